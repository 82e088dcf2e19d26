"""Dataset readers on the shared fixtures and on hand-made broken files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from groundcam.data.captions import Caption, by_image, detect_layout, read_captions
from groundcam.data.flickr30k_entities import (
    Flickr30kEntities,
    MalformedLine,
    ReadReport,
    parse_sentence,
)
from groundcam.data.refcoco import RefCOCO, UnsafePickleError, safe_load_pickle
from groundcam.data.visual_genome import VisualGenomeRegions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def f30k(fixtures: Path) -> Path:
    return fixtures / "flickr30k_entities"


@pytest.fixture
def f30k_copy(f30k: Path, tmp_path: Path) -> Path:
    root = tmp_path / "f30k"
    shutil.copytree(f30k, root)
    return root


# --- Flickr30k Entities -----------------------------------------------------------------------


def test_flickr_test_split_counts_and_boxes(f30k: Path) -> None:
    reader = Flickr30kEntities(f30k, "test", f30k / "flickr30k_images")
    samples = list(reader)
    assert [s.image_id for s in samples] == ["2100000001", "2100000002"]
    assert [len(s.phrases) for s in samples] == [10, 8]
    assert reader.report.samples == 2 and reader.report.phrases == 18
    assert reader.report.errors == [] and reader.report.missing_images == []

    s1, s2 = samples
    assert s1.image_size == (320, 240) and s2.image_size == (200, 300)
    assert s1.split == "test" and s1.load_image().size == (320, 240)
    by_text = {(p.meta["caption_index"], p.text): p for p in s1.phrases}
    # chain 11 has its own box and one shared with chain 13; every coordinate minus 1
    woman = by_text[(0, "A young woman")]
    assert woman.boxes == [(39.0, 59.0, 149.0, 219.0), (59.0, 79.0, 119.0, 199.0)]
    assert woman.kind == "people" and woman.meta["chain"] == "11"
    assert woman.meta["first_word"] == 0 and woman.meta["types"] == ["people"]
    coat = by_text[(0, "a red coat")]
    assert coat.boxes == [(59.0, 79.0, 119.0, 199.0)] and coat.meta["first_word"] == 4
    assert by_text[(3, "the woman 's hand")].meta["first_word"] == 5
    # scene chain 14, no-box chain 15 and notvisual chain 0 are dropped
    chains = {p.meta["chain"] for s in samples for p in s.phrases}
    assert chains == {"11", "12", "13", "21", "22"}
    assert [p.text for p in s1.phrases if p.meta["caption_index"] == 2] == ["Someone"]
    # multi-type phrase, box touching the border (xmin=1 -> 0)
    subway = next(p for p in s2.phrases if p.text == "the subway")
    assert subway.meta["types"] == ["vehicles", "scene"] and subway.kind == "vehicles"
    assert subway.boxes == [(0.0, 199.0, 199.0, 299.0)]
    men = s2.phrases[0]
    assert men.boxes == [(9.0, 9.0, 89.0, 149.0), (99.0, 19.0, 189.0, 159.0)]
    assert s1.caption.startswith("A young woman in a red coat waves")


def test_flickr_other_splits(f30k: Path) -> None:
    val = list(Flickr30kEntities(f30k, "val", f30k / "flickr30k_images"))
    train = list(Flickr30kEntities(f30k, "train", f30k / "flickr30k_images"))
    assert [(s.image_id, len(s.phrases)) for s in val] == [("2100000003", 5)]
    assert [(s.image_id, len(s.phrases)) for s in train] == [("2100000004", 5)]
    assert train[0].phrases[0].boxes == [(4.0, 4.0, 59.0, 99.0)]


def test_parse_sentence() -> None:
    caption, phrases = parse_sentence("[/EN#5/people/other A man] , [/EN#0/notvisual it] .")
    assert caption == "A man , it ."
    assert [(p.text, p.chain, p.types, p.first_word) for p in phrases] == [
        ("A man", "5", ["people", "other"], 0),
        ("it", "0", ["notvisual"], 3),
    ]
    for bad in ("[/EN#5/people A man", "[EN5 a man]", "[/EN#x/people a]", "a man] ."):
        with pytest.raises(MalformedLine):
            parse_sentence(bad)


def test_flickr_malformed_xml_and_sentence_and_missing_image(f30k_copy: Path) -> None:
    root = f30k_copy
    (root / "Annotations" / "2100000002.xml").write_text("<annotation>\n<size>\n</annotation>\n")
    lines = (root / "Sentences" / "2100000001.txt").read_text().splitlines()
    lines[1] = "[/EN#11/people A girl greets her pet ."  # unclosed bracket
    (root / "Sentences" / "2100000001.txt").write_text("\n".join(lines) + "\n")
    (root / "flickr30k_images" / "2100000001.jpg").unlink()

    reader = Flickr30kEntities(root, "test", root / "flickr30k_images")
    samples = list(reader)
    rep = reader.report
    assert [s.image_id for s in samples] == ["2100000001"]
    assert rep.skipped_samples == 1 and rep.skipped_lines == 1
    assert len(samples[0].phrases) == 8  # 10 minus the two of the bad line
    assert {p.meta["caption_index"] for p in samples[0].phrases} == {0, 2, 3, 4}
    assert samples[0].meta["captions"][1] is None
    assert any("2100000002.xml:3" in e for e in rep.errors)
    assert any("2100000001.txt:2" in e for e in rep.errors)
    assert "image not found" in samples[0].meta["error"]
    assert rep.missing_images == [str(root / "flickr30k_images" / "2100000001.jpg")]
    with pytest.raises(FileNotFoundError):
        samples[0].load_image()


def test_flickr_wrong_root(tmp_path: Path, f30k: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"test\.txt"):
        Flickr30kEntities(tmp_path, "test", tmp_path)
    (tmp_path / "test.txt").write_text("2100000001\n")
    with pytest.raises(FileNotFoundError, match="Annotations"):
        Flickr30kEntities(tmp_path, "test", tmp_path)
    with pytest.raises(ValueError):
        Flickr30kEntities(f30k, "testA")


# --- RefCOCO+ ---------------------------------------------------------------------------------


def test_refcoco_splits(fixtures: Path) -> None:
    root, images = fixtures / "refcoco+", fixtures / "coco" / "train2014"
    counts = {sp: len(RefCOCO(root, images, sp)) for sp in ("val", "testA", "testB", "train")}
    assert counts == {"val": 1, "testA": 2, "testB": 1, "train": 1}
    assert len(RefCOCO(root, images, None)) == 5
    assert len(RefCOCO(root, images, "test")) == 0

    test_a = RefCOCO(root, images, "testA")
    s = test_a[0]
    assert [x.phrases[0].text for x in test_a] == ["woman on the left", "left lady in red"]
    assert s.image_id == "580001" and s.image_size == (320, 240)
    assert s.phrases[0].boxes == [(12.5, 20.0, 112.75, 170.0)]
    assert s.meta["ref_id"] == 101 and s.meta["sent_id"] == 50000
    assert s.meta["category"] == "person" and s.phrases[0].kind == "person"
    assert s.image_path == images / "COCO_train2014_000000580001.jpg"
    assert s.load_image().size == (320, 240)
    b = RefCOCO(root, images, "testB")[0]
    assert b.phrases[0].boxes == [(150.0, 40.0, 270.0, 130.5)] and b.meta["category"] == "dog"
    v = RefCOCO(root, images, "val")[0]
    assert v.phrases[0].boxes == [(0.0, 0.0, 128.0, 255.0)] and v.image_size == (256, 256)


class _Evil:
    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_refcoco_refuses_malicious_pickle(tmp_path: Path, fixtures: Path) -> None:
    sentinel = tmp_path / "pwned"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil(str(sentinel))}], protocol=2))
    shutil.copy(fixtures / "refcoco+" / "instances.json", tmp_path / "instances.json")
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*system"):
        RefCOCO(tmp_path, tmp_path, "val")
    for protocol in (0, 4):
        refs.write_bytes(pickle.dumps(_Evil(str(sentinel)), protocol=protocol))
        with pytest.raises(UnsafePickleError):
            safe_load_pickle(refs)
    assert not sentinel.exists()
    # plain builtins load fine
    data = {"a": [1, 2.5, "x", (True, None)]}
    refs.write_bytes(pickle.dumps(data, protocol=2))
    assert safe_load_pickle(refs) == data


def test_refcoco_missing_image_and_wrong_root(tmp_path: Path, fixtures: Path) -> None:
    root = fixtures / "refcoco+"
    ds = RefCOCO(root, tmp_path, "testA")
    assert len(ds) == 2 and all("image not found" in s.meta["error"] for s in ds)
    assert len(ds.report.missing_images) == 1
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
        RefCOCO(tmp_path, tmp_path)
    shutil.copy(root / "refs(unc).p", tmp_path / "refs(umd).p")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        RefCOCO(tmp_path, tmp_path)


# --- captions -----------------------------------------------------------------------------------


def test_captions_three_layouts_agree(fixtures: Path) -> None:
    d = fixtures / "flickr_captions"
    layouts = {"captions.txt": "csv", "results.csv": "pipe", "results_20130124.token": "token"}
    results = {}
    for name, layout in layouts.items():
        assert detect_layout(d / name) == layout
        report = ReadReport()
        results[name] = read_captions(d / name, report=report)
        assert report.skipped_rows == 0
        assert report.repaired_rows == (1 if name == "results.csv" else 0)
    first = results["captions.txt"]
    assert len(first) == 10 and all(v == first for v in results.values())
    assert first[1] == Caption("2100000001.jpg", "A girl , her dog , and the sea .", 1)
    assert first[3].caption == 'A woman and her "pet" .'
    assert first[9] == Caption("2100000002.jpg", "The two men talk .", 4)
    assert [len(v) for v in by_image(first).values()] == [5, 5]
    assert read_captions(d) == first  # a directory: captions.txt is picked first


def test_captions_malformed_rows(tmp_path: Path) -> None:
    csv_path = tmp_path / "captions.txt"
    csv_path.write_text(
        'image,caption\na.jpg,"one, two, three"\na.jpg,plain\nb.jpg\nb.jpg,"x, ""y"""\n'
    )
    report = ReadReport()
    caps = read_captions(csv_path, report=report)
    assert caps == [
        Caption("a.jpg", "one, two, three", 0),
        Caption("a.jpg", "plain", 1),
        Caption("b.jpg", 'x, "y"', 0),
    ]
    assert report.skipped_rows == 1 and "captions.txt:4" in report.errors[0]

    pipe = tmp_path / "results.csv"
    pipe.write_text(
        "image_name| comment_number| comment\n"
        "a.jpg| 0| A dog | with a pipe .\n"
        "a.jpg| 1   A cat .\n"
        "a.jpg| garbage\n"
    )
    report = ReadReport()
    caps = read_captions(pipe, report=report)
    assert caps == [Caption("a.jpg", "A dog | with a pipe .", 0), Caption("a.jpg", "A cat .", 1)]
    assert report.repaired_rows == 1 and report.skipped_rows == 1
    assert any("results.csv:4" in e for e in report.errors)

    tok = tmp_path / "x.token"
    tok.write_text("a.jpg#0\tA dog .\nno tab here\n")
    report = ReadReport()
    assert read_captions(tok, report=report) == [Caption("a.jpg", "A dog .", 0)]
    assert report.skipped_rows == 1
    with pytest.raises(FileNotFoundError):
        read_captions(tmp_path / "nope.txt")


# --- Visual Genome ------------------------------------------------------------------------------


def test_visual_genome_regions(tmp_path: Path, fixtures: Path) -> None:
    images = tmp_path / "VG_100K"
    images.mkdir()
    shutil.copy(
        fixtures / "coco" / "train2014" / "COCO_train2014_000000580001.jpg", images / "7.jpg"
    )
    data = [
        {
            "id": 7,
            "regions": [
                {
                    "region_id": 70,
                    "image_id": 7,
                    "phrase": "a dog",
                    "x": 10,
                    "y": 20,
                    "width": 30,
                    "height": 40,
                },
                {
                    "region_id": 71,
                    "image_id": 7,
                    "phrase": "sky",
                    "x": 0,
                    "y": 0,
                    "width": 320,
                    "height": 50,
                },
                {"region_id": 72, "image_id": 7, "phrase": "broken", "x": 1},
            ],
        },
        {
            "id": 8,
            "regions": [
                {
                    "region_id": 80,
                    "image_id": 8,
                    "phrase": "car",
                    "x": 1,
                    "y": 2,
                    "width": 3,
                    "height": 4,
                }
            ],
        },
        {"no": "regions"},
    ]
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(data))
    ds = VisualGenomeRegions(tmp_path, images)
    samples = list(ds)
    assert len(ds) == 3 and [s.image_id for s in samples] == ["7", "8"]
    s7, s8 = samples
    assert [(p.text, p.boxes, p.id) for p in s7.phrases] == [
        ("a dog", [(10.0, 20.0, 40.0, 60.0)], "70"),
        ("sky", [(0.0, 0.0, 320.0, 50.0)], "71"),
    ]
    assert s7.image_size == (320, 240) and "error" not in s7.meta
    assert "image not found" in s8.meta["error"] and s8.image_size == (0, 0)
    assert ds.report.skipped_lines == 1 and ds.report.skipped_samples == 1
    assert ds.report.phrases == 3
    sizes = tmp_path / "image_data.json"
    sizes.write_text(json.dumps([{"image_id": 8, "width": 100, "height": 90}]))
    s8 = list(VisualGenomeRegions(path, [images], image_data=sizes))[1]
    assert s8.image_size == (100, 90)
    with pytest.raises(FileNotFoundError, match="region_descriptions.json"):
        VisualGenomeRegions(tmp_path / "nowhere")
