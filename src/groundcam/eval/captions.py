"""Caption metrics exactly as the COCO caption evaluation (pycocoevalcap) computes them.

Our own code; the formulas, and the quirks that decide the last digits, carry over from
pycocoevalcap's `bleu/bleu_scorer.py` (`Bleu(4)`) and `cider/cider_scorer.py` (`Cider()`), so the
numbers equal theirs (tests check to 1e-12 against the installed package when it is there).

Inputs: `hypotheses` is one caption per image and `references` the captions of each image, either as
two lists in the same image order (`list[str]`, `list[list[str]]`) or as two dicts keyed by image id
with the same keys (pycocoevalcap's `res`/`gts`: a hypothesis may be a string or a one-string list).
Text runs through `groundcam.data.caption_text.tokenize` (lower-case, punctuation dropped) first;
`tokenized=True` takes the strings as already tokenised and splits them on whitespace, as
pycocoevalcap does with the output of its PTB tokenizer.

BLEU (`corpus_bleu`): corpus totals of clipped n-gram matches and of n-gram guesses, n = 1..4; the
effective reference length of an image is the reference length closest to the hypothesis length
(ties go to the shorter); `BLEU-n = (prod_k (match_k + 1e-15) / (guess_k + 1e-9)) ** (1/n)`, times
the brevity penalty `exp(1 - (r + 1e-9) / (c + 1e-15))` when `(c + 1e-15) / (r + 1e-9) < 1` (c, r:
total hypothesis and effective reference lengths). So an empty corpus scores 0, and a perfect one
`1 - ~1e-10`: pycocoevalcap's smoothing puts even `c == r` a hair below 1, and that penalty too
(`exp(-~1e-10)`) is applied, as there.

CIDEr-D (`cider_d`, `cider_d_scores`): n = 1..4, tf-idf vectors with the document frequency counted
over the references of the evaluated set (an n-gram that no reference has gets document frequency
1) and `log(number of images)` as the log corpus size; per reference and n the clipped cosine
`sum min(h, r) * r / (|h| |r|)` times the Gaussian length penalty `exp(-delta^2 / (2 * 6^2))`;
averaged over n and over the references, times 10; the corpus score is the mean over images.
pycocoevalcap's quirks are kept: the "length" in delta counts bigrams, not words (the difference is
the same whenever both captions have a word, and an empty caption scores 0 either way); a single
image scores 0 (log 1 = 0 zeroes every weight); an n-gram the hypothesis has and the reference lacks
adds nothing, and an n-gram order whose norm is 0 is left undivided. Where every reference is empty
pycocoevalcap fails (`max()` of no document frequencies); here the score is 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from groundcam.data.caption_text import tokenize

__all__ = ["corpus_bleu", "cider_d", "cider_d_scores"]

MAX_N = 4
SIGMA = 6.0
_TINY = 1e-15  # pycocoevalcap bleu_scorer: "so that if guess is 0 still return 0"
_SMALL = 1e-9

Tokens = list[str]
NGrams = Counter  # tuple[str, ...] -> count


def corpus_bleu(
    hypotheses: Sequence[str] | Mapping[object, str | Sequence[str]],
    references: Sequence[Sequence[str]] | Mapping[object, Sequence[str]],
    *,
    tokenized: bool = False,
) -> tuple[float, float, float, float]:
    """BLEU-1..4 of a corpus, as pycocoevalcap's `Bleu(4).compute_score` (option 'closest')."""
    hyps, refs = _prepare(hypotheses, references, tokenized, "corpus_bleu")
    correct = [0] * MAX_N
    guess = [0] * MAX_N
    testlen = reflen = 0
    for hyp, image_refs in zip(hyps, refs, strict=True):
        c = len(hyp)
        max_counts: dict[tuple[str, ...], int] = {}
        for ref in image_refs:
            for gram, count in _ngrams(ref).items():
                if count > max_counts.get(gram, 0):
                    max_counts[gram] = count
        for gram, count in _ngrams(hyp).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        for k in range(MAX_N):
            guess[k] += max(0, c - k)
        testlen += c
        reflen += min((abs(len(ref) - c), len(ref)) for ref in image_refs)[1]
    bleus = []
    product = 1.0
    for k in range(MAX_N):
        product *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
        bleus.append(product ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        bleus = [b * penalty for b in bleus]
    return bleus[0], bleus[1], bleus[2], bleus[3]


def cider_d(
    hypotheses: Sequence[str] | Mapping[object, str | Sequence[str]],
    references: Sequence[Sequence[str]] | Mapping[object, Sequence[str]],
    *,
    tokenized: bool = False,
) -> float:
    """CIDEr-D of a corpus, as pycocoevalcap's `Cider().compute_score` (its first value)."""
    return cider_d_scores(hypotheses, references, tokenized=tokenized)[0]


def cider_d_scores(
    hypotheses: Sequence[str] | Mapping[object, str | Sequence[str]],
    references: Sequence[Sequence[str]] | Mapping[object, Sequence[str]],
    *,
    tokenized: bool = False,
) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-image CIDEr-D) as pycocoevalcap's `Cider().compute_score`.

    Per-image scores follow the image order: the lists' order, or the key order of `references`
    for dicts (pycocoevalcap's `gts`)."""
    hyps, refs = _prepare(hypotheses, references, tokenized, "cider_d")
    hyp_grams = [_ngrams(h) for h in hyps]
    ref_grams = [[_ngrams(r) for r in image_refs] for image_refs in refs]
    doc_freq: Counter = Counter()
    for image_refs in ref_grams:
        doc_freq.update({gram for grams in image_refs for gram in grams})
    log_images = math.log(float(len(refs)))

    def vector(grams: NGrams) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(MAX_N)]
        norm = [0.0] * MAX_N
        length = 0
        for gram, tf in grams.items():
            n = len(gram) - 1
            weight = float(tf) * (log_images - math.log(max(1.0, float(doc_freq.get(gram, 0)))))
            vec[n][gram] = weight
            norm[n] += weight**2
            if n == 1:  # pycocoevalcap counts the length in bigrams
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for grams, image_refs in zip(hyp_grams, ref_grams, strict=True):
        vec, norm, length = vector(grams)
        total = [0.0] * MAX_N
        for ref in image_refs:
            vec_ref, norm_ref, length_ref = vector(ref)
            delta = float(length - length_ref)
            penalty = math.e ** (-(delta**2) / (2 * SIGMA**2))
            for n in range(MAX_N):
                val = 0.0
                for gram, weight in vec[n].items():
                    r = vec_ref[n].get(gram, 0.0)
                    val += min(weight, r) * r
                if norm[n] != 0 and norm_ref[n] != 0:
                    val /= norm[n] * norm_ref[n]
                total[n] += val * penalty
        score = sum(total) / MAX_N
        score /= len(image_refs)
        score *= 10.0
        scores.append(score)
    return sum(scores) / len(scores), scores


# --- inputs -------------------------------------------------------------------------------------


def _ngrams(words: Tokens) -> NGrams:
    counts: Counter = Counter()
    for k in range(1, MAX_N + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _prepare(
    hypotheses, references, tokenized: bool, name: str
) -> tuple[list[Tokens], list[list[Tokens]]]:
    """Validated token lists in image order; every problem is a one-line ValueError."""
    if isinstance(hypotheses, Mapping) != isinstance(references, Mapping):
        raise ValueError(f"{name}: give hypotheses and references both as lists or both as dicts")
    if isinstance(hypotheses, Mapping):
        missing = [k for k in references if k not in hypotheses]
        extra = [k for k in hypotheses if k not in references]
        if missing or extra:
            raise ValueError(
                f"{name}: hypotheses and references have different image ids "
                f"(no hypothesis for {missing[:3]!r}, no references for {extra[:3]!r})"
            )
        keys = list(references)
        hyp_items = []
        for k in keys:
            h = hypotheses[k]
            if not isinstance(h, str):
                if isinstance(h, Sequence) and len(h) == 1:
                    h = h[0]
                elif isinstance(h, Sequence):
                    raise ValueError(f"{name}: image {k!r} has {len(h)} hypotheses, expected one")
            hyp_items.append((k, h))
        ref_items = [(k, references[k]) for k in keys]
    else:
        if isinstance(hypotheses, str) or isinstance(references, str):
            raise ValueError(f"{name}: hypotheses and references are lists, one item per image")
        hypotheses, references = list(hypotheses), list(references)
        if len(hypotheses) != len(references):
            raise ValueError(
                f"{name}: {len(hypotheses)} hypotheses but {len(references)} reference lists"
            )
        hyp_items = list(enumerate(hypotheses))
        ref_items = list(enumerate(references))
    if not hyp_items:
        raise ValueError(f"{name}: no images to score")
    split = str.split if tokenized else tokenize
    hyps = []
    for k, h in hyp_items:
        if not isinstance(h, str):
            raise ValueError(
                f"{name}: hypothesis of image {k!r} is {type(h).__name__}, not a string"
            )
        hyps.append(split(h))
    refs = []
    for k, rs in ref_items:
        if isinstance(rs, str) or not isinstance(rs, Sequence):
            raise ValueError(
                f"{name}: references of image {k!r} must be a list of strings, got {type(rs).__name__}"
            )
        if len(rs) == 0:
            raise ValueError(f"{name}: image {k!r} has no references")
        bad = [r for r in rs if not isinstance(r, str)]
        if bad:
            raise ValueError(
                f"{name}: a reference of image {k!r} is {type(bad[0]).__name__}, not a string"
            )
        refs.append([split(r) for r in rs])
    return hyps, refs
