"""`groundcam caption` and `groundcam eval glyphs` on a tiny saved VisionEncoderDecoder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_vision_encoder_decoder import SIZE, picture, tiny_ved

from groundcam.cli import main
from groundcam.data.glyphs import IMAGE_SIZE
from groundcam.train.trocr_glyphs import char_tokenizer, image_processor


@pytest.fixture(scope="module")
def ved_dir(tmp_path_factory):
    import torch

    from groundcam.data.glyphs import render_line

    tok = char_tokenizer()
    path = tmp_path_factory.mktemp("ved")
    pv = image_processor(SIZE)(images=[render_line("test", 0).image], return_tensors="pt")
    for seed in range(50):  # a random model that writes some text on the first test line
        model = tiny_ved(len(tok), seed=seed)
        with torch.no_grad():
            ids = model.generate(pixel_values=pv["pixel_values"], max_new_tokens=4)[0, 1:3]
        if not set(ids.tolist()) & {0, 1, 2}:
            break
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor(SIZE).save_pretrained(path)
    return path


def test_caption_writes_token_grid_and_maps(ved_dir, tmp_path):
    image = tmp_path / "line.png"
    picture(2).save(image)
    out = tmp_path / "out"
    args = ["caption", str(image), "--model", str(ved_dir), "--text", "ab3", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "ab3" in result.output and "wrote tokens.png, 3 overlays" in result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokens"] == ["a", "b", "3"] and meta["target"] == "token"
    assert (out / "tokens.png").is_file()


def test_caption_on_a_matching_model_is_a_clear_error(tiny_model_dir, tmp_path):
    image = tmp_path / "x.png"
    picture().save(image)
    result = CliRunner().invoke(main, ["caption", str(image), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2
    assert "does not generate text" in result.output


def test_eval_glyphs_writes_records_and_summary(ved_dir, tmp_path):
    assert IMAGE_SIZE  # the glyph lines are resized by the model's own processor
    out = tmp_path / "eval"
    args = ["eval", "glyphs", "--model", str(ved_dir), "--lines", "3", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert summary["n_tokens"] == len(records) and summary["n_lines"] <= 3
    assert records, "the fixture model writes text on the first line"
    assert summary["token_pointing"] == sum(r["hit"] for r in records) / len(records)
    assert all(r["hit"] is False for r in records if not r["in_text"])
