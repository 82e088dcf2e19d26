"""The SCAN card's figures on freshly generated shapes scenes: phrase pointing (`amc` rule) of each
method, how often a proposal covers the phrase's object, and caption retrieval R@1/5/10 among the
scenes (one caption per scene, so i2t and t2i ranks are the rank of the one true partner).

    python benchmarks/scan_shapes.py --model scan-tiny-shapes --scenes 200 --seed 0 \
        --out benchmarks/results/scan_shapes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import groundcam as gc
from groundcam.data.shapes import generate_scene
from groundcam.eval.shapes import shapes_records, summarize


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def recalls(sim: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Square [images, captions] similarities, caption i of image i: R@K both ways and rsum."""
    truth = torch.arange(sim.shape[0])
    rank_i2t = (sim > sim[truth, truth][:, None]).sum(1)  # captions scored above the true one
    rank_t2i = (sim > sim[truth, truth][None, :]).sum(0)
    out = {f"i2t_r{k}": round(100 * float((rank_i2t < k).float().mean()), 1) for k in ks}
    out |= {f"t2i_r{k}": round(100 * float((rank_t2i < k).float().mean()), 1) for k in ks}
    out["rsum"] = round(sum(out.values()), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="scan-tiny-shapes")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", default="test,compositional")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    explainer = gc.load(a.model)
    scan = explainer.adapter.model
    result = {"model": a.model, "scenes": a.scenes, "seed": a.seed, "splits": {}}
    for split in a.splits.split(","):
        t0 = time.time()
        block = {}
        for method in ("attention", "attn-gradcam", "gradcam"):
            s = summarize(list(shapes_records(explainer, split, a.scenes, method, None, a.seed)))
            block[method] = {
                "accuracy": round(100 * s["accuracy"], 1),
                "n": s["n"],
                "by_kind": {k: round(100 * v["accuracy"], 1) for k, v in s["by_kind"].items()},
            }
        scenes = [generate_scene(split, i, a.seed) for i in range(a.scenes)]
        pixels = scan.preprocess([s.image for s in scenes])
        boxes = scan.propose_boxes(pixels) * 128
        covered = [
            max(iou(p.boxes[0], b.tolist()) for b in boxes[i]) >= 0.5
            for i, s in enumerate(scenes)
            for p in s.phrases
        ]
        block["proposal_recall_iou50"] = round(100 * sum(covered) / len(covered), 1)
        with torch.no_grad():
            ids, lengths = scan.encode_texts([s.caption for s in scenes])
            sim = scan.score_matrix(
                scan.encode_regions(pixels, boxes / 128), scan.encode_words(ids, lengths), lengths
            )
        block["retrieval"] = recalls(sim)
        block["seconds"] = round(time.time() - t0, 1)
        result["splits"][split] = block
        print(split, json.dumps(block), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
