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

# Every method of groundcam.methods.METHODS (a test keeps them equal); the first is the badge.
DEMO_METHODS = ("attn-gradcam", "gradcam", "attention", "rollout", "relevance")


@dataclass
class DemoResult:
    html: Path
    accuracy: dict[str, tuple[int, int]]  # method -> (hits, phrases)
    seconds: float


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
    html = write_report(out / "index.html", "groundcam demo", summary, sections)
    (out / "summary.json").write_text(
        json.dumps({m: {"accuracy": h / n, "n": n} for m, (h, n) in accuracy.items()}, indent=1)
    )
    return DemoResult(html, accuracy, time.time() - t0)
