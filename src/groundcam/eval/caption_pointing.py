"""Word pointing for captioning families (the attention captioner, BLIP captioning, TrOCR-style
encoder-decoders): each word that names an object is scored by its map with the `amc` hit rule
(the map's first maximum, upsampled bicubic to the image, strictly inside one of the word's boxes).

Two word sets are scored:

- **reference**: every grounded word of a reference caption, teacher-forced
  (`explain_generation(image, text=caption)`), so every model is scored on the same words;
- **generated**: the words of the model's own caption that the dataset can ground (shapes:
  a colour or shape word inside an "a [size] colour shape" chunk that fits exactly one object);
  words naming no object are counted as ungrounded.

A word's map is the map of its first token (subword tokenisers split words); which tokens make a
word is read from the decoded text, so any tokenizer works. BLEU-1..4 and CIDEr-D of the generated
captions are computed as the COCO caption evaluation does (`groundcam.eval.captions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from groundcam.data.caption_text import tokenize
from groundcam.data.captions import (
    SPLITS,
    VAL_FRACTION,
    by_image,
    detect_layout,
    find_caption_file,
    is_val_image,
    read_captions,
)
from groundcam.data.sample import Box, ReadReport
from groundcam.data.textfile import read_json
from groundcam.errors import InputError
from groundcam.eval.localisation import (
    energy_pointing,
    generation_word_ious,
    shapes_labels,
    summarise_word_ious,
)
from groundcam.eval.pointing import pointing_game
from groundcam.eval.summary import accuracy_block
from groundcam.io import read_image

FLAT_SPLITS = ("all", "val", "train")  # --split of a caption file without splits


@dataclass
class CaptionSample:
    """One image: its reference captions, the grounded ones (tokens + boxes per token), and a
    function that grounds the words of a generated caption (None: the dataset cannot)."""

    image_id: str
    load_image: Callable[[], Image.Image]
    references: list[str]
    grounded: list[tuple[list[str], list[list[Box] | None]]] = field(default_factory=list)
    ground_generated: Callable[[list[str]], list[list[Box] | None]] | None = None
    # the image's category ids [H, W] and categories by name, for TAM's word IoUs (None: no masks)
    labels: Callable[[], tuple[Any, dict[str, int]]] | None = None


def word_starts(explainer, token_ids: list[int]) -> list[int | None]:
    """For each generated token, the index of the word it starts (None: it continues a word or
    is punctuation), read from how the decoded prefix grows."""
    out: list[int | None] = []
    words = 0
    for k in range(len(token_ids)):
        n = len(tokenize(explainer.decode(token_ids[: k + 1])))
        out.append(words if n > words else None)
        words = max(words, n)
    return out


def word_maps(gen, explainer) -> tuple[list[str], dict[int, int]]:
    """The words of a generation explanation and, per word index, the row of its first token."""
    starts = word_starts(explainer, gen.token_ids)
    rows = {w: k for k, w in enumerate(starts) if w is not None}
    return tokenize(gen.text), rows


def _score(gen, size, words, boxes, rows, energy: bool = False) -> Iterator[dict]:
    """Hit records of the grounded words; `[]` boxes (an object word that names no object) give
    an `ungrounded` record, not a hit or a miss. With `energy`, also the map's mass share in the
    boxes (the energy-based pointing game)."""
    maps = None
    height, width = size
    for i, (word, bs) in enumerate(zip(words, boxes, strict=False)):
        if bs is None:
            continue
        if not bs:
            yield {"word": word, "index": i, "ungrounded": True}
            continue
        record = {
            "word": word,
            "index": i,
            "boxes": [list(b) for b in bs],
            "chance": _area_share(bs, size),
            "centre_hit": any(
                x0 < width / 2 < x1 and y0 < height / 2 < y1 for x0, y0, x1, y1 in bs
            ),
        }
        row = rows.get(i)
        if row is None:  # the decoded text lost the word (an unknown token, a merge)
            yield {**record, "hit": False, "point": None, "missing": True}
            continue
        if maps is None:
            maps = gen.resize(size)
        r = pointing_game(maps[row], bs, protocol="amc")
        if energy:
            record["energy"] = energy_pointing(maps[row], bs)
        yield {**record, "hit": bool(r.hit), "point": list(r.point), "flat": bool(r.flat)}


def _area_share(boxes: list[Box], size: tuple[int, int]) -> float:
    """The share of pixels strictly inside any box: a uniformly random point's hit chance."""
    height, width = size
    covered = 0
    for y in range(height):
        spans = sorted(
            (max(0, math.floor(x0) + 1), min(width - 1, math.ceil(x1) - 1))
            for x0, y0, x1, y1 in boxes
            if y0 < y < y1
        )
        end = -1
        for a, b in spans:
            if b < a:
                continue
            covered += max(0, b - max(a, end + 1) + 1)
            end = max(end, b)
    return covered / (height * width)


def caption_records(
    explainer,
    samples: Iterable[CaptionSample],
    method: str | None = None,
    layer: int | None = None,
    beam: int = 1,
    max_new_tokens: int | None = None,
    metrics: bool = False,
) -> Iterator[dict]:
    """One record per image: the generated caption, its grounded words' hits, and the hits of
    the grounded words of every grounded reference (teacher-forced); with `metrics`, TAM's word
    IoUs of the generated words where the sample has masks (`word_iou`) and every scored word's
    energy-based pointing (`energy`)."""
    for s in samples:
        try:
            image = s.load_image()
        except (OSError, ValueError) as e:  # a broken or missing file is this image's error
            yield {"image_id": s.image_id, "error": str(e).splitlines()[0] if str(e) else repr(e)}
            continue
        size = (image.height, image.width)
        gen = explainer.explain_generation(
            image, method=method, layer=layer, max_new_tokens=max_new_tokens, beam=beam
        )
        words, rows = word_maps(gen, explainer)
        record = {
            "image_id": s.image_id,
            "caption": " ".join(words),
            "references": s.references,
            "method": gen.method,
            "layer": gen.layer,
        }
        if s.ground_generated is not None:
            boxes = s.ground_generated(words)
            record["generated"] = list(_score(gen, size, words, boxes, rows, metrics))
        if metrics and s.labels is not None:
            record["word_iou"] = generation_word_ious(gen, explainer.decode, *s.labels())
        record["reference"] = []
        for j, (tokens, boxes) in enumerate(s.grounded):
            try:
                ref = explainer.explain_generation(
                    image, method=method, layer=layer, text=" ".join(tokens)
                )
            except InputError as e:  # e.g. longer than the model's positions: noted, not fatal
                record.setdefault("skipped_references", []).append(str(e))
                continue
            ref_words, ref_rows = word_maps(ref, explainer)
            if ref_words != tokens:  # the model's tokenizer reads the caption differently
                ref_rows = _align(tokens, ref_words, ref_rows)
            scored = _score(ref, size, tokens, boxes, ref_rows, metrics)
            record["reference"] += [h | {"ref": j} for h in scored]  # j: which reference
        yield record


def _align(tokens: list[str], read: list[str], rows: dict[int, int]) -> dict[int, int]:
    """Word rows for `tokens` when the model's decoding of them reads as `read` (e.g. an uncased
    tokenizer, a dropped word): words matched in order, unmatched ones get no row."""
    out, j = {}, 0
    for i, t in enumerate(tokens):
        k = j
        while k < len(read) and read[k] != t:
            k += 1
        if k < len(read):
            if k in rows:
                out[i] = rows[k]
            j = k + 1
    return out


def summarize_captions(records: list[dict], chance: dict | None = None) -> dict:
    """Caption metrics and word pointing (with 95% Wilson intervals), overall and per word."""
    from groundcam.eval.captions import cider_d, corpus_bleu

    errors = [r for r in records if "error" in r]
    records = [r for r in records if "error" not in r]
    out: dict = {"images": len(records), "errors": len(errors)}
    with_refs = [r for r in records if r["references"]]
    if with_refs:
        hyps = [r["caption"] for r in with_refs]
        refs = [r["references"] for r in with_refs]
        bleu = corpus_bleu(hyps, refs)
        out["captions"] = {f"bleu{n}": b for n, b in enumerate(bleu, 1)}
        out["captions"]["cider_d"] = cider_d(hyps, refs) if len(with_refs) > 1 else None
    for key in ("reference", "generated"):
        if not any(key in r for r in records):
            continue
        words = [h for r in records for h in r[key] if key in r]
        hits = [h for h in words if not h.get("ungrounded")]
        block = accuracy_block(sum(h["hit"] for h in hits), len(hits))
        if hits:
            block["chance"] = sum(h["chance"] for h in hits) / len(hits)
            block["centre"] = sum(h["centre_hit"] for h in hits) / len(hits)
        per_word: dict[str, list[bool]] = {}
        for h in hits:
            per_word.setdefault(h["word"], []).append(h["hit"])
        block["per_word"] = {w: accuracy_block(sum(v), len(v)) for w, v in sorted(per_word.items())}
        energies = [h["energy"] for h in hits if h.get("energy") is not None]
        if energies:
            block["energy"] = sum(energies) / len(energies)
        block["flat"] = sum(bool(h.get("flat")) for h in hits)
        block["missing"] = sum(bool(h.get("missing")) for h in hits)
        if key == "generated":
            block["ungrounded_words"] = len(words) - len(hits)
        out[f"{key}_word_pointing"] = block
    if any("word_iou" in r for r in records):
        out["word_localisation"] = summarise_word_ious(
            [r["word_iou"] for r in records if "word_iou" in r]
        )
    return out


# ----------------------------------------------------------------------------- datasets


def shapes_samples(
    split: str, scenes: int, seed: int = 0, image_size: int = 128
) -> Iterator[CaptionSample]:
    """Freshly generated shapes scenes with their left-to-right caption, grounded per word."""
    from groundcam.data.shapes import generate_scene
    from groundcam.data.shapes_captions import ground_generated, left_to_right

    for i in range(scenes):
        scene = generate_scene(split, i, seed, image_size)
        g = left_to_right(scene)
        yield CaptionSample(
            scene.image_id,
            lambda scene=scene: scene.image,
            [g.caption],
            [(g.tokens, g.boxes)],
            lambda words, scene=scene: ground_generated(scene, words),
            lambda scene=scene: shapes_labels(scene),
        )


def file_split(captions: str | Path, split: str | None) -> str:
    """The split `--dataset file` evaluates: a Karpathy file's own (`train`, `val`, `test`,
    `restval`; default `test`) or `all`; a file without splits (csv, pipe, token layouts) has
    `all` (default: every image), `val` (the images, chosen by a hash of the file name, that
    `train captioner` validates on) and `train` (the others). Anything else is an InputError."""
    captions = _caption_file(captions)
    layout = detect_layout(captions)
    if layout == "karpathy":
        split = split or "test"
        if split != "all" and split not in SPLITS:
            raise InputError(
                f"--split {split}: {captions} is a Karpathy split file; use one of "
                f"{', '.join(SPLITS)} or all"
            )
        return split
    split = split or "all"
    if split not in FLAT_SPLITS:
        raise InputError(
            f"--split {split}: {captions} is a {layout!r} caption file without splits; use all "
            f"(every image), val (the {VAL_FRACTION:.0%} of images, chosen by a hash of the file "
            "name, that `groundcam train captioner` validates on) or train (the other images)"
        )
    return split


def file_samples(
    captions: str | Path,
    images: str | Path,
    split: str | None = None,
    report: ReadReport | None = None,
) -> list[CaptionSample]:
    """Images of a captions file (any layout `read_captions` knows) with their references, in
    `split` (see `file_split`); in a Karpathy-layout file, sentences with
    `grounding: [{"token", "boxes"}]` are scored per word (a malformed grounding item, or one with
    a NaN or infinite box, is skipped and counted in `report.skipped_rows`). Images listed but
    missing are left out (counted by the caller from the report)."""
    root = Path(images)
    report = report if report is not None else ReadReport()
    captions = _caption_file(captions)
    split = file_split(captions, split)
    grounded: dict[str, list] = {}
    if detect_layout(captions) == "karpathy":
        rows = read_captions(captions, split=None if split == "all" else split, report=report)
        grounded = _karpathy_grounding(captions, report)
    else:
        rows = read_captions(captions, report=report)
        if split != "all":
            rows = [c for c in rows if is_val_image(c.image) == (split == "val")]
    out = []
    for name, refs in by_image(rows).items():
        path = root / name
        if not path.is_file():
            continue
        out.append(
            CaptionSample(name, lambda path=path: read_image(path), refs, grounded.get(name, []))
        )
    return out


def _caption_file(captions: str | Path) -> Path:
    """The caption file itself, or the one `find_caption_file` picks in a directory."""
    path = Path(captions)
    return find_caption_file(path) if path.is_dir() else path


def _karpathy_grounding(path: Path, report: ReadReport) -> dict[str, list]:
    """Per image file name, `(tokens, boxes per token)` of each sentence that has `grounding`."""
    grounded: dict[str, list] = {}
    for i, entry in enumerate(read_json(path).get("images", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            continue  # read_captions has reported it
        sentences = entry.get("sentences")
        for j, sent in enumerate(sentences if isinstance(sentences, list) else []):
            g = sent.get("grounding") if isinstance(sent, dict) else None
            tokens = sent.get("tokens") if isinstance(sent, dict) else None
            if not g or not tokens:
                continue
            where = f"{path}:images[{i}].sentences[{j}] ({entry['filename']})"
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                report.skipped_rows += 1
                report.error(where, "'tokens' is not a list of strings; grounding skipped")
                continue
            if not isinstance(g, list):
                report.skipped_rows += 1
                report.error(where, "'grounding' is not a list; grounding skipped")
                continue
            boxes: list = [None] * len(tokens)
            for m, item in enumerate(g):
                try:
                    token, word_boxes = _grounding_item(item, len(tokens))
                except ValueError as e:
                    report.skipped_rows += 1
                    report.error(f"{where}.grounding[{m}]", f"{e}; skipped")
                    continue
                boxes[token] = word_boxes
            grounded.setdefault(entry["filename"], []).append((list(tokens), boxes))
    return grounded


def _grounding_item(item: object, n_tokens: int) -> tuple[int, list[Box]]:
    """A `{"token": i, "boxes": [[x0, y0, x1, y1], ...]}` item as (i, boxes); ValueError saying
    what is wrong (not an object, a token outside the sentence, a box that is not 4 finite
    numbers)."""
    if not isinstance(item, dict):
        raise ValueError(f"expected {{'token': i, 'boxes': [...]}}, got {item!r:.60}")
    token, boxes = item.get("token"), item.get("boxes")
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n_tokens:
        raise ValueError(f"token {token!r:.40} is not an index of the {n_tokens} tokens")
    if not isinstance(boxes, list):
        raise ValueError(f"boxes {boxes!r:.60} is not a list")
    out = []
    for box in boxes:
        if (
            not isinstance(box, list)
            or len(box) != 4
            or any(isinstance(v, bool) or not isinstance(v, int | float) for v in box)
            or not all(math.isfinite(v) for v in box)
        ):
            raise ValueError(f"box {box!r:.60} is not 4 finite numbers [x0, y0, x1, y1]")
        out.append(tuple(float(v) for v in box))
    return token, out
