"""Pointing accuracy on the synthetic shapes benchmark, broken down the way DESIGN.md §10 asks."""

from __future__ import annotations

from collections.abc import Iterator

from groundcam.data.shapes import generate_scene
from groundcam.eval.pointing import pointing_game


def shapes_records(
    explainer,
    split: str,
    n_scenes: int,
    method: str = "attn-gradcam",
    layer: int | None = None,
    seed: int = 0,
    image_size: int = 128,
) -> Iterator[dict]:
    """One record per phrase of the first `n_scenes` scenes of `split` (protocol `amc`)."""
    for index in range(n_scenes):
        sample = generate_scene(split, index, seed, image_size)
        ex = explainer.explain(sample.image, [p.text for p in sample.phrases], method, layer)
        upsampled = ex.resize((image_size, image_size))
        for k, phrase in enumerate(sample.phrases):
            result = pointing_game(upsampled[k], phrase.boxes, protocol="amc")
            yield {
                "image_id": sample.image_id,
                "phrase_id": phrase.id,
                "phrase": phrase.text,
                "kind": phrase.kind,
                "hit": result.hit,
                "flat": result.flat,
                "point": list(result.point),
                "score": float(ex.scores[k]),
                "colour_shared": phrase.meta["colour_shared"],
                "shape_shared": phrase.meta["shape_shared"],
                "novel_pair": phrase.meta["novel_pair"],
                "layer": ex.layer,
            }


def _acc(records: list[dict]) -> dict:
    n = len(records)
    return {"accuracy": sum(r["hit"] for r in records) / n if n else float("nan"), "n": n}


def summarize(records: list[dict]) -> dict:
    """Overall accuracy and count, then per phrase kind and for unique vs shared target colour."""
    out = _acc(records)
    out["by_kind"] = {
        k: _acc([r for r in records if r["kind"] == k])
        for k in sorted({r["kind"] for r in records})
    }
    out["colour_unique"] = _acc([r for r in records if not r["colour_shared"]])
    out["colour_shared"] = _acc([r for r in records if r["colour_shared"]])
    return out
