"""`groundcam demo`: a few shapes scenes, every phrase explained with every method, one HTML page."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from groundcam.api import load
from groundcam.data.shapes import generate_scene
from groundcam.eval.pointing import pointing_game
from groundcam.viz.html import write_report
from groundcam.zoo import BUILTIN, ZOO

# Every method of groundcam.methods.METHODS (a test keeps them equal); the first is the badge.
DEMO_METHODS = ("attn-gradcam", "gradcam", "attention", "rollout", "relevance")
CAPTIONER = "captioner-tiny-shapes"
CAPTIONER_METHODS = ("attention", "gradcam")  # the first is the badge


@dataclass
class DemoResult:
    html: Path
    accuracy: dict[str, tuple[int, int]]  # method -> (hits, phrases)
    seconds: float
    word_accuracy: dict[str, tuple[int, int]] | None = None  # captioner: method -> (hits, words)


def run_demo(
    out: str | Path = "groundcam-demo",
    model: str = "albef-tiny-shapes",
    scenes: int = 4,
    split: str = "test",
    seed: int = 0,
    device: str | None = None,
) -> DemoResult:
    """Explain every phrase of `scenes` shapes scenes with every method; write PNGs + index.html.
    `device` (e.g. "cuda") is where the model runs (default: cpu)."""
    t0 = time.time()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    explainer = load(model, device=device)
    hits = {m: [0, 0] for m in DEMO_METHODS}
    sections = []
    for index in range(scenes):
        sample = generate_scene(split, index, seed)
        image = sample.image
        texts = [p.text for p in sample.phrases]
        results = {m: explainer.explain(image, texts, method=m) for m in DEMO_METHODS}
        rows = []
        for k, phrase in enumerate(sample.phrases):
            cells, row_hit = [], None
            for m, ex in results.items():
                r = pointing_game(ex.maps[k], phrase.boxes, image_size=image.size[::-1])
                hits[m][0] += r.hit
                hits[m][1] += 1
                row_hit = r.hit if m == DEMO_METHODS[0] else row_hit
                picture = ex.overlay(k, boxes=phrase.boxes, point=r.point, hit=r.hit)
                picture.save(out / "overlays" / f"scene{index}_phrase{k}_{m}.png")
                label = f"{m} (layer {ex.layer})" if ex.layer is not None else m
                if not ex.text_conditioned:
                    label += " - image only"
                cells.append({"label": f"{label}: {'hit' if r.hit else 'miss'}", "image": picture})
            score = float(results[DEMO_METHODS[0]].scores[k])
            rows.append({"phrase": phrase.text, "score": score, "hit": row_hit, "cells": cells})
        sections.append(
            {"title": f"{sample.image_id}: {sample.caption}", "image": image, "rows": rows}
        )
    accuracy = {m: (h, n) for m, (h, n) in hits.items()}
    summary = {"model": model, "scenes": f"{scenes} ({split} split, seed {seed})"}
    summary |= {
        f"pointing accuracy, {m}": f"{h / n:.1%} ({h}/{n})" for m, (h, n) in accuracy.items()
    }
    summary["score"] = "ITM match probability; badge = attn-gradcam hit (green box = ground truth)"
    words = None
    if CAPTIONER in BUILTIN and (ZOO / CAPTIONER / "model.safetensors").is_file():
        words = _captioner_sections(out, sections, scenes, split, seed, device)
        summary |= {
            f"word pointing, {CAPTIONER}, {m}": f"{h / n:.1%} ({h}/{n} words)" if n else "n/a"
            for m, (h, n) in words.items()
        }
    html = write_report(out / "index.html", "groundcam demo", summary, sections)
    table: dict = {m: {"accuracy": h / n, "n": n} for m, (h, n) in accuracy.items()}
    if words is not None:
        table[CAPTIONER] = {
            m: {"accuracy": h / n if n else None, "n": n} for m, (h, n) in words.items()
        }
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    return DemoResult(html, accuracy, time.time() - t0, words)


def _captioner_sections(out: Path, sections: list, scenes: int, split: str, seed: int, device):
    """Each scene captioned by the built-in attention captioner: the per-word figure, then per
    object word its `attention` and `gradcam` maps scored against the object it names."""
    from groundcam.data.caption_text import tokenize
    from groundcam.data.shapes_captions import ground_generated
    from groundcam.eval.caption_pointing import word_maps

    explainer = load(CAPTIONER, device=device)
    hits = {m: [0, 0] for m in CAPTIONER_METHODS}
    for index in range(scenes):
        sample = generate_scene(split, index, seed)
        image = sample.image
        gens = {m: explainer.explain_generation(image, method=m) for m in CAPTIONER_METHODS}
        first = gens[CAPTIONER_METHODS[0]]
        figure = first.grid()
        figure.save(out / "overlays" / f"scene{index}_captioner_words.png")
        rows = [{"phrase": "every word", "score": None, "hit": None,
                 "cells": [{"label": "attention per word", "image": figure}]}]  # fmt: skip
        words, row_of = word_maps(first, explainer)
        for i, boxes in enumerate(ground_generated(sample, tokenize(first.text))):
            if not boxes or i not in row_of:
                continue
            k, cells, badge = row_of[i], [], None
            for m, gen in gens.items():
                r = pointing_game(gen.maps[k], boxes, image_size=image.size[::-1])
                hits[m][0] += r.hit
                hits[m][1] += 1
                badge = r.hit if badge is None else badge
                picture = gen.overlay(k, boxes=boxes, point=r.point, hit=r.hit)
                picture.save(out / "overlays" / f"scene{index}_word{i}_{m}.png")
                cells.append({"label": f"{m}: {'hit' if r.hit else 'miss'}", "image": picture})
            rows.append({"phrase": words[i], "score": float(first.scores[k]), "hit": badge,
                         "cells": cells})  # fmt: skip
        sections.append(
            {
                "title": f'{CAPTIONER} on {sample.image_id}: "{first.text}"',
                "image": image,
                "rows": rows,
            }  # fmt: skip
        )
    return {m: (h, n) for m, (h, n) in hits.items()}
