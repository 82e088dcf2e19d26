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
from groundcam.eval.localisation import (
    energy_pointing,
    group_words,
    otsu_threshold,
    resize_uint8,
    summarise_word_ious,
    to_uint8,
    token_pieces,
    word_class,
    word_ious,
)

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


# --- word localisation (TAM's protocol) ---


def _between_class_variances(image: np.ndarray) -> dict[int, float]:
    """Brute force: per threshold t that leaves both classes (<= t, > t) non-empty, w0·w1·(m0−m1)²."""
    values = image.astype(np.float64).ravel()
    out = {}
    for t in range(256):
        low, high = values[values <= t], values[values > t]
        if len(low) and len(high):
            w0, w1 = len(low) / len(values), len(high) / len(values)
            out[t] = w0 * w1 * (low.mean() - high.mean()) ** 2
    return out


def test_otsu_equals_brute_force_search():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (17, 23)),
        np.clip(rng.normal(60, 15, (30, 30)), 0, 255),
        np.concatenate([rng.normal(50, 10, 300), rng.normal(180, 20, 200)]).reshape(20, 25),
        rng.choice([3, 40, 41, 250], size=(9, 9)),  # few levels, long runs of empty bins
        rng.integers(100, 104, (5, 5)),
    ]
    for image in images:
        image = np.clip(image, 0, 255).astype(np.uint8)
        sigma = _between_class_variances(image)
        best = max(sigma.values())
        winners = [t for t, s in sigma.items() if s >= best * (1 - 1e-9)]
        t = otsu_threshold(image)
        assert t in winners
        # all maximisers lie on one run of empty bins: the same split as the first of them
        assert np.array_equal(image > t, image > min(winners))


def test_otsu_known_answers_and_opencv_rules():
    assert otsu_threshold(np.array([[10, 10, 200, 200]], np.uint8)) == 10  # first of the plateau
    assert otsu_threshold(np.array([[10, 10, 10, 200]], np.uint8)) == 10
    assert otsu_threshold(np.full((3, 3), 7, np.uint8)) == 0  # no split: OpenCV returns 0
    # a tie in real numbers between two different splits is broken by OpenCV's floating-point
    # recurrence (the first strictly larger variance wins), which otsu_threshold follows
    assert otsu_threshold(np.array([[0, 100, 200]], np.uint8)) in (0, 100)
    with pytest.raises(InputError, match="uint8"):
        otsu_threshold(np.zeros((2, 2)))


def test_uint8_conversion_and_resize_as_tam_and_opencv():
    # (255·(m−min)/(max−min)) truncated: 127.5 -> 127, 254.745 -> 254
    assert to_uint8(np.array([[0.0, 1.0], [0.5, 0.999]])).tolist() == [[0, 255], [127, 254]]
    assert to_uint8(np.full((2, 2), 3.0)).tolist() == [[0, 0], [0, 0]]
    kept = np.array([[3, 9]], np.uint8)
    assert to_uint8(kept) is kept
    # bilinear, half-pixel centres: weights 1, 3/4, 1/4, 0 per axis, rounded
    out = resize_uint8(np.array([[255, 0], [0, 0]], np.uint8), (4, 4))
    assert out.tolist() == [[255, 191, 64, 0], [191, 143, 48, 0], [64, 48, 16, 0], [0, 0, 0, 0]]
    with pytest.raises(InputError, match="NaN"):
        to_uint8(np.array([[0.0, np.nan]]))


def _labels() -> np.ndarray:
    labels = np.zeros((20, 20), np.int64)
    labels[5:15, 5:15] = 3  # a 10x10 object of category 3
    labels[0:4, 0:5] = 7  # a 4x5 object of category 7
    return labels


def _block(rows: slice, cols: slice, low: int = 0, high: int = 255) -> np.ndarray:
    m = np.full((20, 20), low, np.uint8)
    m[rows, cols] = high
    return m


def test_obj_iou_of_constructed_maps():
    half = _block(slice(5, 15), slice(5, 10))  # half the object: IoU 50/100
    exact = _block(slice(5, 15), slice(5, 15))
    beside = _block(slice(5, 15), slice(10, 20))  # 50 inside, 50 outside: 50/150
    r = word_ious([[half], [half, exact], [beside]], [3, "function", 3], _labels())
    assert r["obj_iou"] == [0.5, pytest.approx(1 / 3)]
    r = word_ious([[half, exact, beside]], [3], _labels())
    assert r["obj_iou"] == [1.0]  # the best token of the word
    # a map at another size is resized to the mask: 10x10 -> 20x20 keeps the block exact
    small = np.zeros((10, 10), np.float32)
    small[2:8, 2:8] = 1.0  # grows to [4:16] with a blended edge; Otsu keeps [5:15) or wider
    iou = word_ious([[small]], [3], _labels())["obj_iou"][0]
    assert 100 / 144 <= iou <= 1.0
    # a category the mask does not hold: IoU 0
    assert word_ious([[exact]], [9], _labels())["obj_iou"] == [0.0]


def test_consecutive_words_of_one_category_merge_into_one_object():
    half = _block(slice(5, 15), slice(5, 10))
    exact = _block(slice(5, 15), slice(5, 15))
    other = _block(slice(0, 4), slice(0, 5))
    # "a hot dog , a dog and a cup": "hot dog" is one object (3), the later "dog" another
    words = [[half]] * 9
    words[2] = [exact]
    words[8] = [other]
    classes = ["function", 3, 3, None, "function", 3, "function", "function", 7]
    r = word_ious(words, classes, _labels())
    assert r["obj_iou"] == [1.0, 0.5, 1.0]
    # a word of another category between them keeps them apart
    r = word_ious([[exact], [other], [half]], [3, 7, 3], _labels())
    assert r["obj_iou"] == [1.0, 1.0, 0.5]


def test_func_iou_and_f1_on_a_hand_made_caption():
    """ "the cat sits on the mat": nouns cat (category 3, Otsu 50) and mat (another noun,
    Otsu 100) give the mean foreground threshold 75; "the" shares below 75 are counted."""
    cat = _block(slice(5, 15), slice(5, 15), low=50, high=150)  # Otsu: 50, IoU 1
    mat = _block(slice(0, 10), slice(0, 20), low=100, high=200)  # Otsu: 100
    assert otsu_threshold(cat) == 50 and otsu_threshold(mat) == 100
    the_1 = _block(slice(0, 8), slice(0, 20), low=90, high=60)  # 160 of 400 cells below 75
    the_2 = np.full((20, 20), 70, np.uint8)  # every cell below 75
    words = [[the_1], [cat], [the_1], [the_1], [the_1, the_2], [mat]]
    classes = ["function", 3, None, "function", "function", "noun"]
    r = word_ious(words, classes, _labels())
    assert r["obj_iou"] == [1.0]
    assert r["func_iou"] == pytest.approx([0.4, 0.4, 0.7])
    assert r["Func-IoU"] == pytest.approx(0.5)
    assert r["F1-IoU"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # no noun: function words are not scored, and there is no F1
    r = word_ious([[the_1]], ["function"], _labels())
    assert r["func_iou"] == [] and r["Func-IoU"] is None and r["F1-IoU"] is None
    # split means pool words, not captions
    a = {"obj_iou": [1.0], "func_iou": [0.2]}
    b = {"obj_iou": [0.0, 0.0, 0.5], "func_iou": []}
    s = summarise_word_ious([a, b])
    assert s["Obj-IoU"] == pytest.approx(1.5 / 4) and s["Func-IoU"] == pytest.approx(0.2)
    assert s["F1-IoU"] == pytest.approx(2 * 0.375 * 0.2 / 0.575)


def test_word_ious_bad_input_is_one_clear_line():
    with pytest.raises(InputError, match="2 word maps but 1 word classes"):
        word_ious([[np.zeros((2, 2))]] * 2, [3], np.zeros((2, 2)))
    with pytest.raises(InputError, match="word class 0"):
        word_ious([[np.zeros((2, 2))]], [0], np.zeros((2, 2)))
    with pytest.raises(InputError, match=r"\[H, W\]"):
        word_ious([[np.zeros((1, 2, 2))]], [1], np.zeros((2, 2)))


def test_masks_of_a_scene_localise_its_shape_words_exactly():
    """Maps equal to each object's mask give Obj-IoU 1 on the scene's caption."""
    from groundcam.data.shapes_captions import left_to_right

    scene = generate_scene("test", 5, 0, 64)
    categories = {shape: i + 1 for i, shape in enumerate(SHAPES)}
    objects = scene.meta["objects"]
    masks = [decode_mask(o["mask"], 64, 64, "scene") for o in objects]
    labels = label_mask(
        [(categories[o["shape"]], m) for o, m in zip(objects, masks, strict=True)], 64, 64
    )
    g = left_to_right(scene)
    maps, classes = [], []
    for word, boxes in zip(g.tokens, g.boxes, strict=True):
        cls = word_class(word, categories)
        mask = next(
            (m for o, m in zip(objects, masks, strict=True) if boxes and o["box"] == boxes[0]), None
        )
        maps.append([mask.astype(np.float32) if mask is not None else np.eye(64)])
        classes.append(cls)
    assert classes.count("function") == g.tokens.count("a") + g.tokens.count("and")
    r = word_ious(maps, classes, labels)
    assert len(r["obj_iou"]) == len(objects) and r["Obj-IoU"] == 1.0


def test_word_classes_without_nltk():
    categories = {"person": 1, "hot dog": 2, "t-shirt": 3, "knife": 4, "bus": 5}
    assert word_class("People", categories) == 1
    assert word_class("dogs", categories) == 2 and word_class("hot", categories) == 2
    assert word_class("tshirts", categories) == 3 and word_class("T-shirt", categories) == 3
    assert word_class("knives", categories) == 4 and word_class("buses", categories) == 5
    for word in ("a", "The", "and", "there", "could", "its", "which", "whose", "how"):
        assert word_class(word, categories) == "function", word
    assert word_class("red", categories) is None
    assert word_class("tables", categories, nouns=["table"]) == "noun"


def test_group_words_at_spaces_punctuation_and_cjk():
    pieces = ["▁A", "▁hot", "-", "dog", ",", "▁two", "▁cats", "'s", "▁to", "ys", ".", "猫", "猫"]
    assert group_words(pieces) == [
        ("A", [0]),
        ("hot", [1]),
        ("-", [2]),
        ("dog", [3]),
        (",", [4]),
        ("two", [5]),
        ("cats", [6]),
        ("'s", [7]),
        ("toys", [8, 9]),
        (".", [10]),
        ("猫", [11]),
        ("猫", [12]),
    ]
    # byte-level BPE's marker, and a lone space token joining the next
    assert group_words(["Ġa", "Ġred", "d", "Ġ", "5"]) == [
        ("a", [0]),
        ("redd", [1, 2]),
        ("5", [3, 4]),
    ]


def test_token_pieces_give_group_words_their_spaces():
    vocab = {1: "a", 2: "cat", 3: "##s", 4: "."}

    def decode(ids):  # a WordPiece-like decoder: spaces between words, "##" glued
        text = ""
        for i in ids:
            piece = vocab[i]
            text += (
                piece[2:]
                if piece.startswith("##")
                else ("" if not text or piece == "." else " ") + piece
            )
        return text

    pieces = token_pieces(decode, [1, 2, 3, 4])
    assert pieces == ["a", " cat", "s", "."]
    assert group_words(pieces) == [("a", [0]), ("cats", [1, 2]), (".", [3])]


def test_energy_pointing_is_the_mass_share_inside_the_boxes():
    m = np.full((10, 10), -1.0)
    m[2:5, 2:5] = 1.0  # 9 inside the box [2, 2, 4, 4] (edges included)
    m[8, 8] = 3.0
    assert energy_pointing(m, [[2, 2, 4, 4]]) == pytest.approx(9 / 12)
    assert energy_pointing(m, [[2, 2, 4, 4], [8, 8, 9, 9]]) == pytest.approx(1.0)
    assert energy_pointing(np.zeros((4, 4)), [[0, 0, 1, 1]]) is None


def test_generation_word_ious_groups_tokens_and_uses_the_scene_masks():
    """A fake generation whose shape-word tokens map exactly onto their objects scores 1."""
    from types import SimpleNamespace

    import torch

    from groundcam.eval.localisation import generation_word_ious, shapes_labels

    scene = generate_scene("test", 3, 0, 64)
    labels, categories = shapes_labels(scene)
    objects = scene.meta["objects"]
    words, maps = [], []
    for o in objects:
        mask = decode_mask(o["mask"], 64, 64, "scene").astype(np.float32)
        for w, m in (("a", np.eye(64)), (o["colour"], mask), (o["shape"][:2], mask)):
            words.append(" " + w)
            maps.append(m)
        words.append(o["shape"][2:])  # the shape word's second token
        maps.append(np.zeros((64, 64)))
    gen = SimpleNamespace(token_ids=list(range(len(words))), maps=torch.tensor(np.stack(maps)))
    r = generation_word_ious(gen, lambda ids: "".join(words[i] for i in ids), labels, categories)
    assert r["words"][:3] == ["a", objects[0]["colour"], objects[0]["shape"]]
    assert r["obj_iou"] == [1.0] * len(objects)
    assert len(r["func_iou"]) == len(objects)


def test_eval_captions_metrics_on_shapes(tmp_path):
    from click.testing import CliRunner

    from groundcam.cli import main

    out = tmp_path / "run"
    args = ["eval", "captions", "--model", "captioner-tiny-shapes", "--scenes", "3"]
    result = CliRunner().invoke(main, [*args, "--metrics", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Obj-IoU" in result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())["word_localisation"]
    obj = [v for r in records for v in r["word_iou"]["obj_iou"]]
    assert summary["objects"] == len(obj) > 0
    assert summary["Obj-IoU"] == pytest.approx(np.mean(obj)) and 0 <= min(obj) <= max(obj) <= 1
    full = json.loads((out / "summary.json").read_text())
    energies = [h["energy"] for r in records for h in r["generated"] if "energy" in h]
    assert energies and all(0 <= e <= 1 for e in energies)
    assert full["generated_word_pointing"]["energy"] == pytest.approx(np.mean(energies))
    for r in records:  # one object per shape word (they are never adjacent in these captions)
        shape_words = [w for w in r["word_iou"]["words"] if w in SHAPES]
        assert len(r["word_iou"]["obj_iou"]) == len(shape_words)
    result = CliRunner().invoke(
        main,
        [*args, "--dataset", "file", "--captions", str(COCO / "instances.json"), "--images",
         str(COCO), "--metrics", "--out", str(tmp_path / "f")],
    )  # fmt: skip
    assert result.exit_code == 2 and "--metrics needs object masks" in result.output
    assert "Traceback" not in result.output
