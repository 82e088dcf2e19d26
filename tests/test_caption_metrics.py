"""BLEU-1..4 and CIDEr-D against pycocoevalcap (when installed) and against hand-worked answers."""

from __future__ import annotations

import math
import random

import pytest

from groundcam.data.caption_text import normalize
from groundcam.eval.captions import cider_d, cider_d_scores, corpus_bleu

TINY, SMALL = 1e-15, 1e-9

# --- fixed caption sets (raw text: capitals, punctuation, unicode) ------------------------------

FLICKR_LIKE = (
    [
        "A dog runs across the grass.",
        "Two men are riding a subway train",
        "a woman waves",  # shorter than every reference
        "A little girl in a pink dress is climbing up the wooden stairs of a big house",  # longer
    ],
    [
        ["A brown dog is running through the grass .", "A dog runs on grass.", "Dog in a field"],
        [
            "Two men ride the subway .",
            "Men in a train .",
            "Two guys , a train .",
            "People commuting",
        ],
        ["A woman waves at a dog on the beach .", "A girl, her dog, and the sea."],
        ["A girl in pink climbs stairs .", "A child climbing the stairs of a house"],
    ],
)
EDGE_CASES = (
    [
        "the the the the the the",  # repeated n-grams beyond every clip count
        "",  # empty hypothesis
        "dog",  # one-word hypotheses
        "cat",
        "a man on a bike",  # single-reference image
        "Ein Mädchen läuft über die Straße",  # unicode
        "un garçon à vélo ☺ sur la rue",
        "一只猫 on a mat",
    ],
    [
        ["the cat is on the mat", "the the dog"],
        ["a man sleeps", "someone sleeping on a couch"],
        ["a dog", "dog"],
        ["a black dog", "a dog barks"],
        ["a man riding a bike down a hill"],
        ["Ein Mädchen rennt über die Straße", "ein Kind läuft"],
        ["un garçon à vélo", "Un enfant fait du vélo dans la rue"],
        ["一只猫 sits on a mat", "a cat on a mat"],
    ],
)
SETS = {"flickr_like": FLICKR_LIKE, "edge_cases": EDGE_CASES}


def _random_set(seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = "a b c d e f".split()
    n = rng.randint(2, 7)

    def sentence() -> str:
        return " ".join(rng.choices(words, k=rng.randint(0, 10)))

    hyps = [sentence() for _ in range(n)]
    refs = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(n)]
    refs[0][0] = "a b c"  # at least one reference has words (pycocoevalcap's CIDEr needs one)
    return hyps, refs


def _coco(hyps, refs):
    """The inputs as pycocoevalcap takes them: normalised text, `gts`/`res` dicts."""
    gts = {i: [normalize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [normalize(h)] for i, h in enumerate(hyps)}
    return gts, res


# --- equality with pycocoevalcap ----------------------------------------------------------------


@pytest.mark.parametrize("name", [*SETS, *(f"random{s}" for s in range(40))])
def test_equal_to_pycocoevalcap(name: str) -> None:
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    hyps, refs = SETS[name] if name in SETS else _random_set(int(name[6:]))
    gts, res = _coco(hyps, refs)

    expected_bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    got_bleu = corpus_bleu(hyps, refs)
    assert got_bleu == pytest.approx(tuple(expected_bleu), abs=1e-12, rel=0)

    expected_cider, expected_per_image = cider_mod.Cider().compute_score(gts, res)
    got_cider, got_per_image = cider_d_scores(hyps, refs)
    assert got_cider == pytest.approx(float(expected_cider), abs=1e-12, rel=0)
    assert got_per_image == pytest.approx(list(expected_per_image), abs=1e-12, rel=0)
    assert cider_d(hyps, refs) == got_cider


def test_equal_to_pycocoevalcap_per_subset() -> None:
    """Each edge case alone next to one ordinary image (so no other image hides it)."""
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    for hyp, rs in zip(*EDGE_CASES, strict=True):
        hyps, refs = [hyp, FLICKR_LIKE[0][0]], [rs, FLICKR_LIKE[1][0]]
        gts, res = _coco(hyps, refs)
        expected, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
        assert corpus_bleu(hyps, refs) == pytest.approx(tuple(expected), abs=1e-12, rel=0), hyp
        expected_cider, _ = cider_mod.Cider().compute_score(gts, res)
        assert cider_d(hyps, refs) == pytest.approx(float(expected_cider), abs=1e-12, rel=0), hyp


def test_dicts_keyed_like_pycocoevalcap() -> None:
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    hyps, refs = FLICKR_LIKE
    ids = ["img3", "img1", "img0", "img2"]
    gts = {i: [normalize(r) for r in rs] for i, rs in zip(ids, refs, strict=True)}
    res = {i: [normalize(h)] for i, h in reversed(list(zip(ids, hyps, strict=True)))}
    expected_bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, expected_per_image = cider_mod.Cider().compute_score(gts, res)
    # pycocoevalcap's own dicts (one-string lists, tokenised) and plain-string dicts of raw text
    assert corpus_bleu(res, gts, tokenized=True) == pytest.approx(tuple(expected_bleu), abs=1e-12)
    raw_hyps = {i: h for i, h in zip(ids, hyps, strict=True)}
    raw_refs = {i: rs for i, rs in zip(ids, refs, strict=True)}
    assert corpus_bleu(raw_hyps, raw_refs) == pytest.approx(tuple(expected_bleu), abs=1e-12)
    score, per_image = cider_d_scores(raw_hyps, raw_refs)  # in the order of the references' keys
    assert score == pytest.approx(float(expected_cider), abs=1e-12)
    assert per_image == pytest.approx(list(expected_per_image), abs=1e-12)


# --- known answers (no pycocoevalcap needed) ----------------------------------------------------


def test_bleu_identical_is_one_up_to_smoothing() -> None:
    # "a b c d e" against itself: matches = guesses = 5, 4, 3, 2 n-grams
    b = corpus_bleu(["A b, c d e."], [["a b c d e"]])
    p = [(m + TINY) / (m + SMALL) for m in (5, 4, 3, 2)]
    # pycocoevalcap's quirk: the length ratio (5 + 1e-15) / (5 + 1e-9) is just below 1, so even a
    # hypothesis as long as its reference pays a brevity penalty of exp(-2e-10)
    penalty = math.exp(1 - 1 / ((5 + TINY) / (5 + SMALL)))
    assert penalty < 1
    assert b[0] == p[0] * penalty
    assert b[3] == pytest.approx((p[0] * p[1] * p[2] * p[3]) ** 0.25 * penalty, abs=1e-15)
    assert all(1 - 1e-9 < x < 1 for x in b)


def test_bleu_clipping_worked_by_hand() -> None:
    # hyp "the the the the" (c = 4); refs "the cat" (2), "the the dog" (3); closest length 3 <= 4,
    # so no brevity penalty. Clip counts are the maxima over the references: "the" 2, "the the" 1.
    # 1-grams: 4 x "the" -> 2 matched of 4 | 2-grams: 3 x "the the" -> 1 of 3
    # 3-grams: 2 x "the the the" -> 0 of 2 | 4-grams: 0 of 1
    b1, b2, b3, b4 = corpus_bleu(["the the the the"], [["the cat", "the the dog"]])
    p1, p2, p3, p4 = (
        (2 + TINY) / (4 + SMALL),
        (1 + TINY) / (3 + SMALL),
        TINY / (2 + SMALL),
        TINY / (1 + SMALL),
    )
    assert (b1, b2) == (pytest.approx(0.5, abs=1e-9), pytest.approx(math.sqrt(1 / 6), abs=1e-9))
    assert b2 == pytest.approx((p1 * p2) ** 0.5, abs=1e-15)
    assert b3 == pytest.approx((p1 * p2 * p3) ** (1 / 3), rel=1e-12)  # ~4.4e-6: only the smoothing
    assert b4 == pytest.approx((p1 * p2 * p3 * p4) ** 0.25, rel=1e-12)


def test_bleu_closest_reference_length_and_brevity_penalty() -> None:
    # hyp of 2 words, refs of 3 and 5: closest is 3 > 2 -> penalty exp(1 - 3/2); every n-gram matches
    b1, b2, _, _ = corpus_bleu(["a cat"], [["a cat sat", "a cat sat down here"]])
    assert b1 == pytest.approx(math.exp(-0.5), abs=1e-9) and b2 == pytest.approx(
        math.exp(-0.5), abs=1e-9
    )
    # hyp of 4, refs of 3 and 5: a tie goes to the shorter (3), so no penalty
    assert corpus_bleu(["a b c d"], [["a b c", "a b c d e"]])[0] == pytest.approx(1, abs=1e-9)
    # an empty corpus of hypotheses: zero, no division by zero
    assert corpus_bleu(["", "..."], [["a b"], ["c"]]) == (0.0, 0.0, 0.0, 0.0)


def test_bleu_is_a_corpus_total_not_a_mean() -> None:
    # image 1: 2 of 2 unigrams; image 2: 0 of 4 -> 2/6, where a mean of per-image scores would be 1/2
    b1 = corpus_bleu(["a b", "x y z w"], [["a b"], ["p q r s"]])[0]
    assert b1 == pytest.approx(1 / 3, abs=1e-9)


def test_cider_worked_by_hand() -> None:
    # two images: 'a' vs ['a'] and 'b' vs ['c']. log corpus size = log 2; document frequencies
    # a: 1, c: 1 (b: none -> counted as 1), so every unigram weighs log 2 - log 1 = log 2.
    # image 1: unigram cosine 1, no n-grams of order 2..4 (0), equal lengths: (1+0+0+0)/4 * 10 = 2.5
    # image 2: 'b' is not in the reference: 0
    score, per_image = cider_d_scores(["a", "b"], [["a"], ["c"]])
    assert per_image == pytest.approx([2.5, 0.0], abs=1e-12) and score == pytest.approx(1.25)
    # clipping: 'a a' vs ['a']: unigram weights 2 log 2 (hyp) and log 2 (ref):
    # min(2l, l) * l / (2l * l) = 1/2 (unclipped it would be 1); bigram 'a a' is not in the ref: 0;
    # lengths (counted in bigrams, as pycocoevalcap does) 1 and 0 -> penalty exp(-1 / 72)
    per_image = cider_d_scores(["a a", "b"], [["a"], ["c"]])[1]
    assert per_image[0] == pytest.approx(0.5 / 4 * 10 * math.exp(-1 / 72), abs=1e-12)
    # mean over the references: a second, unrelated reference halves image 1
    per_image = cider_d_scores(["a", "b"], [["a", "d"], ["c"]])[1]
    assert per_image[0] == pytest.approx(1.25, abs=1e-12)


def test_cider_degenerate_corpora_are_zero() -> None:
    assert cider_d(["a b c"], [["a b c"]]) == 0.0  # one image: log 1 = 0 weighs everything 0
    assert cider_d(["a", "b"], [[""], ["..."]]) == 0.0  # no reference words (pycocoevalcap fails)
    assert cider_d(["", "b"], [["a"], ["b"]]) == pytest.approx(1.25)


def test_tokenized_flag() -> None:
    hyps, refs = FLICKR_LIKE
    norm_refs = [[normalize(r) for r in rs] for rs in refs]
    norm_hyps = [normalize(h) for h in hyps]
    assert corpus_bleu(hyps, refs) == corpus_bleu(norm_hyps, norm_refs, tokenized=True)
    assert cider_d(hyps, refs) == cider_d(norm_hyps, norm_refs, tokenized=True)
    # tokenized=True splits on whitespace only: "dog." and "dog" are different words there
    assert corpus_bleu(["a dog."], [["a dog"]], tokenized=True)[0] == pytest.approx(0.5, abs=1e-9)
    assert corpus_bleu(["a dog."], [["a dog"]])[0] == pytest.approx(1, abs=1e-9)


@pytest.mark.parametrize("fn", [corpus_bleu, cider_d, cider_d_scores])
def test_bad_inputs_are_one_line_value_errors(fn) -> None:
    cases = [
        ((["a"], [["a"], ["b"]]), "1 hypotheses but 2 reference lists"),
        ((["a", "b"], [["a"], []]), "image 1 has no references"),
        (([3], [["a"]]), "hypothesis of image 0 is int"),
        ((["a"], [["a", None]]), "a reference of image 0 is NoneType"),
        ((["a"], ["a"]), "references of image 0 must be a list of strings"),
        (({"x": "a"}, {"y": ["a"]}), "different image ids"),
        (({"x": "a"}, [["a"]]), "both as lists or both as dicts"),
        (({"x": ["a", "b"]}, {"x": ["a"]}), "image 'x' has 2 hypotheses"),
        (([], []), "no images"),
        (("a", [["a"]]), "one item per image"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            fn(*args)
        assert "\n" not in str(info.value)
