"""`groundcam train amc`: the AMC term's parameter gradients, a short run that writes a model
gc.load reads, the control without the term, resume, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import noise_images, tiny_albef

import groundcam as gc
from groundcam.cli import main
from groundcam.errors import InputError
from groundcam.train import AMCLoss, box_masks
from groundcam.train.amc import AMCConfig, build, train


def tiny_run(tmp_path, name="run", **kw) -> AMCConfig:
    opts = dict(steps=3, batch_size=3, pool=12, eval_every=0, save_every=1, warmup=1)
    return AMCConfig(out=str(tmp_path / name), **(opts | kw))


def test_amc_gradients_reach_text_itm_and_vision_and_equal_finite_differences(tokenizer):
    torch.manual_seed(0)
    model = tiny_albef(len(tokenizer)).double().train()
    explainer = gc.load(model, tokenizer=tokenizer)
    pv, ids, mask = explainer.prepare(noise_images(2, 64, 64), ["the red circle", "a blue star"])
    pv = pv.double()
    masks, report = box_masks([[[0, 0, 30, 40]], [[20, 10, 64, 50]]], [(64, 64)] * 2, 64, 64)
    loss_fn = AMCLoss()

    def loss() -> torch.Tensor:
        ex = explainer.explain_tensors(
            pv, ids, mask, method="attn-gradcam", layer=1, differentiable=True
        )
        return loss_fn(ex.raw_maps, masks.double(), report.has_box).loss

    names = [
        "text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "itm_head.weight",
        "visual_encoder.blocks.0.mlp.fc1.weight",
    ]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss(), [params[n] for n in names])
    rng = torch.Generator().manual_seed(1)
    for name, g in zip(names, grads, strict=True):
        p = params[name]
        assert g.abs().sum() > 0, f"{name}: the AMC loss does not reach it"
        for i in torch.randint(p.numel(), (3,), generator=rng).tolist():
            with torch.no_grad():
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + 1e-6
                up = loss().item()
                p.view(-1)[i] = old - 1e-6
                down = loss().item()
                p.view(-1)[i] = old
            numeric = (up - down) / 2e-6
            assert abs(numeric - g.view(-1)[i].item()) <= 1e-7 + 1e-4 * abs(numeric), name


def test_a_short_run_writes_a_model_that_loads_and_a_log_of_every_term(tmp_path):
    cfg = tiny_run(tmp_path)
    final = train(cfg, threads=1)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert {"itc", "itm", "amc", "amc_mean", "amc_max", "loss", "lr"} <= set(r)
        assert r["loss"] == pytest.approx(r["itc"] + r["itm"] + r["amc"], rel=1e-5)
    card = json.loads((final / "train_card.json").read_text())
    assert card["config"]["amc"] is True and card["layer"] == 2
    trained = gc.load(final)
    assert trained.family == "albef"
    start = load_file(str(_zoo_weights()))
    now = load_file(str(final / "model.safetensors"))
    assert start.keys() == now.keys()
    assert any(not torch.equal(start[k], now[k]) for k in start)


def _zoo_weights():
    from groundcam.zoo import builtin_path

    return builtin_path("albef-tiny-shapes") / "model.safetensors"


def test_the_control_logs_the_term_but_does_not_train_on_it(tmp_path):
    train(tiny_run(tmp_path, "control", amc=False), threads=1)
    log = (tmp_path / "control" / "train_log.jsonl").read_text().splitlines()
    for r in map(json.loads, log):
        assert r["amc"] > 0  # measured on the same maps ...
        assert r["loss"] == pytest.approx(r["itc"] + r["itm"], rel=1e-5)  # ... not optimised


def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    whole = train(tiny_run(tmp_path, "whole", steps=4), threads=1)
    cut = tiny_run(tmp_path, "cut", steps=4)
    train(cut, threads=1, stop_at=2)
    assert not (tmp_path / "cut" / "model").exists()
    resumed = train(cut, threads=1)
    a, b = (
        load_file(str(whole / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [(tmp_path / n / "train_log.jsonl").read_text() for n in ("whole", "cut")]
    strip = [
        [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in t.splitlines()]
        for t in logs
    ]
    assert strip[0] == strip[1]


def test_another_configuration_in_the_same_out_is_refused(tmp_path):
    train(tiny_run(tmp_path, steps=1), threads=1)
    with pytest.raises(ValueError, match="lr"):
        train(tiny_run(tmp_path, steps=1, lr=3e-4), threads=1)


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(InputError, match="--data vg needs --root"):
        build(AMCConfig(out=str(tmp_path / "x"), data="vg"))
    with pytest.raises(FileNotFoundError, match="region_descriptions.json"):
        build(AMCConfig(out=str(tmp_path / "x"), data="vg", root=str(tmp_path)))
    with pytest.raises(InputError, match="not a cross-attention layer"):
        build(AMCConfig(out=str(tmp_path / "x"), layer=0, pool=4))
    r = CliRunner().invoke(
        main, ["train", "amc", "--out", tmp_path / "y", "--map-method", "attention"]
    )
    assert r.exit_code == 2 and "attention" in r.output
    r = CliRunner().invoke(
        main,
        ["train", "amc", "--out", tmp_path / "y", "--data", "refcoco+"]
        + ["--root", tmp_path, "--images", tmp_path],
    )
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "refs(unc).p" in r.output


def test_blip_itm_trains_with_amc_and_saves_a_loadable_directory(tmp_path, tokenizer):
    from test_blip import make_processor
    from test_blip import tiny as tiny_blip
    from tiny import saved
    from transformers import BlipForImageTextRetrieval

    start = saved(
        tmp_path / "blip",
        tiny_blip(BlipForImageTextRetrieval, tokenizer),
        make_processor(tokenizer),
    )
    final = train(tiny_run(tmp_path, model=str(start), batch_size=4), threads=1)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["amc"] > 0 and r["loss"] > r["itc"] + r["itm"] for r in log)
    trained = gc.load(final)
    assert trained.family == "blip-itm"
    ex = trained.explain(noise_images(1, 64, 64)[0], ["a red circle"])
    assert ex.maps.shape == (1, 4, 4)


def test_box_counts_clip_and_skip():
    from groundcam.train.amc import box_counts

    rows = [([[0, 0, 5, 5], [-3, 2, 8, 9], [5, 5, 5, 9]], (10, 10)), ([[4, 4, 2, 8]], (10, 10))]
    assert box_counts(rows) == {"boxes": 4, "clipped": 1, "skipped": 2}
    assert box_counts([([[12, 0, 20, 5]], (10, 10))])["skipped"] == 1  # wholly outside


def test_two_accelerate_processes_equal_one_process_with_two_micro_batches(tmp_path):
    """Each process takes half of every step's scenes as each micro-batch takes half: the same
    parts, the same negatives, the same averaged gradient, hence the same log and weights."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--steps", "2", "--batch-size", "4", "--pool", "12", "--eval-every", "0"]
    args += ["--save-every", "1", "--warmup", "1", "--threads", "1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(port)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run(
        [*launch, "-m", "groundcam", "train", "amc", "--out", str(tmp_path / "two"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("model written to") == 1
    one = train(tiny_run(tmp_path, "one", steps=2, batch_size=4, grad_accum=2), threads=1)
    logs = [
        [json.loads(x) for x in (tmp_path / n / "train_log.jsonl").read_text().splitlines()]
        for n in ("one", "two")
    ]
    for r1, r2 in zip(*logs, strict=True):
        for key in ("loss", "itc", "itm", "amc"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key
    a = load_file(str(one / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_an_official_albef_release_trains_with_a_given_tokenizer(fixtures, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    ckpt = fixtures / "albef" / "official_tiny_pretrain_format_checkpoint.pth"
    cfg = tiny_run(tmp_path, model=str(ckpt), tokenizer=str(tmp_path / "tok"), num_heads=4)
    cfg.text_num_heads, cfg.steps = 4, 2
    final = train(cfg, threads=1)
    trained = gc.load(final)  # a directory now: config, safetensors, tokenizer
    assert trained.family == "albef" and trained.model.config.fusion_layer == 2
    assert json.loads((final / "train_card.json").read_text())["layer"] == 2


def test_a_model_without_cross_attention_is_told_to_use_gradcam(tmp_path, tokenizer):
    from test_clip import processor_for, tiny_clip
    from tiny import saved

    clip = saved(tmp_path / "clip", tiny_clip(len(tokenizer)), processor_for(tokenizer))
    with pytest.raises(
        InputError, match="has no text-to-image cross-attention.*try --map-method gradcam"
    ):
        build(AMCConfig(out=str(tmp_path / "x"), model=str(clip), pool=4))
    with pytest.raises(InputError, match="clip family is not trainable"):
        build(AMCConfig(out=str(tmp_path / "x"), model=str(clip), map_method="gradcam", pool=4))
