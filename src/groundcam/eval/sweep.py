"""`groundcam sweep-layers`: the pointing accuracy of one method at every layer, so a layer is
picked from evidence (ALBEF uses block 8, LAVIS 6, others 7) rather than folklore."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from groundcam.eval.datasets import Units
from groundcam.eval.runner import EvalConfig, Processes, run_eval


def sweep_layers_of(explainer, cfg: EvalConfig) -> list[int]:
    """Every layer of the source `cfg.method` reads on this model."""
    method = explainer.resolve(cfg.method, None, cfg.target).method
    if method.all_layers:
        raise ValueError(f"method {method.name!r} uses every layer at once; nothing to sweep")
    return explainer.layers(method.name, cfg.target)


def sweep(
    cfg: EvalConfig,
    units: Units,
    explainer,
    out: str | Path,
    layers: list[int] | None = None,
    procs: Processes | None = None,
    progress: bool = True,
) -> dict | None:
    """One resumable evaluation per layer in `out/layer-<k>/`; the table (main process only)
    goes to `sweep.json` and `sweep.tsv`, with the best layer where there is one (`best_layer`)."""
    procs = procs or Processes()
    valid = sweep_layers_of(explainer, cfg)
    layers = valid if layers is None else layers
    bad = [k for k in layers if k not in valid]
    if bad:
        raise ValueError(f"--layers {bad}: not layers of this model's source; valid are {valid}")
    out = Path(out)
    rows = []
    for layer in layers:
        result = run_eval(
            replace(cfg, layer=layer), units, explainer, out / f"layer-{layer}", procs, progress
        )
        if result.summary is not None:
            s = result.summary
            keys = ("accuracy", "n", "hits", "ci95")
            rows.append({"layer": layer} | {k: s[k] for k in keys})
    if not procs.is_main:
        return None
    best, tied = best_layer(rows)
    table = {"config": replace(cfg, layer=None).__dict__ | {"splits": list(cfg.splits)}}
    table |= {"layers": rows, "best_layer": best, "tied": tied}
    (out / "sweep.json").write_text(json.dumps(table, indent=1) + "\n")
    lines = ["layer\taccuracy\tci95_low\tci95_high\tn"]
    for r in rows:
        lo, hi = r["ci95"] or (None, None)
        lines.append(f"{r['layer']}\t{r['accuracy']}\t{lo}\t{hi}\t{r['n']}")
    (out / "sweep.tsv").write_text("\n".join(lines) + "\n")
    return table


def best_layer(rows: list[dict]) -> tuple[int | None, list[int]]:
    """(best layer, tied layers) of sweep rows (`layer`, `accuracy`, `ci95`). The most accurate
    layer (the lower one on equal accuracy) is the best only when its 95% interval lies wholly
    above the next one's: otherwise the data cannot tell them apart, and every layer whose
    interval reaches the leader's is tied with it (best None; tied from the most accurate)."""
    scored = [r for r in rows if r["accuracy"] is not None and r.get("ci95")]
    if not scored:
        return None, []
    ranked = sorted(scored, key=lambda r: (-r["accuracy"], r["layer"]))
    low = ranked[0]["ci95"][0]
    tied = [r["layer"] for r in ranked if r["ci95"][1] >= low]
    return (ranked[0]["layer"], []) if len(tied) == 1 else (None, tied)


def layer_mark(table: dict, layer: int) -> str:
    """What the sweep's table says beside `layer`: "<- best", "tied" or nothing."""
    if layer == table.get("best_layer"):
        return "<- best"
    return "tied" if layer in table.get("tied", []) else ""
