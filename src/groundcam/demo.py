"""`groundcam demo`: a few synthetic images explained with every method the model supports, one
HTML page of paper figures (`groundcam.viz.figures`). Phrase models (ALBEF, CLIP, ...) explain the
phrases of shapes scenes (one figure per scene and model: a row per phrase, a column per method);
captioning models caption the scenes and map each word; OCR models read rendered text lines and
map each character. Every map is scored by the pointing game and marked hit or miss. The default
page shows the AMC-trained built-in beside the model it was trained from."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from groundcam.api import load
from groundcam.data.shapes import generate_scene
from groundcam.errors import GroundcamWarning
from groundcam.eval.pointing import pointing_game
from groundcam.explainer import Explainer
from groundcam.viz.figures import (
    PAGE_ALPHA,
    PAGE_STYLE,
    Panel,
    compare_figure,
    figure_png,
    word_grid_figure,
)
from groundcam.viz.html import write_report
from groundcam.zoo import BUILTIN, ZOO

# Every method of the phrase families (ALBEF's; a test keeps them equal), in the page's order; a
# model's own default method comes first and is the badge.
DEMO_METHODS = ("attn-gradcam", "gradcam", "attention", "rollout", "relevance")
# the built-in captioning models shown under every phrase model, with what the page calls them
CAPTIONERS = {
    "captioner-tiny-shapes": "a show-attend-tell captioner",
    "vlm-tiny-shapes": "a tiny generative LLaVA",
}
LEAD, BASELINE = "albef-tiny-shapes-amc", "albef-tiny-shapes"  # the default page
OCR_FAMILIES = ("vision-encoder-decoder",)  # generating families that read text lines
SCORES = {"itm": "ITM match probability", "similarity": "the model's image-text similarity"}
LINE_HEIGHT = 48  # px at which the 32 x 128 text lines are shown beside their figures
FIGURE_DPI = 110  # the page's figures at their own size: 8 pt labels are 12 px high


@dataclass
class DemoResult:
    html: Path
    accuracy: dict[str, tuple[int, int]]  # method -> (hits, counted) of the model shown first
    seconds: float
    # the built-in captioning models shown beside: model -> method -> (hits, words)
    word_accuracy: dict[str, dict[str, tuple[int, int]]] | None = None
    unit: str = "phrases"  # what `accuracy` counts: phrases, words (captioners), tokens (OCR)
    baseline: str | None = None  # the model shown beside it (the default page)
    baseline_accuracy: dict[str, tuple[int, int]] | None = None
    model: str = ""  # the model shown first


def demo_methods(explainer: Explainer, target: str | None = None) -> list[str]:
    """The methods `explainer` defines for `target` (None: its default), its default first."""
    target = target or explainer.default_target
    first = explainer.default_method(target)
    ordered = [first, *(m for m in DEMO_METHODS if m != first)]
    return [m for m in ordered if _runs(explainer, m, target)]


def _runs(explainer: Explainer, method: str, target: str) -> bool:
    """Whether the model can explain `target` with `method` (the explainer's own check)."""
    try:
        explainer.resolve(method, None, target)
    except ValueError:
        return False
    return True


def run_demo(
    out: str | Path = "groundcam-demo",
    model: str | None = None,
    scenes: int = 4,
    split: str = "test",
    seed: int = 0,
    device: str | None = None,
) -> DemoResult:
    """Explain `scenes` synthetic images (text lines for OCR models) with every method `model`
    supports; write the figures (PNG, under figures/), index.html and summary.json to `out`. `model` None shows
    albef-tiny-shapes-amc beside albef-tiny-shapes, so the first page shows what AMC changes.
    `device` (e.g. "cuda") is where the models run (default: cpu)."""
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    name = LEAD if model is None else model
    explainer = load(name, device=device)  # a model that cannot load leaves no folder behind
    (out / "figures").mkdir(parents=True, exist_ok=True)
    sections: list[dict] = []
    intro, table, words, compared = "", None, None, None
    where = f"({split} split, seed {seed})"
    if "token" not in explainer.targets:
        unit = "phrases"
        models = {name: explainer}
        if model is None:
            models[BASELINE] = load(BASELINE, device=device)
        hits = _phrase_sections(models, out, sections, scenes, split, seed)
        accuracy = hits[name]
        badge = next(iter(accuracy))
        summary = {"model": name, "scenes": f"{scenes} {where}"}
        if model is None:
            compared = hits[BASELINE]
            summary["model"] = f"{LEAD}, beside {BASELINE}"
            intro = (
                f"{LEAD}: {BUILTIN[LEAD]['description']}. Every phrase is explained by both "
                "models with every method, each map marked hit (green dot) or miss (red cross) "
                "against the phrase's ground-truth box (white). Below them, "
                + " and ".join(f"{c}, {what}," for c, what in CAPTIONERS.items())
                + " caption each scene in their own words: a map per word, and the words that "
                "name one object scored against its box."
            )
            table = [["pointing accuracy", LEAD, BASELINE]]
            table += [[m, _rate(accuracy[m]), _rate(compared.get(m))] for m in accuracy]
        else:
            summary |= {f"pointing accuracy, {m}": _rate(hn) for m, hn in accuracy.items()}
        score = SCORES.get(explainer.default_target, "score")
        summary["score"] = f"{score}, beside each phrase; the first column is {badge}"
        words = {}
        for k, shown in enumerate(
            c for c in CAPTIONERS if (ZOO / c / "model.safetensors").is_file()
        ):
            folder = out / "figures" / (shown if k else "")
            folder.mkdir(parents=True, exist_ok=True)
            found = _caption_sections(
                load(shown, device=device), shown, folder, sections, scenes, split, seed
            )
            words[shown] = found
            summary |= {
                f"word pointing, {shown}, {m}": _rate(hn, "words") for m, hn in found.items()
            }
    elif explainer.family in OCR_FAMILIES:
        unit = "tokens"
        accuracy, chars = _line_sections(explainer, name, out, sections, scenes, split, seed)
        summary = {"model": name, "lines": f"{scenes} rendered text lines {where}"}
        summary["character accuracy"] = f"{chars:.1%}"
        summary |= {f"token pointing, {m}": _rate(hn, "tokens") for m, hn in accuracy.items()}
        summary["score"] = "token probability (white boxes = the glyphs of that character)"
    else:
        unit = "words"
        accuracy = _caption_sections(
            explainer, name, out / "figures", sections, scenes, split, seed
        )
        summary = {"model": name, "scenes": f"{scenes} {where}"}
        summary |= {f"word pointing, {m}": _rate(hn, "words") for m, hn in accuracy.items()}
        summary["score"] = "word probability (white box = the object the word names)"
    html = write_report(out / "index.html", "groundcam demo", summary, sections, intro, table)
    record: dict = {m: _json(hn) for m, hn in accuracy.items()}
    for m, hn in (compared or {}).items():
        record.setdefault(m, {})[BASELINE] = _json(hn)
    if unit == "tokens":
        record["char_accuracy"] = chars
    for shown, found in (words or {}).items():
        record[shown] = {m: _json(hn) for m, hn in found.items()}
    (out / "summary.json").write_text(json.dumps(record, indent=1))
    seconds = time.time() - t0
    baseline = BASELINE if compared is not None else None
    return DemoResult(html, accuracy, seconds, words, unit, baseline, compared, name)


def _rate(hits_n: tuple[int, int] | None, unit: str = "") -> str:
    """The rate as "50.0% (8/16 words)", or "n/a" when nothing was counted."""
    if not hits_n or not hits_n[1]:
        return "n/a"
    h, n = hits_n
    return f"{h / n:.1%} ({h}/{n}{' ' + unit if unit else ''})"


def _json(hits_n: tuple[int, int]) -> dict:
    """summary.json's entry for (hits, counted)."""
    h, n = hits_n
    return {"accuracy": h / n if n else None, "n": n}


def _save(fig, path: Path) -> bytes:
    """Write figure `fig` to `path` as PNG at `FIGURE_DPI`; the bytes go into the page as they
    are (one encoding)."""
    data = figure_png(fig, dpi=FIGURE_DPI, palette=True)
    path.write_bytes(data)
    return data


def _cell(data: bytes, labels: list[str]) -> dict:
    """A page cell showing a figure at its own size, captioned with its columns."""
    return {"label": "columns: " + ", ".join(labels), "image": data, "wide": True}


def _label(ex) -> str:
    """A map's caption: method, layer, and whether the text could change it."""
    label = f"{ex.method} (layer {ex.layer})" if ex.layer is not None else ex.method
    return label if ex.text_conditioned else label + " - image only"


def _phrase_sections(
    models: dict[str, Explainer], out: Path, sections: list, scenes: int, split: str, seed: int
) -> dict[str, dict[str, tuple[int, int]]]:
    """Each scene's phrases explained by each model with every method it supports, each map
    scored against the phrase's boxes: one figure per scene and model (a row per phrase with its
    score, the image then a column per method; the first model's in figures/, the others' in
    figures/<model>/). Returns the hits per model and method."""
    methods = {name: demo_methods(ex) for name, ex in models.items()}
    hits = {name: {m: [0, 0] for m in ms} for name, ms in methods.items()}
    folders = {name: out / "figures" / (name if i else "") for i, name in enumerate(models)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(scenes):
        sample = generate_scene(split, index, seed)
        image, size = sample.image, sample.image.size[::-1]
        texts = [p.text for p in sample.phrases]
        rows = []
        for name, explainer in models.items():
            with warnings.catch_warnings():
                # the figure marks image-only maps ("- image only"); no warning per scene
                warnings.filterwarnings(
                    "ignore", "method .* does not read the text", GroundcamWarning
                )
                results = {m: explainer.explain(image, texts, method=m) for m in methods[name]}
            panels = []
            for m, ex in results.items():
                scored = [
                    pointing_game(ex.maps[k], p.boxes, image_size=size)
                    for k, p in enumerate(sample.phrases)
                ]
                hits[name][m][0] += sum(r.hit for r in scored)
                hits[name][m][1] += len(scored)
                panels.append(Panel(_label(ex), list(ex.maps), results=scored))
            first = next(iter(results.values()))
            kind = first.score_kind.name if first.score_kind else "score"
            fig = compare_figure(
                image,
                texts,
                panels,
                row_notes=[f"{kind} {s:.3f}" for s in first.scores.tolist()],
                row_boxes=[p.boxes for p in sample.phrases],
                title=f"{name} · {sample.image_id}",
                style=PAGE_STYLE,
                alpha=PAGE_ALPHA,
            )
            data = _save(fig, folders[name] / f"scene{index}.png")
            cell = _cell(data, ["image"] + [p.label for p in panels])
            rows.append({"phrase": name, "score": None, "hit": None, "cells": [cell]})
        sections.append({"title": f"{sample.image_id}: {sample.caption}", "rows": rows})
    return {name: {m: (h, n) for m, (h, n) in by.items()} for name, by in hits.items()}


def _caption_sections(
    explainer: Explainer,
    name: str,
    folder: Path,
    sections: list,
    scenes: int,
    split: str,
    seed: int,
) -> dict[str, tuple[int, int]]:
    """Each scene captioned by a captioning model (or a generative VLM, with its default
    prompt): the per-word figure, then a figure of the object words (a row per word, a column
    per method the model supports), each map scored against the object the word names; the
    figures go to `folder`."""
    from groundcam.data.caption_text import tokenize
    from groundcam.data.shapes_captions import ground_generated
    from groundcam.eval.caption_pointing import word_maps

    methods = demo_methods(explainer, "token")
    hits = {m: [0, 0] for m in methods}
    for index in range(scenes):
        sample = generate_scene(split, index, seed)
        image, size = sample.image, sample.image.size[::-1]
        gens = {m: explainer.explain_generation(image, method=m) for m in methods}
        first = gens[methods[0]]
        fig = first.figure(style=PAGE_STYLE, alpha=PAGE_ALPHA)
        figure = _save(fig, folder / f"scene{index}_captioner_words.png")
        grid = {"label": f"{methods[0]} per word", "image": figure, "wide": True}
        rows = [{"phrase": "every word", "score": None, "hit": None, "cells": [grid]}]
        words, row_of = word_maps(first, explainer)
        found = ground_generated(sample, tokenize(first.text))
        grounded = [(i, boxes) for i, boxes in enumerate(found) if boxes and i in row_of]
        if grounded:
            panels = []
            for m, gen in gens.items():
                maps = [gen.maps[row_of[i]] for i, _ in grounded]
                scored = [
                    pointing_game(heat, boxes, image_size=size)
                    for heat, (_, boxes) in zip(maps, grounded, strict=True)
                ]
                hits[m][0] += sum(r.hit for r in scored)
                hits[m][1] += len(scored)
                panels.append(Panel(_label(gen), maps, results=scored))
            fig = compare_figure(
                image,
                [words[i] for i, _ in grounded],
                panels,
                row_notes=[f"p {float(first.scores[row_of[i]]):.2f}" for i, _ in grounded],
                row_boxes=[boxes for _, boxes in grounded],
                title=f"{name} · the object words of its caption",
                style=PAGE_STYLE,
                alpha=PAGE_ALPHA,
            )
            data = _save(fig, folder / f"scene{index}_captioner_objects.png")
            cell = _cell(data, ["image"] + [p.label for p in panels])
            rows.append({"phrase": "object words", "score": None, "hit": None, "cells": [cell]})
        title = f'{name} on {sample.image_id}: "{first.text}"'
        sections.append({"title": title, "rows": rows})
    return {m: (h, n) for m, (h, n) in hits.items()}


def _line_sections(
    explainer: Explainer, name: str, out: Path, sections: list, lines: int, split: str, seed: int
) -> tuple[dict[str, tuple[int, int]], float]:
    """Rendered text lines read by an OCR model: per method, a per-token figure, each generated
    token's map scored against the ink boxes of its character (a character the line lacks is a
    miss, as in `groundcam eval glyphs`). Returns the hits per method and the mean character
    accuracy."""
    from groundcam.data.glyphs import render_line
    from groundcam.eval.glyphs import char_accuracy, glyph_boxes

    methods = demo_methods(explainer, "token")
    hits = {m: [0, 0] for m in methods}
    total = 0.0
    for index in range(lines):
        sample = render_line(split, index, seed)
        image, size = sample.image, sample.image.size[::-1]
        rows, text = [], ""
        for m in methods:
            gen = explainer.explain_generation(image, method=m)
            text, labels, marks, line_hits = gen.text, [], [], 0
            for k, token_id in enumerate(gen.token_ids):
                char = explainer.decode([token_id])
                boxes = glyph_boxes(sample, char)
                r = pointing_game(gen.maps[k], boxes, image_size=size) if boxes else None
                hit = bool(r is not None and r.hit)
                line_hits += hit
                labels.append(f"{char!r} {'hit' if hit else 'miss'}" if boxes else f"{char!r} -")
                marks.append(
                    (boxes or None, None if r is None else r.point, hit if boxes else None)
                )
            hits[m][0] += line_hits
            hits[m][1] += len(labels)
            fig = word_grid_figure(
                image,
                gen.maps,
                labels,
                gen.scores.tolist(),
                text=text,
                subtitle=f"{name} · {_label(gen)}",
                marks=marks,
                style=PAGE_STYLE,
                alpha=PAGE_ALPHA,
            )
            data = _save(fig, out / "figures" / f"line{index}_{m}.png")
            head = f"{_label(gen)}: {line_hits}/{len(labels)} tokens on their glyphs"
            cell = {"label": "per token ('-': not in the line)", "image": data, "wide": True}
            rows.append({"phrase": head, "score": None, "hit": None, "cells": [cell]})
        accuracy = char_accuracy(text, sample.text)
        total += accuracy
        title = (
            f'{name} on line {index}: reads "{text}" (the line says "{sample.text}", '
            f"character accuracy {accuracy:.0%})"
        )
        sections.append({"title": title, "image": image, "rows": rows, "image_height": LINE_HEIGHT})
    return {m: (h, n) for m, (h, n) in hits.items()}, total / max(1, lines)
