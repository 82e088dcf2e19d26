"""`repr` of an explanation is one short line: what was explained and how, never the tensors."""

from __future__ import annotations

import torch
from tiny import noise_images, tiny_albef

from groundcam.adapters.albef import AlbefAdapter
from groundcam.explainer import Explainer
from groundcam.explanation import GenerationExplanation

LONG = "the small blue square to the left of the big red circle under the green star"


def test_explanation_repr_is_short_and_says_what_was_explained(one_thread, tokenizer):
    explainer = Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))
    phrases = [LONG, "red", "a star", "green", "blue"]
    ex = explainer.explain(noise_images(1, 64, 64)[0], phrases, method="gradcam", layer=1)
    text = repr(ex)
    assert text == (
        "Explanation(5 phrases ['the small blue square to the left of th…', 'red', 'a star', "
        "+2 more], method='gradcam', layer=1, target='itm', model='tiny', maps=5x4x4)"
    )
    assert str(ex) == text


def test_generation_repr_is_short_for_many_tokens():
    k = 300
    gen = GenerationExplanation(
        text=" ".join(["word"] * k),
        tokens=["word"] * k,
        token_ids=list(range(k)),
        positions=list(range(1, k + 1)),
        maps=torch.rand(k, 24, 24),
        raw_maps=torch.rand(k, 24, 24),
        scores=torch.rand(k),
        method="attn-gradcam",
        layer=None,
        model="captioner",
    )
    assert repr(gen) == (
        "GenerationExplanation(300 tokens, text='word word word word word word word word…', "
        "method='attn-gradcam', layer=None, model='captioner', maps=300x24x24)"
    )
