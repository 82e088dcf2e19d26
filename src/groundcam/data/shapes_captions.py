"""Shapes scenes as a captioning dataset whose words are grounded: the caption names the objects
from left to right ("a small red circle, a large blue star and a small green square"), and each
colour and shape word carries the box of the object it names. Written to disk in Karpathy's
split-file layout (`dataset_shapes.json`), with each sentence's grounded words under
`grounding: [{"token": i, "boxes": [[x0, y0, x1, y1]], "masks": [rle]}]` (token indices into
`tokens`; each box's object's pixels as COCO RLE, `groundcam.data.masks`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from groundcam.data.caption_text import tokenize
from groundcam.data.sample import Box, GroundingSample
from groundcam.data.shapes import COLOURS, SHAPES, SIZES, generate_scene

DATASET_FILE = "dataset_shapes.json"


@dataclass
class GroundedCaption:
    """A caption, its tokens, and per token the boxes of the object it names (None: none)."""

    caption: str
    tokens: list[str]
    boxes: list[list[Box] | None]


def left_to_right(sample: GroundingSample) -> GroundedCaption:
    """The caption of a shapes scene naming its objects by the x of their box centres."""
    objects = sorted(sample.meta["objects"], key=lambda o: (o["box"][0] + o["box"][2], o["box"][1]))
    items = [f"a {o['size']} {o['colour']} {o['shape']}" for o in objects]
    caption = items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"
    tokens, boxes = [], []
    for k, o in enumerate(objects):
        if k and k == len(objects) - 1:
            tokens.append("and")
            boxes.append(None)
        for word in ("a", o["size"], o["colour"], o["shape"]):
            tokens.append(word)
            boxes.append([tuple(o["box"])] if word in (o["colour"], o["shape"]) else None)
    assert tokens == tokenize(caption)
    return GroundedCaption(caption, tokens, boxes)


def ground_generated(sample: GroundingSample, words: list[str]) -> list[list[Box] | None]:
    """For the words of a generated caption, the boxes of the objects they name: a colour or
    shape word inside an "a [size] colour shape" chunk names the one object with those
    attributes. Such a word whose chunk fits no object, or several, gets `[]` (it names nothing
    in the image); words that are not colours or shapes get None."""
    out: list[list[Box] | None] = [[] if w in (*COLOURS, *SHAPES) else None for w in words]
    objects = sample.meta["objects"]
    k = 0
    while k < len(words):
        if words[k] != "a":
            k += 1
            continue
        end = k + 1
        while end < len(words) and words[end] in (*SIZES, *COLOURS, *SHAPES) and end - k <= 3:
            end += 1
        chunk = {w: i for i, w in enumerate(words[k + 1 : end], k + 1)}
        size = next((w for w in chunk if w in SIZES), None)
        colour = next((w for w in chunk if w in COLOURS), None)
        shape = next((w for w in chunk if w in SHAPES), None)
        fits = [
            o
            for o in objects
            if (colour is None or o["colour"] == colour)
            and (shape is None or o["shape"] == shape)
            and (size is None or o["size"] == size)
        ]
        if len(fits) == 1 and (colour or shape):
            for word in (colour, shape):
                if word is not None:
                    out[chunk[word]] = [tuple(fits[0]["box"])]
        k = end
    return out


def write_dataset(
    out: str | Path,
    splits: dict[str, int],
    seed: int = 0,
    image_size: int = 128,
) -> Path:
    """Render `splits` ({split: scenes}) into `out/images/*.png` and `out/dataset_shapes.json`."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images = []
    for split, n in splits.items():
        for i in range(n):
            sample = generate_scene(split, i, seed, image_size)
            name = f"{sample.image_id}.png"
            sample.image.save(out / "images" / name)
            images.append(_entry(sample, name))
    path = out / DATASET_FILE
    path.write_text(json.dumps({"dataset": "shapes", "images": images}) + "\n")
    return path


def _entry(sample: GroundingSample, filename: str) -> dict:
    g = left_to_right(sample)
    mask_of = {tuple(o["box"]): o["mask"] for o in sample.meta["objects"]}
    grounding = [
        {"token": i, "boxes": [list(b) for b in bs], "masks": [mask_of[tuple(b)] for b in bs]}
        for i, bs in enumerate(g.boxes)
        if bs
    ]
    return {
        "filename": filename,
        "split": sample.split,
        "sentences": [{"raw": g.caption, "tokens": g.tokens, "grounding": grounding}],
        "objects": sample.meta["objects"],
    }


def scenes(split: str, n: int, seed: int, image_size: int = 128) -> Iterable[GroundingSample]:
    return (generate_scene(split, i, seed, image_size) for i in range(n))
