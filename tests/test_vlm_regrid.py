"""`train vlm --init M --image-size N`: a trained tiny LLaVA moved to a finer grid of image
tokens, its position embeddings resized as transformers' own interpolation does."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_train_vlm import TINY
from test_train_vlm_ground import tiny_args

import groundcam as gc
from groundcam.cli import main
from groundcam.data.shapes import generate_scene
from groundcam.errors import InputError
from groundcam.train.vlm_regrid import POSITIONS, regrid, resize_positions
from groundcam.train.vlm_shapes import TrainConfig, build_model


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny():
    model, processor = build_model(TrainConfig(out="unused", **TINY))  # 32 px, 4x4 grid
    model.eval()
    return model, processor


def test_the_resized_tower_equals_transformers_interpolation_at_the_new_size() -> None:
    model, processor = tiny()
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.model.vision_tower(pixels, interpolate_pos_encoding=True)
        resized, _ = regrid(model, processor, 48)
        resized.eval()
        got = resized.model.vision_tower(pixels)
    assert got.last_hidden_state.shape == (2, 1 + 6 * 6, 16)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
    # every other weight is the trained model's
    before, after = model.state_dict(), resized.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != POSITIONS)


def test_the_resized_model_keeps_its_dtype() -> None:
    model, processor = tiny()
    resized, _ = regrid(model.to(torch.bfloat16), processor, 48)
    assert resized.dtype == torch.bfloat16
    assert resized.state_dict()[POSITIONS].dtype == torch.bfloat16


def test_positions_keep_the_class_row_and_a_constant_grid_stays_constant() -> None:
    weight = torch.randn(1 + 16, 5)
    assert torch.equal(resize_positions(weight, 4), weight)
    out = resize_positions(weight, 7)
    assert out.shape == (1 + 49, 5) and torch.equal(out[0], weight[0])
    flat = torch.cat([weight[:1], torch.ones(16, 1) * torch.arange(5.0)])
    torch.testing.assert_close(resize_positions(flat, 7)[1:], torch.ones(49, 1) * torch.arange(5.0))
    with pytest.raises(ValueError, match="not a square grid"):
        resize_positions(torch.zeros(1 + 15, 5), 4)


def test_the_resized_model_saves_loads_and_explains_on_its_finer_grid(tmp_path) -> None:
    model, processor = regrid(*tiny(), 48)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    explainer = gc.load(str(tmp_path))
    scene = generate_scene("test", 0, 0, 64)
    inputs = processor(images=[scene.image], text=["USER: <image>\nDescribe the image. ASSISTANT:"])
    image_id = model.config.image_token_id
    assert sum(int(t == image_id) for t in inputs["input_ids"][0]) == 36
    gen = explainer.explain_generation(scene.image, text="a small red circle", method="attention")
    assert tuple(gen.raw_maps.shape) == (len(gen.tokens), 6, 6)
    assert torch.isfinite(gen.raw_maps).all() and (gen.raw_maps.flatten(1).amax(1) > 0).all()


def test_train_vlm_init_at_a_new_size_writes_the_resized_model(tmp_path) -> None:
    first = run("train", "vlm", "--out", tmp_path / "a", "--threads", 1, *tiny_args())
    assert first.exit_code == 0, first.output
    result = run(
        "train", "vlm", "--out", tmp_path / "b", "--threads", 1, "--init", tmp_path / "a" / "model",
        "--ground", "attention", *tiny_args(steps=2, image_size=48),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "b" / "model" / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 48 and config["image_seq_length"] == 36
    loaded = gc.load(str(tmp_path / "b" / "model"))
    assert loaded.adapter.processor.image_processor.crop_size["height"] == 48


def test_a_size_off_the_patch_grid_is_one_line(tmp_path) -> None:
    first = run("train", "vlm", "--out", tmp_path / "a", "--threads", 1, *tiny_args())
    assert first.exit_code == 0, first.output
    result = run(
        "train", "vlm", "--out", tmp_path / "b", "--threads", 1, "--init", tmp_path / "a" / "model",
        *tiny_args(image_size=50),
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--image-size 50 is not a multiple of the model's patch size 8" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    with pytest.raises(InputError, match="do not fit the language model"):
        regrid(*tiny(), 8 * 40)
