"""Attention Grad-CAM (ALBEF Grounding.py, LAVIS, AMC): relu(grad) * attention on the image columns
of a cross-attention layer, times the text mask, mean over heads, then over all token positions."""

from __future__ import annotations

from groundcam.methods.base import TEXT_TO_IMAGE, Method, MethodOutput


class AttnGradCAM(Method):
    name = "attn-gradcam"
    sources = (TEXT_TO_IMAGE,)
    needs_grad = True

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        (probs,), (grad,) = recorded, grads
        attn = geometry.patches(probs)  # [B, H, T, h, w], image CLS column dropped
        grad = geometry.patches(grad).clamp(min=0)
        if text_mask is not None:
            m = text_mask[:, None, :, None, None].to(attn.dtype)
            attn, grad = attn * m, grad * m
        per_token = (attn * grad).mean(1)  # [B, T, h, w]
        # The mean runs over every padded position, as the reference does: the raw scale depends
        # on padding, normalised maps do not.
        return MethodOutput(per_token.mean(1), per_token)
