"""Visual sink tokens (Kang et al., ICLR 2025, "See What You Are Told: Visual Attention Sink in
Large Multimodal Models"): image tokens that carry a massive activation in the same few hidden
dimensions as the begin-of-sequence sink and draw attention whatever the text.

Rule, at the hidden state entering the explained layer (`output_hidden_states[l]`): with
`φ(h) = |h| / rms(h)` per dimension, the sink dimensions are those where the first text
(non-image) position has `φ ≥ SINK_THRESHOLD`; an image token is a sink when its `φ` reaches the
threshold in any sink dimension. τ = 20 is the authors' threshold. Dropped only on request
(`sinks="drop"`: their columns read 0 in every map), never silently; which tokens were dropped
is said in the result's notes."""

from __future__ import annotations

import torch

SINK_THRESHOLD = 20.0


def sink_tokens(
    hidden: torch.Tensor, image: torch.Tensor, threshold: float | None = None
) -> torch.Tensor:
    """Which image positions `image` of one sequence's hidden states [T, C] are visual sinks
    (a bool mask over `image`, module docstring; `threshold` None: `SINK_THRESHOLD`)."""
    threshold = SINK_THRESHOLD if threshold is None else threshold
    h = hidden.float()
    phi = h.abs() / h.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
    is_image = torch.zeros(len(h), dtype=torch.bool, device=h.device)
    is_image[image.to(h.device)] = True
    text = torch.nonzero(~is_image)[:, 0]
    if not len(text):
        return torch.zeros(len(image), dtype=torch.bool)
    dims = phi[text[0]] >= threshold
    if not dims.any():
        return torch.zeros(len(image), dtype=torch.bool)
    return (phi[image.to(h.device)][:, dims] >= threshold).any(-1).cpu()
