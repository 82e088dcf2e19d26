"""PaliGemma and Gemma 3 through the shared generative-VLM plumbing: image tokens found from the
config and placed over the squashed image (Gemma 3: the pooled grid, several images, one map
each), per-token maps of every method against a naive one-forward-and-backward-per-token recipe
with the side inputs `generate()` extends, sdpa against eager, the attention implementation and
hooks left as they were, a known answer, and bad input in one line."""

from __future__ import annotations

import copy

import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from PIL import Image
from vlm_checks import one_line, picture

import groundcam as gc
from groundcam.adapters.vlm import attention_implementations
from groundcam.cli import main
from groundcam.errors import InputError
from groundcam.explanation import normalize_maps
from groundcam.placement import place

METHODS = ("attention", "attn-gradcam", "gradcam", "logit-lens")
PROMPT = "what is the sign"
TEXT = "red cat the dog"
FAMILIES = ("paligemma", "gemma3")


def images_of(family: str, seed: int = 0) -> list[Image.Image]:
    """Two images: both families read several, one map each."""
    return [picture(seed=seed), picture(seed=seed + 10)]


@pytest.fixture(scope="module")
def built():
    """Both families, attention sharpened so that maps differ from token to token."""
    out = {}
    for family in FAMILIES:
        model, processor = tiny_vlm.BUILDERS[family](
            seed=1
        )  # seed 0: Gemma 3 writes only special tokens
        out[family] = (tiny_vlm.sharpen(model), processor)
    return out


@pytest.fixture(scope="module")
def sdpa(built):
    out = {}
    for family, (model, processor) in built.items():
        twin = checks.sdpa_copy(model)
        out[family] = (twin, processor)
    return out


def test_registered_families_with_their_methods(built):
    for family in FAMILIES:
        model, processor = built[family]
        ex = gc.load(model, processor=processor)
        assert ex.family == family
        assert gc.families()[family] == gc.families()["llava"]
        assert ex.layers("attention") == [0, 1] and ex.layers("logit-lens") == [1]


def coded(w: int, h: int) -> Image.Image:
    """Red = x·255/(w-1), green = y·255/(h-1): where a processed pixel came from."""
    xs = torch.linspace(0, 255, w)[None, :].expand(h, w)
    ys = torch.linspace(0, 255, h)[:, None].expand(h, w)
    rgb = torch.stack([xs, ys, torch.zeros_like(xs)], -1).round().to(torch.uint8)
    return Image.fromarray(rgb.numpy())


def cell_centres(inputs, processor, image: int, grid: int, cover: int) -> torch.Tensor:
    """Per token cell of a `grid`² pooled grid over the first `cover` pixels per side of
    processed image `image`: the mean original (x, y) in fractions of the image, [grid, grid, 2]."""
    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    px = (inputs["pixel_values"][image].permute(1, 2, 0) * std + mean)[:cover, :cover, :2]
    k = cover // grid
    return px.reshape(grid, k, grid, k, 2).mean((1, 3))


def test_paligemma_image_first_then_bos_and_the_whole_squashed_image(built):
    model, processor = built["paligemma"]
    a = gc.load(model, processor=processor).adapter
    image = coded(64, 24)  # wide: squashed to 32 x 32, nothing cropped
    inputs = a.inputs([image], PROMPT)
    assert "labels" not in inputs
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(24, 64)])
    assert layout.positions.tolist() == list(range(16))  # the image comes first
    assert int(ids[0, 16]) == processor.tokenizer.bos_token_id
    assert layout.tiles[0].box == (0.0, 0.0, 1.0, 1.0) and layout.tiles[0].grid_h == 4
    assert layout.row.tolist() == [r for r in range(4) for _ in range(4)]
    # each token's patch came from the cell placement gives it on the original image
    centres = cell_centres(inputs, processor, 0, 4, 32)
    want = (torch.arange(4) + 0.5) / 4
    assert torch.allclose(centres[..., 0], want[None, :].expand(4, 4), atol=0.02)
    assert torch.allclose(centres[..., 1], want[:, None].expand(4, 4), atol=0.04)
    values = torch.zeros(1, ids.shape[1])
    values[0, layout.positions] = torch.arange(16.0)
    (placed,) = place(values, layout, [(24, 64)])
    assert placed.shape == (1, 24, 64)
    assert placed[0, 0, 0] == 0 and placed[0, 23, 63] == 15 and placed[0, 6, 16] == 5
    # two images: two runs of 16 before BOS, the second image's grid from column 16 on
    two = a.inputs([image, coded(24, 40)], PROMPT)
    both = a.token_layout(two, two["input_ids"], [(24, 64), (40, 24)])
    assert both.positions.tolist() == list(range(32)) and both.images == 2
    assert both.image.tolist() == [0] * 16 + [1] * 16 and both.col[16:20].tolist() == [0, 1, 2, 3]
    assert int(two["input_ids"][0, 32]) == processor.tokenizer.bos_token_id
    assert a.prompt_text(None, 1) == "<image>caption en"  # its task prefix, not a question
    assert torch.allclose(
        cell_centres(two, processor, 1, 4, 32)[..., 1], centres[..., 1], atol=0.04
    )


def test_gemma3_several_images_each_a_pooled_grid_in_prompt_order(built):
    model, processor = built["gemma3"]
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([coded(40, 32), coded(32, 56)], PROMPT)
    ids = inputs["input_ids"]
    layout = a.token_layout(inputs, ids, [(32, 40), (56, 32)])
    image_id = model.config.image_token_id
    assert image_id != processor.image_token_id  # the processor's is begin-of-image
    assert torch.equal(layout.positions, torch.nonzero(ids[0] == image_id)[:, 0])
    assert layout.images == 2 and layout.image.tolist() == [0] * 4 + [1] * 4
    first, second = layout.positions[:4], layout.positions[4:]
    boi, eoi = model.config.boi_token_id, model.config.eoi_token_id
    assert int(ids[0, first[0] - 1]) == boi and int(ids[0, first[-1] + 1]) == eoi
    assert int(ids[0, second[0] - 1]) == boi and second[0] > first[-1] + 1
    assert all(t.box == (0.0, 0.0, 1.0, 1.0) and t.grid_h == 2 for t in layout.tiles)
    assert gc.load(model, processor=processor).grid(inputs["pixel_values"]) == (2, 2)
    for i in range(2):  # 4 x 4 patches pooled in 2 x 2 blocks: each token a quarter
        centres = cell_centres(inputs, processor, i, 2, 32)
        want = torch.tensor([0.25, 0.75])
        assert torch.allclose(centres[..., 0], want[None, :].expand(2, 2), atol=0.03)
        assert torch.allclose(centres[..., 1], want[:, None].expand(2, 2), atol=0.03)
    gen = gc.load(model, processor=processor).explain_generation(
        [coded(40, 32), coded(32, 56)], prompt=PROMPT, method="attention", text=TEXT
    )
    assert len(gen.image_maps) == 2 and gen.image_maps[1].shape == (4, 2, 2)
    assert not torch.allclose(gen.image_maps[0], gen.image_maps[1])


def test_gemma3_a_pool_that_leaves_patches_over_covers_only_its_part():
    """7 x 7 patches pooled in 2 x 2 blocks to 3 x 3 tokens: the last patch row and column
    reach no token, so the grid covers 6/7 of each side and the rest of the map is 0."""
    model, processor = tiny_vlm.gemma3(image_size=56, tokens_per_side=3)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([coded(70, 56)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(56, 70)])
    (tile,) = layout.tiles
    assert (tile.grid_h, tile.grid_w) == (3, 3)
    assert tile.box == pytest.approx((0.0, 0.0, 6 / 7, 6 / 7))
    centres = cell_centres(inputs, processor, 0, 3, 48)
    want = (torch.arange(3) + 0.5) * 16 / 56
    assert torch.allclose(centres[..., 0], want[None, :].expand(3, 3), atol=0.02)
    gen = gc.load(model, processor=processor).explain_generation(
        picture(70, 56), prompt=PROMPT, method="logit-lens", text=TEXT
    )
    assert gen.raw_maps.shape == (4, 4, 4)  # the finest cell spread over the whole image
    assert (gen.raw_maps[:, 3, :] == 0).all() and (gen.raw_maps[:, :, 3] == 0).all()


def test_paligemma_other_size():
    model, processor = tiny_vlm.paligemma(image_size=48, patch_size=8)
    a = gc.load(model, processor=processor).adapter
    inputs = a.inputs([picture(50, 30)], PROMPT)
    layout = a.token_layout(inputs, inputs["input_ids"], [(30, 50)])
    assert layout.positions.tolist() == list(range(36)) and layout.tiles[0].grid_w == 6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_maps_finite_and_not_flat_at_the_default_layer(built, family, method):
    model, processor = built[family]
    gen = gc.load(model, processor=processor).explain_generation(
        images_of(family), prompt=PROMPT, method=method, max_new_tokens=3
    )
    assert len(gen.tokens) == gen.raw_maps.shape[0] >= 1
    assert model.config.image_token_id not in gen.token_ids
    for maps in [gen.raw_maps, *gen.image_maps]:
        assert torch.isfinite(maps).all()
        spread = maps.amax((1, 2)) - maps.amin((1, 2))
        assert (spread > 1e-6 * maps.abs().amax().clamp(min=1e-30)).all()
    assert gen.raw_maps.abs().amax() > 0
    assert PROMPT in gen.prompt


def naive_maps(family, model, processor, images, method, layer, pad=None) -> list[torch.Tensor]:
    """One forward and one backward per text token, written from the definitions (DESIGN §12):
    the logits at row t-1 score token t; `token_type_ids` extended over the text with `pad`
    (the family's as generate() does: PaliGemma 1, Gemma 3 0); per image, its s² image-token
    columns as an s x s grid (square images: the grid covers each whole image)."""
    if family == "paligemma":
        text, pad = "<image>" * len(images) + PROMPT, 1 if pad is None else pad
    else:
        marks = "<start_of_image>" * len(images)
        text = f"<start_of_turn>user\n{marks}{PROMPT}<end_of_turn>\n<start_of_turn>model\n"
        pad = 0 if pad is None else pad
    enc = processor(images=images, text=[text], return_tensors="pt")
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    types = torch.cat([enc["token_type_ids"], torch.full_like(body, pad)], 1)
    first = enc["input_ids"].shape[1]
    cols = torch.nonzero(ids[0] == model.config.image_token_id)[:, 0]
    n = len(cols) // len(images)
    side = int(n**0.5)
    inputs = {"token_type_ids": types, "pixel_values": enc["pixel_values"]}
    values = checks.naive_token_values(model, ids, first, cols, inputs, method, layer)
    return list(values.reshape(-1, len(images), side, side).unbind(1))  # per image [tokens, s, s]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batched_per_token_maps_equal_the_naive_recipe(built, family, method):
    model, processor = built[family]
    images = images_of(family, seed=3)
    layer = 1 if method == "logit-lens" else 0
    gen = gc.load(model, processor=processor).explain_generation(
        images, prompt=PROMPT, method=method, text=TEXT
    )
    want = naive_maps(family, model, processor, images, method, layer)
    assert gen.tokens == TEXT.split()
    scale = want[0].abs().amax()
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want[0], atol=1e-5 * scale, rtol=1e-4)
    for got, w in zip(gen.image_maps, want, strict=True):
        assert torch.allclose(got, normalize_maps(w), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_side_input_is_extended_as_generate_does(built, family):
    """PaliGemma's generated tokens are suffix (token_type_ids 1): padding with 0 would put
    them in the bidirectional prefix and change the maps; the batched maps follow generate()."""
    model, processor = built[family]
    images = images_of(family, seed=4)
    gen = gc.load(model, processor=processor).explain_generation(
        images, prompt=PROMPT, method="gradcam", text=TEXT
    )
    right = naive_maps(family, model, processor, images, "gradcam", 0)[0]
    scale = right.abs().amax()
    assert torch.allclose(gen.raw_maps, right, atol=1e-5 * scale, rtol=1e-4)
    if family == "paligemma":
        wrong = naive_maps(family, model, processor, images, "gradcam", 0, pad=0)[0]
        assert (gen.raw_maps - wrong).abs().amax() > 1e-3 * scale


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_give_the_same_maps_and_sdpa_stays(built, sdpa, family, method):
    (eager, processor), (twin, _) = built[family], sdpa[family]
    a, b = checks.explain_on_both(eager, twin, processor, images_of(family, seed=5), method)
    for x, y in zip(a.image_maps, b.image_maps, strict=True):
        assert torch.allclose(x, y, atol=1e-4)
    checks.assert_attention_note(b.notes, method)


def test_attention_implementation_restored_after_an_error_mid_forward(sdpa):
    model, processor = sdpa["gemma3"]
    layer = model.get_decoder().layers[1]
    checks.assert_restored_after_an_error(
        model, processor, layer, images_of("gemma3"), "attn-gradcam"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_known_answer_a_text_token_attending_to_one_image_token(family):
    """Layer 0's queries read channel 0 (large in every text embedding), its keys channel 1,
    which only one image token carries (PaliGemma: cell (2, 1); Gemma 3: cell (1, 0) of the
    second image): every text row attends there alone. Gemma 3 normalises q and k per head, so
    the norms' weights on that channel are raised to make the logit large."""
    model, processor = tiny_vlm.BUILDERS[family](seed=2)
    images = images_of(family)
    checks.focus_first_layer(model, norm_slow=5.0)
    ex = gc.load(model, processor=processor)
    inputs = ex.adapter.inputs(images, PROMPT)
    cols = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[:, 0]
    image, row, col, side = (0, 2, 1, 4) if family == "paligemma" else (1, 1, 0, 2)
    cell = cols[image * side * side + row * side + col]
    with checks.marked(model, cell):
        gen = ex.explain_generation(images, prompt=PROMPT, method="attention", text=TEXT)
    assert (gen.image_maps[image].flatten(1).argmax(1) == row * side + col).all()
    values = gen.raw_maps if image == 0 else None
    if values is not None:
        checks.assert_one_cell(values, row, col, 0.99)
    else:  # the first image draws no attention; its raw map is near 0
        assert (gen.raw_maps < 1e-3).all()


def test_bad_input_is_one_line(built):
    model, processor = built["paligemma"]
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture()] * 33, prompt=PROMPT)
    assert "at most 32 images" in one_line(e) and "33 images" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation(picture(), prompt="<image><image>what")
    assert "2 image placeholder" in one_line(e)
    model, processor = built["gemma3"]
    ex = gc.load(model, processor=processor)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture()] * 33, prompt=PROMPT)
    assert "at most 32 images" in one_line(e)
    with pytest.raises(InputError) as e:
        ex.explain_generation([picture(), picture()], prompt="<start_of_image> what")
    assert "1 image placeholder(s) '<start_of_image>' for 2 image(s)" in one_line(e)
    # pan-and-scan: crops of one image arrive as extra runs of image tokens
    a = ex.adapter
    inputs = a.inputs([picture(), picture()], PROMPT)
    with pytest.raises(InputError) as e:
        a.token_layout(inputs, inputs["input_ids"], [(32, 32)])
    assert "do_pan_and_scan=False" in one_line(e)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_from_a_saved_directory(built, family, tmp_path):
    model, processor = built[family]
    ex = gc.load(str(tiny_vlm.save(model, processor, tmp_path / family)))
    assert ex.family == family
    gen = ex.explain_generation(images_of(family), prompt=PROMPT, method="gradcam", text=TEXT)
    want = gc.load(model, processor=processor).explain_generation(
        images_of(family), prompt=PROMPT, method="gradcam", text=TEXT
    )
    assert torch.allclose(gen.raw_maps, want.raw_maps, atol=1e-5 * want.raw_maps.abs().amax())


def test_cli_caption_on_paligemma(built, tmp_path):
    model, processor = built["paligemma"]
    path = tiny_vlm.save(model, processor, tmp_path / "paligemma")
    image = tmp_path / "pic.png"
    picture(48, 32).save(image)
    args = ["caption", str(image), "--model", str(path), "--prompt", "where is the cat"]
    args += ["--method", "logit-lens", "--max-new-tokens", "2", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert "where is the cat" in result.output
    bad = CliRunner().invoke(main, [*args[:5], "<image><image> what", *args[6:]])
    assert bad.exit_code == 2 and "placeholder" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def paligemma2() -> tuple:
    """PaliGemma 2: the same class over a Gemma 2 decoder, whose layer 0 attends within a
    sliding window (8 tokens) shorter than the sequence; Gemma 2 runs eager attention only."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    _, processor = tiny_vlm.paligemma()
    tok = processor.tokenizer
    base = tiny_vlm.paligemma()[0].config
    text = dict(tiny_vlm._lm(tok), model_type="gemma2", head_dim=8, query_pre_attn_scalar=8)
    config = PaliGemmaConfig(
        vision_config=base.vision_config.to_dict(),
        text_config=dict(text, sliding_window=8),
        image_token_index=base.image_token_id,
        vocab_size=len(tok),
        projection_dim=32,
        hidden_size=32,
    )
    torch.manual_seed(1)
    model = PaliGemmaForConditionalGeneration._from_config(config, attn_implementation="eager")
    assert model.config.text_config.layer_types[0] == "sliding_attention"
    return tiny_vlm.sharpen(model.eval()), processor


@pytest.mark.parametrize("method", METHODS)
def test_paligemma2_sliding_window_layer_equals_the_naive_recipe(method):
    model, processor = paligemma2()
    images = images_of("paligemma", seed=7)
    ex = gc.load(model, processor=processor)
    gen = ex.explain_generation(images, prompt=PROMPT, method=method, text=TEXT)
    want = naive_maps(
        "paligemma", model, processor, images, method, 1 if method == "logit-lens" else 0
    )[0]
    scale = want.abs().amax()
    assert scale > 0 and gen.layer == (1 if method == "logit-lens" else 0)
    assert torch.allclose(gen.raw_maps, want, atol=1e-5 * scale, rtol=1e-4)


def test_generation_never_writes_an_image_token():
    """This random Gemma 3 writes its image token second when left alone; an image token in the
    answer would take image features in the teacher-forced forward, so generation suppresses
    it (and only it: the rest of the answer is the model's greedy choice)."""
    model, processor = tiny_vlm.sharpen(tiny_vlm.gemma3()[0]), tiny_vlm.gemma3()[1]
    images = [picture(48, 32), picture(48, 32).transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    image_id = model.config.image_token_id
    ex = gc.load(model, processor=processor)
    inputs = ex.adapter.inputs(images, PROMPT)
    first = inputs["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, first:].tolist()
    assert free[1] == image_id
    gen = ex.explain_generation(images, prompt=PROMPT, method="logit-lens", max_new_tokens=3)
    assert image_id not in gen.token_ids and gen.token_ids[0] == free[0]
    ids = torch.cat([inputs["input_ids"], torch.tensor([free[:1]])], 1)
    with torch.no_grad():
        logits = model(**ex.adapter.teacher_inputs(inputs, ids)).logits[0, -1]
    assert int(logits.argmax()) == image_id
    logits[image_id] = -float("inf")
    assert gen.token_ids[1] == int(logits.argmax())


def test_a_chat_template_that_writes_bos_gets_one_bos():
    """Gemma 3's chat template starts with BOS and its tokenizer adds one: the prompt's ids are
    those of the processor's own `apply_chat_template(tokenize=True)`, a single BOS."""
    from tokenizers import processors

    model, processor = tiny_vlm.gemma3()
    tok = processor.tokenizer
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("what is")["input_ids"][0] == tok.bos_token_id
    processor.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>user\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    a = gc.load(model, processor=processor).adapter
    ours = a.inputs([picture()], PROMPT)["input_ids"]
    content = [{"type": "image", "image": picture()}, {"type": "text", "text": PROMPT}]
    theirs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    assert torch.equal(ours, theirs) and (ours[0] == tok.bos_token_id).sum() == 1


@pytest.mark.parametrize("method", ["attention", "attn-gradcam", "gradcam"])
def test_gemma3_sliding_window_recorded_under_sdpa_equals_the_naive_recipe(method):
    """A 14-token sliding window (both layers): the answer's rows see the second image's
    tokens and at most the end of the first's. Recorded in an sdpa model, the maps equal the
    eager naive recipe's, 0 where the window ends."""
    model, processor = tiny_vlm.gemma3(seed=1)
    tiny_vlm.sharpen(model)
    model.config.text_config.sliding_window = 14
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    images = images_of("gemma3", seed=3)
    gen = gc.load(twin, processor=processor).explain_generation(
        images, prompt=PROMPT, method=method, text=TEXT
    )
    want = naive_maps("gemma3", model, processor, images, method, 0)
    assert set(attention_implementations(twin)) == {"sdpa"}
    scale = want[0].abs().amax()
    assert scale > 0 and torch.allclose(gen.raw_maps, want[0], atol=1e-5 * scale, rtol=1e-4)
    if method != "gradcam":  # the first image's first token lies outside every answer row's window
        assert (want[0][:, 0, 0] == 0).all() and (gen.raw_maps[:, 0, 0] == 0).all()
    assert (want[1].amax((1, 2)) > want[1].amin((1, 2))).all()
    assert torch.allclose(gen.image_maps[1], normalize_maps(want[1]), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_one_cell_of_the_image_changes_the_token_the_layout_names(family):
    """A probe of the model itself: with the vision tower's attention silenced (each patch
    encoded on its own), a block painted inside one cell of the second (non-square) image
    changes the layer-0 states of exactly the image token the layout gives that cell."""
    model, processor = tiny_vlm.BUILDERS[family]()
    with torch.no_grad():
        for name, module in model.named_modules():
            if "vision" in name and name.endswith("self_attn.out_proj"):
                module.weight.zero_()
                module.bias.zero_()
    a = gc.load(model, processor=processor).adapter
    sizes = [(32, 32), (30, 60)]
    side = 4 if family == "paligemma" else 2
    row, col = 1, side - 1
    before = [picture(), picture(60, 30, seed=1)]
    after = [before[0], before[1].copy()]
    h, w = sizes[1]
    cy, cx = int((row + 0.5) * h / side), int((col + 0.5) * w / side)
    after[1].paste((255, 255, 255), (cx - 3, cy - 2, cx + 3, cy + 2))
    states = []
    for images in (before, after):
        inputs = a.inputs(images, PROMPT)
        layout = a.token_layout(inputs, inputs["input_ids"], sizes)
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[0][0]
        states.append(hidden[layout.positions])
    change = (states[1] - states[0]).abs().amax(-1)
    mine = (layout.image == 1) & (layout.row == row) & (layout.col == col)
    assert int(mine.sum()) == 1
    assert change[mine].item() > 0 and (change[~mine] < 1e-6 * change[mine]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_under_sdpa_gives_the_float32_maps(built, family):
    """The deployed form (bf16, sdpa): every method runs and its maps match float32 eager's
    (correlation over all tokens and cells; bf16 keeps about 3 significant digits)."""
    model, processor = built[family]
    half = copy.deepcopy(model).to(torch.bfloat16)
    half.set_attn_implementation("sdpa")
    for method in METHODS:
        x, y = (
            gc.load(m, processor=processor).explain_generation(
                images_of(family, seed=8), prompt=PROMPT, method=method, text=TEXT
            )
            for m in (model, half)
        )
        assert y.raw_maps.dtype == torch.float32 and torch.isfinite(y.raw_maps).all()
        pair = torch.stack([x.raw_maps.flatten(), y.raw_maps.flatten()])
        assert torch.corrcoef(pair)[0, 1] > 0.99, method
    assert set(attention_implementations(half)) == {"sdpa"}
