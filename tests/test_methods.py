"""Known-answer maps: constructed tensors where the right map is certain."""

from __future__ import annotations

import torch

from groundcam.explanation import normalize_maps
from groundcam.geometry import Geometry
from groundcam.methods import CROSS_ATTENTION, SELF_ATTENTION, TOKENS, get_method

GEOM = Geometry(4, 4, prefix=1)  # 16 patches after one CLS token


def argmax_cell(m: torch.Tensor) -> tuple[int, int]:
    i = int(m.flatten().argmax())
    return divmod(i, m.shape[-1])


def test_gradcam_peaks_on_the_patch_whose_channel_the_score_uses():
    acts = torch.rand(1, 17, 8) * 0.1
    acts[0, 1 + 6, 3] = 5.0  # patch 6 = row 1, col 2
    grad = torch.zeros(1, 17, 8)
    grad[..., 3] = 1.0  # the score reads channel 3 only
    grad[..., 5] = -1.0
    out = get_method("gradcam").compute(TOKENS, [acts], [grad], GEOM, None)
    assert argmax_cell(out.raw_maps[0]) == (1, 2)
    expected = (acts[0, 1:, 3] - acts[0, 1:, 5]).clamp(min=0).reshape(4, 4)
    assert torch.allclose(out.raw_maps[0], expected)


def test_attn_gradcam_keeps_positive_gradients_on_real_tokens_only():
    probs = torch.full((1, 2, 3, 17), 1 / 17)
    probs[0, :, 1, 1 + 9] = 0.9  # token 1 looks at patch 9
    probs[0, :, 2, 1 + 4] = 0.9  # token 2 (padding) looks at patch 4
    probs[0, :, 1, 1 + 2] = 0.8
    grad = torch.ones_like(probs)
    grad[0, :, 1, 1 + 2] = -3.0  # negative gradient: clamped away
    mask = torch.tensor([[1, 1, 0]])
    out = get_method("attn-gradcam").compute(CROSS_ATTENTION, [probs], [grad], GEOM, mask)
    assert argmax_cell(out.raw_maps[0]) == (2, 1)
    assert out.raw_token_maps[0, 2].abs().max() == 0
    assert out.raw_token_maps[0, 1, 0, 2] == 0
    manual = (probs[0, :, :2, 1:] * grad[0, :, :2, 1:].clamp(min=0)).mean(0).sum(0) / 3
    assert torch.allclose(out.raw_maps[0].flatten(), manual)


def test_cross_attention_map_is_head_and_token_mean():
    probs = torch.rand(2, 3, 4, 17).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = get_method("attention").compute(CROSS_ATTENTION, [probs], None, GEOM, mask)
    manual = (probs[1, :, :2, 1:].mean(0)).sum(0) / 4
    assert torch.allclose(out.raw_maps[1].flatten(), manual)
    assert out.text_conditioned


def test_self_attention_map_is_the_cls_row():
    probs = torch.rand(1, 2, 17, 17).softmax(-1)
    out = get_method("attention").compute(SELF_ATTENTION, [probs], None, GEOM, None)
    assert torch.allclose(out.raw_maps[0].flatten(), probs[0, :, 0, 1:].mean(0))
    assert not out.text_conditioned


def test_rollout_follows_attention_into_one_patch():
    n, k = 17, 1 + 13
    a = torch.zeros(1, 2, n, n)
    a[..., k] = 1.0  # every token attends to patch 13 only
    out = get_method("rollout").compute(SELF_ATTENTION, [a, a, a], None, GEOM, None)
    assert argmax_cell(out.raw_maps[0]) == divmod(13, 4)
    # by hand: each layer is 0.5 * e_k-column + 0.5 * I; the CLS row after 3 layers
    step = 0.5 * a[0].mean(0) + 0.5 * torch.eye(n)
    r = step @ step @ step
    assert torch.allclose(out.raw_maps[0].flatten(), r[0, 1:])


def test_identity_attention_rolls_out_to_an_all_zero_map_not_nan():
    eye = torch.eye(17).expand(1, 2, 17, 17)
    out = get_method("rollout").compute(SELF_ATTENTION, [eye, eye], None, GEOM, None)
    assert out.raw_maps.abs().max() == 0
    norm = normalize_maps(out.raw_maps)
    assert not norm.isnan().any() and norm.abs().max() == 0


def test_normalisation_has_no_epsilon():
    m = torch.tensor([[[1e-5, 2e-5], [3e-5, 5e-5]]])
    assert torch.allclose(normalize_maps(m), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))


def test_geometry_handles_non_square_grids_and_several_prefix_tokens():
    g = Geometry(2, 3, prefix=2)
    tokens = torch.arange(10.0)[None]
    assert g.patches(tokens).tolist() == [[[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]]]
