"""What a person reading a result must be told (issue 17, items 11-13): words the model read as
unknown, maps that ignore the text, and what the score beside each phrase is."""

from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny import saved, tiny_albef

import groundcam as gc
from groundcam.adapters import FAMILIES
from groundcam.adapters.hf import unknown_words
from groundcam.cli import main
from groundcam.data.shapes import generate_scene, vocabulary
from groundcam.errors import GroundcamWarning
from groundcam.train.tokenizer import word_tokenizer
from groundcam.viz.overlay import overlay

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def mine(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, GroundcamWarning)]


@pytest.fixture(scope="module")
def shapes(one_thread):
    return gc.load("albef-tiny-shapes")


@pytest.fixture(scope="module")
def scene():
    return generate_scene("test", 0, 0).image


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory, scene) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    scene.save(path)
    return path


# ----------------------------------------------------------------------------- unknown words


@pytest.mark.parametrize(
    ("phrase", "unknown"),
    [
        ("the cat", ["cat"]),
        ("the zebra left of a blue star", ["zebra"]),
        ("The Red CIRCLE", []),  # the tokenizer lower-cases: every word known
        ("the red, circle!", []),  # punctuation is not a word
        ("a red circle near the llama and the llama", ["near", "llama"]),  # each once, in order
    ],
)
def test_words_wholly_unknown_to_the_tokenizer_are_found(phrase, unknown):
    tok = word_tokenizer(vocabulary())
    assert unknown_words(tok, [phrase, "the red circle"]) == [unknown, []]


def test_a_word_only_partly_unknown_is_not_flagged(one_thread):
    # a character tokenizer: "naïve" keeps readable letters, "ü" is nothing but <unk>
    tok = gc.load("trocr-tiny-glyphs").adapter.tokenizer
    ids = tok("ü", add_special_tokens=False)["input_ids"]
    assert ids and all(i == tok.unk_token_id for i in ids)
    assert unknown_words(tok, ["naïve ü ok"]) == [["ü"]]


def test_one_unknown_word_warns_once_naming_it_and_is_marked(shapes, scene):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            ex = shapes.explain(scene, ["the cat", "the red circle"])
    got = mine(caught)
    assert len(got) == 1, got
    assert "'the cat'" in got[0] and "'cat' is unknown" in got[0] and "[UNK]" in got[0]
    assert ex.tokens[0] == ["[CLS]", "the", "[UNK]", "[SEP]"]
    assert ex.unknown_words == [["cat"], []]
    assert ex.meta()["unknown_words"] == [["cat"], []]


def test_a_mostly_unknown_phrase_keeps_its_one_warning_and_names_the_words(shapes, scene):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = shapes.explain(scene, ["a woman in uniform"])
    (got,) = mine(caught)
    assert "3 of its 4 tokens are unknown" in got and "woman, in, uniform" in got
    assert ex.unknown_words == [["woman", "in", "uniform"]]


def test_albef_checks_the_text_it_feeds_not_the_raw_phrase(shapes):
    # pre_caption drops the punctuation: "circle." is read as "circle"
    assert shapes.unknown_words(["the red circle.", "the red-hot circle"]) == [[], ["hot"]]


def test_explain_marks_unknown_words_on_its_line_json_and_meta(
    tiny_model_dir, scene_file, tmp_path
):
    out = tmp_path / "o"
    r = run(
        "explain", scene_file, "the cat", "a red circle", "--model", tiny_model_dir, "--out", out
    )
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    (cat,) = [x for x in lines if x.endswith("the cat  [unknown words: cat]")]
    (circle,) = [x for x in lines if "a red circle" in x]
    assert circle.endswith("  a red circle") and re.match(r"^\d\.\d{3}  ", cat)
    warned = [x for x in r.stderr.splitlines() if x.startswith("groundcam: warning:")]
    assert len(warned) == 1 and "'cat' is unknown" in warned[0]
    assert json.loads((out / "meta.json").read_text())["unknown_words"] == [["cat"], []]
    r = run(
        "explain", scene_file, "the cat", "a red circle", "--model", tiny_model_dir,
        "--out", out, "--json",
    )  # fmt: skip
    assert json.loads(r.stdout)["results"][0]["unknown_words"] == [["cat"], []]


def test_caption_text_with_unknown_words_warns(tmp_path, scene_file, one_thread):
    out = tmp_path / "c"
    args = ["caption", scene_file, "--model", "captioner-tiny-shapes", "--out", out]
    r = run(*args, "--text", "an astronaut")
    assert r.exit_code == 0, r.output
    assert "'an', 'astronaut' are unknown" in r.stderr and "<UNK>" in r.stderr
    assert "unknown words (read as unknown tokens): an, astronaut" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokens"] == ["<UNK>", "<UNK>"] and meta["unknown_words"] == ["an", "astronaut"]
    r = run(*args, "--text", "a red circle")
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    assert json.loads((out / "meta.json").read_text())["unknown_words"] == []


def test_captioner_phrases_and_ocr_texts_name_their_unknown_words(scene, one_thread):
    captioner = gc.load("captioner-tiny-shapes")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = captioner.explain(scene, ["a red astronaut circle", "a red circle"])
    (got,) = mine(caught)  # one of four words: below the "mostly unknown" warning
    assert "'astronaut' is unknown" in got and ex.unknown_words == [["astronaut"], []]
    ocr = gc.load("trocr-tiny-glyphs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = ocr.explain_generation(scene, text="ab ü")
    (got,) = mine(caught)
    assert "'ü' is unknown" in got and gen.unknown_words == ["ü"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroundcamWarning)
        assert ocr.explain_generation(scene, text="ab3").unknown_words == []


def test_eval_records_and_summary_mark_phrases_with_unknown_words(tmp_path, tokenizer):
    # the same tiny ALBEF, with a tokenizer that never learnt "circle"
    tok = word_tokenizer([w for w in vocabulary() if w != "circle"])
    model_dir = saved(tmp_path / "m", tiny_albef(len(tokenizer)), tok)
    out = tmp_path / "eval"
    r = run(
        "eval", "shapes", "--split", "val", "--scenes", "6", "--model", model_dir, "--out", out,
        "--metrics", "pointing,deletion", "--steps", "2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stderr.count("is unknown") == 1  # one summing-up line, not one per phrase or step
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    marked = [rec for rec in records if "unknown_words" in rec]
    circles = [rec for rec in records if "circle" in rec["text"].split()]
    assert circles and [rec["uid"] for rec in marked] == [rec["uid"] for rec in circles]
    assert all(rec["unknown_words"] == ["circle"] for rec in marked)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unknown_words"] == len(circles) < len(records)
    assert summary["config"]["score"] == "itm_probability"
    assert f"{len(circles)} phrase(s) have words unknown to the tokenizer" in r.stdout


# ----------------------------------------------------------------------------- image-only maps


def test_several_phrases_on_one_image_only_map_warn_once(shapes, scene):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = shapes.explain(scene, ["the red circle", "a blue square"], method="rollout")
    got = [m for m in mine(caught) if "does not read the text" in m]
    assert len(got) == 1 and "'rollout'" in got[0] and "2 phrases" in got[0]
    assert not ex.text_conditioned and torch.equal(ex.maps[0], ex.maps[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shapes.explain(scene, ["the red circle"], method="rollout")  # one phrase: nothing shared
        shapes.explain(scene, ["the red circle", "a blue square"], method="attn-gradcam")
    assert not [m for m in mine(caught) if "does not read the text" in m]


def test_an_image_only_overlay_says_so_along_its_bottom_edge(shapes, scene, tmp_path):
    ex = shapes.explain(scene, ["the red circle", "a blue square"], method="rollout")
    plain = np.asarray(overlay(scene, ex.maps[0]))
    noted = np.asarray(ex.overlay(0))
    assert noted.shape == plain.shape  # the size stays: the overlay lines up with the photo
    rows = np.nonzero((noted != plain).any(axis=(1, 2)))[0]
    assert rows.size and rows.min() > plain.shape[0] * 2 // 3 and rows.max() == plain.shape[0] - 1
    assert np.array_equal(np.asarray(ex.overlay(0, note=None)), plain)
    out = ex.save(tmp_path / "o")
    on_disk = np.asarray(Image.open(out / "000_the-red-circle.png").convert("RGB"))
    assert np.array_equal(on_disk, np.asarray(ex.overlay(0, colorbar=True)))
    text = shapes.explain(scene, ["the red circle"], method="attn-gradcam")
    assert np.array_equal(np.asarray(text.overlay(0)), np.asarray(overlay(scene, text.maps[0])))


def test_explain_line_and_eval_report_say_the_map_is_image_only(
    tiny_model_dir, scene_file, tmp_path
):
    r = run(
        "explain", scene_file, "a red circle", "a blue star", "--method", "rollout",
        "--model", tiny_model_dir, "--out", tmp_path / "o",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stdout.splitlines() if re.match(r"^\d\.\d{3}  ", x)]
    assert len(lines) == 2
    assert all(x.endswith("[image-only map: rollout does not read the text]") for x in lines)
    assert r.stderr.count("does not read the text") == 1
    out = tmp_path / "eval"
    r = run(
        "eval", "shapes", "--split", "val", "--scenes", "2", "--method", "rollout",
        "--model", tiny_model_dir, "--out", out, "--report", "--examples", "1",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "groundcam: warning: method 'rollout' does not read the text" in r.stderr
    title = re.search(r"<h1>(.*?)</h1>", (out / "report.html").read_text()).group(1)
    assert "image-only maps: rollout does not read the text" in title


# ----------------------------------------------------------------------------- what the score is


def _adapter_classes():
    for name, family in FAMILIES.items():
        yield name, getattr(importlib.import_module(family.module), family.adapter)


def test_every_family_declares_the_score_of_each_of_its_targets():
    for name, cls in _adapter_classes():
        assert set(cls.SCORES) == set(cls.targets), name
        for kind in cls.SCORES.values():
            assert re.fullmatch(r"[a-z_]+", kind.name) and len(kind.description) > 20, name


def test_the_readme_table_is_the_declarations():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Scores\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for family in re.findall(r"`([^`]+)`", cells[0]):
                table[(family, cells[1].strip("`"))] = cells[2].strip("`")
    declared = {
        (name, target): kind.name
        for name, cls in _adapter_classes()
        for target, kind in cls.SCORES.items()
    }
    assert table == declared


def test_the_score_is_named_in_meta_and_on_the_command_line(tiny_model_dir, scene_file, tmp_path):
    for target, name in (("itm", "itm_probability"), ("similarity", "cosine_similarity")):
        out = tmp_path / target
        r = run(
            "explain", scene_file, "a red circle", "--target", target, "--method", "gradcam",
            "--model", tiny_model_dir, "--out", out,
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        (line,) = [x for x in r.stdout.splitlines() if x.startswith("score: ")]
        assert line.startswith(f"score: {name} - ")
        meta = json.loads((out / "meta.json").read_text())
        assert meta["score_kind"]["name"] == name and meta["score_kind"]["description"]
    r = run("caption", scene_file, "--model", "trocr-tiny-glyphs", "--out", tmp_path / "c")
    assert "score: token_probability - " in r.stdout
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["score_kind"]["name"] == "token_probability"


def test_the_page_names_the_score(tmp_path, scene_file, one_thread):
    from groundcam.web import handlers as h
    from groundcam.web.app import _summary
    from groundcam.web.limits import Limits
    from groundcam.web.models import ModelCache

    cache, workspace = ModelCache(), h.Workspace(tmp_path / "ws")
    res = h.explain_phrases(
        cache, workspace, Limits(), "albef-tiny-shapes", str(scene_file), "the cat\na red circle"
    )
    text = _summary(res, "explained 2 phrase(s)")
    assert "score: itm_probability - " in text and "'cat' is unknown" in text


def test_a_sentencepiece_word_start_marker_does_not_hide_an_unknown_word():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<pad>", "\u2581", "\u2581the", "\u2581red", "c", "a", "t"]
    backend = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    # "猫" is ["▁", "<unk>"]: nothing but the unknown token carries its text
    assert (
        tok.convert_ids_to_tokens(tok("猫", add_special_tokens=False)["input_ids"])[-1] == "<unk>"
    )
    assert unknown_words(tok, ["the 猫", "the red cat", "the xyz"]) == [["猫"], [], ["xyz"]]


def test_image_only_token_maps_warn_once_and_their_grid_says_so(one_thread):
    ocr = gc.load("trocr-tiny-glyphs")
    line = Image.new("RGB", (384, 128), "white")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = ocr.explain_generation(line, method="rollout", text="ab3")
    got = [m for m in mine(caught) if "does not read the text" in m]
    assert len(got) == 1 and "3 generated tokens" in got[0] and not gen.text_conditioned
    note = "image-only map: rollout does not read the text"
    assert gen.figure(tokens=True).get_suptitle().endswith(f"glyphs · rollout · {note}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GroundcamWarning)
        text = ocr.explain_generation(line, method="attention", text="ab3")
    assert "image-only" not in text.figure(tokens=True).get_suptitle()


def test_a_word_added_to_the_vocabulary_is_known_at_once():
    tok = word_tokenizer(vocabulary())
    assert unknown_words(tok, ["the red cat"]) == [["cat"]]
    tok.add_tokens(["cat"])
    assert unknown_words(tok, ["the red cat"]) == [[]]


def test_a_too_long_text_is_one_error_line_without_the_unknown_word_warning(scene_file, tmp_path):
    text = "ü " * 40  # more tokens than the tiny OCR decoder reads, every word unknown
    r = run(
        "caption", scene_file, "--model", "trocr-tiny-glyphs", "--text", text, "--out", tmp_path
    )
    assert r.exit_code == 2
    lines = [x for x in r.stderr.splitlines() if x.startswith("groundcam:")]  # not transformers'
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: text= is ")


def test_groundcam_models_lists_every_familys_scores():
    from groundcam.api import score_kinds

    r = run("models")
    assert r.exit_code == 0, r.output
    listed = r.output.split("scores (the number beside each phrase or token)", 1)[1]
    for family, kinds in score_kinds().items():
        for target, kind in kinds.items():
            assert re.search(rf"^  {re.escape(family)} +{target} +{kind.name}: ", listed, re.M)
