"""The captioner's card figures: BLEU-4 and CIDEr-D of its greedy captions and word pointing for
`attention` and `gradcam` on freshly generated shapes scenes (`test` and `compositional`), with
the chance and image-centre baselines of the same words.

    python benchmarks/captioner_shapes.py --model captioner-tiny-shapes --scenes 500 --seed 0 \
        --out benchmarks/results/captioner_shapes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import groundcam as gc
from groundcam.eval.caption_pointing import caption_records, shapes_samples, summarize_captions


def by_kind(per_word: dict) -> dict:
    """Colour words and shape words apart (from the per-word blocks)."""
    from groundcam.data.shapes import COLOURS, SHAPES
    from groundcam.eval.summary import accuracy_block

    out = {}
    for kind, words in (("colour", COLOURS), ("shape", SHAPES)):
        hits = sum(per_word[w]["hits"] for w in words if w in per_word)
        n = sum(per_word[w]["n"] for w in words if w in per_word)
        out[kind] = accuracy_block(hits, n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="captioner-tiny-shapes")
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0, help="scene seed (0: the card's scenes)")
    ap.add_argument("--splits", default="test,compositional")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    explainer = gc.load(args.model)
    table: dict = {"model": args.model, "scenes": args.scenes, "seed": args.seed}
    for split in args.splits.split(","):
        for method in ("attention", "gradcam"):
            t0 = time.time()
            samples = shapes_samples(split, args.scenes, args.seed)
            s = summarize_captions(list(caption_records(explainer, samples, method=method)))
            s["seconds"] = round(time.time() - t0, 1)
            table[f"{split}/{method}"] = s
            for key in ("reference_word_pointing", "generated_word_pointing"):
                b = s[key]
                b["by_kind"] = by_kind(b["per_word"])
                lo, hi = b["ci95"]
                print(
                    f"{split:>13} {method:>9} {key.split('_')[0]:>9}: {b['accuracy']:.1%} "
                    f"[{lo:.1%}-{hi:.1%}] n={b['n']} (chance {b['chance']:.1%}, centre "
                    f"{b['centre']:.1%})",
                    flush=True,
                )
                for kind, k in b["by_kind"].items():
                    print(f"{'':>34}{kind}: {k['accuracy']:.1%} n={k['n']}", flush=True)
        c = table[f"{split}/attention"]["captions"]
        print(f"{split:>13} BLEU-4 {c['bleu4']:.3f} CIDEr-D {c['cider_d']:.3f}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
