"""Attention rollout (Abnar & Zuidema 2020): per layer 0.5*A + 0.5*I of the head-mean attention,
row-normalised, multiplied through the layers; the CLS row over the patches."""

from __future__ import annotations

import torch

from groundcam.methods.base import VISION_ATTENTION, Method, MethodOutput


class Rollout(Method):
    name = "rollout"
    sources = (VISION_ATTENTION,)
    all_layers = True

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        n = recorded[0].shape[-1]
        eye = torch.eye(n, dtype=recorded[0].dtype, device=recorded[0].device)
        rollout = eye.expand(recorded[0].shape[0], n, n)
        for probs in recorded:  # first layer first: R = A_L ... A_2 A_1
            a = 0.5 * probs.mean(1) + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            rollout = a @ rollout
        return MethodOutput(geometry.patches(rollout[:, 0, :]), None, text_conditioned=False)
