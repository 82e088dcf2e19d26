"""Train `trocr-tiny-glyphs`: a tiny TrOCR-style VisionEncoderDecoderModel that reads the short
synthetic text lines of `groundcam.data.glyphs`.

The model is a transformers `VisionEncoderDecoderModel` (a `ViTModel` encoder on the 32 x 128
line image with 8 x 8 patches, so a 4 x 16 patch grid after one CLS token, and a
`TrOCRForCausalLM` decoder) built from config classes with random weights and eager attention,
so that encoder attentions and the decoder's cross-attentions come back from
`output_attentions=True`. Text is tokenised one token per character.

Training is teacher-forced cross-entropy on the shared loop (`groundcam.train.loop.fit`: AdamW,
linear warmup then cosine decay, clipping, Accelerate), on a pool of training lines rendered once
and kept as uint8 tensors (optionally with a small random shift and pixel noise). Every step's
global batch and augmentation come from generators seeded by (seed, step), so a run is
deterministic given its seed and resumes exactly from its checkpoint; micro-batches
(`grad_accum`) and processes (`accelerate launch`) take their shares of that batch.

A ViT and an attention decoder trained from scratch sit for thousands of steps on a plateau where
the decoder is only a language model: its cross-attention is uniform over the 65 image tokens and
has to find the character it reads before the encoder's tokens become worth reading (measured
here: after 4,000 steps of batch 32, validation character accuracy was still 7%). To leave it
within a CPU budget, the first `aux_until` fraction of training adds an auxiliary loss on the
*encoder*: a linear head (discarded afterwards) classifies each patch column's token mean as the
character whose ink-box centre lies in that column, or blank. Its weight decays linearly to zero,
and the rest of training is the plain captioning loss (with it, the same run read 62% of the
characters after 2,000 steps and 81% after 3,000). The decoder's cross-attention is never
supervised: where it looks is learned from the text alone.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    PreTrainedTokenizerFast,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from groundcam.data.glyphs import IMAGE_SIZE, MAX_CHARS, alphabet, render_line
from groundcam.eval.glyphs import char_accuracy, edit_distance  # noqa: F401 (re-exported)
from groundcam.train.loop import LoopConfig, fit, main_process, shard

# Token ids follow TrOCR/RoBERTa: <s> = 0 (also the decoder start), <pad> = 1, </s> = 2.
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
IGNORE = -100  # label value the loss skips


def char_tokenizer(chars: str | None = None) -> PreTrainedTokenizerFast:
    """One token per character of `chars` (default: the glyph alphabet) after the specials.

    Encoding lower-cases, drops whitespace, splits into characters and appends `</s>` (so the
    ids are the decoder's labels; the decoder input is `<s>` + the characters). Unknown
    characters become `<unk>`. Decoding fuses the tokens with no separator, so
    `decode(ids, skip_special_tokens=True)` gives back the string.
    """
    chars = alphabet() if chars is None else chars
    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(chars)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_CHARS + 2,
    )


def build_model(
    vocab_size: int,
    *,
    hidden: int = 96,
    encoder_layers: int = 3,
    decoder_layers: int = 2,
    heads: int = 4,
    mlp_ratio: int = 4,
    patch_size: int = 8,
    image_size: tuple[int, int] = IMAGE_SIZE,
    max_chars: int = MAX_CHARS,
) -> VisionEncoderDecoderModel:
    """A randomly initialised ViT + TrOCR-decoder model with eager attention, in eval mode."""
    encoder = ViTConfig(
        image_size=list(image_size),
        patch_size=patch_size,
        hidden_size=hidden,
        num_hidden_layers=encoder_layers,
        num_attention_heads=heads,
        intermediate_size=mlp_ratio * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    decoder = TrOCRConfig(
        vocab_size=vocab_size,
        d_model=hidden,
        decoder_layers=decoder_layers,
        decoder_attention_heads=heads,
        decoder_ffn_dim=mlp_ratio * hidden,
        cross_attention_hidden_size=hidden,
        use_learned_position_embeddings=True,
        max_position_embeddings=max_chars + 8,
        layernorm_embedding=True,
        scale_embedding=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=BOS_ID,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=BOS_ID,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = BOS_ID
    config.bos_token_id = BOS_ID
    config.pad_token_id = PAD_ID
    config.eos_token_id = EOS_ID
    # `_from_config` sets eager attention on the encoder and decoder configs alike.
    model = VisionEncoderDecoderModel._from_config(config, attn_implementation="eager")
    gen = model.generation_config
    gen.decoder_start_token_id, gen.bos_token_id = BOS_ID, BOS_ID
    gen.pad_token_id, gen.eos_token_id = PAD_ID, EOS_ID
    gen.max_length = max_chars + 2  # the start token, the characters and </s>
    gen.num_beams, gen.do_sample = 1, False
    return model.eval()


def image_processor(image_size: tuple[int, int] = IMAGE_SIZE):
    """A `ViTImageProcessor` that gives the same tensors as `pixel_values`."""
    try:  # transformers without torchvision: the PIL backend, without its fallback warning
        from transformers import ViTImageProcessorPil as cls
    except ImportError:  # pragma: no cover - depends on the installed extras
        from transformers import ViTImageProcessor as cls
    return cls(
        do_resize=True,
        size={"height": image_size[0], "width": image_size[1]},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 in [-1, 1], exactly as the image processor computes it."""
    return (pixels.float() / 255.0 - 0.5) / 0.5


def _to_uint8(images, image_size: tuple[int, int]) -> torch.Tensor:
    if isinstance(images, Image.Image):
        images = [images]
    h, w = image_size
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def pixel_values(images, image_size: tuple[int, int] = IMAGE_SIZE) -> torch.Tensor:
    """PIL image(s) -> float32 [B, 3, H, W]: resized to `image_size` (bilinear) if needed,
    scaled to [0, 1], then normalised with mean 0.5 and std 0.5."""
    return _normalise(_to_uint8(images, image_size))


@torch.no_grad()
def read_text(model: VisionEncoderDecoderModel, tokenizer, images, batch_size: int = 256) -> list:
    """Greedy transcriptions of PIL images (or an already normalised pixel tensor)."""
    pixels = images if isinstance(images, torch.Tensor) else pixel_values(images)
    pixels = pixels.to(model.device)
    was_training = model.training
    model.eval()
    texts = []
    for start in range(0, len(pixels), batch_size):
        ids = model.generate(pixel_values=pixels[start : start + batch_size], do_sample=False)
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    model.train(was_training)
    return texts


def evaluate_text(
    model: VisionEncoderDecoderModel, tokenizer, split: str = "val", n: int = 500, seed: int = 0
) -> dict:
    """Greedy-decoding character accuracy and exact-match rate on the first `n` lines of
    `split`."""
    samples = [render_line(split, i, seed) for i in range(n)]
    predictions = read_text(model, tokenizer, [s.image for s in samples])
    targets = [s.text for s in samples]
    pairs = list(zip(predictions, targets, strict=True))
    return {
        "char_acc": round(float(np.mean([char_accuracy(p, t) for p, t in pairs])), 4),
        "exact": round(float(np.mean([p == t for p, t in pairs])), 4),
        "n": n,
    }


@dataclass
class TrainConfig:
    out: str
    steps: int = 16000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 300
    seed: int = 0
    pool: int = 50000  # training lines rendered once and sampled from
    augment: bool = False  # random shift of up to `shift` pixels and pixel noise per sample
    shift: int = 2
    aux_weight: float = 1.0  # initial weight of the auxiliary per-column encoder loss
    aux_until: float = 0.5  # fraction of the steps over which that weight decays to zero
    hidden: int = 96
    encoder_layers: int = 3
    decoder_layers: int = 2
    heads: int = 4
    patch_size: int = 8
    eval_every: int = 500
    eval_lines: int = 500
    log_every: int = 10
    clip_grad: float = 1.0
    grad_accum: int = 1  # micro-batches a step (the same global batch of `batch_size` lines)
    precision: str = "fp32"  # fp32, bf16, fp16 (CUDA) or auto


def model_from_config(cfg: TrainConfig, vocab_size: int) -> VisionEncoderDecoderModel:
    return build_model(
        vocab_size,
        hidden=cfg.hidden,
        encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers,
        heads=cfg.heads,
        patch_size=cfg.patch_size,
    )


def column_targets(sample, tokenizer, columns: int) -> torch.Tensor:
    """Per patch column: the token id of the character whose ink-box centre lies in it, or
    `<pad>` (blank) where none does (the right-most wins where two centres share a column)."""
    target = torch.full((columns,), PAD_ID, dtype=torch.long)
    col_width = IMAGE_SIZE[1] / columns
    for ch, (x1, _, x2, _) in zip(sample.text, sample.char_boxes, strict=True):
        column = min(columns - 1, int((x1 + x2) / 2 // col_width))
        target[column] = tokenizer.convert_tokens_to_ids(ch)
    return target


class Pool:
    """Training lines rendered once: uint8 images [N, 3, H, W], label ids [N, MAX_CHARS + 1]
    (the characters then `</s>`, padded with -100) and per-column targets [N, columns]."""

    def __init__(self, tokenizer, size: int, seed: int, columns: int = 16, progress: bool = True):
        images, labels = [], torch.full((size, MAX_CHARS + 1), IGNORE, dtype=torch.long)
        self.columns = torch.empty((size, columns), dtype=torch.long)
        chunk = 1000
        for start in tqdm(
            range(0, size, chunk), desc="rendering lines", leave=False, disable=not progress
        ):
            samples = [
                render_line("train", i, seed) for i in range(start, min(start + chunk, size))
            ]
            images.append(_to_uint8([s.image for s in samples], IMAGE_SIZE))
            for k, s in enumerate(samples):
                ids = tokenizer(s.text).input_ids
                labels[start + k, : len(ids)] = torch.tensor(ids)
                self.columns[start + k] = column_targets(s, tokenizer, columns)
        self.images = torch.cat(images)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


def _batch(pool: Pool, cfg: TrainConfig, step: int):
    """Normalised pixels, decoder inputs, labels and column targets of step `step` (a pure
    function of it)."""
    rng = np.random.default_rng([cfg.seed, step])
    idx = torch.from_numpy(rng.choice(len(pool), size=cfg.batch_size, replace=False))
    images, labels, columns = pool.images[idx], pool.labels[idx], pool.columns[idx]
    pixels = _normalise(images)
    if cfg.augment:
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        b = len(idx)
        dx = torch.randint(-cfg.shift, cfg.shift + 1, (b,), generator=gen)
        dy = torch.randint(-cfg.shift, cfg.shift + 1, (b,), generator=gen)
        for i in range(b):  # the text keeps a 2 px margin, so a small roll never cuts ink
            pixels[i] = torch.roll(pixels[i], (int(dy[i]), int(dx[i])), dims=(1, 2))
        # (column targets are not shifted: 2 px moves few centres across an 8 px column)
        sigma = 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
        pixels = pixels + sigma * torch.randn(pixels.shape, generator=gen)
    # Decoder input: <s> then the characters (labels shifted right; -100 becomes <pad>).
    decoder_in = torch.cat([torch.full((len(idx), 1), BOS_ID), labels[:, :-1]], 1)
    decoder_in = decoder_in.masked_fill(decoder_in == IGNORE, PAD_ID)
    return pixels, decoder_in, labels, columns


def losses(
    model: VisionEncoderDecoderModel,
    pixels: torch.Tensor,
    decoder_in: torch.Tensor,
    labels: torch.Tensor,
    columns: torch.Tensor | None = None,
    aux_head: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced cross-entropy over the non-padded label positions, and (with `aux_head`)
    the auxiliary per-column cross-entropy on the encoder's patch tokens."""
    # Padding sits after </s>, and the decoder is causal, so real positions never see it.
    out = model(pixel_values=pixels, decoder_input_ids=decoder_in)
    loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    if aux_head is None:
        return loss, None
    b, n_cols = columns.shape
    tokens = out.encoder_last_hidden_state[:, 1:]  # drop CLS; row-major over the patch grid
    per_column = tokens.reshape(b, -1, n_cols, tokens.shape[-1]).mean(1)
    return loss, F.cross_entropy(aux_head(per_column).flatten(0, 1), columns.flatten())


def _aux_weight(cfg: TrainConfig, step: int) -> float:
    end = cfg.aux_until * cfg.steps
    return cfg.aux_weight * max(0.0, 1.0 - step / end) if end > 0 else 0.0


class WithAux(torch.nn.Module):
    """The reader with its auxiliary per-column head: what the loop trains (the head is a
    training aid, never saved)."""

    def __init__(self, model: VisionEncoderDecoderModel, aux_head: torch.nn.Module):
        super().__init__()
        self.model, self.aux_head = model, aux_head


def loop_config(cfg: TrainConfig, threads: int | None = None) -> LoopConfig:
    """The shared loop's settings for this run (a checkpoint at every evaluation)."""
    return LoopConfig(
        out=cfg.out,
        steps=cfg.steps,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup=cfg.warmup,
        grad_clip=cfg.clip_grad or None,
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        seed=cfg.seed,
        save_every=cfg.eval_every,
        log_every=cfg.log_every,
        eval_every=cfg.eval_every,
        threads=threads or os.cpu_count() or 1,
        find_unused=True,  # the auxiliary head gets no gradient once its weight reaches 0
    )


def save_model(model, tokenizer, out: Path) -> Path:
    """`save_pretrained` of the model, its tokenizer and its image processor (also as a
    TrOCRProcessor, so `AutoProcessor.from_pretrained(out)` works)."""
    model.save_pretrained(out)
    processor = image_processor()
    TrOCRProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    # transformers 5 nests the image processor inside processor_config.json; the separate
    # preprocessor_config.json is what `ViTImageProcessor.from_pretrained` and older readers use.
    processor.save_pretrained(out)
    return out


def train(cfg: TrainConfig, threads: int | None = None, stop_at: int | None = None) -> Path:
    """Run (or resume) training in `cfg.out` (the shared loop's files: `train_log.jsonl`,
    `checkpoint/` at every evaluation) and finally write `model/` and `final_eval.json`.
    `stop_at` ends the run early after that step, with a checkpoint (as a crash after a
    checkpoint would); the final model is then not written, and running again with the same
    configuration resumes."""
    loop = loop_config(cfg, threads)
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}"
        )
    tokenizer = char_tokenizer()
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, len(tokenizer))
    aux_head = torch.nn.Linear(cfg.hidden, len(tokenizer))  # training aid only, never saved
    n_params = sum(p.numel() for p in model.parameters())
    main = main_process()
    if main:
        print(f"model: {n_params:,} parameters", flush=True)
    grid_w = IMAGE_SIZE[1] // cfg.patch_size
    pool = functools.cache(lambda: Pool(tokenizer, cfg.pool, cfg.seed, columns=grid_w))
    step_batch = functools.lru_cache(maxsize=1)(lambda step: _batch(pool(), cfg, step))

    def batch_fn(step: int, micro: int, rank: int, world: int):
        part = (shard(t, micro, cfg.grad_accum) for t in step_batch(step))
        return tuple(shard(t, rank, world) for t in part)

    def loss_fn(reader: WithAux, batch, step: int) -> dict[str, torch.Tensor]:
        aux_w = _aux_weight(cfg, step)
        head = reader.aux_head if aux_w > 0 else None
        loss, aux = losses(reader.model, *batch, head)
        if aux is None:
            return {"loss": loss, "caption_loss": loss}
        return {
            "loss": loss + aux_w * aux,
            "caption_loss": loss,
            "aux_loss": aux,
            "aux_weight": torch.tensor(aux_w, dtype=torch.float64, device=loss.device),
        }

    last_val = {}

    def evaluate(reader: WithAux, step: int) -> dict:
        last_val["val"] = evaluate_text(reader.model, tokenizer, "val", cfg.eval_lines, cfg.seed)
        return last_val["val"]

    final = fit(
        WithAux(model, aux_head),
        loop,
        batch_fn,
        loss_fn,
        fingerprint=asdict(cfg),
        save_model=lambda reader, path: save_model(reader.model, tokenizer, path),
        evaluate=evaluate,
        stop_at=stop_at,
    )
    model.eval()
    if final == Path(cfg.out) or not main:
        return final
    val = last_val.get("val") or evaluate_text(model, tokenizer, "val", cfg.eval_lines, cfg.seed)
    result = {
        "steps": cfg.steps,
        "parameters": n_params,
        "val": val,
        "test": evaluate_text(model, tokenizer, "test", cfg.eval_lines, cfg.seed),
    }
    (Path(cfg.out) / "final_eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return final
