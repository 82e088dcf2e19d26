"""`relevance` and `tam` on BLIP-2 and InstructBLIP (issue 18): Chefer's rules through the
language model onto the queries and through the Q-Former (and optionally the ViT) onto the
patches; TAM on the queries composed by the Q-Former's cross-attention before its filter.
Checked against the rules on hand-made Ā, against naive recipes (one forward and one backward
per token, or one forward per generation round, every map written out from the definitions),
sdpa against eager, the attention implementations and hooks left as they were, and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import tiny_vlm
import torch
import vlm_checks as checks
from click.testing import CliRunner
from test_vlm_blip2 import PROMPT, TEXT, cross_attention, picture, strong
from test_vlm_methods import authors_filter

import groundcam as gc
from groundcam.adapters.vlm import _EAGER, attention_implementations
from groundcam.cli import main
from groundcam.methods.qformer_relevance import compose_to_patches, query_patch_relevance

FAMILIES = ("blip2", "instructblip")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = getattr(tiny_vlm, request.param)()
    return strong(model), processor


# ----------------------------------------------------------------------------- the rules by hand

A_SELF = torch.tensor([[0.2, 0.6], [0.0, 0.5]])  # Q-Former self-attention Ā, 2 queries
A_CROSS = torch.tensor([[0.1, 0.3, 0.6], [0.2, 0.8, 0.0]])  # queries -> CLS, patch 1, patch 2


def test_one_layer_one_head_by_hand():
    """R_ss = I + Ā_s; R̄_ss: rows of Ā_s normalised (0.8 -> [.25, .75], 0.5 -> [0, 1]) plus I,
    so R̄_ss = [[1.25, .75], [0, 2]]; R_si = R̄_ssᵀ Ā_c (R̄_ii = I without the ViT)."""
    r = query_patch_relevance(["self", "cross"], [A_SELF, A_CROSS])
    want = torch.tensor([[0.125, 0.375, 0.75], [0.475, 1.825, 0.45]])
    assert torch.allclose(r, want, atol=1e-6)
    # the LM's row over the queries [1, 2] times R_si, the CLS column dropped
    value = compose_to_patches(torch.tensor([1.0, 2.0]), ["self", "cross"], [A_SELF, A_CROSS])
    assert torch.allclose(value, torch.tensor([0.375 + 2 * 1.825, 0.75 + 2 * 0.45]), atol=1e-6)
    # cross-attention before any self-attention: R̄_ss = I, so R_si = Ā_c; the self-attention
    # after it then adds Ā_s R_si (rule 7)
    r = query_patch_relevance(["cross", "self"], [A_CROSS, A_SELF])
    assert torch.allclose(r, A_CROSS + A_SELF @ A_CROSS, atol=1e-6)


def test_the_vit_rollout_and_instruction_tokens_by_hand():
    """Patch 2 attends patch 1 in the ViT (Ā_v row 2 = [0, .5, 0]): R̄_ii row 2 = [0, 1, 1], so
    patch 1 also receives patch 2's cross-attention share. InstructBLIP's third Q-Former token
    (an instruction word) mixes into the queries through self-attention but reads no image."""
    a_v = torch.zeros(3, 3)
    a_v[2, 1] = 0.5
    r = query_patch_relevance(["vision", "self", "cross"], [a_v, A_SELF, A_CROSS])
    r_bar_ii = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 1]])
    r_bar_ss = torch.tensor([[1.25, 0.75], [0, 2]])
    assert torch.allclose(r, r_bar_ss.T @ A_CROSS @ r_bar_ii, atol=1e-6)
    # Ā_c R̄_ii = [[.1, .9, .6], [.2, .8, 0]]; times R̄_ssᵀ = [[1.25, 0], [.75, 2]]
    assert torch.allclose(r, torch.tensor([[0.125, 1.125, 0.75], [0.475, 2.275, 0.45]]))
    a_s = torch.tensor([[0.0, 0.0, 0.4], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # query 0 reads word
    r = query_patch_relevance(["self", "cross"], [a_s, A_CROSS])
    # R̄_ss = I + e_0 e_2ᵀ; R̄_ssᵀ Ā_c (padded with a zero row) keeps the queries' rows as Ā_c
    assert r.shape == (2, 3) and torch.allclose(r, A_CROSS, atol=1e-6)
    with pytest.raises(ValueError, match="self-attention and cross-attention"):
        query_patch_relevance(["self"], [A_SELF])


# ----------------------------------------------------------------------------- naive recipes


def _grabbed(modules: list[torch.nn.Module]):
    """Forward hooks keeping each module's attention weights (with their graph) in call order."""
    kept: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, a, out: kept.append(out[1])) for m in modules]
    return kept, handles


def _bar(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g[0] * a[0]).clamp(min=0).mean(0)


def _normalised(r: torch.Tensor) -> torch.Tensor:
    """(R - I) with each non-zero row divided by its sum, plus I (Chefer's R̄)."""
    eye = torch.eye(len(r))
    off = r - eye
    total = off.sum(-1, keepdim=True)
    return torch.where(total != 0, off / torch.where(total != 0, total, 1.0), 0.0) + eye


def teacher_forced(model, processor, image, template: str):
    enc = processor(images=[image], text=[template.format(prompt=PROMPT)], return_tensors="pt")
    body = processor.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([enc["input_ids"], body], 1)
    side = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    return enc, ids, enc["input_ids"].shape[1], side


def naive_relevance(model, processor, image, template: str, vision: bool) -> torch.Tensor:
    """One eager forward and one backward per token, every attention and gradient kept, the
    rules applied as matrices in forward order: LM `R += Ā R` (row t-1 at the queries), ViT
    `R_ii += Ā R_ii`, per Q-Former layer `R_ss += Ā R_ss`, `R_si += Ā R_si`, then
    `R_si += R̄_ssᵀ Ā_c R̄_ii`; the map is the LM row times `R_si[:Q, 1:]` on the g x g grid."""
    _, ids, first, side = teacher_forced(model, processor, image, template)
    queries = torch.nonzero(ids[0] == model.config.image_token_id)[:, 0]
    q = len(queries)
    vit = [layer.self_attn for layer in model.vision_model.encoder.layers] if vision else []
    qf = model.qformer.encoder.layer
    maps = []
    for t in range(first, ids.shape[1]):
        v_kept, v_handles = _grabbed(vit)
        s_kept, s_handles = _grabbed([layer.attention.attention for layer in qf])
        c_kept, c_handles = _grabbed([layer.crossattention.attention for layer in qf])
        try:
            with torch.enable_grad():
                out = model(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **side,
                    output_attentions=True,
                )  # fmt: skip
        finally:
            for h in v_handles + s_handles + c_handles:
                h.remove()
        lm = list(out.language_model_outputs.attentions)
        logp = out.logits[0, t - 1].log_softmax(-1)[ids[0, t]]
        grads = torch.autograd.grad(logp, lm + v_kept + s_kept + c_kept)
        g_lm, rest = grads[: len(lm)], grads[len(lm) :]
        g_v, g_s, g_c = rest[: len(vit)], rest[len(vit) : len(vit) + len(qf)], rest[-len(qf) :]
        r = torch.eye(ids.shape[1])
        for a, g in zip(lm, g_lm, strict=True):
            r = r + _bar(a, g) @ r
        row = r[t - 1, queries]
        keys = c_kept[0].shape[-1]
        r_ii = torch.eye(keys)
        for a, g in zip(v_kept, g_v, strict=True):
            r_ii = r_ii + _bar(a, g) @ r_ii
        size = s_kept[0].shape[-1]  # queries, then InstructBLIP's instruction tokens
        r_ss, r_si = torch.eye(size), torch.zeros(size, keys)
        for j in range(len(qf)):
            b = _bar(s_kept[j], g_s[j])
            r_ss, r_si = r_ss + b @ r_ss, r_si + b @ r_si
            cross = torch.zeros(size, keys)
            cross[:q] = _bar(c_kept[j], g_c[j])
            r_si = r_si + _normalised(r_ss).T @ cross @ _normalised(r_ii)
        value = (row @ r_si[:q, 1:]).detach()
        side_len = int(value.numel() ** 0.5)
        maps.append(value.reshape(side_len, side_len))
    return torch.stack(maps)


@pytest.mark.parametrize("vision", [False, True])
def test_relevance_equals_the_naive_recipe_per_token(tiny, vision):
    model, processor = tiny
    image = picture(seed=4)
    ex = gc.load(model, processor=processor)
    assert ex.layers("relevance") == []  # every layer at once
    ex.adapter.relevance_vision = vision
    try:
        gen = ex.explain_generation(image, prompt=PROMPT, method="relevance", text=TEXT)
    finally:
        ex.adapter.relevance_vision = False
    want = naive_relevance(model, processor, image, ex.adapter.template, vision)
    assert gen.raw_maps.shape == want.shape == (4, 4, 4)
    scale = want.abs().amax()
    assert scale > 0
    assert torch.allclose(gen.raw_maps, want, rtol=1e-4, atol=1e-5 * scale)
    assert ("ViT" in gen.notes["composition"]) == vision
    assert "Q-Former's relevance" in gen.notes["composition"]


def test_through_the_vit_differs_from_stopping_at_its_output(tiny):
    model, processor = tiny
    ex = gc.load(model, processor=processor)
    plain = ex.explain_generation(picture(), prompt=PROMPT, method="relevance", text=TEXT)
    ex.adapter.relevance_vision = True
    try:
        deep = ex.explain_generation(picture(), prompt=PROMPT, method="relevance", text=TEXT)
    finally:
        ex.adapter.relevance_vision = False
    assert not torch.allclose(plain.raw_maps, deep.raw_maps, rtol=1e-3, atol=0)
    assert torch.equal(plain.scores, deep.scores)


def test_a_frozen_model_gives_the_same_maps_and_stays_frozen(tiny):
    """Deployed models are often frozen (requires_grad False): the attention still gets a graph
    for the backward, and the flags come back as they were."""
    model, processor = tiny
    want = gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="relevance", text=TEXT
    )
    frozen = copy.deepcopy(model).requires_grad_(False)
    gen = gc.load(frozen, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="relevance", text=TEXT
    )
    assert torch.allclose(gen.raw_maps, want.raw_maps, rtol=1e-5, atol=0)
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("method", ["relevance", "tam"])
def test_maps_are_finite_and_not_flat(tiny, method):
    model, processor = tiny
    calls = []
    handle = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        gen = gc.load(model, processor=processor).explain_generation(
            picture(), prompt=PROMPT, method=method, text=TEXT
        )
    finally:
        handle.remove()
    assert len(calls) == 1  # one forward for every token (and the composition)
    assert gen.tokens == TEXT.split() and gen.raw_maps.shape == (4, 4, 4)
    assert torch.isfinite(gen.raw_maps).all() and (gen.raw_maps >= 0).all()
    flat = gen.raw_maps.flatten(1)
    varied = flat.amax(1) > 1.05 * flat.amin(1)
    # relevance: every token; tam may leave a token all 0 (its logit is negative at every query)
    assert bool(varied.all() if method == "relevance" else varied.any()) and flat.amax() > 0
    assert torch.isfinite(gen.scores).all() and (gen.scores > 0).all()
    assert "composition" in gen.notes


def naive_tam(model, processor, ex, image) -> torch.Tensor:
    """TAM as a loop over generation rounds, from the logits the model outputs at every position
    (TAM's `lm_head(hidden_states[-1])`): ECI over the earlier text tokens, min-max over the
    query and text scores, then the queries composed by the Q-Former's own cross-attention
    (output_attentions, mean over layers and heads, CLS dropped), the rank Gaussian filter on
    the patch grid, × 255."""
    enc, ids, first, side = teacher_forced(model, processor, image, ex.adapter.template)
    with torch.no_grad():
        mix = cross_attention(model, enc).double().numpy()
    seq = ids[0].tolist()
    queries = [j for j, t in enumerate(seq) if t == model.config.image_token_id]
    special = ex.adapter.special_ids()
    text_pos = [j for j, t in enumerate(seq) if j not in queries and t not in special]
    maps = []
    for p in range(first, len(seq)):
        if seq[p] in special:
            continue
        with torch.no_grad():
            logits = (
                model(
                    input_ids=ids[:, :p], attention_mask=torch.ones(1, p, dtype=torch.long), **side
                )
                .logits[0]
                .double()
                .numpy()
            )
        y = seq[p]
        s = logits[:, y].clip(0)
        img = s[queries]
        ctx = [j for j in text_pos if j < p - 1 and seq[j] != y]
        if ctx:
            w = s[ctx] / (s[ctx].sum() + 1e-8)
            m = sum(wj * logits[queries, seq[j]].clip(0) for wj, j in zip(w, ctx, strict=True))
            scale = (img @ m) / (m @ m) if m @ m > 0 else 0.0
            img = (img - scale * m).clip(0)
        both = list(img) + list(s[[j for j in text_pos if j < p - 1]])
        spread = max(both) - min(both)
        img = (img - min(both)) / spread if spread > 0 else 0 * img
        side_len = int(mix.shape[1] ** 0.5)
        maps.append(authors_filter((img @ mix).reshape(side_len, side_len)) * 255)
    return torch.tensor(np.stack(maps), dtype=torch.float32)


def test_tam_equals_an_independent_loop_over_generation_rounds(tiny):
    model, processor = tiny
    image = picture(seed=6)
    ex = gc.load(model, processor=processor)
    gen = ex.explain_generation(image, prompt=PROMPT, method="tam", text=TEXT)
    want = naive_tam(model, processor, ex, image)
    assert gen.raw_maps.shape == want.shape == (4, 4, 4)
    assert want.amax() > 1  # unrounded, on TAM's 0..255 scale
    assert torch.allclose(gen.raw_maps, want, rtol=1e-4, atol=1e-3)
    assert "cross-attention" in gen.notes["composition"]


# ----------------------------------------------------------------------------- the deployed model


@pytest.mark.parametrize("method", ["relevance", "tam"])
def test_sdpa_gives_the_eager_maps_and_is_put_back(tiny, method):
    eager, processor = tiny
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    _, b = checks.explain_on_both(eager, sdpa, processor, picture(seed=5), method)
    if method == "relevance":  # switched: the LM's layers and the Q-Former's, nothing else
        assert "recorded layers only" in b.notes["attention"]
        assert "recorded layers only" in b.notes["composition"]
    else:  # the cross-attention alone
        assert "attention" not in b.notes
    assert set(attention_implementations(sdpa)) == {"sdpa"}


def test_through_the_vit_under_sdpa_switches_and_restores_the_vit_too(tiny):
    eager, processor = tiny
    sdpa = copy.deepcopy(eager)
    sdpa.set_attn_implementation("sdpa")
    maps = []
    for model in (eager, sdpa):
        ex = gc.load(model, processor=processor)
        ex.adapter.relevance_vision = True
        gen = ex.explain_generation(picture(seed=2), prompt=PROMPT, method="relevance", text=TEXT)
        maps.append(gen.raw_maps)
    assert set(attention_implementations(sdpa)) == {"sdpa"} and not _EAGER
    assert torch.allclose(maps[0], maps[1], rtol=1e-4, atol=1e-5 * maps[0].abs().amax())


@pytest.mark.parametrize("where", ["qformer", "vit", "lm"])
def test_an_error_leaves_no_hook_or_switched_attention(where):
    model, processor = tiny_vlm.instructblip()
    model.set_attn_implementation("sdpa")
    layer = {
        "qformer": model.qformer.encoder.layer[1].attention.attention,
        "vit": model.vision_model.encoder.layers[1].self_attn,
        "lm": model.get_decoder().layers[-1],
    }[where]
    gc.load(model, processor=processor).explain_generation(
        picture(), prompt=PROMPT, method="relevance", text=TEXT
    )  # transformers' own hooks, once run
    checks.assert_restored_after_an_error(model, processor, layer, picture(), "relevance")


def test_models_lists_relevance_and_tam_for_both_families():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if "relevance" in line and "attention" in line).split()
    for family in FAMILIES:
        row = next(line for line in lines if line.split()[:1] == [family]).split()[1:]
        marks = dict(zip(header, row, strict=True))
        assert marks["relevance"] == marks["tam"] == "+"
        assert marks["rollout"] == "-"
        assert marks["relative-attention"] == ("+" if family == "blip2" else "-")


@pytest.mark.parametrize("method", ["relevance", "tam"])
def test_caption_from_the_command_line(method, tmp_path):
    model, processor = tiny_vlm.blip2()
    path = tiny_vlm.save(strong(model), processor, tmp_path / "blip2")
    image = tmp_path / "pic.png"
    picture().save(image)
    out = tmp_path / "out"
    args = ["caption", str(image), "--model", str(path), "--prompt", PROMPT, "--method", method]
    result = CliRunner().invoke(main, [*args, "--text", "red cat", "--out", str(out)])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == method and meta["tokens"] == ["red", "cat"]
    assert ("Q-Former's relevance" in meta["notes"]["composition"]) == (method == "relevance")
    assert np.load(out / "maps.npz")["maps"].shape == (2, 4, 4)
