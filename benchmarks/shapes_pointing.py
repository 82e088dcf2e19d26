"""Pointing accuracy of a model on the shapes benchmark: every fusion layer, every method, test and
compositional splits, unique vs shared target colour, with the trivial baselines beside it.

    python benchmarks/shapes_pointing.py --model albef-tiny-shapes --scenes 500 --out bench.json

The figures in the built-in model cards come from this script.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import groundcam as gc
from groundcam.data.shapes import generate_scene
from groundcam.eval.pointing import PROTOCOLS
from groundcam.eval.shapes import shapes_records, summarize
from groundcam.train.shapes_negatives import swap_negative


def baselines(split: str, scenes: int, seed: int) -> dict:
    """Point at a random object's centre, or at the image centre (protocol amc)."""
    rng = np.random.default_rng(1234)
    hits = {"random object centre": [], "image centre": []}
    for i in range(scenes):
        s = generate_scene(split, i, seed)
        boxes = [o["box"] for o in s.meta["objects"]]
        for p in s.phrases:
            x1, y1, x2, y2 = boxes[rng.integers(len(boxes))]
            for name, (x, y) in {
                "random object centre": (int((x1 + x2) / 2), int((y1 + y2) / 2)),
                "image centre": (s.image_size[0] // 2, s.image_size[1] // 2),
            }.items():
                hits[name].append(PROTOCOLS["amc"].hit_rule(x, y, torch.tensor(p.boxes)))
    return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in hits.items()}


def matching(model, split: str, scenes: int, seed: int) -> dict:
    """ITM read by ranking: how often the true phrase outscores the same phrase with one
    attribute swapped to an object the scene lacks (a 0.5 threshold says little early on)."""
    rng = np.random.default_rng(99)
    wins = []
    for i in range(scenes):
        s = generate_scene(split, i, seed)
        negs = [swap_negative(p, s.meta["objects"], rng) for p in s.phrases]
        scores = model.scores(s.image, [p.text for p in s.phrases] + negs)
        n = len(s.phrases)
        wins += (scores[:n] > scores[n:]).tolist()
    return {"accuracy": float(np.mean(wins)), "n": len(wins)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="albef-tiny-shapes")
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = gc.load(args.model)
    adapter = model.adapter
    runs = [("attn-gradcam", layer) for layer in adapter.layers("cross_attention")]
    runs += [
        ("attention", adapter.default_layer("cross_attention", "itm")),
        ("gradcam", adapter.default_layer("tokens", "itm")),
        ("rollout", None),
    ]
    results: dict = {"model": args.model, "scenes": args.scenes, "seed": args.seed, "runs": []}
    print(
        f"{'split':<14}{'method':<14}{'layer':>6}{'acc':>8}{'n':>6}{'unique':>9}{'shared':>9}"
        f"{'relation':>10}"
    )
    for split in ("test", "compositional"):
        for method, layer in runs:
            t0 = time.time()
            s = summarize(list(shapes_records(model, split, args.scenes, method, layer, args.seed)))
            row = {
                "split": split,
                "method": method,
                "layer": layer,
                **s,
                "seconds": round(time.time() - t0, 1),
            }
            results["runs"].append(row)
            rel = s["by_kind"].get("relation", {"accuracy": float("nan")})["accuracy"]
            print(
                f"{split:<14}{method:<14}{str(layer):>6}{s['accuracy']:8.1%}{s['n']:6d}"
                f"{s['colour_unique']['accuracy']:9.1%}{s['colour_shared']['accuracy']:9.1%}"
                f"{rel:10.1%}",
                flush=True,
            )
        m = matching(model, split, args.scenes, args.seed)
        results["runs"].append({"split": split, "method": "itm ranking vs swapped phrase", **m})
        print(f"{split:<14}{'ITM ranking vs swapped phrase':<28}{m['accuracy']:8.1%}{m['n']:6d}")
        for name, b in baselines(split, args.scenes, args.seed).items():
            results["runs"].append({"split": split, "method": name, **b})
            print(f"{split:<14}{name:<28}{b['accuracy']:8.1%}{b['n']:6d}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
