"""Pointing game (protocol amc): argmax location, strict box test, bicubic parity."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groundcam.eval.pointing import (
    PROTOCOLS,
    PointingResult,
    pointing_accuracy,
    pointing_game,
    upsample,
)


def peak_map(height: int, width: int, x: int, y: int) -> torch.Tensor:
    """A map that is 0 everywhere except 1 at column x, row y."""
    heatmap = torch.zeros(height, width)
    heatmap[y, x] = 1.0
    return heatmap


def test_point_is_argmax_and_lands_inside_box():
    result = pointing_game(peak_map(20, 30, x=12, y=7), [[10.0, 5.0, 15.0, 9.0]])
    assert result == PointingResult(hit=True, point=(12, 7), protocol="amc")


def test_point_outside_box_is_miss():
    result = pointing_game(peak_map(20, 30, x=25, y=7), [[10.0, 5.0, 15.0, 9.0]])
    assert result.point == (25, 7)
    assert result.hit is False


def test_tie_goes_to_first_maximum_in_row_major_order():
    heatmap = torch.zeros(10, 10)
    heatmap[6, 1] = 2.0  # later row, earlier column
    heatmap[3, 8] = 2.0  # earlier row: first in row-major order
    heatmap[3, 9] = 2.0
    result = pointing_game(heatmap, [[7.5, 2.5, 8.5, 3.5]])
    assert result.point == (8, 3)
    assert result.hit is True


def test_tie_within_one_row_goes_to_leftmost():
    heatmap = torch.zeros(5, 300)
    heatmap[2, 250] = 1.0
    heatmap[2, 17] = 1.0
    assert pointing_game(heatmap, []).point == (17, 2)


@pytest.mark.parametrize(
    ("box", "hit"),
    [
        ([10.0, 0.0, 20.0, 20.0], False),  # x == x1
        ([0.0, 0.0, 10.0, 20.0], False),  # x == x2
        ([0.0, 5.0, 20.0, 20.0], False),  # y == y1
        ([0.0, 0.0, 20.0, 5.0], False),  # y == y2
        ([9.0, 0.0, 20.0, 20.0], True),  # x1 one pixel left of x
        ([0.0, 0.0, 11.0, 20.0], True),  # x2 one pixel right of x
        ([0.0, 4.0, 20.0, 20.0], True),  # y1 one pixel above y
        ([0.0, 0.0, 20.0, 6.0], True),  # y2 one pixel below y
        ([9.0, 4.0, 11.0, 6.0], True),  # tightest box around the point
    ],
)
def test_strict_box_edges(box, hit):
    result = pointing_game(peak_map(20, 20, x=10, y=5), [box])
    assert result.point == (10, 5)
    assert result.hit is hit


def test_hit_if_any_of_several_boxes_contains_point():
    heatmap = peak_map(20, 20, x=10, y=5)
    far = [0.0, 0.0, 3.0, 3.0]
    edge = [10.0, 0.0, 20.0, 20.0]
    inside = [8.0, 3.0, 12.0, 7.0]
    assert pointing_game(heatmap, [far, edge]).hit is False
    assert pointing_game(heatmap, [far, edge, inside]).hit is True
    assert pointing_game(heatmap, np.array([far, inside])).hit is True
    assert pointing_game(heatmap, torch.tensor([inside, far])).hit is True


def test_empty_boxes_is_a_miss_not_an_error():
    heatmap = peak_map(8, 8, x=3, y=3)
    assert pointing_game(heatmap, []).hit is False
    assert pointing_game(heatmap, np.zeros((0, 4))).hit is False


def test_bicubic_upsample_matches_interpolate_and_differs_from_bilinear():
    grid = torch.arange(16, dtype=torch.float32).reshape(4, 4) ** 1.5 / 10.0
    grid[1, 2] = 7.0
    expected = F.interpolate(grid[None, None], size=(48, 64), mode="bicubic", align_corners=False)
    result = upsample(grid, (48, 64))
    assert result.shape == (48, 64)
    assert result.dtype == torch.float32
    assert torch.equal(result, expected[0, 0])
    bilinear = upsample(grid, (48, 64), mode="bilinear")
    assert (result - bilinear).abs().max() > 0.1


def test_bicubic_overshoot_is_kept():
    grid = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(4, 1)  # a step edge rings under bicubic
    result = upsample(grid, (32, 32))
    assert result.max() > 1.0
    assert result.min() < 0.0


def test_upsample_same_size_returns_float32_unchanged():
    heatmap = torch.rand(6, 9, dtype=torch.float64)
    result = upsample(heatmap, (6, 9))
    assert result.dtype == torch.float32
    assert torch.equal(result, heatmap.float())


def test_pointing_upsamples_to_image_size():
    grid = torch.zeros(4, 4)
    grid[1, 2] = 1.0  # cell centre in a 40x40 image: column 25, row 15
    result = pointing_game(grid, [[20.0, 10.0, 30.0, 20.0]], image_size=(40, 40))
    upsampled = upsample(grid, (40, 40))
    flat = int(torch.argmax(upsampled))
    assert result.point == (flat % 40, flat // 40)
    assert result.hit is True
    assert pointing_game(grid, [[0.0, 0.0, 20.0, 10.0]], image_size=(40, 40)).hit is False


def test_point_uses_width_for_non_square_image():
    grid = torch.zeros(4, 4)
    grid[3, 0] = 1.0
    result = pointing_game(grid, [], image_size=(56, 36))
    flat = int(torch.argmax(upsample(grid, (56, 36))))
    assert result.point == (flat % 36, flat // 36)
    assert result.point[1] > 40  # bottom rows
    assert result.point[0] < 10  # left columns


def test_numpy_input_gives_same_result_as_torch():
    rng = np.random.default_rng(0)
    grid = rng.random((4, 4)).astype(np.float32)
    boxes = [[5.0, 5.0, 30.0, 20.0], [40.0, 25.0, 60.0, 45.0]]
    from_numpy = pointing_game(grid, boxes, image_size=(48, 64))
    from_torch = pointing_game(torch.from_numpy(grid), boxes, image_size=(48, 64))
    assert from_numpy == from_torch
    assert torch.equal(upsample(grid, (48, 64)), upsample(torch.from_numpy(grid), (48, 64)))


def test_unknown_protocol_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError, match="'nope'.*amc"):
        pointing_game(torch.zeros(4, 4), [], protocol="nope")
    assert "amc" in PROTOCOLS


def test_nan_heatmap_raises():
    heatmap = torch.zeros(4, 4)
    heatmap[2, 2] = float("nan")
    with pytest.raises(ValueError, match="heatmap contains NaN"):
        pointing_game(heatmap, [[0.0, 0.0, 4.0, 4.0]])


@pytest.mark.parametrize("shape", [(16,), (1, 4, 4), (1, 1, 4, 4)])
def test_non_2d_heatmap_raises_with_shape(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        pointing_game(torch.zeros(shape), [])
    with pytest.raises(ValueError, match="2-D"):
        upsample(np.zeros(shape), (8, 8))


def test_bad_boxes_shape_raises():
    with pytest.raises(ValueError, match="boxes"):
        pointing_game(torch.zeros(4, 4), [[0.0, 0.0, 1.0]])


def test_pointing_accuracy_counts_hits():
    results = [
        PointingResult(hit=True, point=(0, 0), protocol="amc"),
        PointingResult(hit=False, point=(1, 0), protocol="amc"),
        PointingResult(hit=True, point=(2, 0), protocol="amc"),
        PointingResult(hit=True, point=(3, 0), protocol="amc"),
    ]
    assert pointing_accuracy(results) == (0.75, 4)
    accuracy, count = pointing_accuracy([])
    assert math.isnan(accuracy) and count == 0


@pytest.mark.parametrize(("case", "size"), [(0, (48, 64)), (1, (40, 40)), (2, (56, 36))])
def test_upsample_matches_official_albef_grounding(fixtures, case, size):
    from safetensors.torch import load_file

    expected = load_file(str(fixtures / "albef" / "expected.safetensors"))
    reference = expected[f"grounding_upsampled_case{case}"]
    result = upsample(expected["gradcam_block3"][case], size)
    assert reference.shape == size
    assert result.shape == size
    tolerance = 1e-5 * reference.abs().max().item()
    assert (result - reference).abs().max().item() <= tolerance
    flat = int(torch.argmax(reference))
    official_point = (flat % size[1], flat // size[1])
    assert pointing_game(expected["gradcam_block3"][case], [], image_size=size).point == (
        official_point
    )


def test_in_box_fractions_equal_a_pixel_by_pixel_count():
    """Shares of each map's mass inside the union of its boxes (edges included), boxes that
    overlap, reach outside the image or have fractional edges; None without mass or boxes."""
    from groundcam.eval.runner import in_box_fractions

    torch.manual_seed(0)
    maps = torch.randn(4, 9, 11)
    maps[3] = -1.0  # no positive mass
    boxes = [
        [[1.5, 2.0, 4.0, 6.2], [3.0, 1.0, 7.9, 3.0]],  # overlapping
        [[-3.0, -2.0, 2.0, 20.0]],  # outside the image
        [],
        [[0.0, 0.0, 5.0, 5.0]],
    ]
    expected = []
    for m, phrase_boxes in zip(maps.clamp(min=0), boxes, strict=True):
        inside = sum(
            float(m[y, x])
            for y in range(9)
            for x in range(11)
            if any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in phrase_boxes)
        )
        total = float(m.sum())
        expected.append(inside / total if total > 0 and phrase_boxes else None)
    got = in_box_fractions(maps, boxes)
    assert got[2] is None and got[3] is None and expected[2] is None and expected[3] is None
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    assert got[1] == pytest.approx(expected[1], rel=1e-6)
    assert 0 < got[0] < 1 and 0 < got[1] < 1
