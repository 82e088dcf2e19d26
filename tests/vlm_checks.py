"""Checks shared by the generative-VLM test files, parameterised by what differs per family."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from PIL import Image

import groundcam as gc
from groundcam.adapters.vlm import _EAGER, attention_implementations

PROMPT = "what is the sign"
TEXT = "red cat the dog"


def picture(w: int = 32, h: int = 32, seed: int = 0) -> Image.Image:
    """A seeded random RGB image, so that every family's maps have something to read."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def hooks(model: torch.nn.Module) -> int:
    """How many hooks the model holds: an explanation must leave none behind."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The error's text, asserted non-empty and on one line."""
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def naive_token_values(
    model: torch.nn.Module,
    ids: torch.Tensor,
    first: int,
    cols: torch.Tensor,
    side: dict,
    method: str,
    layer: int,
    lm_outputs: Callable = lambda out: out,
) -> torch.Tensor:
    """One forward and one backward per text token from `first` on, written from the
    definitions (DESIGN §12): the logits at row t-1 score token t; [tokens, len(cols)] values
    over the image-token columns `cols`; `side` holds the family's other model inputs and
    `lm_outputs` picks the language model's outputs (attentions, hidden states) from the model's."""
    head = model.get_output_embeddings().weight
    values = []
    for t in range(first, ids.shape[1]):
        with torch.enable_grad():
            out = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **side,
                output_attentions=True,
                output_hidden_states=True,
            )
            lm = lm_outputs(out)
            logp = out.logits[0, t - 1].log_softmax(-1)[ids[0, t]]
            A, H = lm.attentions[layer], lm.hidden_states[layer + 1]  # H: the layer's output
            attn, hidden = A[0], H[0]  # [heads, T, T], [T, C]
            if method == "attention":
                v = attn[:, t - 1, cols].mean(0)
            elif method == "attn-gradcam":
                g = torch.autograd.grad(logp, A)[0][0]
                v = (g.clamp(min=0) * attn)[:, t - 1, cols].mean(0)
            elif method == "gradcam":
                g = torch.autograd.grad(logp, H)[0][0]
                v = (hidden[cols] * g[cols].mean(0)).sum(-1).clamp(min=0)
            else:
                v = (lm.hidden_states[-1][0][cols] @ head[ids[0, t]]).clamp(min=0)
        values.append(v.detach())
    return torch.stack(values)


def explain_on_both(eager, sdpa, processor, images, method: str, prompt: str = PROMPT):
    """Explain under eager and under sdpa: the sdpa model keeps its attention implementation and
    hooks, and both give the same raw maps. Returns both generations for family checks."""
    before, n_hooks = attention_implementations(sdpa), hooks(sdpa)
    a = gc.load(eager, processor=processor).explain_generation(
        images, prompt=prompt, method=method, text=TEXT
    )
    b = gc.load(sdpa, processor=processor).explain_generation(
        images, prompt=prompt, method=method, text=TEXT
    )
    assert attention_implementations(sdpa) == before and hooks(sdpa) == n_hooks and not _EAGER
    scale = a.raw_maps.abs().amax()
    assert torch.allclose(a.raw_maps, b.raw_maps, atol=1e-5 * scale, rtol=1e-4), method
    return a, b


def assert_attention_note(notes: dict, method: str) -> None:
    """Only the attention methods switch attention, and say they recorded those layers only."""
    if method in ("attention", "attn-gradcam"):
        assert "recorded layers only" in notes["attention"]
    else:
        assert "attention" not in notes  # never switched


def assert_restored_after_an_error(
    model, processor, layer: torch.nn.Module, images, method: str
) -> None:
    """An error raised in `layer` mid-forward leaves the model's attention implementations and
    hooks as they were."""
    before, n_hooks = attention_implementations(model), hooks(model)

    def boom(module, args, output):
        raise RuntimeError("boom in a layer")

    handle = layer.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            gc.load(model, processor=processor).explain_generation(
                images, prompt=PROMPT, method=method, text=TEXT
            )
        assert attention_implementations(model) == before and not _EAGER
    finally:
        handle.remove()
    assert hooks(model) == n_hooks


def focus_first_layer(
    model: torch.nn.Module, norm_fill: float | None = None, norm_slow: float | None = None
) -> None:
    """Layer 0's queries read channel 0 (made large in every text embedding), its keys channel 1,
    on the slowest rotary pair (positions barely matter); `norm_fill` / `norm_slow` raise per-head
    q/k norms (all of them / the slow channel) that would otherwise undo the scale."""
    attn = model.get_decoder().layers[0].self_attn
    hd = attn.head_dim
    slow = hd // 2 - 1  # the rotary pair that barely turns over a few dozen positions
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
        for h in range(attn.q_proj.out_features // hd):
            attn.q_proj.weight[h * hd + slow, 0] = 5.0
        for h in range(attn.k_proj.out_features // hd):
            attn.k_proj.weight[h * hd + slow, 1] = 5.0
        for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
            if norm is not None and norm_fill is not None:
                norm.weight.fill_(norm_fill)
            if norm is not None and norm_slow is not None:
                norm.weight[slow] = norm_slow
        model.get_input_embeddings().weight[:, 0] = 10.0
        model.get_input_embeddings().weight[:, 1] = 0.0


@contextlib.contextmanager
def marked(model: torch.nn.Module, cell: int) -> Iterator[None]:
    """While open, channel 1 of the decoder's input is 10 at sequence position `cell`, 0 elsewhere."""

    def mark(module, args, kwargs):
        x = kwargs["inputs_embeds"].clone()
        x[:, :, 1] = 0.0
        x[:, cell, 1] = 10.0
        return args, {**kwargs, "inputs_embeds": x}

    handle = model.get_decoder().register_forward_pre_hook(mark, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def sdpa_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the eager model running sdpa attention in every layer, to compare against."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("sdpa")
    assert set(attention_implementations(twin)) == {"sdpa"}
    return twin


def assert_one_cell(raw: torch.Tensor, row: int, col: int, at_least: float) -> None:
    """Every token's map [K, h, w] holds more than `at_least` on cell (row, col), ~0 elsewhere."""
    assert (raw[:, row, col] > at_least).all()
    others = raw.clone()
    others[:, row, col] = 0
    assert (others < 1e-3).all()
