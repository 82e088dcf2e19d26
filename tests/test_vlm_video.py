"""Videos on generative VLMs (Qwen2/2.5/3-VL, LLaVA-OneVision): the frame readers, the frames
prepared without torchvision as the models' video paths read them, tokens located per frame, the
batched per-token maps against the one-token-at-a-time recipe, a constructed known answer, and
bad input as one line (library and CLI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from PIL import Image
from vlm_checks import one_line, picture

import groundcam as gc
from groundcam.adapters.llava_next import onevision_video_features
from groundcam.adapters.qwen_vl import qwen_video_features
from groundcam.cli import main
from groundcam.errors import ImageError, InputError
from groundcam.explanation import normalize_maps
from groundcam.video import Video

PROMPT = "what happens"
TEXT = "red cat the dog"
VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")


def clip(n: int = 4, w: int = 40, h: int = 30) -> list[Image.Image]:
    """`n` seeded random frames of one size."""
    return [picture(w, h, seed=10 + i) for i in range(n)]


def solid(colours, size=(6, 4)) -> list[Image.Image]:
    return [Image.new("RGB", size, c) for c in colours]


COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("suffix", [".gif", ".webp", ".png"])
def test_an_animated_file_reads_its_frames_and_frame_rate(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    first, *rest = solid(COLOURS)
    first.save(path, save_all=True, append_images=rest, duration=100, loop=0, lossless=True)
    video = Video(path)
    assert len(video) == 5 and video.total == 5 and video.indices == [0, 1, 2, 3, 4]
    assert [f.getpixel((2, 2)) for f in video.frames] == COLOURS
    assert video.fps == pytest.approx(10.0) and video.size == (4, 6)
    three = Video(path, frames=3)
    assert three.indices == [0, 2, 4]
    assert [f.getpixel((2, 2)) for f in three.frames] == [COLOURS[0], COLOURS[2], COLOURS[4]]
    assert Video(path, fps=25).fps == 25.0  # given: it wins over the file's


def test_a_folder_reads_its_image_files_sorted_by_name_at_the_first_frame_size(tmp_path):
    names = ["f10.png", "f02.png", "f03.jpg", "f01.png"]
    for name, colour in zip(names, COLOURS, strict=False):
        Image.new("RGB", (6, 4), colour).save(tmp_path / name, quality=100)
    Image.new("RGB", (12, 9), COLOURS[4]).save(tmp_path / "f11.png")  # another size: resized
    (tmp_path / "notes.txt").write_text("not a frame")
    video = Video(tmp_path)
    assert video.total == 5 and video.fps is None
    got = [f.getpixel((2, 2)) for f in video.frames]
    assert got[0] == COLOURS[3] and got[1] == COLOURS[1] and got[3] == COLOURS[0]  # by name
    assert np.abs(np.subtract(got[2], COLOURS[2])).max() <= 3  # the JPEG, near its colour
    assert all(f.size == (6, 4) for f in video.frames) and got[4] == COLOURS[4]
    assert Video(tmp_path, frames=2).indices == [0, 4]


def test_frames_from_lists_and_arrays_and_sampling_rule():
    arrays = np.stack([np.full((4, 6, 3), 30 * i, dtype=np.uint8) for i in range(7)])
    video = Video(arrays, frames=4)
    assert video.indices == [0, 2, 4, 6]  # round(i * 6 / 3)
    assert [f.getpixel((0, 0)) for f in video.frames] == [
        (0,) * 3,
        (60,) * 3,
        (120,) * 3,
        (180,) * 3,
    ]
    assert len(Video(list(arrays))) == 7 and len(Video(solid(COLOURS[:2]))) == 2
    assert Video(arrays[:, :, :, :1].repeat(3, -1)).frames[1].mode == "RGB"
    meta = Video(arrays, frames=4, fps=3).metadata()
    assert meta.frames_indices == [0, 2, 4, 6] and meta.total_num_frames == 7 and meta.fps == 3


def test_bad_videos_are_one_line(tmp_path):
    cases = [
        ([], "non-empty list of frames"),
        (Image.new("RGB", (4, 4)), "non-empty list of frames"),
        (tmp_path / "missing.gif", "video not found"),
        (tmp_path, "holds no image files"),
        ([np.zeros((4, 4, 3), dtype=np.float32)], "uint8 array"),
        ([np.zeros((4, 4, 3, 2), dtype=np.uint8)], "uint8 array"),
    ]
    for source, words in cases:
        with pytest.raises(InputError) as e:
            Video(source)
        assert words in one_line(e), source
    for frames, words in [(0, "positive integer"), (9, "only 2 frame"), (True, "positive")]:
        with pytest.raises(InputError) as e:
            Video(solid(COLOURS[:2]), frames=frames)
        assert words in one_line(e)
    with pytest.raises(InputError, match="fps must be a positive number"):
        Video(solid(COLOURS[:2]), fps=0)
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a not really")
    with pytest.raises(ImageError) as e:
        Video(broken)
    assert str(broken) in one_line(e)


# ----------------------------------------------------------------------------- preparation


def unpatch_image(pixels: torch.Tensor, grid: list[int], t: int, p: int, m: int) -> torch.Tensor:
    """One still image back from Qwen's patches [N, C*T*p*p] ([C, H, W]; temporal copy 0),
    inverting the image processor's patch order (t, h/m, w/m, m, m, C, T, p, p)."""
    _, gh, gw = grid
    x = pixels.reshape(gh // m, gw // m, m, m, 3, t, p, p)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)


def patchify_video(video: torch.Tensor, t: int, p: int, m: int) -> torch.Tensor:
    """transformers' Qwen2-VL video processor `patchify` ([F, C, H, W] -> [steps*h*w, C*T*p*p],
    the last frame repeated to fill the last step), transcribed."""
    f, c, h, w = video.shape
    if pad := -f % t:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = video.shape[0] // t, h // p, w // p
    x = video.view(gt, t, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * t * p * p)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_frames_are_the_video_processors_layout_of_the_image_processors_frames(family):
    model, processor = tiny_vlm.BUILDERS[family]()
    ip = processor.image_processor
    t, p, m = ip.temporal_patch_size, ip.patch_size, ip.merge_size
    frames = clip(3)
    got = qwen_video_features(ip, frames)
    one = [ip(images=[f], return_tensors="pt") for f in frames]
    still = torch.stack(
        [unpatch_image(o["pixel_values"], o["image_grid_thw"][0].tolist(), t, p, m) for o in one]
    )
    assert torch.equal(got["pixel_values_videos"], patchify_video(still, t, p, m))
    assert got["video_grid_thw"].tolist() == [[2, *one[0]["image_grid_thw"][0, 1:].tolist()]]
    # a frame repeated over a temporal patch is exactly that frame as a still image ...
    twice = qwen_video_features(ip, [frames[0], frames[0]])
    assert torch.equal(twice["pixel_values_videos"], one[0]["pixel_values"])
    assert torch.equal(twice["video_grid_thw"], one[0]["image_grid_thw"])
    # ... and the model's video path reads it as it reads the image
    with torch.no_grad():
        video = model.model.get_video_features(
            pixel_values_videos=twice["pixel_values_videos"], video_grid_thw=twice["video_grid_thw"]
        ).pooler_output
        image = model.model.get_image_features(
            pixel_values=one[0]["pixel_values"], image_grid_thw=one[0]["image_grid_thw"]
        ).pooler_output
    assert torch.allclose(torch.cat(list(video)), torch.cat(list(image)), atol=1e-6)


def test_onevision_frames_are_the_image_processors_base_tiles():
    model, processor = tiny_vlm.llava_onevision()
    ip = processor.image_processor
    frames = clip(3, 50, 30)
    got = onevision_video_features(ip, frames)["pixel_values_videos"]
    assert got.shape == (1, 3, 3, 32, 32)
    for f, frame in enumerate(frames):
        assert torch.equal(got[0, f], ip(images=[frame], return_tensors="pt")["pixel_values"][0, 0])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_processor_expands_the_video_and_the_model_reads_it_at_the_layout(family):
    """Through the processor (text expansion, timestamps) and the model itself: the language
    model's inputs at the layout's columns of each map are the video features in order."""
    model, processor = tiny_vlm.BUILDERS[family]()
    a = gc.load(model, processor=processor).adapter
    video = Video(clip(4), fps=2)
    inputs = a.video_inputs(video, PROMPT)
    ids = inputs["input_ids"]
    layout, frame_map = a.video_layout(inputs, ids, video)
    assert (ids[0, layout.positions] == model.config.video_token_id).all()
    assert int((ids == model.config.video_token_id).sum()) == len(layout.positions)
    qwen = family != "llava_onevision"
    assert frame_map == ([0, 0, 1, 1] if qwen else [0, 1, 2, 3])
    assert [(t.grid_h, t.grid_w) for t in layout.tiles] == [(2, 2)] * (2 if qwen else 4)
    with torch.no_grad():
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]
        if qwen:
            feats = model.model.get_video_features(
                pixel_values_videos=inputs["pixel_values_videos"],
                video_grid_thw=inputs["video_grid_thw"],
            ).pooler_output
            feats = torch.cat(list(feats))
        else:
            feats = model.model.get_video_features(
                pixel_values_videos=inputs["pixel_values_videos"],
                vision_feature_layer=model.config.vision_feature_layer,
                vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            ).pooler_output[0]
    assert torch.allclose(embeds[layout.positions], feats, atol=1e-6)
    if family == "qwen2_5_vl":  # temporal positions: 2 frames per step at 2 fps
        assert inputs["second_per_grid_ts"].tolist() == [1.0]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_changing_one_frame_changes_only_its_maps_tokens(family):
    model, processor = tiny_vlm.BUILDERS[family]()
    a = gc.load(model, processor=processor).adapter
    frames = clip(4)
    changed = list(frames)
    changed[2] = picture(40, 30, seed=99)

    def run(video):
        inputs = a.video_inputs(video, PROMPT)
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True).hidden_states[0][0]
        return out, a.video_layout(inputs, inputs["input_ids"], video)

    before, (layout, frame_map) = run(Video(frames))
    after, _ = run(Video(changed))
    diff = (before - after).abs().amax(-1)[layout.positions]
    mine = torch.zeros(len(layout.positions), dtype=torch.bool)
    mine[layout.has_cell] = layout.tile[layout.has_cell] == frame_map[2]
    assert (diff[mine] > 1e-4).all() and (diff[~mine] == 0).all()


# ----------------------------------------------------------------------------- maps


def naive_strip(model, a, video: Video, method: str, layer: int) -> torch.Tensor:
    """The one-forward-and-backward-per-token recipe (`vlm_checks.naive_token_values`) over
    the video's tokens, each map placed per frame and the frames side by side [K, h, F*w]."""
    inputs = a.video_inputs(video, PROMPT)
    body = torch.tensor([a.tokenizer(TEXT, add_special_tokens=False)["input_ids"]])
    ids = torch.cat([inputs["input_ids"], body], 1)
    full = a.teacher_inputs(inputs, ids)
    side = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
    layout, frame_map = a.video_layout(inputs, ids, video)
    # every video column, OneVision's newline too (Grad-CAM's weights average over them all)
    flat = checks.naive_token_values(
        model, ids, inputs["input_ids"].shape[1], layout.positions, side, method, layer
    )
    maps = []
    for f in range(len(video)):
        tile = layout.tiles[frame_map[f]]
        one = flat[:, (layout.tile == frame_map[f]) & layout.has_cell]
        maps.append(one.reshape(len(flat), tile.grid_h, tile.grid_w))
    return torch.cat(maps, -1)


@pytest.mark.parametrize("method", ["attention", "gradcam"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_batched_per_token_maps_of_a_video_equal_the_naive_recipe(family, method):
    model, processor = tiny_vlm.BUILDERS[family]()
    model = tiny_vlm.sharpen(model)
    ex = gc.load(model, processor=processor)
    video = Video(clip(3), fps=2)
    gen = ex.explain_generation(video, prompt=PROMPT, method=method, text=TEXT, layer=0)
    want = naive_strip(model, ex.adapter, video, method, 0)
    assert gen.tokens == TEXT.split() and gen.frames == video.frames
    assert gen.raw_maps.shape == want.shape == (4, 2, 6)
    scale = want.abs().amax()
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want, atol=1e-5 * scale, rtol=1e-4)
    frames = gen.image_maps
    assert len(frames) == 3 and torch.allclose(
        torch.cat(frames, -1), normalize_maps(want), atol=1e-4
    )
    if family != "llava_onevision":  # frames 0 and 1 share a temporal patch, hence a map
        assert torch.equal(frames[0], frames[1]) and "temporal steps" in gen.notes["video"]
    assert gen.image.size == (3 * 40, 30) and gen.meta()["frames"] == 3


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_known_answer_every_token_attends_to_one_cell_of_one_frame(family):
    """Layer 0 reads channel 1, which only the video token of cell (1, 0) of frame 2's map
    carries: every token's attention map is that cell of that frame (and, for Qwen, of frame 3,
    which shares frame 2's temporal patch), nothing elsewhere."""
    model, processor = tiny_vlm.BUILDERS[family](seed=2)
    checks.focus_first_layer(model)
    ex = gc.load(model, processor=processor)
    video = Video(clip(4))
    inputs = ex.adapter.video_inputs(video, PROMPT)
    layout, frame_map = ex.adapter.video_layout(inputs, inputs["input_ids"], video)
    pick = (layout.tile == frame_map[2]) & (layout.row == 1) & (layout.col == 0)
    with checks.marked(model, int(layout.positions[pick][0])):
        gen = ex.explain_generation(video, prompt=PROMPT, method="attention", text=TEXT, layer=0)
    raw = gen.raw_maps  # [K, 2, 4 * 2]: frames side by side
    lit = [2, 3] if family == "qwen2_vl" else [2]
    for f in range(4):
        frame = raw[:, :, 2 * f : 2 * f + 2]
        if f in lit:
            checks.assert_one_cell(frame, 1, 0, 0.99)
        else:
            assert (frame < 1e-3).all()


def test_a_generated_answer_on_a_video_and_its_figures(tmp_path):
    model, processor = tiny_vlm.qwen2_vl()
    # the random model would end at once: words only (no pad, unk, bos or eos)
    model.generation_config.suppress_tokens = [0, 1, 2, 3]
    ex = gc.load(tiny_vlm.sharpen(model), processor=processor)
    gen = ex.explain_generation(Video(clip(2)), prompt=PROMPT, max_new_tokens=3)
    assert len(gen) == 3 and gen.maps.shape == (3, 2, 4)  # 2 frames (one temporal step)
    assert torch.equal(gen.maps[:, :, :2], gen.maps[:, :, 2:])
    media = {model.config.video_token_id, model.config.image_token_id}
    assert not media & set(gen.token_ids)
    fig = gen.figure()
    assert fig.axes
    written = gen.save(tmp_path / "out")
    assert (written / "meta.json").is_file() and (written / "tokens.png").is_file()
    phrase = ex.explain(Video(clip(2)), ["red cat"], prompt=PROMPT)
    assert phrase.maps.shape == (1, 2, 4) and phrase.images[0].size == (80, 30)


@pytest.mark.parametrize("method", ["attention", "gradcam"])
def test_a_video_under_sdpa_gives_the_eager_maps_and_keeps_sdpa(method):
    """The deployed model's attention (sdpa) on a video: the same maps as eager, nothing left
    switched or hooked (`vlm_checks.explain_on_both`)."""
    model, processor = tiny_vlm.qwen2_vl()
    model = tiny_vlm.sharpen(model)
    a, b = checks.explain_on_both(model, checks.sdpa_copy(model), processor, Video(clip(3)), method)
    assert a.raw_maps.shape == (4, 2, 6)
    checks.assert_attention_note(b.notes, method)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("family", ["llava", "paligemma", "internvl", "blip2"])
def test_a_video_to_a_family_without_video_is_one_line(family):
    model, processor = tiny_vlm.BUILDERS[family]()
    ex = gc.load(model, processor=processor)
    for call in (
        lambda: ex.explain_generation(Video(clip(2)), prompt=PROMPT, text=TEXT),
        lambda: ex.explain(Video(clip(2)), ["red cat"]),
    ):
        with pytest.raises(InputError) as e:
            call()
        assert "reads images, not videos" in one_line(e)


def test_a_video_inside_a_list_of_images_is_one_line():
    model, processor = tiny_vlm.qwen2_vl()
    with pytest.raises(InputError) as e:
        gc.load(model, processor=processor).explain_generation(
            [picture(), Video(clip(2))], prompt=PROMPT, text=TEXT
        )
    assert "a video is explained alone" in one_line(e)


def test_too_many_frames_for_the_processor_or_the_model_is_one_line():
    model, processor = tiny_vlm.qwen2_vl()
    a = gc.load(model, processor=processor).adapter
    processor.video_processor.max_frames = 3
    try:
        with pytest.raises(InputError) as e:
            a.video_inputs(Video(clip(4)), PROMPT)
        assert "4 frames, the processor reads at most 3" in one_line(e)
    finally:
        del processor.video_processor.max_frames
    a.max_positions = lambda: 12
    with pytest.raises(InputError) as e:
        a.video_inputs(Video(clip(4)), PROMPT)
    assert "this model reads at most 12" in one_line(e) and "frames=N" in one_line(e)
    with pytest.raises(InputError) as e:
        a.video_inputs(Video(clip(2)), "<|vision_start|><|video_pad|><|vision_end|>" * 2 + "x")
    assert "2 video placeholder(s)" in one_line(e)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_cli")
    paths = {}
    for name in ("qwen2_vl", "llava"):
        model, processor = tiny_vlm.BUILDERS[name]()
        paths[name] = tiny_vlm.save(tiny_vlm.sharpen(model), processor, root / name)
    gif = root / "clip.gif"
    first, *rest = clip(4)
    first.save(gif, save_all=True, append_images=rest, duration=250)
    return paths, gif


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: "), result.output
    return lines[0]


def test_cli_caption_of_a_video_writes_the_frame_strip(saved, tmp_path):
    paths, gif = saved
    out = tmp_path / "out"
    args = ["caption", "--video", gif, "--frames", "2", "--model", paths["qwen2_vl"]]
    result = run(*args, "--prompt", PROMPT, "--text", "red cat", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    (res,) = json.loads(result.output)["results"]
    assert res["image"] == str(gif) and res["frames"] == 2 and res["tokens"] == ["red", "cat"]
    assert "indices [0, 3] of 4" in res["notes"]["video"]
    assert (out / "tokens.png").is_file()


def test_cli_video_refusals_are_one_line(saved, tmp_path):
    paths, gif = saved
    common = ["--prompt", PROMPT, "--text", "red", "--out", tmp_path / "o"]
    line = one_line_error(run("caption", "--video", gif, "--model", paths["llava"], *common))
    assert "reads images, not videos" in line
    line = one_line_error(run("caption", gif, "--video", gif, "--model", paths["qwen2_vl"]))
    assert "one of the two" in line
    line = one_line_error(run("caption", "--model", paths["qwen2_vl"]))
    assert "one of the two" in line
    line = one_line_error(run("caption", gif, "--frames", "2", "--model", paths["qwen2_vl"]))
    assert "--frames is for --video" in line
    args = ["caption", "--video", gif, "--frames", "9", "--model", paths["qwen2_vl"], *common]
    assert "only 4 frame" in one_line_error(run(*args))
    args = ["caption", "--video", tmp_path / "none.gif", "--model", paths["qwen2_vl"], *common]
    assert "video not found" in one_line_error(run(*args))
