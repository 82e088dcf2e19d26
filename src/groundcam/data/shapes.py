"""Synthetic coloured-shapes scenes with exact boxes, to train and score tiny grounding models."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw

from groundcam.data.masks import Rle, encode_mask
from groundcam.data.sample import Box, GroundingSample, Phrase

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 205, 20),
    "purple": (140, 50, 190),
    "orange": (250, 125, 10),
}
HELD_OUT_PAIRS = (
    ("red", "star"),
    ("green", "hexagon"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("purple", "diamond"),
    ("orange", "square"),
)
SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "compositional": 3}
SIZE_FRACTION = {"small": 0.14, "large": 0.24}
RELATIONS = ("left of", "right of", "above", "below")

# Tuned so that about half of all objects share their colour or shape with another object.
SHARE_PROB = 0.4
PLACEMENT_GAP = 2  # minimum empty pixels between two objects' boxes
PLACEMENT_TRIES = 200
RELATION_MARGIN = 0.1  # fraction of image_size the centres must differ by for a relation


def _check_split(split: str) -> None:
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLIT_IDS)}")


def _pick_attributes(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str, str]]:
    """(size, colour, shape) triples, unique in the scene; about half copy an earlier attribute."""
    compositional = split == "compositional"
    objs: list[tuple[str, str, str]] = []
    for k in range(n):
        if compositional and k == 0:
            colour, shape = HELD_OUT_PAIRS[rng.integers(len(HELD_OUT_PAIRS))]
            objs.append((SIZES[rng.integers(len(SIZES))], colour, shape))
            continue
        if k > 0 and rng.random() < SHARE_PROB:
            _, src_colour, src_shape = objs[rng.integers(k)]
            if rng.random() < 0.5:
                colours, shapes = [src_colour], list(SHAPES)
            else:
                colours, shapes = list(COLOURS), [src_shape]
        else:
            # Fresh colour and shape, so that sharing comes only from the deliberate copies.
            colours = [c for c in COLOURS if c not in {o[1] for o in objs}]
            shapes = [s for s in SHAPES if s not in {o[2] for o in objs}]
        options = [
            (z, c, s)
            for z in SIZES
            for c in colours
            for s in shapes
            if (compositional or (c, s) not in HELD_OUT_PAIRS) and (z, c, s) not in objs
        ]
        objs.append(options[rng.integers(len(options))])
    return objs


def _place(
    rng: np.random.Generator, sides: list[int], image_size: int
) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping squares of the given sides; None if they do not fit."""
    corners: list[tuple[int, int]] = []
    for side in sides:
        for _ in range(PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            if all(
                x >= px + ps + PLACEMENT_GAP
                or px >= x + side + PLACEMENT_GAP
                or y >= py + ps + PLACEMENT_GAP
                or py >= y + side + PLACEMENT_GAP
                for (px, py), ps in zip(corners, sides, strict=False)
            ):
                corners.append((x, y))
                break
        else:
            return None
    return corners


def _background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A pale, low-saturation tint with faint stripes and pixel noise, different in every scene."""
    base = rng.uniform(220, 242) + rng.uniform(-7, 7, size=3)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
    stripes = 3.0 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)
    noise = rng.normal(0, 3.0, size=(image_size, image_size, 3))
    pixels = base + stripes[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def shape_polygon(shape: str, x: int, y: int, side: int) -> list[tuple[float, float]]:
    """The outline of `shape` in the square with top-left (x, y), in PIL's pixel-centre
    coordinates; a circle as a 64-gon (it is drawn as an ellipse), for masks and tests."""
    r = (side - 1) / 2
    cx, cy = x + r, y + r
    if shape == "circle":
        points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(64) * np.pi / 32]
    elif shape == "square":
        points = [(x, y), (x + side - 1, y), (x + side - 1, y + side - 1), (x, y + side - 1)]
    elif shape == "triangle":
        points = [(cx, y), (x + side - 1, y + side - 1), (x, y + side - 1)]
    elif shape == "diamond":
        points = [(cx, y), (x + side - 1, cy), (cx, y + side - 1), (x, cy)]
    elif shape == "hexagon":
        points = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    elif shape == "star":
        cy += r * (1 - np.cos(np.pi / 5)) / 2  # a star's bottom points sit above its circle
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        points = [
            (cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles, strict=True)
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(float(px), float(py)) for px, py in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, **style) -> None:
    """Draw `shape` filling the square with top-left (x, y) and the given side."""
    if shape == "circle":
        draw.ellipse((x, y, x + side - 1, y + side - 1), **style)
    elif shape == "square":
        draw.rectangle((x, y, x + side - 1, y + side - 1), **style)
    else:
        draw.polygon(shape_polygon(shape, x, y, side), **style)


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _relation_holds(relation: str, target: Box, anchor: Box, margin: float) -> bool:
    """Whether target's centre is `relation` anchor's centre by more than `margin` pixels."""
    (tx, ty), (ax, ay) = _centre(target), _centre(anchor)
    offset = {"left of": ax - tx, "right of": tx - ax, "above": ay - ty, "below": ty - ay}
    return offset[relation] > margin


def _describe(objs: list[tuple[str, str, str]], i: int) -> str:
    """Shortest of "colour shape" / "size colour shape" that names object i alone."""
    size, colour, shape = objs[i]
    if sum(o[1:] == (colour, shape) for o in objs) == 1:
        return f"{colour} {shape}"
    return f"{size} {colour} {shape}"


def _relations(
    rng: np.random.Generator, objs: list[tuple[str, str, str]], boxes: list[Box], margin: float
) -> list[tuple[int, str, int]]:
    """All (target, relation, anchor) whose phrase "the {shape} {relation} the {anchor}" is
    unambiguous while "the {shape}" alone is not, shuffled."""
    found = []
    for t, (_, _, shape) in enumerate(objs):
        rivals = [j for j, o in enumerate(objs) if o[2] == shape and j != t]
        if not rivals:
            continue
        for a in range(len(objs)):
            for relation in RELATIONS:
                # Rivals must not satisfy the relation even loosely (margin 0) so the text is clear.
                if (
                    a != t
                    and _relation_holds(relation, boxes[t], boxes[a], margin)
                    and not any(_relation_holds(relation, boxes[j], boxes[a], 0) for j in rivals)
                ):
                    found.append((t, relation, a))
    return [found[i] for i in rng.permutation(len(found))]


def generate_scene(split: str, index: int, seed: int = 0, image_size: int = 128) -> GroundingSample:
    """Scene `index` of `split`: 2-5 coloured shapes with a caption and referring phrases."""
    _check_split(split)
    if image_size < 48:
        raise ValueError(f"image_size must be at least 48, got {image_size}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))
    n = int(rng.integers(2, 6))
    objs = _pick_attributes(rng, n, split)
    sides = [round(SIZE_FRACTION[o[0]] * image_size * rng.uniform(0.9, 1.1)) for o in objs]
    while (corners := _place(rng, sides, image_size)) is None:
        if len(objs) > 2:
            objs, sides = objs[:-1], sides[:-1]

    image = _background(rng, image_size)
    draw = ImageDraw.Draw(image)
    boxes: list[Box] = []
    masks: list[Rle] = []
    for (_, colour, shape), (x, y), side in zip(objs, corners, sides, strict=True):
        outline = tuple(int(v * 0.7) for v in RGB[colour])
        _draw_shape(draw, shape, x, y, side, fill=RGB[colour], outline=outline)
        mask = Image.new("L", image.size, 0)
        _draw_shape(ImageDraw.Draw(mask), shape, x, y, side, fill=255, outline=255)
        boxes.append(tuple(float(v) for v in mask.getbbox()))
        # The object's pixels as drawn: fill and outline differ so PIL draws the outline too.
        drawn = Image.new("L", image.size, 0)
        _draw_shape(ImageDraw.Draw(drawn), shape, x, y, side, fill=1, outline=2)
        masks.append(encode_mask(np.asarray(drawn) > 0))

    image_id = f"shapes-{split}-{seed}-{index}"

    def meta(t: int) -> dict:
        size, colour, shape = objs[t]
        others = [o for j, o in enumerate(objs) if j != t]
        return {
            "target": t,
            "colour": colour,
            "shape": shape,
            "size": size,
            "colour_shared": any(o[1] == colour for o in others),
            "shape_shared": any(o[2] == shape for o in others),
            "novel_pair": (colour, shape) in HELD_OUT_PAIRS,
        }

    # The compositional split only asks about objects whose colour-shape pair is held out.
    targets = [t for t, o in enumerate(objs) if split != "compositional" or o[1:] in HELD_OUT_PAIRS]
    entries = [(f"the {_describe(objs, t)}", t, "attribute", {}) for t in targets]
    used_targets: set[int] = set()
    for t, relation, a in _relations(rng, objs, boxes, RELATION_MARGIN * image_size):
        if t in targets and t not in used_targets and len(used_targets) < 2:
            used_targets.add(t)
            text = f"the {objs[t][2]} {relation} the {_describe(objs, a)}"
            entries.append((text, t, "relation", {"relation": relation, "anchor": a}))
    phrases = [
        Phrase(text, [boxes[t]], kind, f"{image_id}:{k}", {**meta(t), **extra}, [masks[t]])
        for k, (text, t, kind, extra) in enumerate(entries)
    ]

    items = [f"a {size} {colour} {shape}" for size, colour, shape in objs]
    caption = ", ".join(items[:-1]) + f" and {items[-1]}."
    objects = [
        {"shape": s, "colour": c, "size": z, "box": b, "mask": m}
        for (z, c, s), b, m in zip(objs, boxes, masks, strict=True)
    ]
    return GroundingSample(
        image_id=image_id,
        phrases=phrases,
        image_size=(image_size, image_size),
        image=image,
        caption=caption,
        split=split,
        meta={"objects": objects},
    )


def vocabulary() -> list[str]:
    """Every word captions and phrases can use, sorted, so tokenisers can be built up front."""
    words = {"a", "and", "the"} | set(SIZES) | set(COLOURS) | set(SHAPES)
    words |= {w for relation in RELATIONS for w in relation.split()}
    return sorted(words)


class ShapesDataset(torch.utils.data.Dataset):
    """The first `size` scenes of a split, as a map-style dataset for DataLoader or plain loops."""

    def __init__(self, split: str, size: int, seed: int = 0, image_size: int = 128) -> None:
        _check_split(split)
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> GroundingSample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        return generate_scene(self.split, index, self.seed, self.image_size)

    def __iter__(self) -> Iterator[GroundingSample]:
        return (self[i] for i in range(self.size))
