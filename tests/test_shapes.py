"""Tests for the synthetic shapes grounding benchmark: determinism, geometry, text and splits."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch.utils.data

from groundcam.data import shapes
from groundcam.data.sample import GroundingSample
from groundcam.data.shapes import (
    COLOURS,
    HELD_OUT_PAIRS,
    RGB,
    SHAPES,
    SIZES,
    ShapesDataset,
    generate_scene,
    vocabulary,
)

RELATION_WORDS = ("left of", "right of", "above", "below")


@cache
def scenes(split: str, n: int, image_size: int = 128) -> tuple[GroundingSample, ...]:
    return tuple(generate_scene(split, i, image_size=image_size) for i in range(n))


def fingerprint(sample: GroundingSample) -> str:
    h = hashlib.sha256(sample.image.tobytes())
    h.update(repr((sample.caption, [(p.text, p.boxes, p.kind) for p in sample.phrases])).encode())
    return h.hexdigest()


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def offset(relation: str, target, anchor) -> float:
    """How far target's centre lies in the direction `relation` from anchor's centre."""
    (tx, ty), (ax, ay) = centre(target), centre(anchor)
    return {"left of": ax - tx, "right of": tx - ax, "above": ay - ty, "below": ty - ay}[relation]


def match_description(words: list[str], objects: list[dict]) -> list[int]:
    """Indices of objects fitting "[size] [colour] shape" (every given word must match)."""
    *attrs, shape = words
    out = []
    for i, o in enumerate(objects):
        if o["shape"] != shape:
            continue
        if all(w in (o["colour"], o["size"]) for w in attrs):
            out.append(i)
    return out


def parse_relation(text: str) -> tuple[str, str, list[str]]:
    """Split "the {shape} {relation} the {anchor words}" into its parts."""
    for relation in RELATION_WORDS:
        marker = f" {relation} the "
        if marker in text:
            head, anchor = text.split(marker)
            assert head.startswith("the ")
            return head.removeprefix("the "), relation, anchor.split()
    raise AssertionError(f"no relation in {text!r}")


def test_deterministic_within_and_across_processes():
    a, b = generate_scene("train", 7, seed=3), generate_scene("train", 7, seed=3)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.caption == b.caption and a.phrases == b.phrases and a.meta == b.meta
    assert fingerprint(a) != fingerprint(generate_scene("train", 8, seed=3))
    assert fingerprint(a) != fingerprint(generate_scene("train", 7, seed=4))

    src = Path(__file__).resolve().parents[1] / "src"
    code = (
        "import hashlib; from groundcam.data.shapes import generate_scene as g; "
        "s = g('train', 7, seed=3); h = hashlib.sha256(s.image.tobytes()); "
        "h.update(repr((s.caption, [(p.text, p.boxes, p.kind) for p in s.phrases])).encode()); "
        "print(h.hexdigest())"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == fingerprint(a)


def test_unknown_split_is_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="bogus.*train.*val.*test.*compositional"):
        generate_scene("bogus", 0)
    with pytest.raises(ValueError, match="bogus"):
        ShapesDataset("bogus", 10)


def test_sample_fields():
    s = generate_scene("val", 12, seed=5, image_size=96)
    assert s.image_id == "shapes-val-5-12" and s.split == "val"
    assert s.image.mode == "RGB" and s.image.size == (96, 96) and s.image_size == (96, 96)
    assert [p.id for p in s.phrases] == [f"shapes-val-5-12:{k}" for k in range(len(s.phrases))]
    for p in s.phrases:
        assert set(p.meta) >= {"target", "colour", "shape", "size", "colour_shared"}
        assert set(p.meta) >= {"shape_shared", "novel_pair"}
        assert p.kind in ("attribute", "relation")
    words = s.caption.rstrip(".").replace(",", "").split()
    assert words.count("a") == len(s.meta["objects"])


@pytest.mark.parametrize("image_size", [128, 224])
def test_geometry(image_size):
    for s in scenes("train", 300 if image_size == 128 else 60, image_size):
        objects = s.meta["objects"]
        assert 2 <= len(objects) <= 5
        triples = [(o["size"], o["colour"], o["shape"]) for o in objects]
        assert len(set(triples)) == len(triples)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 < x2 <= image_size and 0 <= y1 < y2 <= image_size
            side = max(x2 - x1, y2 - y1) / image_size
            assert (0.11 <= side <= 0.17) if o["size"] == "small" else (0.2 <= side <= 0.28)
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a["box"], b["box"]
                apart = bx1 >= ax2 + 2 or ax1 >= bx2 + 2 or by1 >= ay2 + 2 or ay1 >= by2 + 2
                assert apart, (s.image_id, a, b)


def test_crowded_scenes_drop_objects_deterministically(monkeypatch):
    def counts() -> list[int]:
        return [
            len(generate_scene("compositional", i, image_size=64).meta["objects"])
            for i in range(100)
        ]

    unconstrained = counts()
    monkeypatch.setattr(shapes, "PLACEMENT_TRIES", 1)
    assert sum(counts()) < sum(unconstrained)
    for i in range(100):
        s = generate_scene("compositional", i, image_size=64)
        assert fingerprint(s) == fingerprint(generate_scene("compositional", i, image_size=64))
        objects = s.meta["objects"]
        assert 2 <= len(objects) <= 5 and s.phrases
        for j, a in enumerate(objects):
            for b in objects[j + 1 :]:
                (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a["box"], b["box"]
                assert bx1 >= ax2 + 2 or ax1 >= bx2 + 2 or by1 >= ay2 + 2 or ay1 >= by2 + 2


def test_all_counts_and_attributes_occur():
    samples = scenes("train", 1000)
    assert {len(s.meta["objects"]) for s in samples} == {2, 3, 4, 5}
    objects = [o for s in samples for o in s.meta["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["size"] for o in objects} == set(SIZES)


def test_attribute_phrases_name_exactly_their_target():
    for s in scenes("train", 300):
        objects = s.meta["objects"]
        attribute = [p for p in s.phrases if p.kind == "attribute"]
        assert sorted(p.meta["target"] for p in attribute) == list(range(len(objects)))
        for p in attribute:
            target = objects[p.meta["target"]]
            assert p.boxes == [target["box"]]
            assert (p.meta["colour"], p.meta["shape"]) == (target["colour"], target["shape"])
            words = p.text.split()
            assert words[0] == "the" and target["colour"] in words and target["shape"] in words
            assert match_description(words[1:], objects) == [p.meta["target"]]


def test_relation_phrases_hold_on_box_centres_and_need_the_relation():
    n_relations = 0
    for s in scenes("train", 1000) + scenes("compositional", 300):
        objects = s.meta["objects"]
        relation_phrases = [p for p in s.phrases if p.kind == "relation"]
        assert len(relation_phrases) <= 2
        for p in relation_phrases:
            n_relations += 1
            shape, relation, anchor_words = parse_relation(p.text)
            t = p.meta["target"]
            assert p.boxes == [objects[t]["box"]] and objects[t]["shape"] == shape
            anchors = match_description(anchor_words, objects)
            assert len(anchors) == 1 and anchors[0] != t
            anchor_box = objects[anchors[0]]["box"]
            same_shape = [i for i, o in enumerate(objects) if o["shape"] == shape]
            assert len(same_shape) > 1, "the shape alone must be ambiguous"
            assert offset(relation, objects[t]["box"], anchor_box) > 0.05 * 128
            for i in same_shape:
                if i != t:
                    assert offset(relation, objects[i]["box"], anchor_box) <= 0, p.text
    assert n_relations >= 300


def test_about_half_of_objects_share_colour_or_shape():
    shared = total = 0
    for s in scenes("train", 1000):
        objects = s.meta["objects"]
        for i, o in enumerate(objects):
            others = objects[:i] + objects[i + 1 :]
            total += 1
            shared += any(q["colour"] == o["colour"] or q["shape"] == o["shape"] for q in others)
    assert 0.4 <= shared / total <= 0.6


def test_sharing_flags_in_phrase_meta():
    for s in scenes("train", 200):
        objects = s.meta["objects"]
        for p in s.phrases:
            t = p.meta["target"]
            others = objects[:t] + objects[t + 1 :]
            assert p.meta["colour_shared"] == any(q["colour"] == p.meta["colour"] for q in others)
            assert p.meta["shape_shared"] == any(q["shape"] == p.meta["shape"] for q in others)
            assert p.meta["novel_pair"] is False


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_held_out_pairs_never_in_ordinary_splits(split):
    for s in scenes(split, 1000 if split == "train" else 500):
        for o in s.meta["objects"]:
            assert (o["colour"], o["shape"]) not in HELD_OUT_PAIRS, s.image_id


def test_compositional_phrases_all_target_held_out_pairs():
    seen_pairs = set()
    for s in scenes("compositional", 300):
        assert s.phrases, s.image_id
        for p in s.phrases:
            pair = (p.meta["colour"], p.meta["shape"])
            assert pair in HELD_OUT_PAIRS and p.meta["novel_pair"] is True
            o = s.meta["objects"][p.meta["target"]]
            assert (o["colour"], o["shape"]) == pair and p.boxes == [o["box"]]
            seen_pairs.add(pair)
    assert seen_pairs == set(HELD_OUT_PAIRS)


def test_pixel_at_box_centre_has_the_object_colour():
    checked = 0
    for s in scenes("train", 200):
        pixels = s.image.load()
        for o in s.meta["objects"]:
            if o["shape"] in ("circle", "square", "diamond", "hexagon", "triangle"):
                x1, y1, x2, y2 = o["box"]
                assert pixels[int((x1 + x2 - 1) // 2), int((y1 + y2 - 1) // 2)] == RGB[o["colour"]]
                checked += 1
    assert checked > 300


def test_background_is_light_and_unlike_the_object_colours():
    bases = set()
    for s in scenes("train", 50):
        pixels = np.asarray(s.image).astype(int)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for o in s.meta["objects"]:
            x1, y1, x2, y2 = (int(v) for v in o["box"])
            outside[y1:y2, x1:x2] = False
        background = pixels[outside]
        assert background.min() >= 180, "background must be light"
        assert (background.max(axis=1) - background.min(axis=1)).max() <= 45, "and pale"
        assert background.std(axis=0).max() > 1, "and textured"
        bases.add(tuple(np.median(background, axis=0)))
    assert len(bases) > 40, "the tint changes from scene to scene"


def test_vocabulary_covers_all_text():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    assert all(w.islower() and w.isalpha() for w in vocab)
    used = set()
    for split in ("train", "compositional"):
        for s in scenes(split, 300):
            texts = [s.caption] + [p.text for p in s.phrases]
            for text in texts:
                used |= set(text.replace(",", "").replace(".", "").split())
    assert used <= set(vocab), used - set(vocab)
    assert {"left", "right", "above", "below"} <= used


def test_splits_are_disjoint():
    train = {s.image.tobytes() for s in scenes("train", 200)}
    assert not train & {s.image.tobytes() for s in scenes("test", 200)}
    assert len(train) == 200


def test_dataset():
    ds = ShapesDataset("val", 5, seed=2, image_size=64)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == 5
    assert fingerprint(ds[3]) == fingerprint(generate_scene("val", 3, seed=2, image_size=64))
    assert fingerprint(ds[-1]) == fingerprint(ds[4])
    assert [s.image_id for s in ds] == [f"shapes-val-2-{i}" for i in range(5)]
    with pytest.raises(IndexError):
        ds[5]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=list)
    assert [len(b) for b in loader] == [2, 2, 1]
