"""Before / control / AMC on the shapes benchmark: pointing accuracy (protocol amc) of several
models at one method and layer, on `test` and `compositional`, overall and for attribute and
relational phrases, with Wilson 95% intervals.

    python benchmarks/amc_shapes.py --models albef-tiny-shapes runs/control/model runs/amc/model \
        --names before control amc --scenes 500 --out amc_shapes.json

The table in the albef-tiny-shapes-amc model card comes from this script.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import groundcam as gc
from groundcam.eval.shapes import shapes_records
from groundcam.eval.summary import wilson_interval


def block(records: list[dict]) -> dict:
    hits, n = sum(bool(r["hit"]) for r in records), len(records)
    lo, hi = wilson_interval(hits, n) or (None, None)
    return {"accuracy": hits / n if n else None, "hits": hits, "n": n, "ci95": [lo, hi]}


def evaluate(model: str, method: str, layer: int, split: str, scenes: int, seed: int) -> dict:
    explainer = gc.load(model)
    records = list(shapes_records(explainer, split, scenes, method, layer, seed))
    return {
        "all": block(records),
        "attribute": block([r for r in records if r["kind"] == "attribute"]),
        "relation": block([r for r in records if r["kind"] == "relation"]),
        "colour_shared": block([r for r in records if r["colour_shared"]]),
    }


def pct(b: dict) -> str:
    lo, hi = b["ci95"]
    return f"{100 * b['accuracy']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--names", nargs="+", default=None)
    ap.add_argument("--method", default="attn-gradcam")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--splits", nargs="+", default=["test", "compositional"])
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.names or args.models
    result = {"method": args.method, "layer": args.layer, "scenes": args.scenes, "models": {}}
    t0 = time.time()
    for name, model in zip(names, args.models, strict=True):
        result["models"][name] = {"path": model}
        for split in args.splits:
            r = evaluate(model, args.method, args.layer, split, args.scenes, args.seed)
            result["models"][name][split] = r
            print(
                f"{name:>10} {split:>13}: all {pct(r['all'])}  attribute {pct(r['attribute'])}"
                f"  relation {pct(r['relation'])}  (n={r['all']['n']})",
                flush=True,
            )
    result["seconds"] = round(time.time() - t0, 1)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
