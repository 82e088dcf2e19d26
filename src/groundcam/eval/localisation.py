"""Word localisation as TAM (Li et al., ICCV 2025, `xmed-lab/TAM` eval.py) measures it: per
generated noun naming an annotated category, the IoU of its Otsu-thresholded map with that
category's mask (Obj-IoU); per function word, the share of its map below the nouns' mean
foreground threshold (Func-IoU); their harmonic mean (F1-IoU). Also the energy-based pointing
game (Score-CAM) and the grouping of generated tokens into words. DESIGN §14 has the protocol.

OpenCV is not needed: Otsu's threshold is computed as `cv2.threshold(..., cv2.THRESH_OTSU)` does
on a uint8 image, and the resize is bilinear with half-pixel centres like `cv2.resize`'s default
(on uint8, OpenCV's fixed-point arithmetic can round a pixel one grey level differently).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from groundcam.errors import InputError

FLT_EPSILON = float(np.finfo(np.float32).eps)  # OpenCV skips thresholds with a class below it

# Words NLTK's tagger gives the Penn tags TAM counts as function words (CC DT EX MD POS PRP PRP$
# UH WDT WP WP$ WRB) when tagged alone; used in place of the tagger, whose data is not on PyPI.
FUNCTION_WORDS = frozenset(
    # CC
    "and or but nor yet plus either neither "
    # DT
    "a an the this that these those each every some any all another no both "
    # EX, MD
    "there can could may might must shall should will would ought "
    # POS, PRP, PRP$
    "'s ' i you he she it we they me him her us them myself yourself himself herself itself "
    "ourselves themselves my your his its our their "
    # UH, WDT, WP, WP$, WRB
    "oh uh um yes hello which whatever whichever who whom what whoever whose where when why how "
    "whenever wherever".split()
)
IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "people": "person",
    "children": "child",
    "mice": "mouse",
    "feet": "foot",
    "teeth": "tooth",
    "geese": "goose",
    "knives": "knife",
}
WORD_MARKERS = " \t\n▁Ġ"  # a token beginning with one starts a word (SentencePiece, byte BPE)
_CJK = re.compile(
    "[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)


def to_uint8(heatmap: np.ndarray | torch.Tensor) -> np.ndarray:
    """A map as TAM's uint8 image: kept as is when already uint8, else
    `(255·(m−min)/(max−min))` truncated (a constant map is all zeros)."""
    m = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if m.ndim != 2:
        raise InputError(f"a word's token map must be [H, W], got shape {tuple(m.shape)}")
    if m.dtype == np.uint8:
        return m
    m = m.astype(np.float64)
    if not np.isfinite(m).all():
        raise InputError("a token map holds NaN or infinite values")
    low, high = m.min(), m.max()
    if high == low:
        return np.zeros(m.shape, dtype=np.uint8)
    return (255 * (m - low) / (high - low)).astype(np.uint8)


def resize_uint8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 `[h, w]` image resized bilinearly (half-pixel centres, as `cv2.resize`) to `size`
    (H, W), rounded back to uint8."""
    if image.shape == tuple(size):
        return image
    t = torch.from_numpy(image.astype(np.float32))[None, None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return torch.floor(out + 0.5).clamp(0, 255).to(torch.uint8).numpy()


def otsu_threshold(image: np.ndarray) -> int:
    """Otsu's threshold of a uint8 image exactly as OpenCV's `THRESH_OTSU` finds it: the grey level
    t maximising the between-class variance of (≤ t, > t), skipping t where a class is empty, the
    first (smallest) t on ties, 0 when no t separates two classes; the foreground is `image > t`.
    The running means follow OpenCV's recurrence so that rounding, too, is the same."""
    if image.dtype != np.uint8:
        raise InputError(f"Otsu's threshold needs a uint8 image, got {image.dtype}")
    hist = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    scale = 1.0 / image.size
    mu = float(np.dot(np.arange(256), hist)) * scale
    mu1 = q1 = max_sigma = 0.0
    best = 0
    for i in range(256):
        p_i = hist[i] * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < FLT_EPSILON or max(q1, q2) > 1.0 - FLT_EPSILON:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > max_sigma:
            max_sigma, best = sigma, i
    return best


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def f1_iou(obj_iou: float | None, func_iou: float | None) -> float | None:
    """The harmonic mean of Obj-IoU and Func-IoU (None when either is missing)."""
    if obj_iou is None or func_iou is None:
        return None
    total = obj_iou + func_iou
    return 2 * obj_iou * func_iou / total if total > 0 else 0.0


def word_ious(
    word_maps: Sequence[Sequence[np.ndarray | torch.Tensor]],
    word_classes: Sequence[int | str | None],
    label_mask: np.ndarray,
) -> dict:
    """TAM's Obj-IoU, Func-IoU and F1-IoU of one caption (DESIGN §14).

    `word_maps[i]`: the token maps `[H, W]` of word i (resized to the mask when of another size);
    `word_classes[i]`: a category id (> 0) for a noun naming an annotated category, "noun" for
    another noun, "function", or None; `label_mask`: `[H, W]` category ids, 0 background.
    A category noun's IoU is its best token's (map > Otsu threshold vs the category's pixels);
    consecutive words of the same category are one object with the better IoU. Every noun gives
    its tokens' largest Otsu threshold; a function word scores the mean over its tokens of the
    share of cells below the mean of those thresholds (not scored in a caption without nouns)."""
    if len(word_maps) != len(word_classes):
        raise InputError(f"{len(word_maps)} word maps but {len(word_classes)} word classes")
    labels = np.asarray(label_mask)
    if labels.ndim != 2:
        raise InputError(f"label_mask must be [H, W], got shape {labels.shape}")
    size = labels.shape
    objects: list[tuple[int, float]] = []  # (category, IoU) after merging
    thresholds: list[int] = []
    previous = None
    for maps, cls in zip(word_maps, word_classes, strict=True):
        if (
            isinstance(cls, bool)
            or cls not in ("noun", "function", None)
            and not (isinstance(cls, int | np.integer) and cls > 0)
        ):
            raise InputError(
                f"word class {cls!r}: expected a category id > 0, noun, function, None"
            )
        is_category = cls not in ("noun", "function", None)
        if is_category or cls == "noun":
            if not maps:
                raise InputError("a noun has no token maps")
            images = [resize_uint8(to_uint8(m), size) for m in maps]
            levels = [otsu_threshold(im) for im in images]
            thresholds.append(max(levels))
        if is_category:
            target = labels == cls
            iou = max(_iou(im > t, target) for im, t in zip(images, levels, strict=True))
            if previous == cls:
                objects[-1] = (cls, max(objects[-1][1], iou))
            else:
                objects.append((cls, iou))
        previous = cls if is_category else None
    func: list[float] = []
    if thresholds:
        level = float(np.mean(thresholds))
        for maps, cls in zip(word_maps, word_classes, strict=True):
            if cls == "function" and maps:
                shares = [np.mean(resize_uint8(to_uint8(m), size) < level) for m in maps]
                func.append(float(np.mean(shares)))
    obj = [iou for _, iou in objects]
    return {
        "obj_iou": obj,
        "func_iou": func,
        "Obj-IoU": _mean(obj),
        "Func-IoU": _mean(func),
        "F1-IoU": f1_iou(_mean(obj), _mean(func)),
    }


def summarise_word_ious(results: Sequence[dict]) -> dict:
    """Obj-IoU and Func-IoU as means over every word of a split (not over captions), and F1-IoU."""
    obj = [v for r in results for v in r["obj_iou"]]
    func = [v for r in results for v in r["func_iou"]]
    return {
        "Obj-IoU": _mean(obj),
        "Func-IoU": _mean(func),
        "F1-IoU": f1_iou(_mean(obj), _mean(func)),
        "objects": len(obj),
        "function_words": len(func),
    }


def energy_pointing(
    heatmap: np.ndarray | torch.Tensor, boxes: Sequence[Sequence[float]]
) -> float | None:
    """The energy-based pointing game (Score-CAM): the share of the map's non-negative mass on
    pixels inside any box (xyxy pixels of the map, edges included); None for a map without mass
    or without boxes. The map must already be at the image's size."""
    from groundcam.eval.runner import in_box_fractions

    m = torch.as_tensor(np.asarray(heatmap) if not isinstance(heatmap, torch.Tensor) else heatmap)
    if m.ndim != 2:
        raise InputError(f"energy pointing needs an [H, W] map, got shape {tuple(m.shape)}")
    return in_box_fractions(m.double()[None], [[list(b) for b in boxes]])[0]


def _starts_word(char: str) -> bool:
    return (
        char in string.punctuation
        or unicodedata.category(char).startswith("P")
        or bool(_CJK.match(char))
    )


def group_words(pieces: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Generated tokens grouped into words as TAM does: a new word at a token beginning with a
    space or `▁` (or byte-level BPE's `Ġ`), at punctuation and at CJK characters, each of which
    is a word of its own. `pieces[k]` is token k's text with its leading space (see
    `token_pieces`). Returns `(word, token indices)`; tokens of whitespace alone join the next."""
    words: list[tuple[str, list[int]]] = []
    pending: list[int] = []
    after_break = True
    for k, piece in enumerate(pieces):
        text = piece.lstrip(WORD_MARKERS)
        if not text:
            pending.append(k)
            after_break = True
            continue
        new = after_break or len(text) < len(piece) or _starts_word(text[0])
        if new or not words:
            words.append((text, [*pending, k]))
        else:
            words[-1] = (words[-1][0] + text, [*words[-1][1], *pending, k])
        pending = []
        after_break = _starts_word(text[-1])
    return [(w.strip(), ks) for w, ks in words]


def token_pieces(decode: Callable[[list[int]], str], token_ids: Sequence[int]) -> list[str]:
    """Each token's text as the decoded prefix grows by it, so that any tokenizer (SentencePiece,
    byte BPE, WordPiece) yields the leading spaces `group_words` needs."""
    pieces, before = [], ""
    for k in range(len(token_ids)):
        now = decode(list(token_ids[: k + 1]))
        pieces.append(now[len(before) :] if now.startswith(before) else now)
        before = now
    return pieces


def lemma_candidates(word: str) -> set[str]:
    """The word lower-cased with `-` removed (as TAM matches) and its singular forms by simple
    English rules, standing in for WordNet's noun lemmatiser."""
    w = word.lower().replace("-", "")
    out = {w, IRREGULAR_PLURALS.get(w, w)}
    if w.endswith("ies") and len(w) > 4:
        out.add(w[:-3] + "y")
    if w.endswith("ves") and len(w) > 4:
        out |= {w[:-3] + "f", w[:-3] + "fe"}
    if w.endswith("es") and len(w) > 3:
        out.add(w[:-2])
    if w.endswith("s") and not w.endswith("ss") and len(w) > 2:
        out.add(w[:-1])
    return out


def word_class(
    word: str, categories: dict[str, int], nouns: Sequence[str] = ()
) -> int | str | None:
    """TAM's class of a generated word without NLTK's tagger: the category id when a singular form
    of the word equals any word of a category's name (lower-cased, `-` removed); "function" for
    the closed-class words of TAM's function tags; "noun" for a word in `nouns` (other nouns the
    caller knows of); else None."""
    forms = lemma_candidates(word)
    for name, category in categories.items():
        if forms & {w.replace("-", "") for w in name.lower().split()}:
            return category
    if word.lower() in FUNCTION_WORDS:
        return "function"
    if forms & {n.lower() for n in nouns}:
        return "noun"
    return None


def shapes_labels(sample) -> tuple[np.ndarray, dict[str, int]]:
    """A shapes scene's `[H, W]` category ids (its shape, 1-based in `SHAPES`) from the objects'
    exact masks, and the categories by name, for `word_ious` of its captions."""
    from groundcam.data.masks import decode_mask, label_mask
    from groundcam.data.shapes import SHAPES

    width, height = sample.image_size
    categories = {shape: k + 1 for k, shape in enumerate(SHAPES)}
    masks = [
        (categories[o["shape"]], decode_mask(o["mask"], height, width, sample.image_id))
        for o in sample.meta["objects"]
    ]
    return label_mask(masks, height, width), categories


def generation_word_ious(
    gen, decode: Callable[[list[int]], str], labels: np.ndarray, categories: dict[str, int]
) -> dict:
    """`word_ious` of a generation explanation: its tokens grouped into words as TAM does, each
    word classed by `word_class`, the token maps `gen.maps` as they are (resized to `labels`)."""
    words = group_words(token_pieces(decode, gen.token_ids))
    maps = gen.maps.numpy()
    classes = [word_class(w, categories) for w, _ in words]
    result = word_ious([[maps[k] for k in ks] for _, ks in words], classes, labels)
    return result | {"words": [w for w, _ in words]}
