"""The generation surface and the image-token layout: what `explain_generation` takes (a prompt, a
list of images, the old `image=` keyword) and refuses in one line per family, and `place`, which
paints per-column values back on each image through a `TokenLayout` (known answers for tiles with
a global view, a centre crop, newline columns, several images, and the identity case)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_blip import make_processor, tiny
from tiny import noise_images
from transformers import BlipForConditionalGeneration

import groundcam as gc
from groundcam.contract import Tile, TokenLayout
from groundcam.errors import InputError
from groundcam.geometry import Geometry
from groundcam.placement import place, working_size


@pytest.fixture(scope="module")
def ocr():
    return gc.load("trocr-tiny-glyphs")


@pytest.fixture(scope="module")
def captioner():
    return gc.load("captioner-tiny-shapes")


@pytest.fixture(scope="module")
def blip(tokenizer):
    model = tiny(BlipForConditionalGeneration, tokenizer, seed=1)
    return gc.load(model, processor=make_processor(tokenizer))


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return noise_images(1, 32, 64, seed=3)[0]


# ----------------------------------------------------------------------------- what a family takes


@pytest.mark.parametrize("which", ["ocr", "captioner"])
def test_a_prompt_to_a_family_without_one_is_one_line(which, request, picture):
    model = request.getfixturevalue(which)
    with pytest.raises(InputError) as e:
        model.explain_generation(picture, prompt="a photo of", text="ab")
    message = str(e.value)
    assert "\n" not in message
    assert f"the {model.family} family" in message and "takes no prompt" in message


@pytest.mark.parametrize("which", ["ocr", "captioner", "blip"])
def test_a_list_of_images_to_a_one_image_family_is_one_line(which, request, picture):
    model = request.getfixturevalue(which)
    with pytest.raises(InputError, match=r"generates from one image; got a list of 2 images"):
        model.explain_generation([picture, picture], text="ab")
    with pytest.raises(InputError, match="no image given"):
        model.explain_generation([], text="ab")


def test_a_prompt_that_is_not_text_is_refused(blip, picture):
    with pytest.raises(InputError, match="prompt must be a string, got int"):
        blip.explain_generation(picture, prompt=3, text="circle")


def test_image_keyword_list_of_one_and_positional_give_the_same_maps(ocr, picture):
    first = ocr.explain_generation(picture, method="gradcam", text="ab")
    by_keyword = ocr.explain_generation(image=picture, method="gradcam", text="ab")
    as_list = ocr.explain_generation([picture], method="gradcam", text="ab")
    for other in (by_keyword, as_list):
        assert other.tokens == first.tokens and other.positions == first.positions
        assert torch.equal(other.raw_maps, first.raw_maps)
        assert other.image is picture
    with pytest.raises(InputError, match="pass the image once"):
        ocr.explain_generation(picture, image=picture, text="ab")
    with pytest.raises(InputError, match="no image given"):
        ocr.explain_generation(text="ab")


def test_blip_takes_a_prompt_per_call(blip, picture, tokenizer):
    """A call's prompt leads the text exactly as the adapter's own `prompt` does, and leaves the
    adapter's prompt as it was."""
    a = blip.adapter
    prompt_ids = tokenizer(["the red"])["input_ids"][0]  # [CLS] the red [SEP]
    first = len(prompt_ids) - 1
    gen = blip.explain_generation(picture, prompt="the red", method="gradcam", text="circle")
    assert a.prompt is None
    assert gen.tokens == ["circle"] and gen.positions == [first] and gen.text == "circle"
    a.prompt = "the red"
    try:
        same = blip.explain_generation(picture, method="gradcam", text="circle")
    finally:
        a.prompt = None
    assert torch.equal(same.raw_maps, gen.raw_maps)
    alone = blip.explain_generation(picture, method="gradcam", text="circle")
    assert alone.positions == [1] and not torch.equal(alone.raw_maps, gen.raw_maps)
    pv = blip.prepare_images([picture])
    with torch.no_grad():
        ids, start = a.generate(pv, max_new_tokens=3, prompt="the red")
    assert start == first and ids[0, 1:first].tolist() == prompt_ids[1:-1]


# ----------------------------------------------------------------------------- rows and layouts


def test_scored_rows_follow_the_family(ocr, captioner):
    positions = torch.tensor([3, 4, 7])
    assert ocr.adapter.scored_rows(positions).tolist() == [2, 3, 6]  # row k-1 predicts token k
    assert captioner.adapter.scored_rows(positions).tolist() == [3, 4, 7]  # row t wrote token t


@pytest.mark.parametrize("which", ["ocr", "captioner", "blip"])
def test_default_layout_places_exactly_as_the_geometry(which, request, picture):
    model = request.getfixturevalue(which)
    pv = model.prepare_images([picture])
    g = model.adapter.geometry(pv)
    layout = model.adapter.token_layout(pv)
    assert len(layout.tiles) == 1 and layout.tiles[0].box == (0.0, 0.0, 1.0, 1.0)
    values = torch.randn(3, 2, g.prefix + g.num_patches + 5)
    (placed,) = place(values, layout)
    assert torch.equal(placed, g.patches(values))


def test_identity_layout_equals_the_grid():
    values = torch.randn(4, 1 + 6)
    layout = TokenLayout.grid(2, 3, start=1)
    assert working_size(layout, 0) == (2, 3)
    (placed,) = place(values, layout)
    assert torch.equal(placed, Geometry(2, 3, prefix=1).patches(values))
    assert torch.equal(placed[0], values[0, 1:].reshape(2, 3))


def two_tiles_and_global(start: int = 3) -> TokenLayout:
    """Left and right halves as 2x2 tiles, then a 2x2 global view of the whole image."""
    tiles = (
        Tile(0, 0, 2, 2, (0.0, 0.0, 0.5, 1.0)),
        Tile(0, 1, 2, 2, (0.5, 0.0, 1.0, 1.0)),
        Tile(0, 2, 2, 2),
    )
    return TokenLayout.from_tiles(torch.arange(start, start + 12), tiles)


def test_two_tiles_and_a_global_view_are_averaged_where_they_overlap():
    layout = two_tiles_and_global()
    values = torch.zeros(15)
    values[3:15] = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 10, 20, 30, 40])
    assert working_size(layout, 0) == (2, 4)
    (placed,) = place(values, layout)
    # each pixel: the mean of its hi-res tile cell and the global cell above it
    expected = torch.tensor(
        [
            [(1 + 10) / 2, (2 + 10) / 2, (5 + 20) / 2, (6 + 20) / 2],
            [(3 + 30) / 2, (4 + 30) / 2, (7 + 40) / 2, (8 + 40) / 2],
        ]
    )
    assert torch.equal(placed, expected)
    (big,) = place(values, layout, sizes=[(4, 8)])  # the original pixel grid
    assert torch.equal(big, expected.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert layout.image.tolist() == [0] * 12 and layout.tile.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_a_centre_crop_leaves_the_cropped_sides_at_zero():
    """An 8x4 (W x H) image whose centre 4x4 square was read as a 2x2 grid (LLaVA-1.5)."""
    layout = TokenLayout.from_tiles([0, 1, 2, 3], [Tile(0, 0, 2, 2, (0.25, 0.0, 0.75, 1.0))])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (placed,) = place(values, layout, sizes=[(4, 8)])
    row_a = [0.0, 0, 1, 1, 2, 2, 0, 0]
    row_b = [0.0, 0, 3, 3, 4, 4, 0, 0]
    assert torch.equal(placed, torch.tensor([row_a, row_a, row_b, row_b]))
    assert working_size(layout, 0) == (2, 4)


def test_newline_columns_have_no_cell_and_are_never_read():
    layout = TokenLayout.from_tiles(torch.arange(2, 8), [Tile(0, 0, 2, 2, newline=True)])
    assert layout.row.tolist() == [0, 0, -1, 1, 1, -1]
    assert layout.col.tolist() == [0, 1, -1, 0, 1, -1]
    assert layout.has_cell.tolist() == [True, True, False, True, True, False]
    values = torch.tensor([9.0, 9.0, 1.0, 2.0, 1e6, 3.0, 4.0, 1e6])
    (placed,) = place(values, layout)
    assert torch.equal(placed, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_several_images_each_get_their_own_map():
    tiles = (Tile(0, 0, 1, 2), Tile(1, 0, 2, 1))
    layout = TokenLayout.from_tiles([1, 2, 5, 6], tiles, sizes=((2, 4), (4, 2)))
    assert layout.images == 2 and layout.image.tolist() == [0, 0, 1, 1]
    values = torch.arange(7.0).expand(3, 7)  # leading axes are kept
    first, second = place(values, layout, sizes=layout.sizes)
    assert first.shape == (3, 2, 4) and second.shape == (3, 4, 2)
    assert torch.equal(first[0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]]))
    assert torch.equal(second[2], torch.tensor([[5.0, 5], [5, 5], [6, 6], [6, 6]]))


def test_placement_is_differentiable_in_the_values():
    """d(sum of the placed map)/d(value) = the pixels a column paints, each divided by the
    number of tiles covering that pixel."""
    values = torch.randn(15, requires_grad=True)
    (placed,) = place(values, two_tiles_and_global())
    placed.sum().backward()
    expected = torch.zeros(15)
    expected[3:11] = 0.5  # a tile cell: one pixel, shared with the global view
    expected[11:] = 1.0  # a global cell: two pixels, each shared with one tile cell
    assert torch.equal(values.grad, expected)


def test_layouts_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="5 image-token columns, but the tiles take 4"):
        TokenLayout.from_tiles(torch.arange(5), [Tile(0, 0, 2, 2)])
    with pytest.raises(ValueError, match="tile box must lie inside"):
        Tile(0, 0, 2, 2, (0.5, 0.0, 0.25, 1.0))
    with pytest.raises(ValueError, match="tiles must name images 0..n-1"):
        TokenLayout.from_tiles(torch.arange(4), [Tile(1, 0, 2, 2)])
    with pytest.raises(ValueError, match="outside its tile's grid"):
        one = torch.zeros(1, dtype=torch.long)
        TokenLayout(one, one, one + 2, one, (Tile(0, 0, 2, 2),))
    with pytest.raises(ValueError, match="values have 4 columns; the layout reads column 6"):
        place(torch.zeros(4), TokenLayout.grid(2, 2, start=3))
