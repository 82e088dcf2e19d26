"""The logit lens on a generative VLM's image tokens: the explained token's logit read from the
language model's last hidden state (after its final norm) at every image position, relu
(`relu(W_U[y_k] · H^L[I])`, plus the head's bias if any). No gradient, no attention weights:
it runs under the model's own attention implementation."""

from __future__ import annotations

from groundcam.methods.base import TOKEN_LOGITS, Method, MethodOutput


class LogitLens(Method):
    name = "logit-lens"
    sources = (TOKEN_LOGITS,)

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        (logits,) = recorded  # [B, T]: token b's logit at every position
        return MethodOutput(geometry.patches(logits).clamp(min=0))
