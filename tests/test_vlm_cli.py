"""The command line on generative VLMs: several images in one prompt, a layer range, explain's
--prompt, `groundcam models`, and each refusal as one line with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_vlm
import torch
from click.testing import CliRunner
from PIL import Image

import groundcam as gc
from groundcam.cli import main


def picture(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny InternVL (reads several images) and LLaVA-1.5 (one), saved; and two images."""
    root = tmp_path_factory.mktemp("vlm_cli")
    paths = {}
    for name in ("internvl", "llava"):
        model, processor = tiny_vlm.BUILDERS[name]()
        paths[name] = tiny_vlm.save(tiny_vlm.sharpen(model), processor, root / name)
    images = []
    for i, (w, h) in enumerate(((64, 32), (32, 48))):
        images.append(root / f"pic{i}.png")
        picture(w, h, i).save(images[-1])
    return paths, images, root


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groundcam: error: "), result.output
    return lines[0]


def test_caption_of_several_images_writes_a_map_per_image(saved, tmp_path):
    paths, images, _ = saved
    out = tmp_path / "out"
    args = ["caption", *images, "--model", paths["internvl"], "--method", "attention"]
    result = run(*args, "--text", "red cat", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    (res,) = doc["results"]
    assert res["image"] == [str(f) for f in images]
    # the same explanation through the API: the files hold its per-image maps
    ex = gc.load(str(paths["internvl"]))
    pics = [Image.open(f).convert("RGB") for f in images]
    gen = ex.explain_generation(pics, method="attention", text="red cat")
    assert len(gen.image_maps) == 2
    first = np.load(out / "maps.npz")["maps"]
    second = np.load(out / "image2" / "maps.npz")["maps"]
    assert np.allclose(first, gen.image_maps[0].numpy(), atol=1e-6)
    assert np.allclose(second, gen.image_maps[1].numpy(), atol=1e-6)
    assert second.shape[1:] != first.shape[1:]  # each image's own grid (64x32 vs 32x48)
    assert (out / "image2" / "tokens.png").is_file()
    assert str(out / "image2" / "tokens.png") in res["files"]
    assert json.loads((out / "image2" / "meta.json").read_text())["tokens"] == gen.tokens


def test_several_images_to_a_one_image_family_is_one_line(saved, tmp_path):
    paths, images, _ = saved
    result = run("caption", *images, "--model", paths["llava"], "--out", tmp_path / "o")
    line = one_line_error(result)
    assert "one image" in line and "2 images" in line


def test_a_layer_range_is_the_mean_of_its_layers(saved, tmp_path):
    paths, images, _ = saved
    base = ["caption", images[0], "--model", paths["llava"], "--method", "attention"]
    base += ["--text", "red cat the dog", "--json"]
    maps = {}
    for layer in ("0", "1", "0-1"):
        result = run(*base, "--layer", layer, "--out", tmp_path / layer)
        assert result.exit_code == 0, result.output
        (res,) = json.loads(result.output)["results"]
        maps[layer] = np.load(tmp_path / layer / "maps.npz")["raw_maps"]
    assert res["layer"] == [0, 1]
    assert np.allclose(maps["0-1"], (maps["0"] + maps["1"]) / 2, atol=1e-6)
    assert not np.allclose(maps["0"], maps["1"], atol=1e-4)


@pytest.mark.parametrize("layer", ["a-b", "1-", "1.5", "3-1"])
def test_a_bad_layer_or_range_is_one_line(saved, tmp_path, layer):
    paths, images, _ = saved
    args = ["caption", images[0], "--model", paths["llava"], "--text", "red cat"]
    line = one_line_error(run(*args, "--layer", layer, "--out", tmp_path / "o"))
    assert "layer" in line


def test_explain_passes_the_prompt_or_refuses_it_in_one_line(saved, tmp_path):
    paths, images, _ = saved
    out = tmp_path / "out"
    scores = {}
    for prompt in ("where is the cat", "what is the sign"):
        args = ["explain", images[0], "red cat", "--model", paths["llava"], "--prompt", prompt]
        result = run(*args, "--method", "gradcam", "--out", tmp_path / prompt, "--json")
        assert result.exit_code == 0, result.output
        (res,) = json.loads(result.output)["results"]
        scores[prompt] = res["scores"][0]
    ex = gc.load(str(paths["llava"]))
    pic = Image.open(images[0]).convert("RGB")
    for prompt, score in scores.items():  # the phrase was read after the prompt given
        want = ex.explain(pic, ["red cat"], method="gradcam", prompt=prompt).scores[0]
        assert score == pytest.approx(float(want), rel=1e-5)
    assert scores["where is the cat"] != pytest.approx(scores["what is the sign"], rel=1e-6)
    # a family without prompts: the prompt is refused, nothing is written
    albef = ["explain", images[0], "the red circle", "--prompt", "look", "--out", out]
    line = one_line_error(run(*albef))
    assert "prompt" in line and not out.exists()


def test_explain_layer_range_on_a_family_of_single_layers_is_one_line(saved, tmp_path):
    _, images, _ = saved
    args = ["explain", images[0], "the red circle", "--layer", "0-1", "--out", tmp_path / "o"]
    assert "layer" in one_line_error(run(*args))


def test_models_lists_the_generative_families_and_their_methods():
    result = run("models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("families x methods"))
    end = next(i for i, line in enumerate(lines) if line.startswith("scores"))
    header = lines[start + 1].split()
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2 : end]}
    for family in ("llava", "internvl", "idefics3"):
        marks = dict(zip(header, rows[family], strict=True))
        assert marks["logit-lens"] == "+" and marks["gradcam"] == "+"
        assert marks["rollout"] == "-"
    assert dict(zip(header, rows["albef"], strict=True))["logit-lens"] == "-"


@pytest.fixture
def page(saved, tmp_path):
    """The page's handlers offering the saved LLaVA and TrOCR (no prompt), and a workspace."""
    from groundcam.web import handlers as h
    from groundcam.web.models import ModelCache

    paths, _, _ = saved
    cache = ModelCache([str(paths["llava"]), "trocr-tiny-glyphs"], builtins=False)
    return h, cache, h.Workspace(tmp_path / "ws")


def test_page_caption_mode_takes_a_prompt_and_shows_each_word(page, saved):
    from groundcam.web.limits import Limits

    h, cache, workspace = page
    paths, images, _ = saved
    name = str(paths["llava"])
    assert cache.info(name).prompt and not cache.info("trocr-tiny-glyphs").prompt
    text = "red cat the dog"
    res = h.explain_caption(
        cache, workspace, Limits(), name, str(images[0]), "gradcam", text=text, prompt="where is"
    )
    gen = res.generation
    want = gc.load(str(paths["llava"])).explain_generation(
        Image.open(images[0]).convert("RGB"), prompt="where is", method="gradcam", text=text
    )
    assert gen.words == want.words == text.split() and gen.prompt == want.prompt
    assert torch.allclose(gen.word_maps, want.word_maps, atol=1e-6)
    html = h.caption_html(res, 0.5, None)
    assert html.count('class="gc-tok"') == len(gen.words)
    assert html.count("data:image/png;base64,") == len(gen.words)
    assert "where is" in html and "Hover a word" in html
    p = float(gen.scores[gen.word_tokens[0]].prod())
    assert f"{gen.words[0]} p={p:.2f}" in html


def test_page_refuses_a_prompt_in_one_line(page, saved):
    from groundcam.errors import InputError
    from groundcam.web.limits import Limits

    h, cache, workspace = page
    _, images, _ = saved
    with pytest.raises(InputError) as e:
        h.explain_caption(
            cache, workspace, Limits(), "trocr-tiny-glyphs", str(images[0]), prompt="what"
        )
    assert "takes no prompt" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError) as e:
        h.explain_caption(
            cache, workspace, Limits(max_phrase_chars=10), "trocr-tiny-glyphs", str(images[0]),
            prompt="a prompt longer than ten",
        )  # fmt: skip
    assert str(e.value).startswith("the prompt is 24 characters long")
