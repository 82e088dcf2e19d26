"""Methods for generative VLMs beyond the per-token basics (issue 18 items 3 and 4): `tam`
against an independent loop over generation rounds, its rank Gaussian filter against a
hand-computed example, `relative-attention` of a prompt against itself, and a given phrase
explained through `explain` as on ALBEF."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import tiny_vlm
import torch
from test_vlm_llava import strong, teacher_forced
from vlm_checks import hooks, picture

import groundcam as gc
from groundcam.adapters.vlm import attention_implementations
from groundcam.methods.relative_attention import GENERIC_PROMPT
from groundcam.methods.tam import rank_gaussian_filter

PROMPT = "what is the sign"
TEXT = "red cat the dog red"  # "red" twice: a repeat is left out of its own interference


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_vlm.llava()
    return strong(model), processor


# ----------------------------------------------------------------------------- rank Gaussian filter


def test_rank_gaussian_filter_on_a_hand_computed_3x3_example():
    grid = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    out = rank_gaussian_filter(grid)
    # the centre window is 1..9: symmetric ranks around 5 give exactly 5
    assert out[1, 1].item() == pytest.approx(5.0, abs=1e-9)
    # corner (0, 0), reflect padding: rows (1, 0, 1) x cols (1, 0, 1) of the grid
    window = sorted([5, 4, 5, 2, 1, 2, 5, 4, 5])
    assert window == [1, 2, 2, 4, 4, 5, 5, 5, 5]
    mean = 33 / 9
    std = math.sqrt(sum((v - mean) ** 2 for v in window) / 9)  # 20/9 variance
    assert std == pytest.approx(math.sqrt(20 / 9))
    sigma = std / mean
    kernel = [math.exp(-(x**2) / (2 * sigma**2)) for x in range(-4, 5)]
    value = sum(v * k for v, k in zip(window, kernel, strict=True)) / sum(kernel)
    assert value == pytest.approx(4.0443, abs=1e-4)
    assert out[0, 0].item() == pytest.approx(value, rel=1e-6)  # float32 grid
    # a window whose mean is 0 gives 0; a constant window keeps its value
    assert rank_gaussian_filter(torch.zeros(3, 3)).abs().max() == 0
    assert torch.allclose(rank_gaussian_filter(torch.full((3, 4), 0.25)), torch.tensor(0.25))


def authors_filter(img: np.ndarray) -> np.ndarray:
    """The rank Gaussian filter as a plain loop over cells (DESIGN §12)."""
    out = np.zeros_like(img)
    padded = np.pad(img, 1, mode="reflect")
    x = np.arange(9) - 4
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            window = np.sort(padded[i : i + 3, j : j + 3].flatten())
            mean = window.mean()
            if mean <= 0:
                continue
            sigma = window.std() / mean
            kernel = np.exp(-(x**2) / (2 * sigma**2))
            out[i, j] = (window * kernel / kernel.sum()).sum()
    return out


def test_rank_gaussian_filter_equals_a_loop_on_a_random_grid():
    g = torch.rand(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g[0, 0] = 0
    want = authors_filter(g.numpy())
    assert np.allclose(rank_gaussian_filter(g).numpy(), want, atol=1e-12)


# ----------------------------------------------------------------------------- tam


def rounds_tam(model, processor, ex, image, eci: bool = True) -> torch.Tensor:
    """TAM written from the paper's formulas as a loop over generation rounds: round r runs the
    model on the sequence up to the explained token and reads the full LM head there."""
    a = ex.adapter
    enc = processor(
        images=[image], text=[f"USER: <image>\n{PROMPT} ASSISTANT:"], return_tensors="pt"
    )
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    first = enc["input_ids"].shape[1]
    seq = ids[0].tolist()
    image_pos = [j for j, t in enumerate(seq) if t == model.config.image_token_index]
    special = a.special_ids()
    text_pos = [j for j, t in enumerate(seq) if j not in image_pos and t not in special]
    maps = []
    for p in range(first, len(seq)):
        with torch.no_grad():
            out = model(
                input_ids=ids[:, :p],
                attention_mask=torch.ones(1, p, dtype=torch.long),
                pixel_values=enc["pixel_values"],
                output_hidden_states=True,
            )
            logits = model.get_output_embeddings()(out.hidden_states[-1])[0].double().numpy()
        y = seq[p]
        s = np.clip(logits[:, y], 0, None)
        img = s[image_pos]
        ctx = [j for j in text_pos if j < p - 1 and seq[j] != y]
        if eci and ctx:
            w = s[ctx] / (s[ctx].sum() + 1e-8)
            m = sum(
                w_j * np.clip(logits[image_pos, seq[j]], 0, None)
                for w_j, j in zip(w, ctx, strict=True)
            )
            scale = np.linalg.lstsq(m[:, None], img, rcond=None)[0][0]
            img = np.clip(img - scale * m, 0, None)
        text = s[[j for j in text_pos if j < p - 1]]
        both = np.concatenate([img, text])
        img = (img - both.min()) / (both.max() - both.min())
        grid = authors_filter(img.reshape(4, 4))
        maps.append((grid * 255).astype(np.uint8))
    return torch.tensor(np.stack(maps), dtype=torch.float32)


def test_tam_equals_an_independent_loop_over_generation_rounds(tiny):
    model, processor = tiny
    image = picture(seed=3)
    ex = gc.load(model, processor=processor)
    gen = ex.explain_generation(image, prompt=PROMPT, method="tam", text=TEXT)
    want = rounds_tam(model, processor, ex, image)
    assert gen.tokens == TEXT.split()
    assert gen.raw_maps.shape == want.shape == (5, 4, 4)
    assert (gen.raw_maps - want).abs().max() <= 1  # uint8 values, rounding at the edge
    assert (gen.raw_maps.amax((1, 2)) > gen.raw_maps.amin((1, 2))).all()
    # the estimated causal inference changed the maps (the loop without it differs)
    plain = rounds_tam(model, processor, ex, image, eci=False)
    assert (plain - want).abs().max() > 2


def eager_and_sdpa(tiny, method: str, seed: int):
    """The method's generation on the eager model and on an sdpa copy of it, and that copy."""
    model, processor = tiny
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    image = picture(seed=seed)
    eager = gc.load(model, processor=processor).explain_generation(
        image, prompt=PROMPT, method=method, text=TEXT
    )
    sdpa = gc.load(twin, processor=processor).explain_generation(
        image, prompt=PROMPT, method=method, text=TEXT
    )
    return eager, sdpa, twin


def test_tam_under_sdpa_equals_eager_and_sdpa_stays(tiny):
    eager, sdpa, twin = eager_and_sdpa(tiny, "tam", seed=5)
    assert (eager.raw_maps - sdpa.raw_maps).abs().max() <= 1
    assert set(attention_implementations(twin)) == {"sdpa"}


# ----------------------------------------------------------------------------- relative attention


def test_relative_attention_of_a_prompt_against_itself_is_uniform(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(seed=6)
    rel = ex.explain_generation(
        image, prompt=GENERIC_PROMPT, method="relative-attention", text=TEXT
    )
    assert torch.equal(rel.raw_maps[0], torch.ones(4, 4))  # row k-1 of token 0: the prompt's last
    assert "relative-attention" in rel.notes


def test_relative_attention_is_each_token_row_over_the_generic_prompt_row(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(seed=7)
    rel = ex.explain_generation(image, prompt=PROMPT, method="relative-attention", text=TEXT)
    att = ex.explain_generation(image, prompt=PROMPT, method="attention", text=TEXT)
    generic = ex.explain_generation(image, prompt=GENERIC_PROMPT, method="attention", text=TEXT)
    assert torch.allclose(rel.raw_maps * generic.raw_maps[0], att.raw_maps, rtol=1e-5, atol=0)
    assert not torch.allclose(rel.raw_maps[0], torch.ones(4, 4))
    assert attention_implementations(model) == attention_implementations(copy.deepcopy(model))


def test_relative_attention_is_refused_on_a_phrase_family(tiny_model_dir):
    ex = gc.load(str(tiny_model_dir))
    assert "relative-attention" not in gc.families()["albef"]
    with pytest.raises(gc.errors.InputError, match="relative-attention.*not defined"):
        ex.resolve("relative-attention")


# ----------------------------------------------------------------------------- a phrase you give


def test_a_given_phrase_map_is_the_mean_of_its_token_maps(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(seed=8)
    for method in ("gradcam", "attention", "tam"):
        out = ex.explain(image, ["red cat", "the dog"], method=method)
        for p, phrase in enumerate(["red cat", "the dog"]):
            gen = ex.explain_generation(image, method=method, text=phrase)
            assert out.tokens[p] == gen.tokens == phrase.split()
            assert torch.allclose(out.raw_maps[p], gen.raw_maps.mean(0), rtol=1e-5, atol=1e-7)
            assert torch.allclose(out.raw_token_maps[p], gen.raw_maps)
            assert out.scores[p].item() == pytest.approx(gen.scores.log().sum().item(), rel=1e-5)
        assert out.scores.max() < 0 and out.target == "phrase" and out.method == method
        assert out.score_kind.name == "phrase_log_likelihood"
    # the default prompt is the documented one, and prompt= changes what the phrase follows
    same = ex.explain(image, ["red cat"], method="gradcam", prompt="Describe the image.")
    other = ex.explain(image, ["red cat"], method="gradcam", prompt=PROMPT)
    assert torch.equal(same.raw_maps[0], out_gradcam(ex, image))
    assert not torch.allclose(other.raw_maps, same.raw_maps)


def out_gradcam(ex, image) -> torch.Tensor:
    return ex.explain(image, ["red cat"], method="gradcam").raw_maps[0]


def test_the_pointing_game_runs_on_a_phrase_map(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(48, 32, seed=9)
    out = ex.explain(image, "red cat", method="logit-lens")
    h, w = out.maps.shape[1:]
    assert (h, w) == (4, 6)  # the centre crop's 4 x 4 cells, the cropped sides empty
    c = int(out.maps[0].flatten().argmax()) % w
    column = [c * 8, 0, (c + 1) * 8, 32]  # the peak's column of cells (1/6 of the image)
    assert gc.pointing_game(out.maps[0], [column], image_size=(32, 48)).hit
    other = [((c + 2) % w) * 8, 0, ((c + 2) % w + 1) * 8, 32]
    assert not gc.pointing_game(out.maps[0], [other], image_size=(32, 48)).hit


def test_bad_phrases_and_prompts_are_one_line(tiny, tiny_model_dir):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    special = processor.tokenizer.eos_token
    with pytest.raises(gc.errors.InputError, match="tokenizes to nothing"):
        ex.explain(picture(), [special])
    with pytest.raises(gc.errors.InputError, match="non-empty strings"):
        ex.explain(picture(), ["  "])
    with pytest.raises(gc.errors.InputError, match="prompt= is for generative VLMs"):
        gc.load(str(tiny_model_dir)).explain(picture(), ["a cat"], prompt="look")
    with pytest.raises(gc.errors.InputError, match="target 'itm'.*target 'phrase'"):
        ex.explain(picture(), ["a red circle"], target="itm")
    assert ex.explain(picture(), ["a red circle"], target="phrase").target == "phrase"


# ----------------------------------------------------------------------------- relevance


def naive_relevance(model, processor, image) -> torch.Tensor:
    """Chefer's rule with every layer's attention and gradient kept: one forward and backward
    per token, R = I, R += mean_heads relu(grad * A) @ R per layer, row t-1 at the image."""
    enc, ids, first, image_cols = teacher_forced(model, processor, image, TEXT)
    maps = []
    for t in range(first, ids.shape[1]):
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=enc["pixel_values"],
            output_attentions=True,
        )
        logp = out.logits[0, t - 1].log_softmax(-1)[ids[0, t]]
        grads = torch.autograd.grad(logp, out.attentions)
        r = torch.eye(ids.shape[1])
        for a, g in zip(out.attentions, grads, strict=True):
            r = r + (g[0] * a[0]).clamp(min=0).mean(0) @ r
        maps.append(r[t - 1, image_cols].detach().reshape(4, 4))
    return torch.stack(maps)


def test_relevance_equals_chefer_with_every_layer_kept(tiny):
    model, processor = tiny
    image = picture(seed=10)
    ex = gc.load(model, processor=processor)
    assert ex.layers("relevance") == []  # every layer at once
    gen = ex.explain_generation(image, prompt=PROMPT, method="relevance", text=TEXT)
    want = naive_relevance(model, processor, image)
    assert gen.raw_maps.shape == want.shape == (5, 4, 4)
    assert want.abs().amax() > 0 and (want.amax((1, 2)) > want.amin((1, 2))).all()
    assert torch.allclose(gen.raw_maps, want, rtol=1e-4, atol=1e-6 * want.abs().amax())
    assert torch.isfinite(gen.scores).all() and (gen.scores > 0).all()


def test_relevance_under_sdpa_switches_back_and_matches_eager(tiny):
    eager, sdpa, twin = eager_and_sdpa(tiny, "relevance", seed=11)
    assert torch.allclose(eager.raw_maps, sdpa.raw_maps, rtol=1e-4, atol=1e-6)
    assert set(attention_implementations(twin)) == {"sdpa"}
    assert "eager" in sdpa.notes["attention"]


# ----------------------------------------------------------------------------- visual sinks


def test_sink_rule_on_constructed_hidden_states():
    from groundcam.methods.sinks import sink_tokens

    h = torch.ones(6, 1024)
    h[0, 3] = 1000  # the begin-of-sequence token: massive in dimension 3 (|h|/rms ~ 32)
    h[2, 3] = -1000  # an image token massive in the same dimension: a sink
    h[3, 7] = 1000  # massive in another dimension: not a sink
    image = torch.tensor([1, 2, 3, 4])
    assert sink_tokens(h, image).tolist() == [False, True, False, False]
    assert sink_tokens(h, image, threshold=40).tolist() == [False] * 4  # 1000/rms is ~32
    h[0, 3] = 1  # no sink dimension at the first text token: no sinks
    assert not sink_tokens(h, image).any()


def test_sinks_drop_zeroes_the_sink_columns_and_says_so(tiny, monkeypatch):
    import groundcam.generation as generation

    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(seed=12)
    plain = ex.explain_generation(image, prompt=PROMPT, method="attention", text=TEXT)
    kept = ex.explain_generation(image, prompt=PROMPT, method="attention", text=TEXT, sinks="drop")
    assert torch.equal(kept.raw_maps, plain.raw_maps)  # tiny hidden states have no sinks
    assert "dropped 0 visual sink" in kept.notes["sinks"] and "sinks" not in plain.notes
    fake = torch.zeros(16, dtype=torch.bool)
    fake[[0, 5]] = True
    monkeypatch.setattr(generation, "sink_tokens", lambda h, image: fake)
    dropped = ex.explain_generation(image, prompt=PROMPT, method="gradcam", text=TEXT, sinks="drop")
    ref = ex.explain_generation(image, prompt=PROMPT, method="gradcam", text=TEXT)
    cells = dropped.raw_maps.reshape(5, 16)
    assert (cells[:, [0, 5]] == 0).all() and (ref.raw_maps.reshape(5, 16)[:, [0, 5]] > 0).any()
    keep = [c for c in range(16) if c not in (0, 5)]
    assert torch.equal(cells[:, keep], ref.raw_maps.reshape(5, 16)[:, keep])
    assert "image columns [0, 5]" in dropped.notes["sinks"]
    with pytest.raises(gc.errors.InputError, match="sinks must be"):
        ex.explain_generation(image, prompt=PROMPT, text=TEXT, sinks="yes")


# ----------------------------------------------------------------------------- the eval runner


def test_the_eval_runner_scores_a_generative_vlm_as_explain_does(tiny, tmp_path):
    import json

    import torch.nn.functional as F
    from flickr_like import write_flickr_like
    from PIL import Image

    from groundcam.data.text import pre_caption
    from groundcam.eval.datasets import open_units
    from groundcam.eval.runner import EvalConfig, run_eval

    model, processor = tiny
    ex = gc.load(model, processor=processor)
    root = write_flickr_like(tmp_path / "flickr30k", 2)
    units = open_units("flickr30k-entities", ["test"], root)
    cfg = EvalConfig("flickr30k-entities", ("test",), "tiny-llava", method="gradcam")
    result = run_eval(cfg, units, ex, tmp_path / "out", progress=False)
    records = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert result.summary["n"] == len(records) > 0
    assert result.summary["config"]["score"] == "phrase_log_likelihood"
    for rec in records[:3]:
        image = Image.open(root / "flickr30k_images" / f"{rec['image_id']}.jpg").convert("RGB")
        one = ex.explain(image, [pre_caption(rec["phrase"])], method="gradcam")
        h, w = image.height, image.width
        up = F.interpolate(one.maps[None], (h, w), mode="bicubic", align_corners=False)[0, 0]
        flat = int(torch.argmax(up))
        assert rec["point"] == [flat % w, flat // w]
        assert rec["score"] == pytest.approx(float(one.scores[0]), abs=1e-4)


def test_faithfulness_curves_on_a_generative_vlm(tiny):
    from groundcam.eval.faithfulness import faithfulness

    model, processor = tiny
    ex = gc.load(model, processor=processor)
    image = picture(48, 32, seed=13)
    out = ex.explain(image, ["red cat"], method="gradcam")
    (curves,) = faithfulness(ex, image, ["red cat"], out.maps, steps=4)
    assert len(curves.deletion) == len(curves.insertion) == 5
    # nothing removed / everything inserted: the explanation's own score
    assert curves.deletion[0] == pytest.approx(float(out.scores[0]), abs=1e-4)
    assert curves.insertion[-1] == pytest.approx(float(out.scores[0]), abs=1e-4)
    # everything removed / nothing inserted: the same all-mean-colour image
    assert curves.deletion[-1] == pytest.approx(curves.insertion[0], abs=1e-5)
    assert curves.deletion[-1] != pytest.approx(curves.deletion[0], abs=1e-4)
    assert curves.deletion_auc == pytest.approx(
        sum((a + b) / 2 for a, b in zip(curves.deletion[:-1], curves.deletion[1:], strict=True)) / 4
    )


def test_cli_explains_phrases_on_a_vlm_and_refuses_an_empty_one_in_one_line(tiny, tmp_path):
    from click.testing import CliRunner

    from groundcam.cli import main

    model, processor = tiny
    path = tiny_vlm.save(model, processor, tmp_path / "llava")
    image = tmp_path / "pic.png"
    picture().save(image)
    args = ["explain", str(image), "red cat", "--model", str(path), "--method", "tam"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "phrase_log_likelihood" in r.output and "red cat" in r.output
    bad = processor.tokenizer.eos_token
    r = CliRunner().invoke(main, ["explain", str(image), bad, "--model", str(path)])
    assert r.exit_code == 2
    assert "tokenizes to nothing" in r.output and "Traceback" not in r.output


def test_relevance_leaves_no_hook_or_switched_attention_after_an_error(tiny):
    model, processor = tiny
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    ex = gc.load(twin, processor=processor)
    ex.explain_generation(picture(), prompt=PROMPT, method="relevance", text=TEXT)
    before, count = attention_implementations(twin), hooks(twin)  # transformers' own, once run

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = twin.get_decoder().layers[-1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        ex.explain_generation(picture(), prompt=PROMPT, method="relevance", text=TEXT)
    handle.remove()
    assert attention_implementations(twin) == before and hooks(twin) == count
    ex.explain_generation(picture(), prompt=PROMPT, method="relevance", text=TEXT)
    assert attention_implementations(twin) == before and hooks(twin) == count
