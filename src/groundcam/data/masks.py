"""Object masks as COCO run-length encodings, read and written with `pycocotools.mask` as the COCO
tools do: shapes scenes carry each object's exact pixels, and COCO `instances.json` files give
polygons, compressed RLE or uncompressed RLE, all decoded to `[H, W]` boolean arrays."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask

from groundcam.data.textfile import read_json
from groundcam.errors import InputError

Rle = dict[str, Any]  # {"size": [height, width], "counts": str}, JSON-ready


def encode_mask(mask: np.ndarray) -> Rle:
    """A boolean `[H, W]` mask as compressed COCO RLE with a text `counts`, so it goes into JSON."""
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, compressed RLE or uncompressed RLE) as a boolean `[H, W]`
    mask of an image `height` x `width`; InputError naming `where` when it is malformed or its
    size is not the image's."""
    try:
        if isinstance(segmentation, list):
            polygons = [[float(v) for v in p] for p in segmentation]
            if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
                raise ValueError("a polygon needs at least 3 x, y pairs")
            rle = coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))
        elif isinstance(segmentation, dict) and "counts" in segmentation:
            size = [int(v) for v in segmentation.get("size", ())]
            if size != [height, width]:
                raise InputError(
                    f"{where}: mask size {size} (height, width) does not match its image's "
                    f"{[height, width]}"
                )
            counts = segmentation["counts"]
            if isinstance(counts, list):  # uncompressed RLE (iscrowd annotations)
                rle = coco_mask.frPyObjects({"size": size, "counts": counts}, height, width)
            else:
                rle = {"size": size, "counts": counts}
        else:
            raise ValueError("expected a list of polygons or an RLE {'size', 'counts'}")
        with warnings.catch_warnings():  # pycocotools' copy=False under NumPy 2 (harmless)
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = coco_mask.decode(rle)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{where}: unreadable segmentation ({e})") from None
    if mask.shape != (height, width):
        raise InputError(
            f"{where}: mask decodes to {list(mask.shape)}, expected its image's {[height, width]}"
        )
    return mask.astype(bool)


@dataclass
class InstanceMask:
    """One COCO instance: its annotation id, category id and name, and its pixels."""

    id: int
    category_id: int
    category: str
    mask: np.ndarray


def read_coco_masks(path: str | Path) -> dict[int, list[InstanceMask]]:
    """Per image id, the instance masks of a COCO `instances.json`; InputError naming the file for
    an annotation whose category or image is not in the file or whose mask does not fit its image."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise InputError(
            f"{path}: expected an object with 'images', 'annotations' and 'categories' lists"
        )
    try:
        images = {im["id"]: (int(im["height"]), int(im["width"])) for im in data["images"]}
        names = {c["id"]: str(c["name"]) for c in data["categories"]}
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: an image or category entry lacks {e}") from None
    out: dict[int, list[InstanceMask]] = {}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotation {ann.get('id', i) if isinstance(ann, dict) else i}"
        if not isinstance(ann, dict) or "segmentation" not in ann:
            raise InputError(f"{where}: no 'segmentation'")
        if ann.get("category_id") not in names:
            raise InputError(f"{where}: category {ann.get('category_id')!r} is not in the file")
        if ann.get("image_id") not in images:
            raise InputError(f"{where}: image {ann.get('image_id')!r} is not in the file")
        mask = decode_mask(ann["segmentation"], *images[ann["image_id"]], where)
        cat = ann["category_id"]
        out.setdefault(ann["image_id"], []).append(
            InstanceMask(int(ann.get("id", i)), cat, names[cat], mask)
        )
    return out


def label_mask(masks: list[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """An `[H, W]` map of category ids (0: background) from `(category id, mask)` pairs; where
    instances overlap the smaller one wins, so that a remote on a couch stays a remote."""
    labels = np.zeros((height, width), dtype=np.int64)
    for category, mask in sorted(masks, key=lambda m: -int(m[1].sum())):
        labels[mask] = category
    return labels


def read_karpathy_masks(path: str | Path, images: str | Path) -> dict[str, list[dict[int, list]]]:
    """Per image file name, per sentence, `{token index: [mask, ...]}` of the grounded words of a
    Karpathy-layout file whose `grounding` items carry `masks` (as `groundcam data
    shapes-captions` writes); each mask is checked against the size of its image in `images`."""
    from PIL import Image

    path = Path(path)
    data = read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise InputError(f'{path}: not a Karpathy split file: expected {{"images": [...]}}')
    out: dict[str, list[dict[int, list]]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise InputError(f"{path}: images[{i}] has no 'filename'")
        name = entry["filename"]
        try:
            with Image.open(Path(images) / name) as im:
                width, height = im.size
        except OSError as e:
            raise InputError(f"{path}: image {name} of images[{i}] cannot be read ({e})") from None
        sentences = []
        for j, sentence in enumerate(entry.get("sentences") or []):
            words: dict[int, list] = {}
            for m, item in enumerate(sentence.get("grounding") or []):
                where = f"{path}: images[{i}].sentences[{j}].grounding[{m}] ({name})"
                if not isinstance(item, dict) or not isinstance(item.get("masks"), list):
                    raise InputError(f"{where}: no 'masks' list")
                words[item.get("token")] = [
                    decode_mask(s, height, width, where) for s in item["masks"]
                ]
            sentences.append(words)
        out[name] = sentences
    return out
