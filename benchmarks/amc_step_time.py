"""Training step time of `groundcam train amc` with and without the AMC term: the term adds a
differentiable attn-gradcam (one more forward of the positives and a double backward through the
layers after the recorded one), which should cost well under 2x a plain ITC + ITM step.

    python benchmarks/amc_step_time.py --model albef-tiny --batch 32 --steps 5
    python benchmarks/amc_step_time.py --model blip-base --batch 4 --steps 3 --out amc_blip.json

`albef-tiny` is the built-in albef-tiny-shapes on shapes scenes (all phrases of each scene);
`blip-base` is BlipForImageTextRetrieval at its default (base) size, random weights, on
(scene, phrase) pairs, the map read at text layer 8. Each step is data, losses, backward and an
AdamW step; the first step is a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from groundcam.train.amc import AMCConfig, AMCTrainer, build


def blip_base(tmp: Path) -> str:
    """A base-size BlipForImageTextRetrieval (random weights) saved with a word tokenizer."""
    from transformers import (
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    from groundcam.data.shapes import vocabulary
    from groundcam.train.tokenizer import word_tokenizer

    tok = word_tokenizer(vocabulary())
    cfg = BlipConfig()  # ViT-B/16 at 384 px, BERT-base text encoder with cross-attention
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval._from_config(cfg, attn_implementation="eager")
    size = cfg.vision_config.image_size
    processor = BlipProcessor(BlipImageProcessor(size={"height": size, "width": size}), tok)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return str(tmp)


def time_steps(trainer: AMCTrainer, steps: int, device: torch.device) -> tuple[float, dict]:
    """Mean seconds per step over `steps` timed steps (after one warm-up) and the last terms."""
    model = trainer.model.to(device).train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times, terms = [], {}
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = trainer.batch(step, 0, 0, 1)
        terms = trainer.losses(model, batch, step)
        terms["loss"].backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times), {k: float(v.detach()) for k, v in terms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["albef-tiny", "blip-base"], default="albef-tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = Path("/tmp/groundcam-amc-bench")
    model = "albef-tiny-shapes"
    layer = args.layer
    if args.model == "blip-base":
        model = blip_base(tmp)
        layer = 8 if layer is None else layer
    result = {"model": args.model, "batch": args.batch, "device": str(device)}
    for amc in (False, True):
        cfg = AMCConfig(
            out="/tmp/unused",
            model=model,
            batch_size=args.batch,
            layer=layer,
            amc=amc,
            pool=max(64, args.batch * (args.steps + 1)),
        )
        trainer = build(cfg, device=device)
        seconds, terms = time_steps(trainer, args.steps, device)
        name = "amc" if amc else "plain"
        result[name] = {"s_per_step": round(seconds, 4), "terms": terms, "layer": trainer.layer}
        print(f"{name:>6}: {seconds:.3f} s/step ({args.model}, batch {args.batch}, {device})")
    ratio = result["amc"]["s_per_step"] / result["plain"]["s_per_step"]
    result["amc_over_plain"] = round(ratio, 3)
    result |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"AMC step / plain step: {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
