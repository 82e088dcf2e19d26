"""Raw attention: text-token -> patch rows of a cross-attention layer (the ALBEF visualisation), or
for dual encoders the CLS -> patch row of a vision layer (not text-conditioned)."""

from __future__ import annotations

from groundcam.methods.base import (
    TEXT_TO_IMAGE,
    VISION_ATTENTION,
    Method,
    MethodOutput,
    masked_token_maps,
)


class Attention(Method):
    name = "attention"
    sources = (TEXT_TO_IMAGE, VISION_ATTENTION)

    def compute(self, source, recorded, grads, geometry, text_mask, graph=None):
        (probs,) = recorded
        if source == VISION_ATTENTION:
            cls_row = geometry.patches(probs[:, :, 0, :]).mean(1)
            return MethodOutput(cls_row, None, text_conditioned=False)
        per_token = masked_token_maps(geometry.patches(probs).mean(1), text_mask)  # head mean
        return MethodOutput(per_token.mean(1), per_token)
