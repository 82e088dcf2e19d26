"""Shared pieces for adapters over 🤗 transformers models: inputs, processors, loading."""

from __future__ import annotations

import re
import warnings
import weakref
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from groundcam.adapters.base import ensure_eager
from groundcam.errors import GroundcamWarning, InputError
from groundcam.io import to_rgb
from groundcam.model_files import pretrained


def image_processor_of(processor):
    """The image processor inside a multimodal processor, or the processor itself."""
    return getattr(processor, "image_processor", None) or processor


def tokenizer_of(processor, tokenizer=None):
    """An explicit tokenizer wins; else the processor's."""
    return tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)


def pixel_values(processor, images: list[Image.Image], device: torch.device, **kwargs):
    """The model's image preprocessing (RGB first) as a float tensor on `device`."""
    if processor is None:
        raise ValueError("this model has no image processor: pass processor= to gc.load")
    ip = image_processor_of(processor)
    out = ip(images=[to_rgb(im) for im in images], return_tensors="pt", **kwargs)
    return out["pixel_values"].to(device)


def text_inputs(
    tokenizer,
    phrases: list[str],
    max_length: int,
    device: torch.device,
    padding: str | bool = "longest",
    shown: list[str] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, each phrase checked as the model will read it (`shown`: the
    phrases as the user wrote them, when `phrases` were cleaned first): nothing but special tokens
    is refused; mostly unknown tokens, or more than the text encoder's `max_length` tokens
    (explained as truncated), is a warning naming the phrase."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass tokenizer= (or processor=) to gc.load")
    full = tokenizer(phrases, padding=False, truncation=False, **kwargs)["input_ids"]
    unknown = unknown_words(tokenizer, phrases)
    for phrase, ids, words in zip(shown or phrases, full, unknown, strict=True):
        check_readable(tokenizer, phrase, ids, words)
        if len(ids) > max_length:
            warnings.warn(
                f"phrase truncated to the text encoder's {max_length} tokens: {phrase[:60]!r}",
                GroundcamWarning,
                stacklevel=3,
            )
    enc = tokenizer(
        phrases,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        **kwargs,
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def check_readable(
    tokenizer, phrase: str, ids: list[int], unknown_words: list[str] | None = None
) -> None:
    """Refuse a phrase the tokenizer turns into special tokens alone (an empty text after
    cleaning, "[SEP]"); warn once when most of its tokens are unknown to the vocabulary, or else
    when some of its words are (`unknown_words`), since the model then reads `[UNK]`, not them."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [i for i in ids if i not in special or i == unk]
    if not words:
        raise InputError(
            f"phrase {phrase[:60]!r} has no text the model can read: it tokenises to special "
            "tokens only"
        )
    unknown = sum(i == unk for i in words) if unk is not None else 0
    named = f" (unknown: {', '.join(unknown_words)})" if unknown_words else ""
    if unknown * 2 > len(words):
        warnings.warn(
            f"phrase {phrase[:60]!r}: {unknown} of its {len(words)} tokens are unknown to the "
            f"model's tokenizer; the map explains [UNK] tokens, not these words{named}",
            GroundcamWarning,
            stacklevel=4,
        )
    elif unknown_words:
        warnings.warn(
            unknown_words_message(phrase, unknown_words, getattr(tokenizer, "unk_token", None)),
            GroundcamWarning,
            stacklevel=4,
        )


_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")  # a word: letters/digits, inner apostrophes kept


def unknown_words(tokenizer, texts: list[str]) -> list[list[str]]:
    """Per text, its words (each once, in order) that the tokenizer reads as the unknown token
    alone: every sub-token of the word that carries text is the unknown token (a bare word-start
    marker such as SentencePiece's "▁" carries none); punctuation is not a word. Empty without a
    tokenizer or an unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None) if tokenizer is not None else None
    words = [list(dict.fromkeys(_WORD.findall(text))) for text in texts]
    if unk is None:
        return [[] for _ in texts]
    known = _verdicts(tokenizer)  # word -> unknown?, so a dataset's words are tokenised once
    verdicts = {w: known.get(w) for ws in words for w in ws}
    new = [w for w, v in verdicts.items() if v is None]
    if new:
        encoded = tokenizer(new, add_special_tokens=False)["input_ids"]
        verdicts.update(dict.fromkeys(new, False))
        suspects = [(w, ids) for w, ids in zip(new, encoded, strict=True) if unk in ids]
        pieces = iter(tokenizer.convert_ids_to_tokens([i for _, ids in suspects for i in ids]))
        for word, ids in suspects:
            # zip takes len(ids) pieces: ids run out first
            text = [i for i, p in zip(ids, pieces, strict=False) if i == unk or _bare(str(p))]
            verdicts[word] = all(i == unk for i in text)
        if len(known) > _MAX_VERDICTS:
            known.clear()
        known.update({w: verdicts[w] for w in new})
    return [[w for w in ws if verdicts[w]] for ws in words]


_MAX_VERDICTS = 200_000  # words remembered per tokenizer
_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _verdicts(tokenizer) -> dict[str, bool]:
    """The remembered word verdicts of `tokenizer`, forgotten when its vocabulary grows (a fresh
    dict when it cannot be weakly keyed)."""
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    try:
        remembered = _VERDICTS.get(tokenizer)
        if remembered is None or remembered[0] != size:
            remembered = _VERDICTS[tokenizer] = (size, {})
    except TypeError:
        return {}
    return remembered[1]


def _bare(piece: str) -> str:
    """A sub-token without its word-boundary markers (SentencePiece, byte-level BPE)."""
    return piece.strip("\u2581\u0120 \t\n")


def unknown_words_message(phrase: str, words: list[str], unk: str | None = None) -> str:
    """The warning for a phrase (or text) with words the model cannot read."""
    names = ", ".join(repr(w) for w in words)
    one = len(words) == 1
    return (
        f"phrase {phrase[:60]!r}: {names} {'is' if one else 'are'} unknown to the model's "
        f"vocabulary; the model reads {unk or 'the unknown token'} in place of "
        f"{'it' if one else 'them'}, so the map and the score do not see "
        f"{'this word' if one else 'these words'}"
    )


def token_strings(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Per row, the tokens under the mask as strings."""
    out = []
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        ids = [i for i, keep in zip(ids, m, strict=True) if keep]
        out.append(tokenizer.convert_ids_to_tokens(ids) if tokenizer else [str(i) for i in ids])
    return out


def load_pretrained(model_class, source: str, processor=None, **kwargs):
    """A transformers model with eager attention (sdpa returns no weights), in eval mode, and
    its processor (AutoProcessor, else AutoImageProcessor) when none is given."""
    model = pretrained(model_class, source, attn_implementation="eager", **kwargs)
    model.eval()
    if processor is None:
        processor = auto_processor(source)
    return model, processor


def auto_processor(source: str):
    """The saved processor; when that holds no image processor (AutoProcessor falls back to a
    bare tokenizer for some directories), the saved image processor."""
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        proc = pretrained(AutoProcessor, source)
    except (OSError, ValueError, TypeError, KeyError):
        proc = None
    if hasattr(proc, "image_processor") or isinstance(proc, ImageProcessingMixin):
        return proc
    try:
        return pretrained(AutoImageProcessor, source)
    except (OSError, ValueError):
        return proc


def build_image_processor(class_name: str, **kwargs):
    """transformers' image processor `class_name` built from arguments (no files): its PIL
    implementation where torchvision is missing, as transformers would fall back to anyway."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(
        transformers, class_name + "Pil"
    ):
        class_name += "Pil"
    return getattr(transformers, class_name)(**kwargs)


def square(size) -> dict[str, int]:
    """A config's image size (an int or a pair) as a processor's {"height", "width"}."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return {"height": h, "width": w}


def prepare_instance(model: nn.Module) -> nn.Module:
    """A caller's model: eager attention (or a clear error), eval mode."""
    ensure_eager(model)
    return model.eval()


# --------------------------------------------------------------- layers, found by structure
QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("qkv",))


def _holds_attention(block: nn.Module) -> bool:
    """Whether `block` computes attention: a module of an attention class, or one owning
    query/key/value projections."""
    for module in block.modules():
        if "Attention" in type(module).__name__:
            return True
        children = dict(module.named_children())
        if any(all(isinstance(children.get(n), nn.Linear) for n in names) for names in QKV_NAMES):
            return True
    return False


def layer_stack(root: nn.Module, what: str = "transformer", depth: int | None = None):
    """The transformer blocks under `root`, found by structure (module paths move between
    transformers releases): the longest `nn.ModuleList` whose every item computes attention, or
    the one of length `depth` when the config tells it."""
    stacks = [
        m
        for m in root.modules()
        if isinstance(m, nn.ModuleList) and len(m) and all(_holds_attention(b) for b in m)
    ]
    if depth is not None:
        stacks = [m for m in stacks if len(m) == depth]
    if not stacks:
        size = f"{depth} " if depth is not None else ""
        raise ValueError(f"could not find the {size}{what} layers of {type(root).__name__}")
    return max(stacks, key=len)


CROSS_NAMES = ("encoder_attn", "crossattention", "cross_attn", "cross_attention")


def attention_modules(layer: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(self-attention, cross-attention or None) of a layer: its outermost modules of an attention
    class, told apart by name (`encoder_attn`, `crossattention`, ...). Each returns `(output, probs)`
    under eager attention."""
    found: dict[str, nn.Module] = {}
    for name, mod in layer.named_modules():
        if not name or "Attention" not in type(mod).__name__:
            continue
        if any(name.startswith(k + ".") for k in found):  # inside one already found
            continue
        found[name] = mod
    cross = [m for n, m in found.items() if any(c in n for c in CROSS_NAMES)]
    own = [m for n, m in found.items() if not any(c in n for c in CROSS_NAMES)]
    if not own:
        raise ValueError(f"{type(layer).__name__}: no attention module found")
    return own[0], (cross[0] if cross else None)


def _attention(block: nn.Module, strict: bool = True) -> nn.Module | None:
    """The module of `block` that computes attention probabilities: query/key/value projections
    and one dropout, applied to the probabilities in eager attention."""
    for module in block.modules():
        children = dict(module.named_children())
        if all(isinstance(children.get(n), nn.Linear) for n in ("query", "key", "value")):
            return module
    if strict:
        raise ValueError(f"{type(block).__name__}: no query/key/value self-attention found")
    return None


def attention_probs(block: nn.Module) -> nn.Module:
    """The dropout on `block`'s attention probabilities: its output (the probabilities, in eval
    mode) is what the context is computed from, so a recorded leaf there carries the gradient."""
    attention = _attention(block)
    drops = [c for c in attention.children() if isinstance(c, nn.Dropout)]
    if len(drops) != 1:
        raise ValueError(f"{type(attention).__name__}: no attention-probability dropout to hook")
    return drops[0]


def patch_size(config) -> tuple[int, int]:
    p = config.patch_size
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def tokenizer_from_directory(directory: Path):
    """The tokenizer saved beside a model: `tokenizer.json`, or a BERT `vocab.txt`."""
    if (directory / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return pretrained(PreTrainedTokenizerFast, directory)
    if (directory / "vocab.txt").is_file():
        from transformers import BertTokenizer

        # transformers 5 ignores `vocab_file=`; `vocab=` is the argument that reads the file
        return BertTokenizer(vocab=str(directory / "vocab.txt"))
    return None


def load_tokenizer(source: str, processor, tokenizer):
    """An explicit tokenizer, else the processor's, else the one saved beside the model."""
    tokenizer = tokenizer_of(processor, tokenizer)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = pretrained(AutoTokenizer, source)
        except (OSError, ValueError, TypeError, KeyError):
            tokenizer = None
    return tokenizer
