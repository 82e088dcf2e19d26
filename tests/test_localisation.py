"""Object masks (shapes generator, Karpathy files, COCO instances) and TAM's word localisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from groundcam.data import shapes
from groundcam.data.masks import (
    decode_mask,
    encode_mask,
    label_mask,
    read_coco_masks,
    read_karpathy_masks,
)
from groundcam.data.shapes import SHAPES, generate_scene, shape_polygon
from groundcam.data.shapes_captions import write_dataset
from groundcam.errors import InputError

COCO = Path(__file__).parent / "fixtures" / "coco_real"


def _scene_with_spies(monkeypatch, split: str, index: int, size: int = 96):
    """A scene, its background before any shape was drawn, and each shape's (shape, x, y, side)."""
    backgrounds, drawn = [], []
    background, draw_shape = shapes._background, shapes._draw_shape

    def spy_background(rng, image_size):
        image = background(rng, image_size)
        backgrounds.append(image.copy())
        return image

    def spy_draw(draw, shape, x, y, side, **style):
        if draw.mode == "RGB":  # the scene, not a mask
            drawn.append((shape, x, y, side))
        draw_shape(draw, shape, x, y, side, **style)

    monkeypatch.setattr(shapes, "_background", spy_background)
    monkeypatch.setattr(shapes, "_draw_shape", spy_draw)
    scene = generate_scene(split, index, 0, size)
    return scene, np.asarray(backgrounds[0]), drawn


@pytest.mark.parametrize(("split", "index"), [("test", 0), ("test", 1), ("compositional", 2)])
def test_shape_masks_are_the_pixels_the_scene_changed(monkeypatch, split, index):
    scene, background, _ = _scene_with_spies(monkeypatch, split, index)
    changed = np.any(np.asarray(scene.image) != background, axis=-1)
    masks = [decode_mask(o["mask"], 96, 96, "scene") for o in scene.meta["objects"]]
    assert sum(m.astype(int) for m in masks).max() == 1  # objects do not overlap
    assert np.array_equal(np.logical_or.reduce(masks), changed)
    for o, m in zip(scene.meta["objects"], masks, strict=True):
        ys, xs = np.nonzero(m)  # the box is the fill's: the outline adds at most a pixel
        x0, y0, x1, y1 = o["box"]
        assert x0 - 1 <= xs.min() <= x0 and y0 - 1 <= ys.min() <= y0
        assert x1 <= xs.max() + 1 <= x1 + 1 and y1 <= ys.max() + 1 <= y1 + 1
    for phrase in scene.phrases:
        target = scene.meta["objects"][phrase.meta["target"]]
        assert phrase.masks == [target["mask"]]


def _edge_distance(points: list[tuple[float, float]], size: int) -> np.ndarray:
    """Per pixel centre, its distance to the closed polygon's outline."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    dist = np.full((size, size), np.inf)
    for (ax, ay), (bx, by) in zip(points, points[1:] + points[:1], strict=True):
        vx, vy = bx - ax, by - ay
        t = np.clip(((xx - ax) * vx + (yy - ay) * vy) / (vx * vx + vy * vy), 0, 1)
        dist = np.minimum(dist, np.hypot(xx - ax - t * vx, yy - ay - t * vy))
    return dist


def test_shape_masks_match_their_rasterised_polygons(monkeypatch):
    """pycocotools' raster of the shape's polygon (shifted by half a pixel: COCO's pixel i spans
    [i, i+1), PIL's is centred on i) equals the mask away from the outline; they differ only on
    the band within 1.5 px of the edge, where PIL draws the outline and rounds vertices."""
    seen = set()
    for index in range(12):
        scene, _, drawn = _scene_with_spies(monkeypatch, "test", index)
        monkeypatch.undo()
        for o, (shape, x, y, side) in zip(scene.meta["objects"], drawn, strict=True):
            seen.add(shape)
            mask = decode_mask(o["mask"], 96, 96, "scene")
            points = shape_polygon(shape, x, y, side)
            polygon = [v + 0.5 for point in points for v in point]
            raster = coco_mask.decode(coco_mask.frPyObjects([polygon], 96, 96)[0]).astype(bool)
            assert _edge_distance(points, 96)[mask ^ raster].max(initial=0) <= 1.5, shape
            assert (mask & raster).sum() / (mask | raster).sum() > 0.6, shape
    assert seen == set(SHAPES)


def test_rle_round_trip_and_uncompressed_rle():
    mask = np.zeros((5, 7), bool)
    mask[1:4, 2:6] = True
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [5, 7]
    assert np.array_equal(decode_mask(json.loads(json.dumps(rle)), 5, 7, "x"), mask)
    # uncompressed RLE: column-major run lengths starting with background
    counts = [11, 3, 2, 3, 2, 3, 2, 3, 6]
    assert counts == _runs(mask)
    assert np.array_equal(decode_mask({"size": [5, 7], "counts": counts}, 5, 7, "x"), mask)


def test_mask_of_another_size_is_one_line_naming_the_file():
    rle = encode_mask(np.ones((4, 4), bool))
    with pytest.raises(InputError, match=r"^f\.json: ann 3: mask size \[4, 4\].*\[5, 4\]"):
        decode_mask(rle, 5, 4, "f.json: ann 3")
    with pytest.raises(InputError, match="f.json: unreadable segmentation"):
        decode_mask([[1, 2, 3]], 5, 4, "f.json")


def test_coco_fixture_masks_decode(tmp_path):
    masks = read_coco_masks(COCO / "instances.json")
    data = json.loads((COCO / "instances.json").read_text())
    assert list(masks) == [39769]
    instances = masks[39769]
    assert [m.category for m in instances] == ["remote", "remote", "couch", "bed", "cat", "cat"]
    for inst, ann in zip(instances, data["annotations"], strict=True):
        assert inst.mask.shape == (480, 640) and inst.id == ann["id"]
        # COCO's area is the polygon's; the raster differs from it by its boundary only
        assert inst.mask.sum() == pytest.approx(ann["area"], rel=0.05)
        ys, xs = np.nonzero(inst.mask)
        x, y, w, h = ann["bbox"]
        assert abs(xs.min() - x) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
    labels = label_mask([(m.category_id, m.mask) for m in instances], 480, 640)
    assert set(np.unique(labels)) == {0, 17, 63, 65, 75}
    # the same masks as compressed and uncompressed RLE read the same
    data["annotations"][0]["segmentation"] = encode_mask(instances[0].mask)
    runs = _runs(instances[1].mask)
    data["annotations"][1]["segmentation"] = {"size": [480, 640], "counts": runs}
    data["annotations"][1]["iscrowd"] = 1
    (tmp_path / "i.json").write_text(json.dumps(data))
    again = read_coco_masks(tmp_path / "i.json")[39769]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(again, instances, strict=True))


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: alternating run lengths, column-major, background first."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_coco_missing_category_or_wrong_size_is_one_line_naming_the_file(tmp_path):
    data = json.loads((COCO / "instances.json").read_text())
    data["categories"] = [c for c in data["categories"] if c["name"] != "couch"]
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"a\.json: annotation 1605237: category 63 is not in"):
        read_coco_masks(tmp_path / "a.json")
    data = json.loads((COCO / "instances.json").read_text())
    data["annotations"][2]["segmentation"] = encode_mask(np.ones((48, 64), bool))
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"b\.json: annotation 1605237: mask size \[48, 64\]"):
        read_coco_masks(tmp_path / "b.json")


def test_shapes_captions_files_carry_masks(tmp_path):
    path = write_dataset(tmp_path, {"test": 3}, seed=0, image_size=64)
    masks = read_karpathy_masks(path, tmp_path / "images")
    data = json.loads(path.read_text())
    for entry in data["images"]:
        scene = generate_scene("test", int(entry["filename"].split("-")[-1][:-4]), 0, 64)
        sentence = entry["sentences"][0]
        words = masks[entry["filename"]][0]
        assert sorted(words) == [g["token"] for g in sentence["grounding"]]
        for g in sentence["grounding"]:
            (obj,) = [o for o in scene.meta["objects"] if list(o["box"]) == g["boxes"][0]]
            assert g["masks"] == [obj["mask"]]
            assert np.array_equal(words[g["token"]][0], decode_mask(obj["mask"], 64, 64, "x"))
            assert sentence["tokens"][g["token"]] in (obj["colour"], obj["shape"])
    # a mask of another size than its image: one line naming the file and the item
    data["images"][0]["sentences"][0]["grounding"][0]["masks"] = [encode_mask(np.ones((8, 8)))]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"dataset_shapes\.json: images\[0\]\.sentences\[0\]"):
        read_karpathy_masks(path, tmp_path / "images")
