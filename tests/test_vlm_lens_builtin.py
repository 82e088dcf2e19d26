"""The logit lens of the built-in VLM recomputed without groundcam: transformers' own forward,
the final hidden states at the image tokens (the LM head's input, after the final norm), the
word's row of the head, relu, reshaped to the tower's patch grid in image-token order."""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

import groundcam as gc
from groundcam.data.shapes import generate_scene
from groundcam.zoo import builtin_path


def test_builtin_logit_lens_equals_an_independent_computation() -> None:
    folder = builtin_path("vlm-tiny-shapes")
    model = LlavaForConditionalGeneration.from_pretrained(folder, trust_remote_code=False).eval()
    processor = LlavaProcessor.from_pretrained(folder, trust_remote_code=False)
    explainer = gc.load("vlm-tiny-shapes")
    scene = generate_scene("test", 3, 0, 128)
    ex = explainer.explain_generation(scene.image, method="logit-lens", max_new_tokens=12)
    text = "USER: <image>\nDescribe the image. ASSISTANT:"
    inputs = processor(images=[scene.image], text=[text], return_tensors="pt")
    ids = torch.cat([inputs["input_ids"], torch.tensor([ex.token_ids])], 1)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            pixel_values=inputs["pixel_values"],
            attention_mask=torch.ones_like(ids),
            output_hidden_states=True,
        )
    hidden = out.hidden_states[-1][0]  # normed: the head's input
    head = model.get_output_embeddings().weight
    assert torch.allclose(hidden @ head.T, out.logits[0], atol=1e-4)
    image = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size  # read from the model, not assumed
    assert len(image) == grid * grid and ex.raw_maps.shape[1:] == (grid, grid)
    for k, token in enumerate(ex.token_ids):
        lens = (hidden[image] @ head[token]).clamp(min=0).reshape(grid, grid)
        assert torch.allclose(ex.raw_maps[k], lens, atol=1e-4), k
