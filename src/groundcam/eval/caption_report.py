"""`groundcam eval captions --report`: the evaluation report of a captioning run, written by the
same page as the other evaluations (`groundcam.viz.report`). Its cards are words: the best hits
and worst misses among the scored words of the reference captions (teacher-forced) and of the
model's own captions, each word's map explained again for its picture."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from groundcam.eval.caption_pointing import CaptionSample, _align, word_maps
from groundcam.viz.report import Example, select_examples, write_eval_report

WORD_SETS = ("reference", "generated")


def word_records(records: list[dict]) -> list[dict]:
    """One report record per scored word of every image (`uid` image/set/reference/word): its
    boxes, pointed pixel and hit, its energy as `in_box` when measured. Words without a map
    (the decoded text lost them) and words naming no object have nothing to show."""
    out = []
    for rec in records:
        if "error" in rec:
            continue
        for key in WORD_SETS:
            for h in rec.get(key, []):
                if h.get("ungrounded") or h.get("missing"):
                    continue
                ref = h.get("ref", 0) if key == "reference" else 0
                out.append(
                    {
                        "uid": f"{rec['image_id']}/{key}/{ref}/{h['index']}",
                        "image_id": rec["image_id"],
                        "phrase": h["word"],
                        "kind": f"{key} word",
                        "boxes": h["boxes"],
                        "point": h["point"],
                        "hit": h["hit"],
                        "in_box": h.get("energy"),
                        "set": key,
                        "ref": ref,
                        "index": h["index"],
                    }
                )
    return out


def report_summary(summary: Mapping[str, Any]) -> tuple[dict, list[tuple[str, str, Any]]]:
    """The page's summary of a captions run (the headline is the reference words' pointing,
    scored on the same words for every model; else the generated words'), with BLEU-4 and
    CIDEr-D, the run's options as its configuration, and its tables (by word set, by word)."""
    blocks = {k: summary.get(f"{k}_word_pointing") for k in WORD_SETS}
    headline = next((b for b in blocks.values() if b and b.get("n")), None) or {}
    captions = summary.get("captions") or {}
    shown = {k: v for k, v in headline.items() if k in ("accuracy", "n", "hits", "ci95")}
    shown |= {k: captions[k] for k in ("bleu4", "cider_d") if k in captions}
    shown["errors"] = summary.get("errors")
    options = ("images", "errors", "captions", "reader", *(f"{k}_word_pointing" for k in WORD_SETS))
    shown["config"] = {k: v for k, v in summary.items() if k not in options}
    by_set = {f"{k} words": b for k, b in blocks.items() if b}
    groups = [("By word set", "words", by_set)]
    groups += [(f"By {k} word", "word", b.get("per_word")) for k, b in blocks.items() if b]
    return shown, groups


def write_caption_report(
    out: str | Path,
    summary: dict,
    records: list[dict],
    explainer,
    samples: Iterable[CaptionSample],
    k: int = 8,
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    """`out/report.html` for a captions run: `summary` and `records` as `eval captions` wrote
    them, `samples` the run's images again (only those of the chosen words are loaded and
    explained); `defaults` are the options' unset values, left out of the configuration."""
    best, worst = select_examples(word_records(records), k)
    chosen = {r["image_id"] for r in best + worst}
    pictures = {}
    for sample in samples:
        if sample.image_id in chosen:
            try:
                pictures[sample.image_id] = _word_maps(explainer, sample, summary, best + worst)
            except (OSError, ValueError):  # the file changed since it was scored: no picture
                continue
    shown, groups = report_summary(summary)
    shown["config"]["score"] = "p"
    if shown["config"].get("layer") is None:  # the family's layer: the records name it
        layers = [r["layer"] for r in records if r.get("layer") is not None]
        shown["config"]["layer"] = layers[0] if layers else None

    def examples(words: list[dict]) -> list[Example]:
        result = []
        for word in words:
            image, maps = pictures.get(word["image_id"], (None, {}))
            found = maps.get((word["set"], word["ref"], word["index"]))
            if found is not None:  # else the word reads differently now: no picture to show
                heatmap, score, text = found
                result.append(Example(word | {"score": score, "text": text}, image, heatmap))
        return result

    title = f"groundcam eval captions: {summary.get('dataset')} ({summary.get('model')})"
    path = Path(out) / "report.html"
    return write_eval_report(
        path, shown, examples(best), examples(worst), title, defaults=defaults, groups=groups
    )


def _word_maps(explainer, sample: CaptionSample, run: Mapping[str, Any], words: list[dict]):
    """The sample's image and, per chosen word of it (set, reference, word index), its map, its
    probability and the caption it belongs to, explained as `caption_records` explained it."""
    image = sample.load_image()
    method, layer = run.get("method"), run.get("layer")
    mine = [w for w in words if w["image_id"] == sample.image_id]
    maps = {}
    if any(w["set"] == "generated" for w in mine):
        gen = explainer.explain_generation(
            image,
            method=method,
            layer=layer,
            max_new_tokens=run.get("max_new_tokens"),
            beam=run.get("beam", 1),
        )
        _, rows = word_maps(gen, explainer)
        for w in mine:
            if w["set"] == "generated" and w["index"] in rows:
                row = rows[w["index"]]
                maps[("generated", 0, w["index"])] = (
                    gen.maps[row],
                    float(gen.scores[row]),
                    gen.text,
                )
    for j in sorted({w["ref"] for w in mine if w["set"] == "reference"}):
        tokens = sample.grounded[j][0]
        ref = explainer.explain_generation(image, method=method, layer=layer, text=" ".join(tokens))
        ref_words, rows = word_maps(ref, explainer)
        if ref_words != tokens:
            rows = _align(tokens, ref_words, rows)
        for w in mine:
            if w["set"] == "reference" and w["ref"] == j and w["index"] in rows:
                row = rows[w["index"]]
                maps[("reference", j, w["index"])] = (
                    ref.maps[row],
                    float(ref.scores[row]),
                    ref.text,
                )
    return image, maps
