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
        acts = geometry.patches(acts.transpose(1, 2))  # [B, C, h, w]
        grad = geometry.patches(grad.transpose(1, 2))
        weights = grad.mean(dim=(2, 3), keepdim=True)
        return MethodOutput((weights * acts).sum(1).clamp(min=0))
