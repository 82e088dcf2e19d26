"""The shapes trainer: negatives are false, a crashed run resumes to the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from groundcam.data.shapes import generate_scene
from groundcam.train import albef_shapes
from groundcam.train.albef_shapes import TrainConfig, train
from groundcam.train.shapes_negatives import certainly_false, certainly_true, swap_negative


def test_swapped_negatives_name_an_object_the_scene_lacks():
    rng = np.random.default_rng(0)
    for i in range(200):
        s = generate_scene("train", i)
        objects = s.meta["objects"]
        for p in s.phrases:
            neg = swap_negative(p, objects, rng)
            assert neg != p.text and len(neg.split()) == len(p.text.split())
            words = set(neg.split())
            if p.kind == "relation":
                assert neg.split()[1] not in {o["shape"] for o in objects}
            else:
                assert not any({o["colour"], o["shape"]} <= words for o in objects)
            assert not certainly_false(p, objects)


def test_truth_checks_agree_with_the_scene():
    s = generate_scene("train", 3)
    objs = s.meta["objects"]
    for p in s.phrases:
        assert not certainly_false(p, objs)
        if p.kind == "attribute" and p.meta["size"] not in p.text:
            assert certainly_true(p, objs)


def tiny_cfg(out) -> TrainConfig:
    return TrainConfig(
        out=str(out),
        steps=4,
        batch_size=8,
        warmup=2,
        pool=32,
        scene_size=64,
        image_size=32,
        width=16,
        vision_depth=1,
        text_layers=2,
        fusion_layer=1,
        heads=2,
        embed_dim=8,
        save_every=2,
        eval_every=100,
        eval_scenes=2,
    )


def test_a_crashed_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    straight = train(tiny_cfg(tmp_path / "a"), threads=1)

    real_step, calls = albef_shapes.train_step, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(albef_shapes, "train_step", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "b"), threads=1)
    monkeypatch.setattr(albef_shapes, "train_step", real_step)
    resumed = train(tiny_cfg(tmp_path / "b"), threads=1)

    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(ln)["step"]
        for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    final = json.loads((tmp_path / "b" / "train_log.jsonl").read_text().splitlines()[-1])
    assert set(final["val"]) == {"layer1"}


def test_resuming_with_another_configuration_is_refused(tmp_path):
    train(tiny_cfg(tmp_path), threads=1)
    other = tiny_cfg(tmp_path)
    other.lr = 1e-3
    with pytest.raises(ValueError, match="another configuration; use a new --out"):
        train(other, threads=1)
