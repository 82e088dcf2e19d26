"""Native ALBEF against outputs written by the official ALBEF code (tests/fixtures/albef)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import assert_close

import groundcam as gc
from groundcam.capture import HookPoint, Recorder
from groundcam.data.text import pre_caption
from groundcam.models.albef_checkpoint import CheckpointError, load_official

CHECKPOINTS = [
    "official_tiny_state_dict.safetensors",
    "official_tiny_checkpoint.pth",
    "official_tiny_pretrain_format_checkpoint.pth",
]


REL = 1e-5  # of the official tensor's largest magnitude (`assert_close`)


@pytest.fixture(scope="module")
def ref(fixtures):
    d = fixtures / "albef"
    return load_file(str(d / "inputs.safetensors")), load_file(str(d / "expected.safetensors"))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_forward_outputs_match_official(fixtures, ref, name):
    inputs, exp = ref
    m = load_official(fixtures / "albef" / name, num_heads=4, text_num_heads=4)
    pv, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image = m.encode_image(pv)
        text = m.text_encoder.encode_text(ids, mask)
        assert_close(image, exp["image_embeds"], REL)
        assert_close(text, exp["text_embeds"], REL)
        img, txt = m.itc_features(pv, ids, mask)
        assert_close(img, exp["itc_image_feat"], REL)
        assert_close(txt, exp["itc_text_feat"], REL)
        assert_close(img @ txt.T, exp["itc_sim"], REL)
        assert_close(img @ txt.T / m.temp, exp["itc_logits"], REL)
        assert_close(
            m.text_encoder.fuse(text, mask, image), exp["multimodal_last_hidden_state"], REL
        )
        assert_close(m.itm_logits(pv, ids, mask), exp["itm_logits"], REL)
        # every image with every text, image tokens shared through the index
        ii, tt = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
        all_pairs = m.itm_from(image, text[tt.flatten()], mask[tt.flatten()], ii.flatten())
        assert_close(all_pairs.reshape(3, 3, 2), exp["itm_logits_all_pairs"], REL)


def test_load_report_accounts_for_every_key(fixtures):
    d = fixtures / "albef"
    keys = json.loads((d / "state_dict_keys.json").read_text())
    m = load_official(d / "official_tiny_checkpoint.pth", num_heads=4, text_num_heads=4)
    r = m.load_report
    n_file = len(keys["grounding_class"]["keys"])
    assert len(r.loaded) + len(r.unused) == n_file == 255
    assert r.unused["queue_ptr"] == "ITC queue"
    assert r.unused["visual_encoder_m.cls_token"] == "momentum copy"
    assert r.layout == "fine-tuning"
    m = load_official(
        d / "official_tiny_pretrain_format_checkpoint.pth", num_heads=4, text_num_heads=4
    )
    assert m.load_report.layout == "pre-training"
    r = m.load_report
    assert len(r.loaded) + len(r.unused) == 268
    assert sorted(k for k, v in r.unused.items() if v == "MLM head") == sorted(
        k for k in r.unused if k.startswith("text_encoder.cls.")
    )
    assert len([k for k in r.unused if ".cls." in k]) == 14  # main + momentum MLM heads
    cfg = m.config
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_depth) == (64, 16, 48, 2)
    assert (cfg.text_layers, cfg.fusion_layer, cfg.vocab_size, cfg.embed_dim) == (4, 2, 100, 16)
    assert cfg.max_position_embeddings == 40 and cfg.intermediate_size == 96


@pytest.mark.parametrize("block", [2, 3])
def test_cross_attention_and_gradients_match_official(fixtures, ref, block):
    inputs, exp = ref
    m = load_official(fixtures / "albef" / CHECKPOINTS[0], num_heads=4, text_num_heads=4)
    point = HookPoint("x", m.text_encoder.encoder.layer[block].crossattention.self.probs)
    with Recorder([point], leaf=True) as rec:
        logits = m.itm_logits(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        (probs,) = rec.tensors()
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), [probs])
    assert_close(probs.detach(), exp[f"cross_attn_probs_block{block}"], REL)
    assert_close(grad, exp[f"cross_attn_grad_block{block}"], REL)
    assert not point.module._forward_hooks


@pytest.mark.parametrize("block", [2, 3])
def test_gradcam_maps_match_official(fixtures, ref, block):
    inputs, exp = ref
    model = gc.load(fixtures / "albef" / CHECKPOINTS[1], num_heads=4, text_num_heads=4)
    ex = model.explain_tensors(
        inputs["pixel_values"],
        inputs["input_ids"],
        inputs["attention_mask"],
        method="attn-gradcam",
        layer=block,
    )
    assert_close(ex.raw_maps, exp[f"gradcam_block{block}"], REL)
    assert_close(ex.raw_token_maps, exp[f"gradcam_per_token_block{block}"], REL)
    ref_maps = exp[f"gradcam_block{block}"]
    lo = ref_maps.flatten(1).min(1).values[:, None, None]
    hi = ref_maps.flatten(1).max(1).values[:, None, None]
    assert_close(ex.maps, (ref_maps - lo) / (hi - lo), REL)
    if block == 3:  # last layer: only the text CLS row reaches the ITM head
        assert ex.raw_token_maps[:, 1:].abs().max() == 0
        assert ex.token_maps[0][1:].abs().max() == 0  # all-zero maps stay zero, never NaN


def test_upsampled_maps_match_official_grounding(fixtures, ref):
    inputs, exp = ref
    cases = json.loads((fixtures / "albef" / "grounding_cases.json").read_text())["cases"]
    model = gc.load(fixtures / "albef" / CHECKPOINTS[0], num_heads=4, text_num_heads=4)
    ex = model.explain_tensors(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], layer=3
    )
    ex.maps = ex.raw_maps  # the official code upsamples the raw map
    for case in cases:
        size = (case["image_height"], case["image_width"])
        assert_close(
            ex.resize(size)[case["sample_index"]],
            exp[f"grounding_upsampled_case{case['case']}"],
            REL,
        )


def test_pre_caption_matches_official(fixtures):
    for case in json.loads((fixtures / "albef" / "pre_caption_cases.json").read_text()):
        assert pre_caption(case["input"], case["max_words"]) == case["output"]


def test_position_embeddings_resize_for_another_resolution(fixtures):
    m = load_official(fixtures / "albef" / CHECKPOINTS[0], 4, 4, image_size=128)
    assert m.config.image_size == 128
    assert m.visual_encoder.pos_embed.shape == (1, 8 * 8 + 1, 48)
    with torch.no_grad():
        assert m.encode_image(torch.randn(1, 3, 128, 128)).shape == (1, 65, 48)


def test_bad_checkpoints_get_one_clear_error(fixtures, tmp_path):
    state = load_file(str(fixtures / "albef" / CHECKPOINTS[0]))
    extra = dict(state, **{"text_encoder.pooler.dense.weight": torch.zeros(48, 48)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="'text_encoder.pooler.dense.weight' fits no part"):
        load_official(tmp_path / "extra.safetensors", 4, 4)
    no_temp = {k: v for k, v in state.items() if k != "temp"}
    save_file(no_temp, str(tmp_path / "no_temp.safetensors"))
    m = load_official(tmp_path / "no_temp.safetensors", 4, 4)
    assert m.load_report.defaulted == ["temp"] and m.temp.item() == pytest.approx(0.07)
    missing = {k: v for k, v in state.items() if k != "itm_head.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing .*itm_head.weight"):
        load_official(tmp_path / "missing.safetensors", 4, 4)
    with pytest.raises(CheckpointError, match="not divisible by 5 heads"):
        load_official(fixtures / "albef" / CHECKPOINTS[0], num_heads=5, text_num_heads=4)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_official(tmp_path / "nope.pth", 4, 4)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_official(tmp_path / "junk.pth", 4, 4)
    torch.save({"model": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_official(tmp_path / "list.pth", 4, 4)
