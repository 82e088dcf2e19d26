"""`groundcam train vlm`: a tiny LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower,
projector, Llama) built from config classes and trained from scratch on shapes scenes, on the
shared loop (`groundcam.train.loop.fit`: Accelerate, resumable, every term logged).

Each training row is a scene of `groundcam.data.shapes.generate_scene` with one prompt and its
answer: the caption `groundcam data shapes-captions` writes (objects left to right) for the
family's default prompt, or a referring question ("What colour is the star?" -> "red", "Where is
the red circle?" -> "left"). The text is the LLaVA adapter's template, `USER: <image>\\n{prompt}
ASSISTANT: {answer} </s>`, and the loss is the cross-entropy of the answer tokens (and `</s>`)
only. The tokenizer is word-level over the shapes vocabulary, the question words and the chat
markers; `out/model` saves with `save_pretrained` (model, tokenizer, processor) and loads with
`groundcam.load(dir)` as any LLaVA checkpoint.

`init` starts from a saved model (a built-in name or a folder) instead of random weights (a
fine-tune); with `image_size` as well it is first moved to that size (`vlm_regrid`: a finer grid
of image tokens, position embeddings resized). `ground="attention"` adds attention correctness (Liu et al., AAAI 2017; the loss of
`caption_grounding.attention_correctness_loss`): every answer word that names one object (the
caption's colour and shape words, a colour or shape answer) is pushed, at the row that writes
it (row k-1 for the token at k, the row groundcam's maps read), to put its image attention (mean
over heads and `ground_layers`, as a share of that row's attention on the image tokens) on the
cells its object's mask covers (`R_i`: the share of cell i inside the mask):
`-log(sum_i R_i a_i / sum_i a_i)` per word, summed per row and averaged over the batch."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tqdm import tqdm
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from groundcam.adapters.llava import LlavaAdapter
from groundcam.adapters.vlm import DEFAULT_PROMPT
from groundcam.data.shapes import generate_scene, vocabulary
from groundcam.data.shapes_captions import left_to_right
from groundcam.errors import InputError
from groundcam.train.caption_grounding import attention_correctness_loss, mask_coverage
from groundcam.train.loop import LoopConfig, fit, main_process, shard
from groundcam.train.vlm_regrid import regrid

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"
QUESTION_WORDS = (
    "user assistant describe image what colour shape size is where one left right middle"
)
PUNCTUATION = ". , ? : !"
IGNORE = -100
KINDS = ("caption", "colour", "shape", "size", "where")
GROUND_CHOICES = ("none", "attention")
MAX_ANSWER = 40  # tokens: the longest caption (5 objects, 24 tokens) and </s> fit; saved as default


@dataclass
class TrainConfig:
    out: str
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    pool: int = 4000  # training scenes (rendered once each, on first use)
    scene_size: int = 128  # scenes are drawn at this size, as `data shapes-captions` writes them
    image_size: int | None = None  # 64 from scratch; with `init`: the init's, or resized to it
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    caption_share: float = 0.5  # the rest of the rows are referring questions
    val_scenes: int = 100
    eval_every: int = 500
    save_every: int = 200
    grad_accum: int = 1
    precision: str = "fp32"
    init: str | None = None  # start from this saved model (built-in name or folder)
    ground: str = "none"  # grounding supervision: none or attention (Liu et al. 2017)
    ground_weight: float = 1.0
    ground_layers: list[int] | None = None  # LM layers whose attention is supervised (None: the
    # family's default layer, the one `attention` and `attn-gradcam` read)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer (whitespace, punctuation split off) over the shapes
    words, the question words and the chat markers; `<image>` is a special token (one id)."""
    words = [*vocabulary(), *QUESTION_WORDS.split(), *PUNCTUATION.split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *words]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_model(cfg: TrainConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained LLaVA and its processor for `cfg` (random weights drawn under `cfg.seed`)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = cfg.image_size or 64
    if size % cfg.patch_size:
        raise InputError(f"--image-size {size} is not a multiple of --patch-size {cfg.patch_size}")
    for name, width in (("--hidden", cfg.hidden), ("--vision-hidden", cfg.vision_hidden)):
        if width % cfg.heads:
            raise InputError(f"{name} {width} is not a multiple of --heads {cfg.heads}")
    tok = build_tokenizer()
    grid = (size // cfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=cfg.vision_hidden,
            intermediate_size=2 * cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.heads,
            image_size=size,
            patch_size=cfg.patch_size,
            projection_dim=cfg.vision_hidden,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=cfg.hidden,
            intermediate_size=2 * cfg.hidden,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=4 * (grid + 64),
            vocab_size=len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=grid,
    )
    images = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def load_init(source: str) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The saved model and processor to fine-tune (`--init`: a built-in name or a folder),
    with eager attention (the grounding term reads the weights)."""
    from groundcam.adapters.vlm_compat import load_processor
    from groundcam.model_files import pretrained
    from groundcam.zoo import BUILTIN, builtin_path

    folder = builtin_path(source) if source in BUILTIN else Path(source)
    if not (folder / "config.json").is_file():
        raise InputError(f"--init {source}: expected a built-in name or a saved model folder")
    model = pretrained(LlavaForConditionalGeneration, folder, attn_implementation="eager")
    return model, load_processor(str(folder))


def parse_layers(text: str | None) -> list[int] | None:
    """`--ground-layers` ("1" or "0,2") as a list of layer numbers (None stays None)."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(
            f"--ground-layers {text!r}: expected layer numbers such as 1 or 0,2"
        ) from None


def ground_layers(cfg: TrainConfig, model) -> list[int]:
    """The LM layers whose attention the grounding term supervises (checked against the model)."""
    n = model.config.text_config.num_hidden_layers
    if cfg.ground_layers is None:  # LlavaAdapter's default layer
        return [max(0, min(round(LlavaAdapter.default_depth * n), n - 2))]
    bad = [i for i in cfg.ground_layers if not 0 <= i < n]
    if bad or not cfg.ground_layers:
        raise InputError(f"--ground-layers {cfg.ground_layers}: expected layers in 0..{n - 1}")
    return sorted(set(cfg.ground_layers))


def _where(box, size: int) -> str:
    x = (box[0] + box[2]) / 2 / size
    return "left" if x < 1 / 3 else "right" if x > 2 / 3 else "middle"


def questions(sample) -> list[tuple[str, str]]:
    """Referring questions about a scene with one-word answers, each about an object that its
    question names unambiguously."""
    return [(q, a) for q, a, _ in _object_questions(sample)]


def _object_questions(sample) -> list[tuple[str, str, int]]:
    """`questions` with the index of the object each is about."""
    objects = sample.meta["objects"]
    size = sample.image_size[1]
    out = []
    for k, o in enumerate(objects):
        same_shape = sum(p["shape"] == o["shape"] for p in objects)
        same_colour = sum(p["colour"] == o["colour"] for p in objects)
        same_pair = sum(p["shape"] == o["shape"] and p["colour"] == o["colour"] for p in objects)
        if same_shape == 1:
            out.append((f"What colour is the {o['shape']}?", o["colour"], k))
        if same_colour == 1:
            out.append((f"What shape is the {o['colour']} one?", o["shape"], k))
        if same_pair == 1:
            name = f"{o['colour']} {o['shape']}"
            out.append((f"What size is the {name}?", o["size"], k))
            out.append((f"Where is the {name}?", _where(o["box"], size), k))
    return out


def named_objects(sample, prompt: str, answer: str, words: list[str]) -> list[int | None]:
    """Per word of `answer` as the tokenizer splits it (`words`), the index of the object it
    names, or None: the caption's colour and shape words, a question's colour or shape answer."""
    objects = sample.meta["objects"]
    if prompt == DEFAULT_PROMPT:
        caption = left_to_right(sample)
        boxes = iter(caption.boxes)
        out = []
        for w in words:
            if w in PUNCTUATION.split():
                out.append(None)
                continue
            box = next(boxes)
            out.append(None if box is None else [tuple(o["box"]) for o in objects].index(box[0]))
        return out
    for q, a, k in _object_questions(sample):
        if (q, a) == (prompt, answer):
            names = a in (objects[k]["colour"], objects[k]["shape"])
            return [k if names and w == a else None for w in words]
    return [None] * len(words)


@functools.lru_cache(maxsize=4096)
def _coverage(mask: str, height: int, width: int, grid: int) -> np.ndarray:
    from groundcam.data.masks import decode_mask

    rle = json.loads(mask)
    return mask_coverage(decode_mask(rle, height, width, "shapes object mask"), (grid, grid))


def object_cells(sample, k: int, grid: int) -> torch.Tensor:
    """`[grid * grid]` share of each image-token cell (row-major) covered by object k's mask
    (the processor's crop is the whole square scene)."""
    h, w = sample.image_size
    mask = json.dumps(sample.meta["objects"][k]["mask"], sort_keys=True)
    return torch.from_numpy(_coverage(mask, h, w, grid).astype(np.float32))


def row(sample, rng: np.random.Generator, caption_share: float) -> tuple[str, str]:
    """One (prompt, answer) of `sample`: its caption, or (with 1 - caption_share) a question."""
    asks = questions(sample)
    if not asks or rng.random() < caption_share:
        return DEFAULT_PROMPT, left_to_right(sample).caption
    return asks[int(rng.integers(len(asks)))]


def encode(
    processor: LlavaProcessor, images, rows: list[tuple[str, str]], samples=None, grid: int = 0
) -> dict:
    """Processor inputs for `rows` of (prompt, answer) with `labels`: the answer words and
    `</s>` keep their ids, everything else (prompt, image tokens, padding) is IGNORE. With the
    rows' `samples`, also `ground_regions` [B, T, grid^2]: at the row that writes each answer
    word naming an object (`named_objects`), its object's cell shares (elsewhere 0)."""
    tok = processor.tokenizer
    prompts = [LlavaAdapter.template.format(image=IMAGE_TOKEN, prompt=p) for p, _ in rows]
    answers = [f" {a} {tok.eos_token}" for _, a in rows]
    inputs = processor(
        images=images,
        text=[p + a for p, a in zip(prompts, answers, strict=True)],
        return_tensors="pt",
        padding=True,
    )
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    for i, answer in enumerate(answers):
        n = len(tok(answer, add_special_tokens=False)["input_ids"])
        end = int(inputs["attention_mask"][i].sum())  # right padding
        labels[i, end - n : end] = inputs["input_ids"][i, end - n : end]
    inputs["labels"] = labels
    if samples is not None:
        regions = torch.zeros(*labels.shape, grid * grid)
        for i, ((prompt, answer), sample) in enumerate(zip(rows, samples, strict=True)):
            words = tok.tokenize(answer)
            n = len(tok(answers[i], add_special_tokens=False)["input_ids"])
            start = int(inputs["attention_mask"][i].sum()) - n  # the answer's first position
            for j, k in enumerate(named_objects(sample, prompt, answer, words)):
                if k is not None:
                    regions[i, start + j - 1] = object_cells(sample, k, grid)
        inputs["ground_regions"] = regions
    return dict(inputs)


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (`labels` != IGNORE) of `batch`."""
    return model(**batch).loss


def image_attention_share(
    attentions, input_ids: torch.Tensor, image_id: int, layers: list[int]
) -> torch.Tensor:
    """`[B, T, N]`: each row's attention on the N image tokens (mean over heads and `layers`),
    as a share of its attention on all image tokens."""
    image = (input_ids[0] == image_id).nonzero()[:, 0]
    if not (input_ids[:, image] == image_id).all():
        raise ValueError("the rows of a batch hold their image tokens at different positions")
    att = torch.stack([attentions[n][:, :, :, image] for n in layers]).mean((0, 2))
    return att / att.sum(-1, keepdim=True).clamp_min(1e-12)


def grounded_loss(model, batch: dict, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer cross-entropy, attention-correctness term) of one forward over `batch` (which
    holds `ground_regions`)."""
    batch = dict(batch)
    regions = batch.pop("ground_regions")
    out = model(**batch, output_attentions=True)
    share = image_attention_share(
        out.attentions, batch["input_ids"], model.config.image_token_id, layers
    )
    return out.loss, attention_correctness_loss(share, regions.to(share.dtype))


def generate(model, processor, images, prompt: str = DEFAULT_PROMPT, max_new: int = MAX_ANSWER):
    """Greedy answers to `prompt` about each of `images`, as text."""
    text = LlavaAdapter.template.format(image=IMAGE_TOKEN, prompt=prompt)
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt")
    inputs = inputs.to(next(model.parameters()).device)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
    model.train(was)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [processor.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


def validate(model, processor, cfg: TrainConfig) -> dict:
    """BLEU-1..4 and CIDEr-D of greedy captions of `val` scenes, and the share of questions about
    them answered right."""
    from groundcam.eval.captions import cider_d, corpus_bleu

    scenes = [generate_scene("val", i, cfg.seed, cfg.scene_size) for i in range(cfg.val_scenes)]
    hyps, refs = [], []
    for start in range(0, len(scenes), 32):
        part = scenes[start : start + 32]
        hyps += generate(model, processor, [s.image for s in part])
        refs += [[left_to_right(s).caption] for s in part]
    out = {f"bleu{n}": round(float(v), 5) for n, v in enumerate(corpus_bleu(hyps, refs), 1)}
    out["cider_d"] = round(float(cider_d(hyps, refs)), 5)
    right = asked = 0
    for s in scenes[:50]:
        for prompt, answer in questions(s)[:2]:
            right += generate(model, processor, [s.image], prompt, max_new=3)[0] == answer
            asked += 1
    out["answers"] = round(right / max(asked, 1), 5)
    return out


def train(cfg: TrainConfig, threads: int | None = None, stop_at: int | None = None) -> Path:
    """Run (or resume) training in `cfg.out`; writes `out/model` (LLaVA weights, tokenizer,
    processor) that `groundcam.load` reads."""
    if cfg.batch_size % cfg.grad_accum:
        raise InputError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum}"
        )
    if not 0 <= cfg.caption_share <= 1:
        raise InputError(f"--caption-share {cfg.caption_share}: expected a share in [0, 1]")
    if cfg.scene_size < 48:
        raise InputError(f"--scene-size {cfg.scene_size}: scenes are at least 48 px")
    if cfg.ground not in GROUND_CHOICES:
        raise InputError(f"--ground {cfg.ground!r}: expected one of {GROUND_CHOICES}")
    if cfg.init is None:
        model, processor = build_model(cfg)
    else:
        model, processor = load_init(cfg.init)
        if cfg.image_size is not None:
            model, processor = regrid(model, processor, cfg.image_size)
    if model.generation_config.max_new_tokens is None:  # else generate() stops at 20 tokens
        model.generation_config.max_new_tokens = MAX_ANSWER
    layers = ground_layers(cfg, model)
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    model.train()
    main = main_process()
    if main:
        total = sum(p.numel() for p in model.parameters())
        print(
            f"model: LLaVA, {total:,} parameters ({4 * total / 2**20:.1f} MB in float32); "
            f"{cfg.steps} steps of {cfg.batch_size} rows from {cfg.pool} scenes"
            + (f", from {cfg.init}" if cfg.init else "")
            + (
                f"; grounding ({cfg.ground}, weight {cfg.ground_weight}, layers {layers})"
                if cfg.ground != "none"
                else ""
            ),
            flush=True,
        )
    loop = LoopConfig(
        out=cfg.out,
        steps=cfg.steps,
        lr=cfg.lr,
        warmup=min(cfg.warmup, cfg.steps // 2),
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        seed=cfg.seed,
        save_every=cfg.save_every,
        log_every=min(50, cfg.eval_every),
        eval_every=cfg.eval_every,
        threads=threads,
    )

    @functools.cache
    def scene(index: int):
        return generate_scene("train", index, cfg.seed, cfg.scene_size)

    @functools.lru_cache(maxsize=1)
    def step_batch(step: int) -> dict:
        rng = np.random.default_rng([cfg.seed, step])
        picks = rng.integers(cfg.pool, size=cfg.batch_size)
        samples = [scene(int(i)) for i in picks]
        rows = [row(s, rng, cfg.caption_share) for s in samples]
        grounded = samples if cfg.ground != "none" else None
        return encode(processor, [s.image for s in samples], rows, grounded, grid)

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict:
        batch = step_batch(step)
        return {k: shard(shard(v, micro, cfg.grad_accum), rank, world) for k, v in batch.items()}

    def loss_fn(m, batch: dict, step: int) -> dict[str, torch.Tensor]:
        if cfg.ground == "none":
            loss = answer_loss(m, batch)
            return {"loss": loss, "answer_cross_entropy": loss.detach()}
        ce, term = grounded_loss(m, batch, layers)
        return {
            "loss": ce + cfg.ground_weight * term,
            "answer_cross_entropy": ce.detach(),
            f"grounding_{cfg.ground}": term.detach(),
        }

    def after_step(m, step: int) -> None:
        if main and step % cfg.eval_every == 0:
            text = generate(m, processor, [generate_scene("val", 0, cfg.seed).image])[0]
            tqdm.write(f"step {step}: val 0: {text!r}")

    final = fit(
        model,
        loop,
        batch_fn,
        loss_fn,
        fingerprint=asdict(cfg),
        save_model=lambda m, path: _save(m, processor, cfg, path),
        evaluate=lambda m, step: validate(m, processor, cfg),
        after_step=after_step,
        stop_at=stop_at,
    )
    return final


def _save(model, processor, cfg: TrainConfig, path: Path) -> None:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (Path(path) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
