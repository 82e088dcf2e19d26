"""SigLIP (a dual encoder without a CLS token): the explained score of a pair is the logit
SiglipModel outputs, `exp(logit_scale) * cos(image, text) + logit_bias`; the reported score is its
sigmoid, the model's own match probability. The image embedding is read by an attention-pooling
head: a learned probe attends to every patch token (no CLS).

So: Grad-CAM works on the last block (the head reads every token, after `post_layernorm`);
relevance runs over the vision self-attention and ends with the probe's attention to the patches
(a co-attention step), read from the probe row. `attention` and `rollout` read a CLS row, which
SigLIP does not have: they are not defined for this family."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from groundcam.adapters import hf
from groundcam.adapters.clip import ClipAdapter, first_norm
from groundcam.contract import (
    ATTENTION_GRAPH,
    VISION_TOKENS,
    AttentionGraph,
    AttentionStep,
    HookPoint,
    RecordSpec,
    ScoreKind,
)
from groundcam.threads import this_thread


def pooling_head(vision: nn.Module) -> tuple[nn.Module, nn.MultiheadAttention]:
    """The attention-pooling head (the module holding a `probe`) and its attention."""
    head = next(
        (m for m in vision.modules() if isinstance(getattr(m, "probe", None), nn.Parameter)), None
    )
    if head is None:
        raise ValueError(
            f"{type(vision).__name__} has no attention-pooling head (vision_use_head=False): "
            "SigLIP's similarity needs it"
        )
    attention = next((m for m in head.modules() if isinstance(m, nn.MultiheadAttention)), None)
    if attention is None:
        raise ValueError(f"{type(head).__name__}: no nn.MultiheadAttention found")
    return head, attention


def probe_attention(module: nn.MultiheadAttention, query, key, value):
    """nn.MultiheadAttention's math with per-head probabilities that the output is computed from:
    `(out_proj(probs @ v), probs [B, H, Q, K])`. (The module itself returns head-averaged weights
    made after its output, so they carry no gradient of the score.)"""
    if not module.batch_first or not module._qkv_same_embed_dim:
        raise ValueError("SigLIP's pooling head: expected a batch-first attention with packed qkv")
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("SigLIP's pooling head: key biases / zero attention are not supported")
    e, h = module.embed_dim, module.num_heads
    weights = module.in_proj_weight.split(e)
    biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.split(e)

    def heads(x, w, b):
        return F.linear(x, w, b).unflatten(-1, (h, e // h)).transpose(1, 2)

    q, k, v = (heads(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True))
    probs = ((q * (e // h) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
    out = (probs @ v).transpose(1, 2).flatten(2)
    return module.out_proj(out), probs


class SiglipAdapter(ClipAdapter):
    family = "siglip"
    SCORES = {
        "similarity": ScoreKind(
            "sigmoid_probability",
            "the model's match probability: sigmoid of exp(logit_scale) x cosine + logit_bias",
        )
    }
    architectures = ("SiglipModel",)
    SOURCES = (VISION_TOKENS, ATTENTION_GRAPH)
    prefix = 0  # no CLS: the patch tokens are the whole sequence
    padding = "max_length"  # the text tower pools the last position: SigLIP was trained padded

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "", processor=None):
        super().__init__(model, tokenizer=tokenizer, name=name, processor=processor)
        self.head, self.head_attention = pooling_head(self.vision)

    @classmethod
    def default_image_processor(cls, model: nn.Module):
        """SigLIP's preprocessing: a plain resize to the model's size, mean and std 0.5."""
        size = hf.square(model.config.vision_config.image_size)
        return hf.build_image_processor("SiglipImageProcessor", size=size)

    def _token_readers(self) -> list[nn.Module]:
        """Block i < last: the next block's first LayerNorm; the last block: `post_layernorm`,
        whose output the pooling head reads."""
        post = getattr(self.vision, "post_layernorm", None)
        if post is None:
            raise ValueError(f"{type(self.vision).__name__}: no post_layernorm found")
        return [first_norm(b) for b in self.blocks[1:]] + [post]

    def _graph_spec(self) -> RecordSpec:
        """Every vision self-attention, then the probe's attention to the patches; the map is
        the probe row."""
        spec = super()._graph_spec()
        probe = HookPoint("vision.head.attn", self.head_attention, index=1, per_image=True)
        steps = spec.graph.steps + (AttentionStep("probe", "image"),)
        graph = AttentionGraph(steps, "probe", "image", readout_row=0)
        return RecordSpec(spec.points + [probe], None, per_image=True, graph=graph)

    def methods_note(self) -> str:
        return (
            "no CLS token: attention and rollout are not defined; relevance ends with the "
            "pooling head's probe->patch attention and reads the probe row; gradcam layer i is "
            "block i's output as read next (the last: post_layernorm, read by the pooling head); "
            "score: the model's logit exp(logit_scale)*cosine+logit_bias, reported as its sigmoid"
        )

    @contextlib.contextmanager
    def _forward_hooks(self):
        """While the model runs, its pooling head attends with `probe_attention` (the same math),
        so that the per-head probe probabilities it returns are the ones its output is made of."""

        def exact(module, args, kwargs, output):
            names = ("query", "key", "value")
            qkv = [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]
            return probe_attention(module, *qkv)

        # prepend: the recorder's hook on this module must see the per-head probabilities
        handle = self.head_attention.register_forward_hook(
            this_thread(exact), prepend=True, with_kwargs=True
        )
        try:
            yield
        finally:
            handle.remove()

    def _reported(self, out, image_index: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The model's match probability: the sigmoid of its logit."""
        return torch.sigmoid(logits)
