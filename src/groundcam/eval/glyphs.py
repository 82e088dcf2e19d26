"""Token pointing on rendered text lines: does a generated character's map peak on its glyph?"""

from __future__ import annotations

from collections.abc import Iterator

from groundcam.data.glyphs import GlyphSample, render_line
from groundcam.eval.pointing import pointing_game


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions and substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(prediction: str, target: str) -> float:
    """1 - edit_distance / len(target), floored at 0."""
    return max(0.0, 1.0 - edit_distance(prediction, target) / max(1, len(target)))


def glyph_boxes(sample: GlyphSample, char: str) -> list[tuple[float, float, float, float]]:
    """The ink boxes of every occurrence of `char` in the line (none: the line lacks it)."""
    return [b for c, b in zip(sample.text, sample.char_boxes, strict=True) if c == char]


def glyph_records(
    explainer,
    split: str,
    n_lines: int,
    method: str | None = None,
    layer: int | None = None,
    seed: int = 0,
) -> Iterator[dict]:
    """One record per generated character of the first `n_lines` lines of `split`. A token's
    glyph boxes are the ink boxes of every occurrence of that character in the true text; a
    token whose character is not in the text has no box and counts as a miss (`in_text` False).
    The peak is read on the map upsampled to the image (protocol `amc`). `method` is passed to
    `explain_generation` as given (None: the family's default method)."""
    for index in range(n_lines):
        sample = render_line(split, index, seed)
        gen = explainer.explain_generation(sample.image, method=method, layer=layer)
        size = (sample.image.height, sample.image.width)
        maps = gen.resize(size)
        for k, token_id in enumerate(gen.token_ids):
            char = explainer.decode([token_id])
            boxes = glyph_boxes(sample, char)
            hit, point = False, None
            if boxes:
                result = pointing_game(maps[k], boxes, protocol="amc")
                hit, point = result.hit, list(result.point)
            yield {
                "split": split,
                "index": index,
                "text": sample.text,
                "prediction": gen.text,
                "char_acc": char_accuracy(gen.text, sample.text),
                "k": k,
                "token": char,
                "in_text": bool(boxes),
                "hit": hit,
                "point": point,
                "score": float(gen.scores[k]),
                "layer": gen.layer,
            }


def summarize_glyphs(records: list[dict]) -> dict:
    """Token pointing accuracy (over all generated tokens, and over tokens whose character is in
    the text), and the character accuracy of the lines that produced tokens (None when empty)."""
    lines = {(r["split"], r["index"]): r["char_acc"] for r in records}
    in_text = [r for r in records if r["in_text"]]
    n = len(records)
    return {
        "token_pointing": sum(r["hit"] for r in records) / n if n else None,
        "n_tokens": n,
        "token_pointing_in_text": (
            sum(r["hit"] for r in in_text) / len(in_text) if in_text else None
        ),
        "n_tokens_in_text": len(in_text),
        "char_accuracy": sum(lines.values()) / len(lines) if lines else None,
        "n_lines": len(lines),
    }
