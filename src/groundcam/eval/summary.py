"""summary.json of an evaluation: accuracy with a 95% confidence interval, per split and type."""

from __future__ import annotations

import math
from collections.abc import Iterable

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson_interval(hits: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (sound at 0%, 100% and small n, where
    the normal approximation is not); None when n is 0."""
    if n == 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return low, high


def accuracy_block(hits: int, n: int) -> dict:
    """`{"accuracy", "n", "hits", "ci95"}` (accuracy and interval null when n is 0)."""
    ci = wilson_interval(hits, n)
    return {
        "accuracy": hits / n if n else None,
        "n": n,
        "hits": hits,
        "ci95": list(ci) if ci else None,
    }


def _grouped(records: list[dict], keys_of) -> dict[str, dict]:
    counts: dict[str, list[int]] = {}
    for rec in records:
        for key in keys_of(rec):
            tally = counts.setdefault(key, [0, 0])
            tally[0] += bool(rec["hit"])
            tally[1] += 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1][1], kv[0]))
    return {key: accuracy_block(h, n) for key, (h, n) in ordered}


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(records: list[dict]) -> dict:
    """Accuracy over scored phrases (skipped and errored ones counted apart), then per split
    and per phrase type (a phrase with several types counts in each), the class-averaged
    accuracy (TorchRay's headline, over `kind`) and mean deletion/insertion areas if present."""
    errors = [r for r in records if r.get("error")]
    ok = [r for r in records if not r.get("error")]
    scored = [r for r in ok if r["hit"] is not None]
    hits = sum(bool(r["hit"]) for r in scored)
    out = accuracy_block(hits, len(scored))
    out["skipped"] = sum(bool(r["skipped"]) for r in ok)
    out["flat"] = sum(bool(r.get("flat")) for r in scored)  # maps with no point: misses
    out["errors"] = len(errors)
    # phrases with a word the tokenizer read as unknown (their maps and scores never saw it)
    out["unknown_words"] = sum(bool(r.get("unknown_words")) for r in ok)
    by_kind = _grouped(scored, lambda r: [r["kind"]])
    accs = [b["accuracy"] for b in by_kind.values()]
    out["class_mean_accuracy"] = sum(accs) / len(accs) if accs else None
    out["by_split"] = _grouped(scored, lambda r: [r["split"]])
    out["by_type"] = _grouped(scored, lambda r: r.get("types") or [r["kind"]])
    for metric in ("deletion_auc", "insertion_auc"):
        if any(metric in r for r in ok):
            out[metric] = _mean(r.get(metric) for r in ok)
    if errors:
        out["error_examples"] = sorted({r["error"] for r in errors})[:10]
    return out
