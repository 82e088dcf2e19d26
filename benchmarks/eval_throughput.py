"""Phrases/s of `groundcam eval flickr30k-entities` end to end (reading files, decoding images,
explaining, upsampling to image size, pointing, writing JSON lines), against the per-pair recipe
(one pair per forward and a full backward, model time only: no files, no pointing).

The data is a Flickr30k-Entities-format directory written from synthetic scenes (5 captions an
image, about 17 phrases an image, as Flickr30k Entities' 14.5); the model BLIP-ITM built from a
config with random weights (base: the size of Salesforce/blip-itm-base-coco), attn-gradcam on
text layer 8.

    python benchmarks/eval_throughput.py --device cuda --images 300 --out eval.json
    python benchmarks/eval_throughput.py --device cpu --size tiny --images 20 --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import BlipImageProcessorPil, BlipProcessor

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]

from batching import build, device_name, per_pair_recipe, sync  # noqa: E402
from flickr_like import write_flickr_like  # noqa: E402

import groundcam as gc  # noqa: E402
from groundcam.data.shapes import vocabulary  # noqa: E402
from groundcam.eval.datasets import open_units  # noqa: E402
from groundcam.eval.runner import EvalConfig, run_eval  # noqa: E402
from groundcam.train.tokenizer import word_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["base", "tiny"], default="base")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=448, help="side of the written images")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batch-images", default="1,8", help="images per forward, comma-separated")
    ap.add_argument("--baseline-pairs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="print where the last run's time went")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args.size, device)
    side = model.config.vision_config.image_size
    tokenizer = word_tokenizer(vocabulary())
    processor = BlipProcessor(
        BlipImageProcessorPil(size={"height": side, "width": side}), tokenizer
    )
    explainer = gc.load(model, processor=processor)
    layer = 8 if args.size == "base" else 0
    report: dict = {
        "config": vars(args) | {"out": str(args.out), "layer": layer},
        "device": device_name(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = write_flickr_like(
            Path(tmp) / "f30k", args.images, captions=5, image_size=args.image_size
        )
        units = open_units("flickr30k-entities", ["test"], root)
        phrases = sum(len(u.sample.phrases) for u in units.units)
        report["phrases"], report["images"] = phrases, len(units)
        runs = [
            (p, int(b)) for b in args.batch_images.split(",") for p in args.precisions.split(",")
        ]
        for precision, batch in runs:
            name = f"{precision}_batch{batch}"
            cfg = EvalConfig(
                "flickr30k-entities",
                ("test",),
                "blip-random",
                layer=layer,
                precision=precision,
                batch_images=batch,
            )
            warm = open_units("flickr30k-entities", ["test"], root, limit=batch)
            run_eval(cfg, warm, explainer, Path(tmp) / f"warm-{name}", progress=False)
            sync(device)
            profiler = (
                cProfile.Profile() if args.profile and (precision, batch) == runs[-1] else None
            )
            start = time.perf_counter()
            if profiler:
                profiler.enable()
            result = run_eval(cfg, units, explainer, Path(tmp) / name, progress=False)
            sync(device)
            seconds = time.perf_counter() - start
            if profiler:
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            report["runs"][name] = {
                "seconds": seconds,
                "phrases_per_s": phrases / seconds,
                "accuracy": result.summary["accuracy"],
            }
            print(
                f"eval {name}: {phrases} phrases in {seconds:.1f} s = "
                f"{phrases / seconds:.1f} phrases/s",
                flush=True,
            )

        # the per-pair recipe on the first image's phrases, repeated to baseline-pairs pairs
        unit = units.units[0]
        texts = [p.text for p in unit.sample.phrases]
        pv = explainer.adapter.prepare_images([unit.sample.load_image()])
        ids, mask = explainer.adapter.prepare_texts(texts)
        reps = max(1, args.baseline_pairs // len(texts))
        pv = pv.repeat(reps, 1, 1, 1)
        per_pair_recipe(model, pv[:1], ids[:1], mask[:1], layer, device, "fp32")  # warm-up
        sync(device)
        start = time.perf_counter()
        per_pair_recipe(model, pv, ids, mask, layer, device, "fp32")
        sync(device)
        seconds = time.perf_counter() - start
        pairs = reps * len(texts)
        report["runs"]["per_pair_fp32_model_only"] = {
            "seconds": seconds,
            "phrases_per_s": pairs / seconds,
            "pairs": pairs,
        }
        print(f"per-pair recipe fp32 (model only): {pairs / seconds:.1f} pairs/s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
