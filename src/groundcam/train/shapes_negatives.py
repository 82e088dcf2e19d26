"""Which shapes phrases are certainly false for a scene, and attribute-swapped negatives.

Used for ITM negatives without boxes: a phrase is certainly false for a scene when the object it
names does not exist there (attribute phrases: no object of that colour and shape; relational
phrases: no object of the target's shape at all)."""

from __future__ import annotations

import numpy as np

from groundcam.data.sample import Phrase
from groundcam.data.shapes import COLOURS, SHAPES


def certainly_false(phrase: Phrase, objects: list[dict]) -> bool:
    m = phrase.meta
    if phrase.kind == "relation":
        return all(o["shape"] != m["shape"] for o in objects)
    return all((o["colour"], o["shape"]) != (m["colour"], m["shape"]) for o in objects)


def certainly_true(phrase: Phrase, objects: list[dict]) -> bool:
    """Attribute phrases without a size word hold wherever an object of that colour and shape is."""
    m = phrase.meta
    if phrase.kind == "relation" or m["size"] in phrase.text.split():
        return False
    return any((o["colour"], o["shape"]) == (m["colour"], m["shape"]) for o in objects)


def swap_negative(phrase: Phrase, objects: list[dict], rng: np.random.Generator) -> str:
    """The phrase with its target's colour or shape word replaced so that it names an object the
    scene does not hold (relational phrases: a shape absent from the scene)."""
    m = phrase.meta
    words = phrase.text.split(" ")
    present = {(o["colour"], o["shape"]) for o in objects}
    shapes_present = {o["shape"] for o in objects}
    options = []
    if phrase.kind == "relation":
        i = words.index(m["shape"])
        options = [(i, s) for s in SHAPES if s not in shapes_present]
    else:
        ci, si = words.index(m["colour"]), words.index(m["shape"])
        options = [(ci, c) for c in COLOURS if (c, m["shape"]) not in present]
        options += [(si, s) for s in SHAPES if (m["colour"], s) not in present]
    i, word = options[rng.integers(len(options))]
    return " ".join(words[:i] + [word] + words[i + 1 :])
