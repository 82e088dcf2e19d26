"""One table of every method on a model (issue 19): pointing with 95% Wilson intervals, TAM's word
IoUs where words apply, deletion and insertion AUC, the sanity verdict and CPU time per map, and
the best method marked only where its interval separates from the next best.

Each family is scored by the protocol its built-in was made for: phrase pointing on shapes scenes
(ALBEF, `eval.shapes`), the object words of the model's own captions (captioners and generative
VLMs, `eval.caption_pointing`), or every generated character on its glyphs (OCR,
`eval.glyphs`). `benchmarks/methods_table.py` runs it over the built-ins and writes the table.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from groundcam.eval import sanity
from groundcam.eval.caption_pointing import (
    caption_records,
    shapes_samples,
    summarize_captions,
    word_maps,
)
from groundcam.eval.faithfulness import faithfulness, token_curves
from groundcam.eval.glyphs import glyph_records
from groundcam.eval.shapes import shapes_records
from groundcam.eval.summary import accuracy_block
from groundcam.explainer import supported_methods

SPLIT = "test"
PROTOCOLS = {  # family -> how its maps are scored
    "albef": "phrase pointing",
    "captioner": "word pointing",
    "vision-encoder-decoder": "glyph pointing",
}
VLM_PROTOCOL = "word pointing"


def protocol(explainer) -> str:
    """The protocol a model is scored by (its family's; generative VLMs: word pointing)."""
    if getattr(explainer.adapter, "vlm", False):
        return VLM_PROTOCOL
    if explainer.family not in PROTOCOLS:
        raise ValueError(f"no methods-table protocol for the {explainer.family} family")
    return PROTOCOLS[explainer.family]


def best_method(rows: dict[str, dict]) -> dict:
    """The best method by pointing accuracy, named only where the lower end of its 95% interval
    lies above the upper end of the next best's; otherwise None, with every method whose interval
    overlaps the top one's listed as `tied`."""
    ranked = sorted(
        ((m, r["pointing"]) for m, r in rows.items() if r["pointing"]["n"]),
        key=lambda item: -item[1]["accuracy"],
    )
    if not ranked:
        return {"best": None, "tied": []}
    top, block = ranked[0]
    low = block["ci95"][0]
    tied = [m for m, b in ranked[1:] if b["ci95"][1] >= low]
    if not tied:
        return {"best": top, "tied": []}
    return {"best": None, "tied": [top, *tied]}


class _Timed:
    """An explainer that keeps each explanation it makes with the CPU seconds it took, so that
    the existing record generators can be read for their maps without explaining twice."""

    def __init__(self, explainer):
        self._explainer = explainer
        self.calls: list[tuple[tuple, object, float]] = []

    def __getattr__(self, name: str):
        return getattr(self._explainer, name)

    def _run(self, fn, args, kwargs):
        start = time.process_time()
        out = fn(*args, **kwargs)
        self.calls.append((args, out, time.process_time() - start))
        return out

    def explain(self, *args, **kwargs):
        return self._run(self._explainer.explain, args, kwargs)

    def explain_generation(self, *args, **kwargs):
        return self._run(self._explainer.explain_generation, args, kwargs)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _faith(curves: list) -> dict:
    return {
        "deletion_auc": _mean([c.deletion_auc for c in curves]),
        "insertion_auc": _mean([c.insertion_auc for c in curves]),
        "faithfulness_n": len(curves),
    }


def _per_map(calls: list[tuple[tuple, object, float]]) -> float | None:
    """The median CPU seconds per map over the calls (a call's seconds / its maps)."""
    each = [s / len(out) for _, out, s in calls if len(out)]
    return statistics.median(each) if each else None


def _new_calls(timed: _Timed, seen: int) -> Iterator[tuple[int, tuple, object]]:
    """The calls made since the first `seen`, numbered from 1."""
    for k in range(seen, len(timed.calls)):
        args, out, _ = timed.calls[k]
        yield k + 1, args, out


def phrase_row(explainer, method: str, scenes: int, seed: int, faith: int, steps: int) -> dict:
    """Phrase pointing on `scenes` shapes scenes; deletion/insertion on the first `faith`."""
    timed = _Timed(explainer)
    hits, curves, seen = [], [], 0
    for record in shapes_records(timed, SPLIT, scenes, method, None, seed):
        hits.append(bool(record["hit"]))
        for k, (image, phrases, *_), ex in _new_calls(timed, seen):
            if k <= faith:
                curves += faithfulness(explainer, image, phrases, ex.maps, steps=steps)
        seen = len(timed.calls)
    return {
        "pointing": accuracy_block(sum(hits), len(hits)),
        "unit": "phrases",
        **_faith(curves),
        "seconds_per_map": _per_map(timed.calls),
        "layer": _layer(timed),
    }


def word_row(
    explainer, method: str, scenes: int, seed: int, faith: int, steps: int, max_new_tokens=None
) -> dict:
    """Word pointing of the object words of the model's own captions on `scenes` shapes scenes
    (`generated_word_pointing`), TAM's word IoUs of those captions, and deletion/insertion of
    each scored word's first token on the first `faith` scenes."""
    timed = _Timed(explainer)
    samples = (replace(s, grounded=[]) for s in shapes_samples(SPLIT, scenes, seed))
    records, curves = [], []
    stream = caption_records(timed, samples, method, max_new_tokens=max_new_tokens, metrics=True)
    for record in stream:
        records.append(record)
        if "error" in record or len(timed.calls) > faith:  # an error record explained nothing
            continue
        (image, *_), gen, _ = timed.calls[-1]
        _, rows = word_maps(gen, explainer)
        scored = [w["index"] for w in record.get("generated", []) if "hit" in w]
        tokens = [rows[i] for i in scored if i in rows]
        curves += token_curves(explainer, image, gen, tokens, steps=steps)
    summary = summarize_captions(records)
    block = summary["generated_word_pointing"]
    loc = summary.get("word_localisation", {})
    return {
        "pointing": {k: block[k] for k in ("accuracy", "n", "hits", "ci95")},
        "unit": "generated object words",
        "chance": block.get("chance"),
        "ungrounded_words": block["ungrounded_words"],
        "errors": summary["errors"],  # images that could not be read, left out
        **{k: loc.get(k) for k in ("Obj-IoU", "Func-IoU", "F1-IoU")},
        **_faith(curves),
        "seconds_per_map": _per_map(timed.calls),
        "layer": _layer(timed),
        "bleu4": summary.get("captions", {}).get("bleu4"),
    }


def glyph_row(explainer, method: str, lines: int, seed: int, faith: int, steps: int) -> dict:
    """Token pointing of every generated character on its glyphs on `lines` rendered lines;
    deletion/insertion of every token of the first `faith` lines."""
    timed = _Timed(explainer)
    hits, curves, seen = [], [], 0
    for record in glyph_records(timed, SPLIT, lines, method, seed=seed):
        hits.append(bool(record["hit"]))
        for k, (image, *_), gen in _new_calls(timed, seen):
            if k <= faith:
                curves += token_curves(explainer, image, gen, range(len(gen)), steps=steps)
        seen = len(timed.calls)
    return {
        "pointing": accuracy_block(sum(hits), len(hits)),
        "unit": "generated characters",
        **_faith(curves),
        "seconds_per_map": _per_map(timed.calls),
        "layer": _layer(timed),
    }


def _layer(timed: _Timed):
    layer = timed.calls[0][1].layer if timed.calls else None
    return list(layer) if isinstance(layer, tuple) else layer


def sanity_samples(explainer, scenes: int, seed: int) -> list[tuple[str, object, list[str]]]:
    """What the sanity check explains: shapes phrases (ALBEF), the scene's caption (captioners
    and VLMs, read as one phrase), or the line's text (OCR)."""
    kind = protocol(explainer)
    if kind == "phrase pointing":
        return sanity.shapes_samples(scenes, seed, SPLIT)
    if kind == "glyph pointing":
        return sanity.glyph_samples(scenes, seed, SPLIT)
    return [
        (s.image_id, s.load_image(), s.references[:1]) for s in shapes_samples(SPLIT, scenes, seed)
    ]


def sanity_verdicts(explainer, methods: Sequence[str], scenes: int, seed: int) -> dict:
    """Per method, the cascading randomisation's verdict on `scenes` samples: `passes` or
    `flagged`, the step and layer where it breaks and the final mean |Spearman|."""
    samples = sanity_samples(explainer, scenes, seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = {"model": explainer.name, "scenes": scenes, "seed": seed, "table": True}
        summary = sanity.run_sanity(
            explainer, samples, list(methods), Path(tmp), config, seed, ("cascading",)
        )
    out = {}
    for method, entry in summary["methods"].items():
        if "flagged" not in entry:
            out[method] = {"verdict": "failed", "errors": entry["errors"]}
            continue
        b = entry["breaks_at"]
        out[method] = {
            "verdict": "flagged" if entry["flagged"] else "passes",
            "breaks_at": None if b is None else f"{b['step']}/{len(entry['cascading'])}",
            "final_abs_spearman": entry["final"]["spearman_abs"],
        }
    return out


def model_table(
    explainer,
    scenes: int = 100,
    seed: int = 0,
    faith: int = 20,
    sanity_scenes: int = 5,
    steps: int = 16,
    methods: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
    log=lambda line: None,
) -> dict:
    """Every method (default: all the model supports) on one model: its row per method, the
    best one where separated, and the family default beside it."""
    methods = list(methods or supported_methods(explainer.adapter))
    kind = protocol(explainer)
    rows = {}
    for method in methods:
        start = time.time()
        if kind == "phrase pointing":
            row = phrase_row(explainer, method, scenes, seed, faith, steps)
        elif kind == "glyph pointing":
            row = glyph_row(explainer, method, scenes, seed, faith, steps)
        else:
            row = word_row(explainer, method, scenes, seed, faith, steps, max_new_tokens)
        row["wall_seconds"] = round(time.time() - start, 1)
        rows[method] = row
        log(f"{explainer.name} {method}: {_percent(row['pointing'])} in {row['wall_seconds']} s")
    start = time.time()
    verdicts = sanity_verdicts(explainer, methods, sanity_scenes, seed) if sanity_scenes else {}
    log(f"{explainer.name} sanity: {round(time.time() - start, 1)} s")
    for method, row in rows.items():
        row["sanity"] = verdicts.get(method)
    target = "token" if "token" in explainer.targets else None
    return {
        "protocol": kind,
        "split": SPLIT,
        "scenes": scenes,
        "seed": seed,
        "faithfulness_scenes": min(faith, scenes),
        "steps": steps,
        "sanity_scenes": sanity_scenes,
        "default": explainer.default_method(target),
        "methods": rows,
        **best_method(rows),
    }


def _percent(block: dict) -> str:
    if not block["n"]:
        return "-"
    lo, hi = block["ci95"]
    return f"{block['accuracy']:.1%} [{lo:.1%}, {hi:.1%}]"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(table: dict) -> str:
    """The table (`{"models": {name: model_table(...)}}`) as markdown, one row per model and
    method: the best method in bold with "best", methods tied with the top one marked "tied"."""
    lines = [
        "| model | protocol (n) | method | pointing [95% CI] | Obj-IoU | Func-IoU | F1-IoU "
        "| deletion AUC ↓ | insertion AUC ↑ | sanity | CPU ms / map | |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in table["models"].items():
        order = sorted(t["methods"], key=lambda m: -(t["methods"][m]["pointing"]["accuracy"] or 0))
        for method in order:
            r = t["methods"][method]
            p = r["pointing"]
            mark = "best" if t["best"] == method else "tied" if method in t["tied"] else ""
            shown = f"**`{method}`**" if mark == "best" else f"`{method}`"
            if method == t["default"]:
                shown += " (default)"
            s = r.get("sanity") or {}
            verdict = s.get("verdict", "–")
            if s.get("breaks_at"):
                verdict += f", breaks at {s['breaks_at']}"
            ms = r["seconds_per_map"]
            lines.append(
                f"| `{name}` | {t['protocol']} ({p['n']} {r['unit']}) | {shown} | "
                f"{_percent(p)} | {_num(r.get('Obj-IoU'))} | {_num(r.get('Func-IoU'))} | "
                f"{_num(r.get('F1-IoU'))} | {_num(r['deletion_auc'])} | "
                f"{_num(r['insertion_auc'])} | {verdict} | {_num(ms and ms * 1000, 1)} | {mark} |"
            )
    return "\n".join(lines) + "\n"
