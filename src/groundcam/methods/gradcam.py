"""Grad-CAM (Selvaraju et al. 2017) on vision token activations, or on a generative VLM's LM
hidden states at its image-token columns: channel weights are the mean of the gradient over the
image tokens; the map is relu of the weighted channel sum."""

from __future__ import annotations

from groundcam.methods.base import LM_TOKENS, VISION_TOKENS, Method, MethodOutput


class GradCAM(Method):
    name = "gradcam"
    sources = (VISION_TOKENS, LM_TOKENS)
    needs_grad = True

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        (acts,), (grad,) = recorded, grads
        weights = geometry.token_mean(grad.transpose(1, 2))  # [B, C]
        cam = (weights[:, :, None] * acts.transpose(1, 2)).sum(1)  # per token, then placed
        return MethodOutput(geometry.patches(cam).clamp(min=0))
