"""Bad data is one sample's problem: NaN/inf boxes, boxes outside the image, Latin-1 and BOM text
files, malformed records at every level of the JSON, huge CSV fields, caption files without
splits. Each is a skipped+counted record naming its file and id, or one line naming the file."""

from __future__ import annotations

import copy
import csv
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flickr_like import write_flickr_like

from groundcam.cli import main
from groundcam.data.captions import VAL_FRACTION, is_val_image, read_captions
from groundcam.data.flickr30k_entities import Flickr30kEntities
from groundcam.data.refcoco import RefCOCO, safe_load_pickle
from groundcam.data.sample import ReadReport
from groundcam.data.visual_genome import VisualGenomeRegions
from groundcam.errors import InputError
from groundcam.eval.caption_pointing import file_samples, file_split
from groundcam.eval.datasets import open_units
from groundcam.eval.pointing import (
    PROTOCOLS,
    albef_boxes,
    pointing_game,
    pointing_games,
    proposal_scores,
    read_dets,
    union_box,
)
from groundcam.eval.runner import EvalConfig, in_box_fractions, run_eval

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BAD_NUMBERS = (float("nan"), float("inf"), -float("inf"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles: str) -> None:
    """Exit 2 with one `groundcam: error:` line holding every needle, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


# --- pointing: boxes outside the image and non-finite boxes -----------------------------------


def _pixel_count_share(m: torch.Tensor, boxes: list[list[float]]) -> float | None:
    m = m.clamp(min=0)
    h, w = m.shape
    inside = sum(
        float(m[y, x])
        for y in range(h)
        for x in range(w)
        if any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in boxes)
    )
    total = float(m.sum())
    return inside / total if total > 0 and boxes else None


def test_in_box_is_zero_for_a_box_wholly_left_of_or_above_the_image() -> None:
    maps = torch.rand(1, 30, 40) + 0.1
    assert in_box_fractions(maps, [[[-21, -21, -6, -6]]]) == [0.0]
    for box in ([-21, 5, -6, 20], [5, -21, 20, -6], [50, 5, 70, 20], [5, 31, 20, 45]):
        assert in_box_fractions(maps, [[box]]) == [0.0], box
    assert in_box_fractions(maps, [[[-5, -5, 100, 100]]]) == [pytest.approx(1.0)]
    assert in_box_fractions(maps, [[[10, 10, 4, 4]]]) == [0.0]  # inverted: no pixel


def test_in_box_equals_a_pixel_count_for_boxes_anywhere() -> None:
    rng = np.random.default_rng(3)
    maps = torch.rand(60, 9, 11)
    boxes = []
    for _ in range(60):
        phrase = []
        for _ in range(int(rng.integers(1, 3))):
            x1, y1 = rng.uniform(-30, 20, size=2).round(1)
            w, h = rng.uniform(-3, 25, size=2).round(1)
            phrase.append([float(x1), float(y1), float(x1 + w), float(y1 + h)])
        boxes.append(phrase)
    got = in_box_fractions(maps, boxes)
    expected = [_pixel_count_share(m, b) for m, b in zip(maps, boxes, strict=True)]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert sum(g == 0.0 for g in got) >= 5 and sum(0 < g < 1 for g in got) >= 5


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_non_finite_boxes_are_one_line_input_errors(bad: float) -> None:
    grid = torch.rand(6, 6)
    boxes = [[1.0, 2.0, 5.0, 5.0], [bad, 0.0, 3.0, 3.0]]
    with pytest.raises(InputError, match="not finite") as e:
        in_box_fractions(grid[None], [boxes])
    assert "\n" not in str(e.value)
    for protocol in PROTOCOLS:
        kwargs = {"proposals": [[0, 0, 4, 4]]} if PROTOCOLS[protocol].uses_proposals else {}
        with pytest.raises(InputError, match="finite"):
            pointing_game(grid, boxes, protocol, image_size=(20, 20), **kwargs)
        with pytest.raises(InputError, match="finite"):
            pointing_games(grid[None], [boxes], protocol, **kwargs)
    with pytest.raises(InputError, match="finite"):
        union_box(boxes)
    with pytest.raises(InputError, match="finite"):
        albef_boxes(grid, [[0, 0, 4, 4]], [bad, 0, 3, 3])


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_non_finite_proposals_are_never_chosen(bad: float) -> None:
    grid = torch.zeros(10, 10)
    grid[6:9, 6:9] = 1.0
    proposals = [[bad, 6, 3, 3], [6, bad, 3, 3], [6, 6, bad, 3], [6, 6, 3, bad], [6, 6, 3, 3]]
    scores = proposal_scores(grid, proposals)
    assert all(math.isnan(s) for s in scores[:4].tolist()) and scores[4].item() == 3.0
    result = albef_boxes(grid, proposals, [6, 6, 3, 3])
    assert result.hit is True and result.box == (6.0, 6.0, 3.0, 3.0) and result.iou == 1.0


def test_dets_files_that_cannot_be_read_are_one_line_naming_the_file(tmp_path) -> None:
    path = tmp_path / "dets.json"
    for text, expected in (
        ("{oops", "not valid JSON"),
        ('{"1": [[1, 2, "wide", 4]]}', "image 1: bad detection"),
        ('{"1": [[1, 2, 3]]}', "image 1: bad detection"),
        ('{"1": [null]}', "image 1: bad detection"),
    ):
        path.write_text(text)
        with pytest.raises(InputError, match=expected) as e:
            read_dets(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_bytes(b'\xef\xbb\xbf{"1": [[0, 0, NaN, 4, 0.9], [1, 1, 2, 2]]}')
    dets = read_dets(path)
    assert dets["1"][1] == [1.0, 1.0, 2.0, 2.0] and math.isnan(dets["1"][0][2])


# --- the runner: a non-finite box is that phrase's failure -------------------------------------


def test_runner_records_a_non_finite_box_as_that_phrases_error(tmp_path, tiny_model_dir) -> None:
    from groundcam.api import load

    root = write_flickr_like(tmp_path / "f30k", 2)
    units = open_units("flickr30k-entities", ["test"], root)
    phrases = units.units[0].sample.phrases
    phrases[0].boxes = [(float("nan"), 1.0, 5.0, 5.0)]
    phrases[1].boxes = [(-21.0, -21.0, -6.0, -6.0)]  # wholly outside: in_box 0, a miss
    cfg = EvalConfig(dataset="flickr30k-entities", splits=("test",), model=str(tiny_model_dir))
    result = run_eval(cfg, units, load(tiny_model_dir), tmp_path / "o", progress=False)
    lines = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert "not finite" in records[0]["error"] and records[0]["hit"] is None
    assert records[1]["in_box"] == 0.0 and records[1]["hit"] is False
    assert all(r["hit"] in (True, False) for r in records[1:])
    assert result.summary["errors"] == 1 and result.summary["n"] == len(records) - 1


# --- Flickr30k Entities -----------------------------------------------------------------------


@pytest.fixture
def f30k(fixtures: Path, tmp_path: Path) -> Path:
    root = tmp_path / "f30k"
    shutil.copytree(fixtures / "flickr30k_entities", root)
    return root


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "-Infinity"])
def test_flickr_non_finite_box_skips_its_sample(f30k: Path, value: str) -> None:
    xml = f30k / "Annotations" / "2100000001.xml"
    xml.write_text(xml.read_text().replace("<xmax>150</xmax>", f"<xmax>{value}</xmax>", 1))
    ids = (f30k / "test.txt").read_text().split()
    data = Flickr30kEntities(f30k, "test")
    samples = list(data)
    assert "2100000001" in ids and "2100000001" not in [s.image_id for s in samples]
    assert len(samples) == len(ids) - 1 and data.report.skipped_samples == 1
    (error,) = data.report.errors
    assert str(xml) in error and "non-finite <bndbox>" in error and "sample skipped" in error
    for s in samples:
        assert all(math.isfinite(v) for p in s.phrases for b in p.boxes for v in b)


def test_flickr_eval_goes_on_past_a_nan_box(f30k: Path, tmp_path: Path, tiny_model_dir) -> None:
    xml = f30k / "Annotations" / "2100000001.xml"
    xml.write_text(xml.read_text().replace("<ymin>60</ymin>", "<ymin>NaN</ymin>", 1))
    r = run("eval", "flickr30k-entities", "--root", f30k, "--split", "test",
            "--model", tiny_model_dir, "--out", tmp_path / "o", "--protocol", "torchray")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    reader = summary["reader"]["test"]
    assert reader["skipped_samples"] == 1 and str(xml) in reader["errors"][0]
    records = (tmp_path / "o" / "results.jsonl").read_text().splitlines()
    assert records and all(json.loads(x)["image_id"] != "2100000001" for x in records)


def test_flickr_latin1_sentence_file_is_read_with_a_counted_fallback(f30k: Path) -> None:
    txt = f30k / "Sentences" / "2100000001.txt"
    lines = txt.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("A girl", "A girl in a caf\u00e9")
    txt.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    data = Flickr30kEntities(f30k, "test")
    samples = {s.image_id: s for s in data}
    sample = samples["2100000001"]
    assert sample.meta["captions"][1].startswith("A girl in a caf\u00e9 greets")
    assert data.report.recoded_files == 1 and data.report.skipped_samples == 0
    (error,) = data.report.errors
    assert error.startswith(f"{txt}: not UTF-8 (byte 0xe9 at offset ") and "cp1252" in error
    # cp1252's curly quotes, which are not Latin-1's characters
    txt.write_bytes("[/EN#11/people The \u201cwoman\u201d] waves .\n".encode("cp1252"))
    sample = {s.image_id: s for s in data}["2100000001"]
    assert sample.meta["captions"] == ["The \u201cwoman\u201d waves ."]


def test_flickr_bom_keeps_the_first_caption(f30k: Path) -> None:
    txt = f30k / "Sentences" / "2100000001.txt"
    before = {s.image_id: s for s in Flickr30kEntities(f30k, "test")}["2100000001"]
    txt.write_bytes(b"\xef\xbb\xbf" + txt.read_bytes())
    split = f30k / "test.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())  # a BOM before the first id too
    data = Flickr30kEntities(f30k, "test")
    after = {s.image_id: s for s in data}["2100000001"]
    assert after.meta["captions"] == before.meta["captions"]
    assert [p.text for p in after.phrases] == [p.text for p in before.phrases]
    assert after.phrases[0].meta["caption_index"] == 0
    assert data.report.errors == [] and data.report.skipped_lines == 0


# --- RefCOCO ----------------------------------------------------------------------------------


@pytest.fixture
def refcoco(fixtures: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "refcoco+"
    shutil.copytree(fixtures / "refcoco+", root)
    return root, fixtures / "coco" / "train2014"


def _instances(root: Path) -> dict:
    return json.loads((root / "instances.json").read_text())


def _refs(root: Path) -> list:
    return safe_load_pickle(root / "refs(unc).p")


def _check_samples(data: RefCOCO) -> None:
    for s in data:
        (phrase,) = s.phrases
        assert isinstance(phrase.text, str)
        assert len(phrase.boxes[0]) == 4 and all(math.isfinite(v) for v in phrase.boxes[0])
        assert all(isinstance(v, int) for v in s.image_size)


def test_refcoco_bad_annotations_and_images_skip_their_refs(refcoco) -> None:
    root, images = refcoco
    full = len(RefCOCO(root, images, None))
    inst = _instances(root)
    anns = {a["id"]: a for a in inst["annotations"]}
    refs = _refs(root)
    by_ann: dict = {}
    for ref in refs:
        by_ann.setdefault(ref["ann_id"], []).append(ref)
    (ann_id, its_refs), *_ = by_ann.items()
    lost = sum(len(r["sentences"]) for r in its_refs)
    for change in (
        lambda a: a.pop("bbox"),
        lambda a: a.update(bbox=[1.0, 2.0, float("nan"), 4.0]),
        lambda a: a.update(bbox=[1.0, float("inf"), 3.0, 4.0]),
        lambda a: a.update(bbox=[1.0, 2.0, 3.0]),
        lambda a: a.update(bbox=["1", "2", "3", "4"]),
        lambda a: a.update(bbox=None),
    ):
        bad = copy.deepcopy(inst)
        change(next(a for a in bad["annotations"] if a["id"] == ann_id))
        (root / "instances.json").write_text(json.dumps(bad))
        data = RefCOCO(root, images, None)
        assert len(data) == full - lost and data.report.skipped_samples == lost
        assert all(f"annotation {ann_id}" in e and "skipped" in e for e in data.report.errors)
        assert f"ref_id {its_refs[0]['ref_id']!r}" in data.report.errors[0]
        _check_samples(data)
    image_id = anns[ann_id]["image_id"]
    for key, value in (("file_name", None), ("width", None), ("height", "tall"), ("width", 1e999)):
        bad = copy.deepcopy(inst)
        image = next(im for im in bad["images"] if im["id"] == image_id)
        if value is None:
            image.pop(key)
        else:
            image[key] = value
        (root / "instances.json").write_text(json.dumps(bad))
        data = RefCOCO(root, images, None)
        assert data.report.skipped_samples > 0 and len(data) == full - data.report.skipped_samples
        assert all(f"image {image_id}" in e for e in data.report.errors), data.report.errors
        _check_samples(data)


def test_refcoco_sentences_that_are_not_objects_are_skipped(refcoco) -> None:
    root, images = refcoco
    full = len(RefCOCO(root, images, None))
    refs = _refs(root)
    refs[0]["sentences"] = ["a woman", {"sent": 7}, *refs[0]["sentences"]]
    refs[1]["sentences"] = "a string, not a list"
    n1 = len(_refs(root)[1]["sentences"])
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    data = RefCOCO(root, images, None)
    assert len(data) == full - n1 and data.report.skipped_samples == 3
    errors = "\n".join(data.report.errors)
    assert "sentence #0" in errors and "sentence #1" in errors and "not a list" in errors
    assert all(str(root / "refs(unc).p") in e for e in data.report.errors)
    _check_samples(data)


def test_refcoco_instances_that_cannot_be_read_are_one_line(refcoco, tmp_path) -> None:
    root, images = refcoco
    path = root / "instances.json"
    for text, expected in (
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"images": {"id": 1}, "annotations": []}', "'images' must be a list"),
        ("[" * 100000, "JSON"),
    ):
        path.write_text(text)
        with pytest.raises(InputError, match=expected) as e:
            RefCOCO(root, images, None)
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_text("{not json")
    r = run("eval", "refcoco+", "--root", root, "--images", images, "--model", "none",
            "--out", tmp_path / "o")  # fmt: skip
    one_line_error(r, str(path), "not valid JSON")


def _paths(value, prefix=()):
    """Every path into a JSON value (keys and indexes)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(value, path, new):
    out = copy.deepcopy(value)
    if not path:
        return new
    target = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return out


WRONG = (None, "x", 2.5, True, [], {}, [None], {"id": None}, float("nan"), -float("inf"))


def test_refcoco_fuzz_every_level_is_skipped_or_one_line(refcoco) -> None:
    root, images = refcoco
    inst, refs = _instances(root), _refs(root)
    wrong = (None, "x", True, [], {"id": None}, float("nan"))
    cases = [("instances.json", p, w) for p in _paths(inst) for w in wrong]
    cases += [("refs(unc).p", p, w) for p in _paths(refs) for w in wrong]
    outcomes = {"read": 0, "refused": 0}
    for name, path, wrong in cases:
        if name == "instances.json":
            (root / name).write_text(json.dumps(_replaced(inst, path, wrong)))
            (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
        else:
            (root / "instances.json").write_text(json.dumps(inst))
            (root / name).write_bytes(pickle.dumps(_replaced(refs, path, wrong), protocol=2))
        try:
            data = RefCOCO(root, images, None)
        except ValueError as e:  # InputError and the reader's own one-line ValueErrors
            assert name in str(e) and "\n" not in str(e), (name, path, wrong, e)
            outcomes["refused"] += 1
            continue
        _check_samples(data)
        outcomes["read"] += 1
    assert outcomes["read"] > 100 and outcomes["refused"] > 5


# --- Visual Genome ----------------------------------------------------------------------------

VG = [
    {
        "id": 1,
        "regions": [
            {"region_id": 10, "x": 1, "y": 2, "width": 30, "height": 20, "phrase": "a red car"},
            {"region_id": 11, "x": 5, "y": 5, "width": 10, "height": 10, "phrase": "a tree"},
        ],
    },
    {
        "id": 2,
        "regions": [
            {"region_id": 20, "x": 0, "y": 0, "width": 8, "height": 8, "phrase": "the sky"},
        ],
    },
]


def _vg(tmp_path: Path, data) -> VisualGenomeRegions:
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(data))
    return VisualGenomeRegions(path)


def test_visual_genome_null_regions_and_bad_phrases_are_skipped_and_counted(tmp_path) -> None:
    data = copy.deepcopy(VG)
    data[1]["regions"] = None
    regions = data[0]["regions"]
    regions += [
        {"region_id": 12, "x": 1, "y": 1, "width": 3, "height": 3, "phrase": None},
        {"region_id": 13, "x": 1, "y": 1, "width": 3, "height": 3, "phrase": 42},
        {"region_id": 14, "x": 1, "y": 1, "width": 3, "height": 3, "phrase": ["a", "b"]},
        {"region_id": 15, "x": float("nan"), "y": 1, "width": 3, "height": 3, "phrase": "x"},
        {"region_id": 16, "x": 1, "y": 1, "width": float("inf"), "height": 3, "phrase": "y"},
    ]
    vg = _vg(tmp_path, data)
    samples = list(vg)
    assert [s.image_id for s in samples] == ["1"]
    assert [p.text for p in samples[0].phrases] == ["a red car", "a tree"]
    assert vg.report.skipped_samples == 1 and vg.report.skipped_lines == 5
    assert all(str(vg.path) in e for e in vg.report.errors)
    assert "image entry #1" in vg.report.errors[-1] and "not a list" in vg.report.errors[-1]
    assert sum("(image 1) region #" in e for e in vg.report.errors) == 5
    assert not any(p.text in ("None", "42") for s in samples for p in s.phrases)


def test_visual_genome_fuzz_every_level_is_skipped_or_one_line(tmp_path) -> None:
    outcomes = {"read": 0, "refused": 0}
    for path in _paths(VG):
        for wrong in WRONG:
            try:
                vg = _vg(tmp_path, _replaced(VG, path, wrong))
                samples = list(vg)
            except ValueError as e:
                assert "region_descriptions.json" in str(e) and "\n" not in str(e), (path, e)
                outcomes["refused"] += 1
                continue
            outcomes["read"] += 1
            for s in samples:
                for p in s.phrases:
                    assert isinstance(p.text, str) and p.text.strip() and p.text != "None"
                    assert all(math.isfinite(v) for v in p.boxes[0])
    assert outcomes["read"] > 100 and outcomes["refused"] >= 5


def test_visual_genome_bad_image_data_and_unreadable_images(tmp_path) -> None:
    from PIL import Image

    (tmp_path / "VG_100K").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "VG_100K" / "1.jpg")
    (tmp_path / "VG_100K" / "2.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "region_descriptions.json").write_text(json.dumps(VG))
    sizes = [{"image_id": 1, "width": 40}, "junk", {"id": None, "width": 1, "height": 1}]
    (tmp_path / "image_data.json").write_text(json.dumps(sizes))
    vg = VisualGenomeRegions(tmp_path, tmp_path / "VG_100K", tmp_path / "image_data.json")
    samples = {s.image_id: s for s in vg}
    assert samples["1"].image_size == (40, 30) and "error" not in samples["1"].meta
    assert "unreadable image" in samples["2"].meta["error"]
    assert vg.report.skipped_rows == 3
    assert sum("image_data.json: entry #" in e for e in vg.report.errors) == 3
    (tmp_path / "image_data.json").write_text('{"a": 1}')
    with pytest.raises(InputError, match=r"image_data\.json: expected a list"):
        VisualGenomeRegions(tmp_path, tmp_path / "VG_100K", tmp_path / "image_data.json")


# --- caption files ----------------------------------------------------------------------------


def test_a_csv_field_over_the_csv_limit_skips_its_row(tmp_path) -> None:
    long = "a" * (csv.field_size_limit() + 10)
    path = tmp_path / "captions.txt"
    rows = ["image,caption", "a.jpg,A dog .", f'b.jpg,"{long}"', f"c.jpg,{long}", "d.jpg,A cat ."]
    path.write_text("\n".join(rows) + "\n")
    report = ReadReport()
    caps = read_captions(path, report=report)
    assert [c.image for c in caps] == ["a.jpg", "d.jpg"]
    assert report.skipped_rows == 2
    assert report.errors[0].startswith(f"{path}:3: not a CSV row (field larger than field limit")
    assert report.errors[1].startswith(f"{path}:4: not a CSV row")


@pytest.fixture(scope="module")
def shapes_files(tmp_path_factory) -> Path:
    """The shapes caption set in the Karpathy layout and in the csv, pipe and token layouts."""
    from groundcam.data.shapes_captions import DATASET_FILE, write_dataset

    root = tmp_path_factory.mktemp("shapes-files")
    write_dataset(root, {"train": 2, "test": 3}, seed=0, image_size=64)
    images = json.loads((root / DATASET_FILE).read_text())["images"]
    caps = [(im["filename"], s["raw"]) for im in images for s in im["sentences"]]
    (root / "captions.txt").write_text("image,caption\n" + "".join(f'{n},"{c}"\n' for n, c in caps))
    (root / "results.csv").write_text(
        "image_name| comment_number| comment\n" + "".join(f"{n}| 0| {c}\n" for n, c in caps)
    )
    (root / "captions.token").write_text("".join(f"{n}#0\t{c}\n" for n, c in caps))
    return root


def test_file_splits_of_files_without_splits(shapes_files: Path) -> None:
    names = sorted(p.name for p in (shapes_files / "images").iterdir())
    for name in ("captions.txt", "results.csv", "captions.token"):
        path = shapes_files / name
        assert file_split(path, None) == "all"
        every = file_samples(str(path), str(shapes_files / "images"))
        assert sorted(s.image_id for s in every) == names
        val = {s.image_id for s in file_samples(str(path), str(shapes_files / "images"), "val")}
        train = {s.image_id for s in file_samples(str(path), str(shapes_files / "images"), "train")}
        assert val == {n for n in names if is_val_image(n)} and train == set(names) - val
        for bad in ("test", "restval", "testA"):
            with pytest.raises(InputError, match=f"--split {bad}: .*{name}.*use all"):
                file_split(path, bad)
    # a directory: its caption file (captions.txt first)
    assert file_split(shapes_files, None) == "all"
    assert len(file_samples(shapes_files, shapes_files / "images")) == len(names)
    assert file_split(shapes_files / "dataset_shapes.json", None) == "test"
    assert file_split(shapes_files / "dataset_shapes.json", "all") == "all"
    with pytest.raises(InputError, match="Karpathy split file"):
        file_split(shapes_files / "dataset_shapes.json", "compositional")
    # the trainer's rule: about VAL_FRACTION of many names
    share = sum(is_val_image(f"{i}.jpg") for i in range(20000)) / 20000
    assert abs(share - VAL_FRACTION) < 0.01


def test_eval_captions_reads_csv_pipe_and_token_files(shapes_files: Path, tmp_path) -> None:
    images = shapes_files / "images"
    n = len(list(images.iterdir()))
    summaries = {}
    for name in ("captions.txt", "results.csv", "captions.token"):
        out = tmp_path / name.replace(".", "-")
        r = run("eval", "captions", "--model", "captioner-tiny-shapes", "--dataset", "file",
                "--captions", shapes_files / name, "--images", images, "--max-new-tokens", 6,
                "--out", out)  # fmt: skip
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == n and summary["split"] == "all" and summary["errors"] == 0
        summaries[name] = summary["captions"]
    assert summaries["captions.txt"] == summaries["results.csv"] == summaries["captions.token"]
    r = run("eval", "captions", "--model", "captioner-tiny-shapes", "--dataset", "file",
            "--captions", shapes_files / "captions.txt", "--images", images,
            "--split", "test", "--out", tmp_path / "t")  # fmt: skip
    one_line_error(r, "--split test", "captions.txt", "use all")


def test_karpathy_grounding_problems_are_skipped_and_counted(shapes_files, tmp_path) -> None:
    from groundcam.data.shapes_captions import DATASET_FILE

    data = json.loads((shapes_files / DATASET_FILE).read_text())
    tests = [im for im in data["images"] if im["split"] == "test"]
    g0 = tests[0]["sentences"][0]["grounding"]
    n0 = len(g0)
    g0[0]["boxes"] = [[float("nan"), 1.0, 5.0, 5.0]]
    g0.append({"token": 99, "boxes": [[1, 1, 2, 2]]})
    g0.append("junk")
    g0.append({"token": 0, "boxes": [[1, 1, 2]]})
    g0.append({"token": 0, "boxes": [[1, 1, 2, float("inf")]]})
    tests[1]["sentences"][0]["grounding"] = {"token": 0}
    path = tmp_path / DATASET_FILE
    path.write_text(json.dumps(data))
    report = ReadReport()
    samples = {
        s.image_id: s for s in file_samples(str(path), str(shapes_files / "images"), None, report)
    }
    assert report.skipped_rows == 6
    assert all(str(path) in e for e in report.errors)
    assert f"{tests[0]['filename']}).grounding[{n0 + 1}]" in "\n".join(report.errors)
    tokens, boxes = samples[tests[0]["filename"]].grounded[0]
    assert boxes[g0[0]["token"]] is None  # the word with the NaN box is not scored
    assert sum(b is not None for b in boxes) == n0 - 1
    assert samples[tests[1]["filename"]].grounded == []
    r = run("eval", "captions", "--model", "captioner-tiny-shapes", "--dataset", "file",
            "--captions", path, "--images", shapes_files / "images", "--max-new-tokens", 6,
            "--out", tmp_path / "o")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["images"] == 3 and summary["reader"]["skipped_rows"] == 6
    assert summary["reference_word_pointing"]["n"] > 0
