"""Tiny generative VLMs of every family, built offline from config classes (DESIGN §12).

Each builder returns `(model, processor)`: the model in eval mode with eager attention, hidden 32,
2 LM layers of 4 heads, 32 px tiles of 8 px patches, random weights drawn under `seed`; the
processor built in code from the family's `XxxImageProcessorPil` class and a word-level tokenizer
that holds the family's image tokens as special tokens. Geometry options (image or tile size, patch
size, anyres pinpoints, max tiles, merge size, max pixels) are arguments, so tests can vary them.
`save` writes a directory that `load` (`AutoModelForImageTextToText` and, through
`groundcam.adapters.vlm_compat.load_processor`, `AutoProcessor`) reads back offline. `sharpen`
makes the near-uniform attention of the default init peaked enough to tell maps apart.

What each family needed, and traps met beyond DESIGN §12 (transformers 5.25, no torchvision):
- The tokenizer (WordLevel, whitespace split) adds no BOS/EOS: PaliGemma's processor inserts BOS
  itself, the others get none (real OPT / Gemma tokenizers add one). All special tokens must be in
  the tokenizer before the config takes `vocab_size`: Idefics3's and SmolVLM's processors add
  `<fake_token_around_image>`, `<global-img>`, `<row_r_col_c>`… themselves when missing, after the
  model was sized. Processors read named tokens off the tokenizer (`extra_special_tokens`):
  Gemma 3 `boi_token`/`eoi_token`/`image_token`, InternVL `start_image_token`/`end_image_token`/
  `context_image_token`/`video_token` (their `_id`s come for free), PaliGemma `image_token`;
  BLIP-2/InstructBLIP must not have a named one (DESIGN), so `<image>` is an unnamed special.
- Video slot (LLaVA-OneVision, Qwen2/2.5/3-VL, SmolVLM, InternVL): built with
  `vlm_compat.image_only_video_processor()` (a `VideoProcessorMixin` subclass, the mixin
  re-exported on `transformers` where `check_argument_for_proper_class` looks it up). Passing
  `video_processor=None` fails (`VIDEO_PROCESSOR_MAPPING has no attribute _extra_content`).
  `AutoProcessor.from_pretrained` of such a directory raises `ValueError: … requires torchvision`
  (from `AutoVideoProcessor`); `load_processor` retries with the stub. The stub saves as `{}` in
  processor_config.json (with torchvision installed the real video processor is built instead;
  not checked here, torchvision is absent).
- SmolVLMProcessor raises ImportError in `__init__` without `num2words` (used only for video
  prompts), also when loading: the builders set a stand-in (`str`) in transformers' module for the
  whole test process; the library names the package instead (`load_processor`).
- LLaVA-OneVision with CLIP vision needs strategy "default" (CLS dropped) and the processor's
  `num_image_tokens` = g²+1, else the model raises "number of patches is not consistent"; SigLIP
  (the real one) runs "full".
- Qwen2/2.5/3-VL: `mrope_section` must sum to head_dim/2 ([2, 1, 1] for head_dim 8); Qwen3-VL's
  text `head_dim` defaults to 128 (set 8), `num_position_embeddings` must be a square (16 = 4×4,
  interpolated to the patch grid), `deepstack_visual_indexes` must lie within `depth`. The image
  processor's `size` is in pixels: `shortest_edge` = min_pixels, `longest_edge` = max_pixels.
- Gemma 3 text defaults head_dim 256 and query_pre_attn_scalar 256 (set 8). Its q/k RMS norms make
  `sharpen` weak there (max/min 1.3 against ≈ 6 for LLaVA and InternVL).
- PaliGemmaProcessor always returns `labels` (all -100 without a suffix): `model(**inputs)` then
  computes a loss; adapters may drop it.
- Idefics3/SmolVLM: an image whose resized grid is 1×1 is not split: only the global image,
  `image_seq_len` tokens (not `image_seq_len·(1+1)`). InternVL's tiling breaks aspect-ratio ties
  toward more tiles while the image covers over half of them (a square image: 2×2 + thumbnail).
- BLIP-2/InstructBLIP: `model(...)` returns the LM's maps in `out.language_model_outputs`; the
  Q-Former's cross-attention (`cross_attention_frequency=1`: every layer) comes from calling
  `model.qformer(..., output_attentions=True).cross_attentions`, `[B, heads, Q, 1 + patches]`.
  `generate` returns the prompt (with the query ids) followed by the new tokens, like the others.
- Padding: InternVLProcessor pads on the left (its default `padding_side`), every other processor
  here on the right (the tokenizer's side); each row of a padded batch equals its single forward at
  the `attention_mask` positions (≤ 1e-7; the image features go to rows in image order).
- Loaded back, models run sdpa (the default): logits match the eager original to ≤ 1.5e-7.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from groundcam.adapters.vlm_compat import image_only_video_processor, load_processor

Built = tuple[PreTrainedModel, ProcessorMixin]

# Words of the prompts the tests write; anything else is <unk>.
WORDS = (
    "USER ASSISTANT : ? . , what where is the a sign text cat dog red say describe image".split()
)
SMALL_LM = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
SMALL_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)


def word_tokenizer(specials: list[str], **named: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: <pad> <unk> <s> </s>, `WORDS`, then `specials` as
    special tokens (each one id, never split); `named` gives extra named special tokens
    (e.g. image_token="<image>") that processors read off the tokenizer."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=named or None,
    )
    tok.add_special_tokens({"additional_special_tokens": specials + list(named.values())})
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _finish(model_class, config, processor, seed: int) -> Built:
    """The model built under `seed` with eager attention, in eval mode, with `processor`."""
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="eager")
    return model.eval(), processor


def _lm(tok, **overrides) -> dict:
    return dict(
        SMALL_LM,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **overrides,
    )


def sharpen(model: PreTrainedModel, std: float = 0.2, seed: int = 0) -> PreTrainedModel:
    """`model` with its attention query and key weights redrawn from N(0, std²): at the default
    init (std 0.02) every attention row is nearly uniform (max/min ≈ 1.02 over the image), too
    flat for tests that must tell one map from another."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "query", "key"):
                module.weight.normal_(0, std)
    return model


def llava(
    image_size: int = 32, patch_size: int = 8, strategy: str = "default", seed: int = 0
) -> Built:
    """LLaVA-1.5: CLIP vision + Llama; the image is resized (shortest edge) and centre-cropped."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = word_tokenizer(["<image>"])
    (image_id,) = _ids(tok, "<image>")
    config = LlavaConfig(
        vision_config=dict(
            SMALL_VISION,
            model_type="clip_vision_model",
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=dict(_lm(tok), model_type="llama"),
        image_token_index=image_id,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )
    return _finish(LlavaForConditionalGeneration, config, processor, seed)


def _anyres(size: int, pinpoints) -> list[list[int]]:
    """`pinpoints` ((height, width) canvases) as lists; by default 1×2, 2×1 and 2×2 tiles."""
    pinpoints = pinpoints or [[size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
    return [list(p) for p in pinpoints]


def llava_next(
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints: list[list[int]] | None = None,
    seed: int = 0,
) -> Built:
    """LLaVA-NeXT: CLIP vision + Llama, anyres tiles on the best of `pinpoints` (default: 1x2,
    2x1, 2x2 tiles), one image_newline per grid row."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = word_tokenizer(["<image>"])
    (image_id,) = _ids(tok, "<image>")
    grid = _anyres(image_size, pinpoints)
    config = LlavaNextConfig(
        vision_config=dict(
            SMALL_VISION,
            model_type="clip_vision_model",
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=dict(_lm(tok), model_type="llama"),
        image_token_index=image_id,
        image_grid_pinpoints=grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid,
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _finish(LlavaNextForConditionalGeneration, config, processor, seed)


def llava_onevision(
    image_size: int = 32,
    patch_size: int = 8,
    pinpoints: list[list[int]] | None = None,
    max_tiles: int = 9,
    vision: str = "siglip",
    seed: int = 0,
) -> Built:
    """LLaVA-OneVision: SigLIP (or CLIP) vision + Qwen2, anyres tiles, `anyres_max_{max_tiles}`
    shrinking of large grids."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
    )

    tok = word_tokenizer(["<image>", "<video>"])
    image_id, video_id = _ids(tok, "<image>", "<video>")
    grid = _anyres(image_size, pinpoints)
    vision_type = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}[vision]
    # CLIP's CLS token must be dropped: the model checks g² features per tile.
    strategy = "default" if vision == "clip" else "full"
    config = LlavaOnevisionConfig(
        vision_config=dict(
            SMALL_VISION, model_type=vision_type, image_size=image_size, patch_size=patch_size
        ),
        text_config=dict(_lm(tok), model_type="qwen2"),
        image_token_index=image_id,
        video_token_index=video_id,
        image_grid_pinpoints=grid,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=-1,
    )
    images = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=images,
        tokenizer=tok,
        video_processor=image_only_video_processor(),
        num_image_tokens=(image_size // patch_size) ** 2 + (vision == "clip"),
        vision_feature_select_strategy=strategy,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )
    return _finish(LlavaOnevisionForConditionalGeneration, config, processor, seed)


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_SPECIALS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _qwen(family: str, patch_size: int, merge_size: int, max_pixels: int, seed: int) -> Built:
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL: patches merged `merge_size`² into one LM token."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    cls = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
        "qwen2_5_vl": (
            "Qwen2_5_VLConfig",
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2_5_VLProcessor",
        ),
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    }[family]
    config_class, model_class, processor_class = (getattr(transformers, c) for c in cls)
    tok = word_tokenizer(QWEN_SPECIALS)
    start, image_id, end, video_id = _ids(tok, *QWEN_SPECIALS)
    # M-RoPE splits each head's 8 rotary dims (4 frequencies) over (t, h, w).
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
    vision = dict(
        depth=2,
        hidden_size=32,
        num_heads=4,
        patch_size=patch_size,
        spatial_merge_size=merge_size,
        temporal_patch_size=2,
    )
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision.update(
            intermediate_size=64,
            out_hidden_size=32,
            window_size=4 * patch_size,
            fullatt_block_indexes=[1],
        )
    else:
        rope["mrope_interleaved"] = True
        vision.update(
            intermediate_size=64,
            out_hidden_size=32,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
    text = dict(_lm(tok), rope_parameters=rope)
    if family == "qwen3_vl":
        text["head_dim"] = 8
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=image_id,
        video_token_id=video_id,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    factor = patch_size * merge_size
    images = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": max_pixels},
    )
    processor = processor_class(
        image_processor=images, tokenizer=tok, video_processor=image_only_video_processor()
    )
    return _finish(model_class, config, processor, seed)


def qwen2_vl(
    patch_size: int = 8, merge_size: int = 2, max_pixels: int = 64 * 64, seed: int = 0
) -> Built:
    """Qwen2-VL: `smart_resize` to multiples of patch·merge, no crop; M-RoPE."""
    return _qwen("qwen2_vl", patch_size, merge_size, max_pixels, seed)


def qwen2_5_vl(
    patch_size: int = 8, merge_size: int = 2, max_pixels: int = 64 * 64, seed: int = 0
) -> Built:
    """Qwen2.5-VL: as Qwen2-VL, windowed vision attention (full attention in its last block)."""
    return _qwen("qwen2_5_vl", patch_size, merge_size, max_pixels, seed)


def qwen3_vl(
    patch_size: int = 8, merge_size: int = 2, max_pixels: int = 64 * 64, seed: int = 0
) -> Built:
    """Qwen3-VL: as Qwen2-VL, learned vision positions (4x4, interpolated) and deepstack."""
    return _qwen("qwen3_vl", patch_size, merge_size, max_pixels, seed)


def paligemma(image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Built:
    """PaliGemma: SigLIP + Gemma; the image (squashed) comes first, then BOS, prompt and \\n."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tok = word_tokenizer(["<image>"], image_token="<image>")
    (image_id,) = _ids(tok, "<image>")
    n = (image_size // patch_size) ** 2
    config = PaliGemmaConfig(
        vision_config=dict(
            SMALL_VISION,
            model_type="siglip_vision_model",
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=dict(_lm(tok), model_type="gemma", head_dim=8),
        image_token_index=image_id,
        vocab_size=len(tok),
        projection_dim=32,
        hidden_size=32,
    )
    images = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    images.image_seq_length = n
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    return _finish(PaliGemmaForConditionalGeneration, config, processor, seed)


def gemma3(
    image_size: int = 32, patch_size: int = 8, tokens_per_side: int = 2, seed: int = 0
) -> Built:
    """Gemma 3: SigLIP + Gemma 3; the patch grid average-pooled to `tokens_per_side`²; its
    zero-initialised projector weight is randomised (else every image looks all-zero)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )

    names = dict(
        boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"
    )
    tok = word_tokenizer([], **names)
    boi, eoi, image_id = _ids(tok, *names.values())
    n = tokens_per_side**2
    config = Gemma3Config(
        vision_config=dict(
            SMALL_VISION,
            model_type="siglip_vision_model",
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=dict(_lm(tok), head_dim=8, query_pre_attn_scalar=8, sliding_window=64),
        mm_tokens_per_image=n,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image_id,
    )
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=n)
    model, processor = _finish(Gemma3ForConditionalGeneration, config, processor, seed)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return model, processor


IDEFICS_SPECIALS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]


def _idefics(
    family: str, tile_size: int, patch_size: int, scale: int, max_tiles: int, seed
) -> Built:
    """Idefics3 or SmolVLM: the longest edge resized to at most `max_tiles` tiles, split into
    `tile_size` tiles plus the global image; each tile's patch grid pixel-shuffled by `scale`."""
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[family]
    config_class, model_class, processor_class, images_class = (
        getattr(transformers, prefix + name)
        for name in ("Config", "ForConditionalGeneration", "Processor", "ImageProcessorPil")
    )
    tok = word_tokenizer(IDEFICS_SPECIALS + (["<video>"] if family == "smolvlm" else []))
    (image_id,) = _ids(tok, "<image>")
    seq_len = (tile_size // patch_size) ** 2 // scale**2
    config = config_class(
        vision_config=dict(SMALL_VISION, image_size=tile_size, patch_size=patch_size),
        text_config=dict(_lm(tok), model_type="llama"),
        image_token_id=image_id,
        scale_factor=scale,
    )
    images = images_class(
        size={"longest_edge": max_tiles * tile_size},
        max_image_size={"longest_edge": tile_size},
    )
    if family == "idefics3":
        processor = processor_class(image_processor=images, tokenizer=tok, image_seq_len=seq_len)
    else:
        _without_num2words()
        processor = processor_class(
            image_processor=images,
            tokenizer=tok,
            video_processor=image_only_video_processor(),
            image_seq_len=seq_len,
        )
    return _finish(model_class, config, processor, seed)


def _without_num2words() -> None:
    """SmolVLMProcessor refuses to be built without `num2words`, which only its video prompts
    use: the tests give it a stand-in (the library names the missing package instead)."""
    from transformers.models.smolvlm import processing_smolvlm

    if processing_smolvlm.num2words is None:
        processing_smolvlm.num2words = str


def idefics3(
    tile_size: int = 32, patch_size: int = 8, scale: int = 2, max_tiles: int = 2, seed: int = 0
) -> Built:
    """Idefics3: SigLIP-like vision + Llama, tiles then the global image (see `_idefics`)."""
    return _idefics("idefics3", tile_size, patch_size, scale, max_tiles, seed)


def smolvlm(
    tile_size: int = 32, patch_size: int = 8, scale: int = 2, max_tiles: int = 2, seed: int = 0
) -> Built:
    """SmolVLM: Idefics3's geometry; its processor has a video slot (and wants num2words)."""
    return _idefics("smolvlm", tile_size, patch_size, scale, max_tiles, seed)


def internvl(image_size: int = 32, patch_size: int = 8, max_tiles: int = 4, seed: int = 0) -> Built:
    """InternVL: InternViT + Qwen2; the image squashed to at most `max_tiles` tiles (plus a
    thumbnail when there are several), each tile's grid pixel-shuffled by 2."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    names = dict(
        start_image_token="<img>",
        end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>",
        video_token="<video>",
    )
    tok = word_tokenizer([], **names)
    (image_id,) = _ids(tok, "<IMG_CONTEXT>")
    seq_len = (image_size // patch_size) ** 2 // 4
    config = InternVLConfig(
        vision_config=dict(
            SMALL_VISION, image_size=[image_size, image_size], patch_size=[patch_size, patch_size]
        ),
        text_config=dict(_lm(tok), model_type="qwen2"),
        image_token_id=image_id,
        image_seq_length=seq_len,
        downsample_ratio=0.5,
    )
    images = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
    )
    processor = InternVLProcessor(
        image_processor=images,
        tokenizer=tok,
        video_processor=image_only_video_processor(),
        image_seq_length=seq_len,
    )
    return _finish(InternVLForConditionalGeneration, config, processor, seed)


def _blip2_configs(tok, image_size: int, patch_size: int, queries: int) -> dict:
    return dict(
        vision_config=dict(SMALL_VISION, image_size=image_size, patch_size=patch_size),
        qformer_config=dict(
            SMALL_VISION,
            encoder_hidden_size=32,
            cross_attention_frequency=1,
            vocab_size=len(tok),
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
        ),
        num_query_tokens=queries,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )


def blip2(image_size: int = 32, patch_size: int = 8, queries: int = 4, seed: int = 0) -> Built:
    """BLIP-2: ViT + Q-Former (`queries` query tokens, cross-attention in every layer) + OPT;
    the tokenizer holds <image> unnamed (a named image_token crashes Blip2Processor)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
    )

    tok = word_tokenizer(["<image>"])
    text = dict(
        model_type="opt",
        vocab_size=len(tok),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = Blip2Config(text_config=text, **_blip2_configs(tok, image_size, patch_size, queries))
    images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=images, tokenizer=tok, num_query_tokens=queries)
    return _finish(Blip2ForConditionalGeneration, config, processor, seed)


def instructblip(
    image_size: int = 32, patch_size: int = 8, queries: int = 4, seed: int = 0
) -> Built:
    """InstructBLIP: BLIP-2 whose Q-Former also reads the prompt (its own tokenizer, saved in
    `qformer_tokenizer/`), here with a Llama LM."""
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    tok = word_tokenizer(["<image>"])
    config = InstructBlipConfig(
        text_config=dict(_lm(tok), model_type="llama"),
        **_blip2_configs(tok, image_size, patch_size, queries),
    )
    images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = InstructBlipProcessor(
        image_processor=images,
        tokenizer=tok,
        qformer_tokenizer=word_tokenizer([]),
        num_query_tokens=queries,
    )
    return _finish(InstructBlipForConditionalGeneration, config, processor, seed)


def save(model: PreTrainedModel, processor: ProcessorMixin, path) -> Path:
    """`path` holding `model` (safetensors) and `processor`, loadable offline by
    `AutoModelForImageTextToText` and `AutoProcessor` (see `load_processor`)."""
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load(path) -> Built:
    """The model and processor saved at `path`, loaded back offline without remote code."""
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=False)
    return model.eval(), load_processor(path)


# What a prompt writes where the image goes; the processor expands it into the image tokens
# ("": BLIP-2 and InstructBLIP put their query tokens before the text themselves).
PLACEHOLDER = {
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
    "qwen2_vl": QWEN_IMAGE,
    "qwen2_5_vl": QWEN_IMAGE,
    "qwen3_vl": QWEN_IMAGE,
    "paligemma": "<image>",
    "gemma3": "<start_of_image>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "internvl": "<IMG_CONTEXT>",
    "blip2": "",
    "instructblip": "",
}
# Every family's builder, by name.
BUILDERS = {name: globals()[name] for name in PLACEHOLDER}
