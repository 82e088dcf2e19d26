"""Which method to trust: every built-in x every method it supports in one table (issue 19).

    python benchmarks/methods_table.py --scenes 100 --threads 1          # every built-in
    python benchmarks/methods_table.py --models vlm-tiny-shapes          # one model, merged in

Pointing (ALBEF: phrases on shapes scenes; captioner and VLM: the object words of their own
captions; TrOCR: every generated character on its glyphs) with 95% Wilson intervals, TAM's
Obj/Func/F1-IoU where words apply, deletion and insertion AUC, the cascading-randomisation sanity
verdict and the median CPU seconds per map. Rows for the models named are replaced in
benchmarks/results/methods_table.json, and the markdown table is rewritten from the whole JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import groundcam as gc
from groundcam.eval.methods_table import markdown, model_table

BUILTINS = (
    "albef-tiny-shapes-amc",
    "captioner-tiny-shapes",
    "trocr-tiny-glyphs",
    "vlm-tiny-shapes",
)
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(BUILTINS))
    ap.add_argument("--scenes", type=int, default=100, help="scenes (TrOCR: lines) per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faithfulness-scenes", type=int, default=20)
    ap.add_argument("--sanity-scenes", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    ap.add_argument("--max-new-tokens", type=int, default=40, help="captions' length limit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=RESULTS / "methods_table.json")
    ap.add_argument("--markdown", type=Path, default=RESULTS / "methods_table.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        row = model_table(
            gc.load(name),
            scenes=args.scenes,
            seed=args.seed,
            faith=args.faithfulness_scenes,
            sanity_scenes=args.sanity_scenes,
            steps=args.steps,
            max_new_tokens=args.max_new_tokens,
            log=lambda line: print(line, flush=True),
        )
        row["threads"] = args.threads
        # read again just before writing: another run may have merged its model meanwhile
        table = json.loads(args.json.read_text()) if args.json.is_file() else {"models": {}}
        table["models"][name] = row
        order = [m for m in BUILTINS if m in table["models"]]
        table["models"] = {
            m: table["models"][m] for m in order + sorted(set(table["models"]) - set(order))
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=1) + "\n")
        args.markdown.write_text(markdown(table))
        print(f"wrote {args.json} and {args.markdown}", flush=True)


if __name__ == "__main__":
    main()
