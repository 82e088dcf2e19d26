"""The AMC loss and its box masks against hand-computed values and a plain float64 loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny import assert_close

from groundcam.train.amc_loss import AMCLoss, box_mask, box_masks

S = 1 / (1 + 1e-7)  # the min-max divisor: a map spanning [0, 1] comes out scaled by S


def close(actual: torch.Tensor, expected: float, tol: float = 1e-6) -> None:
    """A 0-dim tensor equals a hand-computed number."""
    assert actual.dim() == 0
    assert abs(actual.item() - expected) <= tol, f"{actual.item()} != {expected}"


# --- box masks ---------------------------------------------------------------------------------


def test_box_mask_int_slicing():
    masks, report = box_masks([[[2, 3, 6, 8]]], [(10, 10)], 10)
    expected = torch.zeros(10, 10)
    expected[3:8, 2:6] = 1  # rows 3..7, cols 2..5
    assert torch.equal(masks[0], expected)
    assert (report.clipped, report.skipped, report.has_box.tolist()) == (0, 0, [True])
    # float boxes truncate like int(): [2.7, 3.2, 6.9, 8.0] covers the same pixels
    assert torch.equal(box_mask([[2.7, 3.2, 6.9, 8.0]], 10, 10)[0], expected)


def test_box_mask_align_corners_true_resize():
    # 10 -> 5 with align_corners=True samples input positions 0, 2.25, 4.5, 6.75, 9
    masks, _ = box_masks([torch.tensor([[2.0, 3.0, 6.0, 8.0]])], torch.tensor([[10, 10]]), 5)
    rows = torch.tensor([0, 0.25, 1, 1, 0])  # inside rows 3..7: 2.25 is a quarter into row 3
    cols = torch.tensor([0, 1, 1, 0, 0])  # inside cols 2..5
    assert_close(masks[0], rows[:, None] * cols[None, :], rel=1e-6)


def test_box_mask_image_res_resize():
    # a 4x4 image, box over cols 0..1; 4 -> 8 with align_corners=False: source x = j/2 - 0.25
    masks, _ = box_masks([[[0, 0, 2, 4]]], [(4, 4)], 8, image_res=8)
    cols = torch.tensor([1, 1, 1, 0.75, 0.25, 0, 0, 0])
    assert_close(masks[0], cols.expand(8, 8), rel=1e-6)
    # downsampling is antialiased like an image resize: 8 -> 4 is a triangle filter of width 4
    masks, _ = box_masks([[[0, 0, 4, 8]]], [(8, 8)], 4, image_res=4)
    assert_close(masks[0], torch.tensor([1, 0.875, 0.125, 0]).expand(4, 4), rel=1e-6)
    # non-square image, square image_res, non-square mask size
    masks, _ = box_masks([[[0, 0, 3, 2]]], [(2, 6)], (3, 2), image_res=4)
    assert masks.shape == (1, 3, 2)


def test_box_mask_union_clip_skip():
    boxes = [
        [[0, 0, 2, 2], [1, 1, 3, 3]],  # union of two overlapping boxes
        [[-2, -1, 2, 1], [8, 8, 12, 20], [3, 3, 3, 5], [4, 4, 2, 6], [5.2, 0, 5.8, 2]],
        [],  # no box at all
        [[20, 20, 30, 30], [float("nan"), 0, 1, 1]],  # outside, non-finite: nothing kept
    ]
    masks, report = box_masks(boxes, [(4, 4), (10, 10), (4, 4), (10, 10)], (10, 10))
    assert masks.shape == (4, 10, 10)
    first = box_mask(boxes[0], 4, 4)[0]
    assert first.sum() == 7 and first[:2, :2].all() and first[1:3, 1:3].all()
    second = torch.zeros(10, 10)
    second[0:1, 0:2] = 1  # [-2, -1, 2, 1] clipped to [0, 0, 2, 1]
    second[8:10, 8:10] = 1  # [8, 8, 12, 20] clipped to [8, 8, 10, 10]
    assert torch.equal(masks[1], second)
    # clipped: 2; skipped: zero width, inverted, thinner than a pixel, outside, NaN
    assert (report.clipped, report.skipped) == (2, 5)
    assert report.has_box.tolist() == [True, True, False, False]
    assert masks[2:].abs().sum() == 0
    empty, report = box_masks([], [], 8)
    assert empty.shape == (0, 8, 8) and report.has_box.shape == (0,)
    with pytest.raises(ValueError):
        box_masks([[]], [(4, 4), (4, 4)], 8)


# --- the loss on hand-built maps (maps at the mask size: the upsample is the identity) ----------

G = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
TOP, BOTTOM = torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])


def test_margins_active():
    terms = AMCLoss()(G[None], BOTTOM[None])
    # inside (0.5, 0): mean 0.25, max 0.5; outside (1, 0): mean 0.5, max 1
    close(terms.mean, 0.25 * S + 0.1)
    close(terms.max, 0.5 * S + 0.5)
    close(terms.loss, 0.2 * (0.25 * S + 0.1) + 0.8 * (0.5 * S + 0.5))
    assert terms.loss.dtype == torch.float32


def test_margins_inactive():
    raw = torch.tensor([[1.0, 0.2], [0.4, 0.0]])
    terms = AMCLoss()(raw[None], TOP[None])  # in (1, .2) out (.4, 0): -0.4 + 0.1, -0.6 + 0.5
    close(terms.mean, 0.0, 0)
    close(terms.max, 0.0, 0)
    close(terms.loss, 0.0, 0)


def test_max_tie():
    raw = torch.tensor([[1.0, 0.0], [1.0, 0.5]])
    terms = AMCLoss()(raw[None], TOP[None])  # max inside = max outside = 1
    close(terms.max, 0.5)
    close(terms.mean, 0.25 * S + 0.1)  # out mean .75, in mean .5


def test_all_zero_maps():
    terms = AMCLoss()(torch.zeros(3, 4, 4), torch.ones(3, 8, 8).tril())
    close(terms.mean, 0.1)
    close(terms.max, 0.5)
    close(terms.loss, 0.2 * 0.1 + 0.8 * 0.5)
    assert not torch.isnan(terms.loss)


def test_relu_then_min_max():
    # relu first: [[2, 0], [1, 0]] -> min-max [[1, 0], [.5, 0]] = G (without relu it would not be)
    raw = torch.tensor([[2.0, -1.0], [1.0, -3.0]])
    ref = AMCLoss()(G[None], BOTTOM[None])
    terms = AMCLoss()(raw[None], BOTTOM[None])
    close(terms.loss, ref.loss.item())
    # min-max is scale- and shift-free on positive maps: 7 * G + 3 gives the same terms
    close(AMCLoss()((7 * G + 3)[None], BOTTOM[None]).loss, ref.loss.item())


def test_batch_of_one_is_per_sample():
    # the authors' squeeze() bug would take the max per row: (1.5 + 0) / 2 = 0.75, not 1.0
    terms = AMCLoss()(G[None], BOTTOM[None])
    close(terms.max, 0.5 * S + 0.5)
    # the bug's own setting: a batch of two where one sample has a box
    pair = AMCLoss()(torch.stack([G, G]), torch.stack([BOTTOM, torch.zeros(2, 2)]))
    close(pair.max, 0.5 * S + 0.5)
    close(pair.loss, terms.loss.item())


def test_samples_without_box_are_ignored():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 3, generator=g)
    ma, mb = (torch.rand(2, 6, 6, generator=g) > 0.5).float()
    none = torch.full((3, 3), float("nan"))  # never touches the loss
    loss = AMCLoss()
    two = loss(torch.stack([a, b]), torch.stack([ma, mb]))
    raw = torch.stack([a, none, b]).requires_grad_()
    three = loss(raw, torch.stack([ma, torch.zeros(6, 6), mb]))
    for x, y in zip(
        (three.loss, three.mean, three.max), (two.loss, two.mean, two.max), strict=True
    ):
        close(x, y.item(), 1e-7)
    three.loss.backward()
    assert torch.equal(raw.grad[1], torch.zeros(3, 3))
    # has_box takes out a sample whose mask is not empty
    hb = loss(torch.stack([a, b]), torch.stack([ma, mb]), torch.tensor([True, False]))
    close(hb.loss, loss(a[None], ma[None]).loss.item(), 1e-7)


def test_no_box_gives_connected_zeros():
    raw = torch.rand(2, 3, 3, requires_grad=True)
    for terms in (
        AMCLoss()(raw, torch.zeros(2, 6, 6)),
        AMCLoss()(raw, torch.ones(2, 6, 6), torch.tensor([False, False])),
    ):
        assert terms.loss.item() == terms.mean.item() == terms.max.item() == 0
        terms.loss.backward()
        assert torch.equal(raw.grad, torch.zeros(2, 3, 3))
        raw.grad = None


def test_mean_is_pooled_over_the_batch():
    # sample a: 1 pixel inside (value 0), 3 outside (value 1); b: 3 inside (1), 1 outside (0)
    a = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    ma = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mb = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    terms = AMCLoss()(torch.stack([a, b]), torch.stack([ma, mb]))
    # pooled: outside (1+1+1+0)/4 = .75, inside (0+1+1+1)/4 = .75 -> relu(0 + .1)
    close(terms.mean, 0.1)
    # the mean of per-sample terms differs: a: relu(1 - 0 + .1) = 1.1, b: relu(0 - 1 + .1) = 0
    per_sample = (AMCLoss()(a[None], ma[None]).mean + AMCLoss()(b[None], mb[None]).mean) / 2
    close(per_sample, (1 * S + 0.1) / 2)
    close(terms.max, (relu(S - 0 + 0.5) + relu(0 - S + 0.5)) / 2)


def test_full_image_box():
    raw = torch.tensor([[[1.0, 0.0], [0.5, 0.25]]])
    terms = AMCLoss()(raw, torch.ones(1, 2, 2))
    # no outside pixel: outside mean and max are 0; inside mean 1.75 / 4, max 1
    close(terms.mean, relu(0 - 1.75 / 4 * S + 0.1))
    close(terms.max, relu(0 - S + 0.5))
    zeros = AMCLoss()(torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    close(zeros.mean, 0.1)
    close(zeros.max, 0.5)
    # next to a sample with outside pixels, the pooled outside mean is that sample's
    pair = AMCLoss()(torch.stack([raw[0], G]), torch.stack([torch.ones(2, 2), BOTTOM]))
    close(pair.mean, relu(0.5 * S - (1.75 + 0.5) / 6 * S + 0.1))


def relu(x: float) -> float:
    return max(x, 0.0)


# --- an independent float64 loop on random inputs -----------------------------------------------


def bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize, align_corners=False (half-pixel centres, clamped at the borders)."""
    in_h, in_w = img.shape

    def taps(n_out: int, n_in: int, i: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), src - lo

    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        r0, r1, wr = taps(out_h, in_h, i)
        for j in range(out_w):
            c0, c1, wc = taps(out_w, in_w, j)
            top = (1 - wc) * img[r0, c0] + wc * img[r0, c1]
            bottom = (1 - wc) * img[r1, c0] + wc * img[r1, c1]
            out[i, j] = (1 - wr) * top + wr * bottom
    return out


def reference(raw: np.ndarray, masks: np.ndarray) -> tuple[float, float, float]:
    """The AMC terms written out sample by sample, pixel by pixel."""
    sums = dict(g_in=0.0, m_in=0.0, g_out=0.0, m_out=0.0)
    peaks = []
    for r, m in zip(raw, masks, strict=True):
        if m.sum() == 0:
            continue
        g = np.maximum(r, 0)
        g = (g - g.min()) / ((g - g.min()).max() + 1e-7)
        g = bilinear(g, *m.shape)
        best_in = best_out = 0.0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                sums["g_in"] += g[i, j] * m[i, j]
                sums["m_in"] += m[i, j]
                sums["g_out"] += g[i, j] * (1 - m[i, j])
                sums["m_out"] += 1 - m[i, j]
                best_in = max(best_in, g[i, j] * m[i, j])
                best_out = max(best_out, g[i, j] * (1 - m[i, j]))
        peaks.append(relu(best_out - best_in + 0.5))
    mean = relu(sums["g_out"] / sums["m_out"] - sums["g_in"] / sums["m_in"] + 0.1)
    peak = sum(peaks) / len(peaks)
    return 0.2 * mean + 0.8 * peak, mean, peak


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_loop(seed):
    rng = np.random.default_rng(seed)
    b, h, w, mh, mw = 3 + seed, 3 + seed % 2, 4, 7, 9 + seed
    raw = rng.normal(size=(b, h, w))
    boxes = [[[1.5, 0.5, 6.5, 4.5]], [], [[0, 2, 3, 7], [5, 0, 9, 3]]] + [[[2, 2, 8, 6]]] * seed
    masks, _ = box_masks(boxes, [(8, 10)] * b, (mh, mw), image_res=12)
    masks = masks.double()
    if seed % 2:
        masks[0] = torch.from_numpy(rng.random((mh, mw)))  # fractional masks are weights
    terms = AMCLoss()(torch.from_numpy(raw), masks)
    assert terms.loss.dtype == torch.float64
    expected = reference(raw, masks.numpy())
    for got, want in zip((terms.loss, terms.mean, terms.max), expected, strict=True):
        close(got, want, 1e-12)
    # float32 gives the same numbers to float32 precision
    t32 = AMCLoss()(torch.from_numpy(raw).float(), masks.float())
    close(t32.loss, expected[0], 1e-5)


# --- gradients and precisions --------------------------------------------------------------------


@pytest.mark.parametrize("margin", [1.5, -1.5])  # every relu active / every relu inactive
def test_gradcheck(margin):
    # positive, distinct raw values: no relu, min, max or margin sits at a kink
    raw = 0.5 + torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    masks, _ = box_masks([[[0, 0, 3, 4]], [[2, 1, 6, 5]]], [(6, 6), (6, 6)], 6)
    loss = AMCLoss(mean_margin=margin, max_margin=margin)

    def f(x: torch.Tensor) -> torch.Tensor:
        return loss(x, masks.double()).loss

    assert torch.autograd.gradcheck(f, (raw.requires_grad_(),), eps=1e-6, atol=1e-8)
    grad = torch.autograd.grad(f(raw), raw)[0]
    assert (grad.abs().sum() > 0) == (margin > 0)


def test_bf16_autocast_computes_in_float32():
    g = torch.Generator().manual_seed(2)
    raw = torch.rand(3, 4, 4, generator=g).bfloat16().requires_grad_()
    masks, _ = box_masks([[[0, 0, 5, 5]], [[2, 2, 8, 8]], [[4, 0, 8, 8]]], [(8, 8)] * 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = AMCLoss()(raw, masks)
    assert terms.loss.dtype == torch.float32
    expected = AMCLoss()(raw.detach().float(), masks)
    close(terms.loss, expected.loss.item(), 1e-6)
    terms.loss.backward()
    assert raw.grad.dtype == torch.bfloat16 and torch.isfinite(raw.grad.float()).all()


def test_shape_errors():
    with pytest.raises(ValueError):
        AMCLoss()(torch.rand(2, 3, 3), torch.ones(3, 6, 6))
    with pytest.raises(ValueError):
        AMCLoss()(torch.rand(2, 9), torch.ones(2, 6, 6))
    with pytest.raises(ValueError):
        AMCLoss()(torch.rand(2, 3, 3), torch.ones(2, 6, 6), torch.tensor([True]))
