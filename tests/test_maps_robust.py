"""The shared map math (groundcam.maps) at its edges, and the pointing game on maps with no
variation: zero, constant, constant plus rounding-level noise, flat after the resize, non-finite.
Property-style: seeded random loops over every protocol, grid, image size and box placement."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import groundcam.eval.pointing as pointing
import groundcam.explanation as explanation
import groundcam.maps as maps
from groundcam.errors import InputError
from groundcam.eval.pointing import PROTOCOLS, albef_boxes, pointing_game, pointing_games
from groundcam.maps import FLAT_RTOL, check_finite, is_flat, normalize_maps, upsample, upsample_many

SRC = Path(__file__).resolve().parents[1] / "src" / "groundcam"
INF, NAN = float("inf"), float("nan")


def reference_normalize(m: torch.Tensor) -> torch.Tensor:
    """DESIGN's rule computed naively in float64 (finite maps only)."""
    flat = m.double().flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0)
    return out.float().reshape(m.shape)


# ----------------------------------------------------------------------------- normalize_maps


def test_normalize_maps_is_exactly_the_float64_formula_at_every_scale():
    rng = np.random.default_rng(0)
    for trial in range(300):
        scale = 10.0 ** rng.uniform(-35, 35)
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 9)), int(rng.integers(1, 9)))
        m = torch.from_numpy((rng.standard_normal(shape) * scale).astype(np.float32))
        out = normalize_maps(m)
        assert out.dtype == torch.float32 and out.shape == m.shape
        assert torch.equal(out, reference_normalize(m)), trial
        assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_normalize_maps_keeps_tiny_raw_values_exact_no_epsilon():
    m = torch.tensor([[[0.0, 1e-5], [2e-5, 4e-5]]])
    assert torch.equal(normalize_maps(m), torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    sub = torch.tensor([[[0.0, 2.0**-148, 2.0**-147]]])  # float32 subnormals still have a range
    assert torch.equal(normalize_maps(sub), torch.tensor([[[0.0, 0.5, 1.0]]]))


def test_normalize_maps_fp16_whose_range_exceeds_fp16():
    m = torch.tensor([[[-60000.0, 60000.0], [0.0, 30000.0]]], dtype=torch.float16)
    assert float(m.max() - m.min()) == INF  # the naive span overflows in fp16
    out = normalize_maps(m)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[[0.0, 1.0], [0.5, 0.75]]]))
    bf = torch.tensor([[[-3e38, 3e38, 0.0, 1.5e38]]], dtype=torch.bfloat16)
    assert torch.allclose(normalize_maps(bf), torch.tensor([[[0.0, 1.0, 0.5, 0.75]]]), atol=1e-2)


def test_normalize_maps_near_the_float_limits():
    m = torch.tensor([[[-3e38, 3e38], [0.0, 1.5e38]]])  # span 6e38 > float32 max
    assert torch.equal(normalize_maps(m), torch.tensor([[[0.0, 1.0], [0.5, 0.75]]]))
    big = torch.tensor([[[-1e308, 1e308, 0.0]]], dtype=torch.float64)  # span > float64 max
    assert torch.equal(normalize_maps(big), torch.tensor([[[0.0, 1.0, 0.5]]]))
    tiny = torch.tensor([[[0.0, 1e-310, 5e-311]]], dtype=torch.float64)
    assert torch.equal(normalize_maps(tiny), torch.tensor([[[0.0, 1.0, 0.5]]]))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, 2.0, INF, NAN], [0.0, 1.0, 1.0, 0.0]),  # +inf is the top, NaN 0
        ([-INF, 0.0, 4.0, 2.0], [0.0, 0.0, 1.0, 0.5]),  # -inf is the bottom
        ([5.0, 5.0, INF, 5.0], [0.0, 0.0, 1.0, 0.0]),  # constant finite part
        ([-INF, INF, 3.0, 3.0], [0.0, 1.0, 0.0, 0.0]),
        ([INF, INF, INF, INF], [0.0, 0.0, 0.0, 0.0]),  # constant: zeros
        ([NAN, NAN, NAN, NAN], [0.0, 0.0, 0.0, 0.0]),
        ([7.0, NAN, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0]),
        ([0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
        ([-2.5, -2.5, -2.5, -2.5], [0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_normalize_maps_non_finite_and_constant_maps_never_nan(values, expected):
    m = torch.tensor(values).reshape(1, 2, 2)
    out = normalize_maps(m)
    assert not torch.isnan(out).any()
    assert torch.equal(out, torch.tensor(expected).reshape(1, 2, 2))
    assert torch.equal(normalize_maps(m.half()), out)


def test_normalize_maps_is_per_map_keeps_shape_and_gradients():
    rng = np.random.default_rng(1)
    m = torch.from_numpy(rng.random((2, 3, 4, 5)).astype(np.float32))
    m[1, 2] = 0.0  # one zero map among real ones
    m[0, 1] *= 1e-20
    out = normalize_maps(m)
    assert out.shape == (2, 3, 4, 5)
    for p in range(2):
        for t in range(3):
            assert torch.equal(out[p, t], reference_normalize(m[p, t][None])[0])
    assert torch.equal(out[1, 2], torch.zeros(4, 5))
    x = m.clone().requires_grad_(True)
    (normalize_maps(x) * torch.arange(20.0).reshape(4, 5)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert torch.equal(x.grad[1, 2], torch.zeros(4, 5))  # a flat map has nothing to move


def test_map_math_has_one_home_and_viz_does_not_import_eval():
    assert explanation.normalize_maps is maps.normalize_maps
    assert pointing.upsample is maps.upsample and pointing.upsample_many is maps.upsample_many
    for path in sorted((SRC / "viz").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("groundcam.eval"), (path.name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("groundcam.eval") for a in node.names), path


# ----------------------------------------------------------------------------- flatness


def test_a_constant_map_stays_flat_after_any_resize_though_not_exactly_constant():
    rng = np.random.default_rng(2)
    inexact = 0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        size = tuple(int(v) for v in rng.integers(1, 500, 2))
        value = float(rng.choice([-1, 1]) * 10.0 ** rng.uniform(-30, 30))
        mode = str(rng.choice(["bicubic", "bilinear"]))
        resized = upsample(torch.full((h, w), value), size, mode)
        inexact += int(resized.max() != resized.min())
        assert bool(is_flat(resized)), (h, w, size, value, mode)
    assert inexact > 0  # rounding noise is real: exact equality would call these maps varied


def test_is_flat_tolerance_is_relative_and_per_map():
    base = torch.full((3, 6, 6), 0.25)
    base[1, 2, 3] += 0.25 * FLAT_RTOL * 0.5  # below the tolerance
    base[2, 2, 3] += 0.25 * FLAT_RTOL * 20  # above it
    assert is_flat(base).tolist() == [True, True, False]
    assert bool(is_flat(torch.zeros(4, 4)))
    assert not bool(is_flat(torch.tensor([[0.0, 1e-30]])))  # tiny but real variation
    scaled = torch.full((4, 4), 1e30)
    scaled[0, 0] *= 1 + 1e-3
    assert not bool(is_flat(scaled))


def test_check_finite_names_what_and_when():
    check_finite(torch.rand(3, 3))
    with pytest.raises(InputError, match="^heatmap contains NaN$"):
        check_finite(torch.tensor([[0.0, NAN]]))
    with pytest.raises(InputError, match="^map 3 contains inf after x$"):
        check_finite(torch.tensor([[0.0, -INF]]), what="map 3", when=" after x")


# ----------------------------------------------------------------------------- pointing, flat


def random_boxes(rng, height: int, width: int) -> list[list[float]]:
    """Some boxes around the first argmax of a flat map (0, 0), some anywhere, one the image."""
    boxes = [[-1.0, -1.0, width + 1.0, height + 1.0]]  # strictly contains every pixel
    boxes.append([0.0, 0.0, float(rng.integers(1, width + 1)), float(rng.integers(1, height + 1))])
    for _ in range(int(rng.integers(0, 3))):
        x1, y1 = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        boxes.append(
            [x1, y1, x1 + float(rng.uniform(1, width)), y1 + float(rng.uniform(1, height))]
        )
    return boxes


def flat_grid(rng, kind: str, h: int, w: int) -> torch.Tensor:
    value = float(rng.choice([-1, 1]) * 10.0 ** rng.uniform(-20, 20))
    if kind == "zero":
        return torch.zeros(h, w)
    if kind == "constant":
        return torch.full((h, w), value)
    if kind == "constant-fp16":
        return torch.full((h, w), float(rng.uniform(-6e4, 6e4)), dtype=torch.float16)
    # constant plus noise below the tolerance (relative 0.3 * FLAT_RTOL at most)
    noise = rng.uniform(-0.15, 0.15, (h, w)) * FLAT_RTOL
    return torch.from_numpy((value * (1 + noise)).astype(np.float32))


FLAT_KINDS = ("zero", "constant", "constant-fp16", "constant-noise")


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_flat_map_is_never_a_hit_under_any_protocol(protocol):
    rng = np.random.default_rng(sorted(PROTOCOLS).index(protocol))
    rule = PROTOCOLS[protocol]
    seen = {"skipped": 0, "missed": 0}
    for trial in range(160):
        kind = FLAT_KINDS[trial % len(FLAT_KINDS)]
        h, w = (int(v) for v in rng.integers(1, 13, 2))
        height, width = (int(v) for v in rng.integers(8, 90, 2))
        grid = flat_grid(rng, kind, h, w)
        boxes = random_boxes(rng, height, width)
        proposals = None
        if rule.uses_proposals:  # the whole image among the proposals: a sure hit by area
            proposals = [[0, 0, width, height]] + [
                [float(rng.uniform(0, width / 2)), float(rng.uniform(0, height / 2)), 5.0, 5.0]
                for _ in range(3)
            ]
            boxes = [[0.0, 0.0, float(width), float(height)]]
        kwargs = {"proposals": proposals} if proposals is not None else {}
        result = pointing_game(grid, boxes, protocol, image_size=(height, width), **kwargs)
        resized = upsample_many(grid[None], (height, width), rule.resize_mode)
        (batched,) = pointing_games(resized, [boxes], protocol, **kwargs)
        for r in (result, batched):
            assert r.flat is True, (trial, kind)
            assert r.hit is not True, (trial, kind, r)
            assert r.box is None and r.iou is None
            if rule.skip_rule is not None and rule.skip_rule(
                pointing._as_boxes(boxes), (height, width)
            ):
                assert r.skipped is True and r.hit is None
                seen["skipped"] += 1
            else:
                assert r.skipped is False and r.hit is False
                seen["missed"] += 1
        assert batched.point == result.point  # the first maximum all the same
        if rule.uses_proposals:
            r = albef_boxes(grid, proposals, [0, 0, width, height], image_size=(height, width))
            assert r.flat is True and r.hit is False and r.box is None
    assert seen["missed"] > 0


def test_zero_map_near_the_corner_was_a_torchray_hit_and_is_now_a_miss():
    corner = [[3.0, 3.0, 10.0, 10.0]]  # within 15 px of (0, 0)
    r = pointing_game(torch.zeros(4, 4), corner, "torchray", image_size=(64, 64))
    assert (r.hit, r.flat, r.point) == (False, True, (0, 0))
    peak = torch.zeros(4, 4)
    peak[0, 0] = 1.0  # the same point, now meant
    r = pointing_game(peak, corner, "torchray", image_size=(64, 64))
    assert (r.hit, r.flat, r.point) == (True, False, (0, 0))


def test_flat_after_the_resize_is_a_miss():
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2  # 0/1 checkerboard
    grid = checker.float()
    assert not bool(is_flat(grid))
    for protocol in ("mg", "torchray"):  # bilinear halving averages each 2x2 block to 0.5
        assert bool(is_flat(upsample(grid, (2, 2), "bilinear")))
        r = pointing_game(grid, [[-1.0, -1.0, 3.0, 3.0]], protocol, image_size=(2, 2))
        assert (r.hit, r.flat, r.skipped) == (False, True, False)
        # the same map drawn larger varies, and points
        r = pointing_game(grid, [[-1.0, -1.0, 41.0, 41.0]], protocol, image_size=(40, 40))
        assert (r.hit, r.flat) == (True, False)


def test_noise_above_the_tolerance_is_a_real_map():
    grid = torch.full((4, 4), 0.5)
    grid[2, 1] = 0.5 * (1 + 100 * FLAT_RTOL)
    r = pointing_game(grid, [[5.0, 15.0, 20.0, 30.0]], "amc", image_size=(40, 40))
    assert r.flat is False and r.hit is True


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_real_maps_score_as_an_independent_implementation(protocol):
    """Maps with variation: the verdict is the protocol's, unchanged by the flatness rule."""
    rng = np.random.default_rng(100 + sorted(PROTOCOLS).index(protocol))
    rule = PROTOCOLS[protocol]
    hits = 0
    for trial in range(120):
        h, w = (int(v) for v in rng.integers(2, 12, 2))
        height, width = (int(v) for v in rng.integers(8, 80, 2))
        grid = torch.from_numpy(rng.random((h, w)).astype(np.float32))
        if trial % 3 == 0:  # real signal on a large offset
            grid = 1000.0 + grid
        up = F.interpolate(grid[None, None], (height, width), mode=rule.resize_mode)[0, 0]
        index = int(torch.argmax(up))
        x, y = index % width, index // width
        boxes = random_boxes(rng, height, width)[1:] or [[0.0, 0.0, 1.0, 1.0]]
        if rule.uses_proposals:
            proposals = [[0, 0, width // 2, height // 2], [width // 2, height // 2, width, height]]
            result = pointing_game(grid, boxes, protocol, (height, width), proposals=proposals)
            assert result.flat is False and result.box is not None
            hits += bool(result.hit)
            continue
        result = pointing_game(grid, boxes, protocol, image_size=(height, width))
        assert result.flat is False and result.point == (x, y)
        b = np.array(boxes)
        if protocol == "amc":
            expected = bool(((b[:, 0] < x) & (x < b[:, 2]) & (b[:, 1] < y) & (y < b[:, 3])).any())
        elif protocol == "mg":
            expected = bool(
                ((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])).any()
            )
            union = (b[:, 2].max() - b[:, 0].min()) * (b[:, 3].max() - b[:, 1].min())
            if union < 0.05 * height * width:
                assert result.skipped is True
                continue
        else:  # torchray: some integer pixel of a box within 15 px
            expected = False
            for x1, y1, x2, y2 in boxes:
                us = np.arange(np.ceil(x1), np.floor(x2) + 1)
                vs = np.arange(np.ceil(y1), np.floor(y2) + 1)
                if us.size and vs.size:
                    d2 = (us[:, None] - x) ** 2 + (vs[None, :] - y) ** 2
                    expected |= bool((d2 < 225).any())
        assert result.hit is expected, (trial, result)
        hits += expected
        (batched,) = pointing_games(up[None], [boxes], protocol)
        assert batched == result
    assert hits > 0


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_non_finite_maps_are_refused_before_the_resize(protocol, bad):
    grid = torch.rand(4, 4)
    grid[1, 2] = bad
    kind = "NaN" if bad != bad else "inf"
    kwargs = {"proposals": [[0, 0, 5, 5]]} if PROTOCOLS[protocol].uses_proposals else {}
    with pytest.raises(InputError, match=f"^heatmap contains {kind}$"):
        pointing_game(grid, [[0, 0, 5, 5]], protocol, image_size=(20, 20), **kwargs)
    with pytest.raises(InputError, match=f"heatmap contains {kind}"):
        pointing_games(grid[None], [[[0, 0, 5, 5]]], protocol, **kwargs)
    if kwargs:
        with pytest.raises(InputError, match=f"heatmap contains {kind}"):
            albef_boxes(grid, kwargs["proposals"], [0, 0, 5, 5], image_size=(20, 20))


def test_a_finite_map_that_overflows_in_the_resize_is_refused_after_it():
    grid = torch.tensor([[3e38, -3e38, 3e38], [-3e38, 3e38, -3e38]])  # bicubic overshoot > max
    with pytest.raises(InputError, match="after the resize to 20x30"):
        pointing_game(grid, [[0, 0, 5, 5]], "amc", image_size=(20, 30))
    with pytest.raises(InputError, match="after the resize to 20x30"):
        albef_boxes(grid, [[0, 0, 5, 5]], [0, 0, 5, 5], image_size=(20, 30))
    huge = torch.tensor([[1e300, 0.0], [0.0, 0.0]], dtype=torch.float64)  # inf in float32
    with pytest.raises(InputError, match="contains inf after the resize to 8x8"):
        pointing_game(huge, [[0, 0, 5, 5]], "mg", image_size=(8, 8))
    assert pointing_game(huge, [[-1, -1, 5, 5]], "amc").hit is True  # no resize: float64 kept


def test_pointing_games_flat_flags_are_per_map_on_one_call():
    heatmaps = torch.zeros(4, 30, 40)
    heatmaps[1, 10, 20] = 1.0
    heatmaps[2] = 0.7
    heatmaps[3] = upsample(torch.full((3, 3), 0.3), (30, 40))
    boxes = [[[-1.0, -1.0, 41.0, 31.0]]] * 4
    results = pointing_games(heatmaps, boxes, "amc")
    assert [r.flat for r in results] == [True, False, True, True]
    assert [r.hit for r in results] == [False, True, False, False]
    assert results[1].point == (20, 10)
