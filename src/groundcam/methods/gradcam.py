"""Grad-CAM (Selvaraju et al. 2017) on vision token activations: channel weights are the spatial
mean of the gradient; the map is relu of the weighted channel sum."""

from __future__ import annotations

from groundcam.methods.base import VISION_TOKENS, Method, MethodOutput


class GradCAM(Method):
    name = "gradcam"
    sources = (VISION_TOKENS,)
    needs_grad = True

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        (acts,), (grad,) = recorded, grads
        weights = geometry.token_mean(grad.transpose(1, 2))  # [B, C]
        cam = (weights[:, :, None] * acts.transpose(1, 2)).sum(1)  # per token, then placed
        return MethodOutput(geometry.patches(cam).clamp(min=0))
