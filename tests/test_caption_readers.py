"""Caption files as users have them: Karpathy split files and every layout's edge cases."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from groundcam.data.captions import (
    WARN_LIMIT,
    Caption,
    by_image,
    detect_layout,
    find_caption_file,
    read_captions,
)
from groundcam.data.sample import ReadReport

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the report's warnings

FIXTURE_CAPTIONS = [
    Caption("2100000001.jpg", "A woman waves at a dog .", 0),
    Caption("2100000001.jpg", "A girl , her dog , and the sea .", 1),
    Caption("2100000001.jpg", "Someone on a beach .", 2),
    Caption("2100000001.jpg", 'A woman and her "pet" .', 3),
    Caption("2100000001.jpg", "Dog and woman .", 4),
    Caption("2100000002.jpg", "Two men ride the subway .", 0),
    Caption("2100000002.jpg", "Men in a train .", 1),
    Caption("2100000002.jpg", "Two guys , a train .", 2),
    Caption("2100000002.jpg", "People commuting .", 3),
    Caption("2100000002.jpg", "The two men talk .", 4),
]


def _read(path: Path, **kwargs) -> tuple[list[Caption], ReadReport]:
    report = ReadReport()
    return read_captions(path, report=report, **kwargs), report


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# --- the shared fixtures read exactly as before -------------------------------------------------


def test_shared_fixtures_unchanged(fixtures: Path) -> None:
    d = fixtures / "flickr_captions"
    for name in ("captions.txt", "results.csv", "results_20130124.token"):
        caps, report = _read(d / name)
        assert caps == FIXTURE_CAPTIONS and all(c.split == "" for c in caps)
        assert report.samples == 10 and report.skipped_rows == 0 and report.skipped_samples == 0
        if name == "results.csv":
            assert report.repaired_rows == 1 and len(report.errors) == 1
            assert "results.csv:11: missing '|' before the caption" in report.errors[0]
        else:
            assert report.repaired_rows == 0 and report.errors == []
    assert read_captions(d) == FIXTURE_CAPTIONS
    assert Caption("a.jpg", "x", 0) == Caption("a.jpg", "x", 0, "")  # old constructors still work


# --- Karpathy split files -----------------------------------------------------------------------

KARPATHY = {
    "images": [
        {
            "filename": "1000.jpg",
            "split": "train",
            "imgid": 0,
            "sentences": [
                {"raw": "A dog runs .", "tokens": ["a", "dog", "runs"], "sentid": 0},
                {"raw": " A brown dog. ", "tokens": ["a", "brown", "dog"], "sentid": 1},
            ],
        },
        {"filename": "2000.jpg", "split": "val", "sentences": [{"raw": "Two men ."}]},
        {"filename": "3000.jpg", "split": "test", "sentences": [{"raw": "Une école, ça ?"}]},
        {
            "filepath": "val2014",
            "filename": "COCO_val2014_4000.jpg",
            "split": "restval",
            "sentences": [{"raw": "A cat on a mat"}],
        },
    ]
}
KARPATHY_ALL = [
    Caption("1000.jpg", "A dog runs .", 0, "train"),
    Caption("1000.jpg", "A brown dog.", 1, "train"),
    Caption("2000.jpg", "Two men .", 0, "val"),
    Caption("3000.jpg", "Une école, ça ?", 0, "test"),
    Caption("COCO_val2014_4000.jpg", "A cat on a mat", 0, "restval"),
]


def test_karpathy_split_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "dataset_flickr8k.json", json.dumps(KARPATHY))
    assert detect_layout(path) == "karpathy"
    caps, report = _read(path)
    assert caps == KARPATHY_ALL and report.samples == 5 and report.errors == []
    # restval counts as train when train is asked for; each split alone otherwise
    assert read_captions(path, split="train") == [KARPATHY_ALL[0], KARPATHY_ALL[1], KARPATHY_ALL[4]]
    assert read_captions(path, split="restval") == [KARPATHY_ALL[4]]
    assert read_captions(path, split="val") == [KARPATHY_ALL[2]]
    assert read_captions(path, split="test") == [KARPATHY_ALL[3]]
    assert by_image(read_captions(path, split="train"))["1000.jpg"] == [
        "A dog runs .",
        "A brown dog.",
    ]
    # a directory that holds it (alone, or under another dataset_*.json name)
    assert find_caption_file(tmp_path) == path and read_captions(tmp_path) == KARPATHY_ALL
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "dataset_mine.json", json.dumps(KARPATHY))
    assert read_captions(other, split="val") == [KARPATHY_ALL[2]]
    # by content when the name does not say; with a BOM and pretty-printed
    plain = _write(tmp_path / "splits.txt", "\ufeff" + json.dumps(KARPATHY, indent=2))
    assert detect_layout(plain) == "karpathy" and read_captions(plain) == KARPATHY_ALL


def test_karpathy_split_problems(tmp_path: Path) -> None:
    path = _write(tmp_path / "dataset_flickr30k.json", json.dumps(KARPATHY))
    with pytest.raises(ValueError, match="unknown split 'testA'"):
        read_captions(path, split="testA")
    nosplit = {"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}]}
    path2 = _write(tmp_path / "dataset_coco.json", json.dumps(nosplit))
    caps, report = _read(path2, split="test")
    assert caps == [] and report.errors == [
        f"{path2}: no captions in split 'test' (splits present: ['(none)'])"
    ]
    assert read_captions(path2) == [Caption("a.jpg", "x", 0, "")]
    with pytest.raises(ValueError, match=r"captions\.txt: a 'csv' caption file has no splits"):
        read_captions(_write(tmp_path / "captions.txt", "a.jpg,x\n"), split="train")


def test_karpathy_malformed_entries(tmp_path: Path) -> None:
    data = {
        "images": [
            {"filename": "ok.jpg", "split": "train", "sentences": [{"raw": "Fine ."}]},
            "not an object",
            {"split": "train", "sentences": [{"raw": "no file name"}]},
            {"filename": "b.jpg", "split": "train", "sentences": {"raw": "a dict"}},
            {"filename": "c.jpg", "split": "val", "sentences": []},
            {
                "filename": "d.jpg",
                "split": "test",
                "sentences": [{"tokens": ["no", "raw"]}, {"raw": "  "}, "text", {"raw": "Kept ."}],
            },
        ]
    }
    path = _write(tmp_path / "dataset_flickr8k.json", json.dumps(data))
    caps, report = _read(path)
    assert caps == [Caption("ok.jpg", "Fine .", 0, "train"), Caption("d.jpg", "Kept .", 3, "test")]
    assert report.skipped_samples == 4 and report.skipped_rows == 3 and report.samples == 2
    assert report.errors == [
        f"{path}:images[1]: an image entry is an object, got str; image skipped",
        f"{path}:images[2]: no 'filename'; image skipped",
        f"{path}:images[3]: 'sentences' of b.jpg is not a list; image skipped",
        f"{path}:images[4]: no sentences for c.jpg; image skipped",
        f"{path}:images[5].sentences[0]: no raw text for d.jpg; row skipped",
        f"{path}:images[5].sentences[1]: no raw text for d.jpg; row skipped",
        f"{path}:images[5].sentences[2]: no raw text for d.jpg; row skipped",
    ]


def test_karpathy_invalid_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "dataset_flickr8k.json", '{"images": [{"filename": "a.jpg",}]}')
    with pytest.raises(ValueError, match=r"dataset_flickr8k\.json: not valid JSON \(") as info:
        read_captions(path)
    assert "\n" not in str(info.value) and "line 1 column" in str(info.value)
    for text in ('["a.jpg"]', '{"annotations": []}', '{"images": {}}'):
        _write(path, text)
        with pytest.raises(ValueError, match="not a Karpathy split file"):
            read_captions(path)


# --- text edge cases, every layout --------------------------------------------------------------


def test_bom_crlf_blank_lines_and_whitespace(tmp_path: Path) -> None:
    expected = [Caption("a.jpg", "A dog .", 0), Caption("a.jpg", "A cat , too .", 1)]
    files = {
        "captions.txt": '\ufeffimage,caption\r\n\r\n a.jpg , A dog .  \r\n   \r\na.jpg,"A cat , too ." \r\n',
        "results.csv": "\ufeffimage_name| comment_number| comment\r\na.jpg| 0| A dog . \t\r\n\r\n"
        "a.jpg |1 |A cat , too .\r\n",
        "x.token": "\ufeff\r\na.jpg#0\tA dog .  \r\n\t\r\na.jpg#1\t A cat , too .\r",
    }
    for name, text in files.items():
        caps, report = _read(_write(tmp_path / name, text))
        assert caps == expected, name
        assert report.errors == [] and report.skipped_rows == report.repaired_rows == 0, name
    # old Mac line ends (CR only) count as line ends, for the line numbers too
    caps, report = _read(_write(tmp_path / "mac.txt", "image,caption\ra.jpg,A dog .\rb.jpg\r"))
    assert (
        caps == [Caption("a.jpg", "A dog .", 0)] and f"{tmp_path / 'mac.txt'}:3" in report.errors[0]
    )


def test_header_variants(tmp_path: Path) -> None:
    for header in (
        "Image,Caption",
        " IMAGE , caption ",
        "image_name,caption",
        "Image Name,Comment",
    ):
        caps, report = _read(_write(tmp_path / "captions.txt", f"{header}\na.jpg,A dog .\n"))
        assert caps == [Caption("a.jpg", "A dog .", 0)] and report.errors == [], header
    # three columns, numbered: the numbers are kept, commas after them belong to the caption
    path = _write(
        tmp_path / "flickr.csv",
        "image_name, comment_number, comment\na.jpg,0,A dog .\na.jpg,3,A dog, running .\n"
        "a.jpg,x,bad number\n",
    )
    caps, report = _read(path)
    assert caps == [Caption("a.jpg", "A dog .", 0), Caption("a.jpg", "A dog, running .", 3)]
    assert report.repaired_rows == 1 and report.skipped_rows == 1
    assert report.errors[0].startswith(f"{path}:3: unquoted commas in the caption")
    assert report.errors[1] == f"{path}:4: the caption number 'x' is not a number; row skipped"
    for header in ("Image_Name | Comment_Number | Comment", "image_name|comment_number|comment"):
        caps, report = _read(_write(tmp_path / "results.csv", f"{header}\na.jpg| 0| A dog .\n"))
        assert caps == [Caption("a.jpg", "A dog .", 0)] and report.errors == [], header
    # a header repeated inside the file (two files pasted together) is not a caption
    path = _write(
        tmp_path / "captions.txt", "image,caption\na.jpg,A dog .\nimage,caption\nb.jpg,B .\n"
    )
    caps, report = _read(path)
    assert caps == [Caption("a.jpg", "A dog .", 0), Caption("b.jpg", "B .", 0)]
    assert report.skipped_rows == 1 and report.errors == [
        f"{path}:3: a repeated header row 'image,caption'; row skipped"
    ]


def test_csv_unquoted_commas_are_repaired(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.txt",
        "image,caption\n"
        "a.jpg,A girl, her dog, and the sea .\n"  # unquoted commas: the rest of the line is the caption
        'a.jpg,A "big" dog, running\n'
        "a.jpg,Plain .\n"
        "a.jpg,Trailing fields .,,\n"  # a spreadsheet's empty columns
        'b.jpg,"An open quote, never closed\n'  # only this line is affected
        'b.jpg,"Quoted, fine ."\n'
        'b.jpg, "Quoted after a space, fine ."\n',
    )
    caps, report = _read(path)
    assert caps == [
        Caption("a.jpg", "A girl, her dog, and the sea .", 0),
        Caption("a.jpg", 'A "big" dog, running', 1),
        Caption("a.jpg", "Plain .", 2),
        Caption("a.jpg", "Trailing fields .", 3),
        Caption("b.jpg", "An open quote, never closed", 0),
        Caption("b.jpg", "Quoted, fine .", 1),
        Caption("b.jpg", "Quoted after a space, fine .", 2),
    ]
    assert report.repaired_rows == 4 and report.skipped_rows == 0 and report.samples == 7
    assert report.errors == [
        f"{path}:2: unquoted commas in the caption, fields joined, repaired: caption "
        "'A girl, her dog, and the sea .'",
        f"{path}:3: unquoted commas in the caption, fields joined, repaired: caption "
        "'A \"big\" dog, running'",
        f"{path}:5: trailing empty fields, repaired: caption 'Trailing fields .'",
        f"{path}:6: unbalanced quotes, repaired: caption 'An open quote, never closed'",
    ]


def test_numbers_beyond_four(tmp_path: Path) -> None:
    tok = _write(tmp_path / "x.token", "a.jpg#5\tSix .\na.jpg#12\tThirteen .\nb.c.jpg#0\tDots .\n")
    assert read_captions(tok) == [
        Caption("a.jpg", "Six .", 5),
        Caption("a.jpg", "Thirteen .", 12),
        Caption("b.c.jpg", "Dots .", 0),
    ]
    pipe = _write(tmp_path / "results.csv", "a.jpg| 7| Eight .\na.jpg| 10   Eleven .\n")
    caps, report = _read(pipe)
    assert caps == [Caption("a.jpg", "Eight .", 7), Caption("a.jpg", "Eleven .", 10)]
    assert report.repaired_rows == 1
    csv_path = _write(tmp_path / "captions.txt", "".join(f"a.jpg,C{i}\n" for i in range(7)))
    assert [c.index for c in read_captions(csv_path)] == list(range(7))


def test_empty_captions_are_skipped_and_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.txt", 'image,caption\na.jpg,\na.jpg,""\na.jpg,   \na.jpg,Ok .\n'
    )
    caps, report = _read(path)
    assert caps == [Caption("a.jpg", "Ok .", 0)] and report.skipped_rows == 3
    assert report.errors == [f"{path}:{n}: empty caption for a.jpg; row skipped" for n in (2, 3, 4)]

    pipe = _write(tmp_path / "results.csv", "a.jpg| 0| \na.jpg| 1| Ok .\n")
    caps, report = _read(pipe)
    assert caps == [Caption("a.jpg", "Ok .", 1)]
    assert report.errors == [f"{pipe}:1: empty caption for a.jpg; row skipped"]

    tok = _write(tmp_path / "x.token", "a.jpg#0\t\na.jpg#1\na.jpg#2\tOk .\n")
    caps, report = _read(tok)
    assert caps == [Caption("a.jpg", "Ok .", 2)] and report.skipped_rows == 2
    assert report.errors == [
        f"{tok}:1: empty caption for a.jpg#0; row skipped",
        f"{tok}:2: empty caption for a.jpg#1; row skipped",
    ]


def test_duplicated_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.txt", "a.jpg,A dog .\na.jpg,A cat .\na.jpg,A dog .\nb.jpg,A dog .\n"
    )
    caps, report = _read(path)
    assert caps == [
        Caption("a.jpg", "A dog .", 0),
        Caption("a.jpg", "A cat .", 1),
        Caption("b.jpg", "A dog .", 0),
    ]
    assert report.skipped_rows == 1
    assert report.errors == [f"{path}:3: duplicate of line 1; row skipped"]

    tok = _write(
        tmp_path / "x.token",
        "a.jpg#0\tA dog .\na.jpg#0\tA dog .\na.jpg#1\tA dog .\n",  # #1: a second annotator, kept
    )
    caps, report = _read(tok)
    assert caps == [Caption("a.jpg", "A dog .", 0), Caption("a.jpg", "A dog .", 1)]
    assert report.errors == [f"{tok}:2: duplicate of line 1; row skipped"]

    pipe = _write(tmp_path / "results.csv", "a.jpg| 0| A dog .\n\na.jpg| 0| A dog .\n")
    caps, report = _read(pipe)
    assert caps == [Caption("a.jpg", "A dog .", 0)]
    assert report.errors == [f"{pipe}:3: duplicate of line 1; row skipped"]


def test_token_with_spaces_instead_of_a_tab(tmp_path: Path) -> None:
    tok = _write(tmp_path / "Flickr8k.token.txt", "a.jpg#0 A dog | a pipe .\na.jpg#1\tA cat .\n")
    assert detect_layout(tok) == "token"
    caps, report = _read(tok)
    assert caps == [Caption("a.jpg", "A dog | a pipe .", 0), Caption("a.jpg", "A cat .", 1)]
    assert report.repaired_rows == 1
    assert report.errors == [f"{tok}:1: spaces instead of a tab after a.jpg#0, repaired"]
    # detected by content too: a '|' inside a token caption does not make it a pipe file
    other = _write(tmp_path / "caps.dat", "a.jpg#0\tA | b\n")
    assert detect_layout(other) == "token"
    assert detect_layout(_write(tmp_path / "caps2.dat", "a.jpg,A | b\n")) == "csv"


def test_not_utf8_is_one_line_value_error(tmp_path: Path) -> None:
    for name in ("captions.txt", "results.csv", "x.token", "dataset_flickr8k.json"):
        path = _write(tmp_path / name, "a.jpg,Un caf\u00e9 .\n", encoding="latin-1")
        with pytest.raises(
            ValueError, match=rf"{name}: not UTF-8 text: byte 0xe9 at offset 12"
        ) as e:
            read_captions(path)
        assert "\n" not in str(e.value)
    path = _write(tmp_path / "captions.txt", "image,caption\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"captions\.txt: not UTF-8 text \(it looks like UTF-16\)"):
        read_captions(path)
    with pytest.raises(ValueError, match="not UTF-8"):
        detect_layout(_write(tmp_path / "caps.dat", "a.jpg,caf\u00e9\n", encoding="latin-1"))


def test_empty_files_give_no_captions(tmp_path: Path) -> None:
    for name, text in [
        ("captions.txt", ""),
        ("results.csv", "\ufeff\r\n  \n"),
        ("x.token", "\n\n"),
        ("dataset_flickr8k.json", ""),
    ]:
        path = _write(tmp_path / name, text)
        caps, report = _read(path)
        assert caps == [] and report.errors == [f"{path}: empty caption file: no captions"], name
    # a header and nothing else; a Karpathy file without images
    path = _write(tmp_path / "captions.txt", "image,caption\n")
    caps, report = _read(path)
    assert caps == [] and report.errors == [f"{path}: no captions read"]
    path = _write(tmp_path / "dataset_flickr8k.json", '{"images": []}')
    caps, report = _read(path)
    assert caps == [] and report.errors == [f"{path}: no captions read"]
    assert detect_layout(_write(tmp_path / "empty.txt", "")) == "csv"
    with pytest.raises(ValueError, match="cannot tell the caption layout"):
        detect_layout(_write(tmp_path / "empty.dat", ""))


def test_directory_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset_\\*.json"):
        read_captions(tmp_path)
    _write(tmp_path / "dataset_flickr30k.json", json.dumps(KARPATHY))
    assert read_captions(tmp_path, split="test") == [KARPATHY_ALL[3]]
    _write(tmp_path / "captions.txt", "a.jpg,A dog .\n")  # captions.txt still comes first
    assert read_captions(tmp_path) == [Caption("a.jpg", "A dog .", 0)]
    with pytest.raises(ValueError, match="unknown caption layout"):
        read_captions(tmp_path / "captions.txt", layout="xml")


def test_many_problems_warn_a_bounded_number_of_times(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "captions.txt", "".join(f"a{i}.jpg,A, b\n" for i in range(WARN_LIMIT + 10))
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        caps, report = _read(path)
    assert len(caps) == WARN_LIMIT + 10 and report.repaired_rows == WARN_LIMIT + 10
    assert (
        len(report.errors) == WARN_LIMIT + 10 and f"{path}:{WARN_LIMIT + 10}:" in report.errors[-1]
    )
    assert len(caught) == WARN_LIMIT + 1
    assert str(caught[-1].message) == f"{path}: 10 more problems, listed in the report's errors"
