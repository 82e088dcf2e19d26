"""Pairs per second for attention Grad-CAM on BLIP-ITM, three ways in one run:

1. per pair: one (image, phrase) per forward and a full `backward()`, gradients read with
   `retain_grad` on the cross-attention probabilities of text layer 8 (the recipe of ALBEF's
   Grounding.py and LAVIS's `compute_gradcam`, written here with plain hooks);
2. batched: groundcam's path, `explain_tensors` over many images x phrases (each image encoded
   once, `autograd.grad` only back to the recorded layer);
3. forward only: ITM scores of the same batch (the floor an explanation can approach).

The model is built from a config with random weights (base: ViT-B/16 @384 + BERT-base with
cross-attention, the size of Salesforce/blip-itm-base-coco; tiny: for a quick smoke run).

    python benchmarks/batching.py --device cuda --dtype bf16 --out bench.json
    python benchmarks/batching.py --device cpu --images 2 --phrases 4 --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import autocast, device_name, sync  # benchmarks/ is on sys.path
from transformers import BlipConfig, BlipForImageTextRetrieval

import groundcam as gc

SIZES = {
    "base": dict(
        text=dict(num_attention_heads=12),  # BERT-base: 768 wide, 12 layers, 12 heads
        vision=dict(image_size=384, patch_size=16),  # ViT-B/16: 768 wide, 12 layers, 12 heads
    ),
    "tiny": dict(
        text=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        vision=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=64,
            patch_size=16,
        ),
    ),
}


def build(size: str, device: torch.device) -> BlipForImageTextRetrieval:
    """BLIP-ITM with random weights, eager attention, eval mode."""
    sizes = SIZES[size]
    vision = dict(sizes["vision"], initializer_range=0.02)  # BLIP's 1e-10 default gives ~0 maps
    cfg = BlipConfig(text_config=dict(sizes["text"]), vision_config=vision)
    model = BlipForImageTextRetrieval._from_config(cfg, attn_implementation="eager")
    return model.to(device).eval()


def inputs(model, images: int, phrases: int, device: torch.device, seed: int):
    """Random images, and random phrases of 3-10 word pieces between [CLS] and [SEP], padded."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pv = torch.randn(images, 3, size, size, generator=g)
    vocab = model.config.text_config.vocab_size
    low = min(1000, vocab // 2)
    lengths = torch.randint(3, 11, (phrases,), generator=g).tolist()
    ids = torch.zeros(phrases, max(lengths) + 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for p, n in enumerate(lengths):
        ids[p, 0], ids[p, n + 1] = 101 % vocab, 102 % vocab
        ids[p, 1 : n + 1] = torch.randint(low, vocab - 2, (n,), generator=g)
        mask[p, : n + 2] = 1
    return pv.to(device), ids.to(device), mask.to(device)


def image_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + 1


def per_pair_recipe(model, pv, ids, mask, layer: int, device, dtype: str) -> torch.Tensor:
    """One pair per forward; retain_grad on the hooked cross-attention probabilities; a full
    backward of the match logit; relu(grad) * attn on the patch columns, times the text mask,
    head mean, then the mean over every (padded) token position. Maps [I*P, N] on the CPU."""
    kept = {}

    def keep(module, args, output):
        output[1].retain_grad()
        kept["probs"] = output[1]

    attention = model.text_encoder.encoder.layer[layer].crossattention.self
    handle = attention.register_forward_hook(keep)
    maps = []
    try:
        for i in range(pv.shape[0]):
            for p in range(ids.shape[0]):
                with autocast(device, dtype):
                    # the model's own ITM forward (BlipForImageTextRetrieval.forward), spelled
                    # out so that the image mask is created on the right device
                    image = model.vision_model(pixel_values=pv[i : i + 1]).last_hidden_state
                    text = model.text_encoder(
                        input_ids=ids[p : p + 1],
                        attention_mask=mask[p : p + 1],
                        encoder_hidden_states=image,
                        encoder_attention_mask=torch.ones(
                            image.shape[:2], dtype=torch.long, device=device
                        ),
                    ).last_hidden_state
                    logit = model.itm_head(text[:, 0])[:, 1]
                model.zero_grad(set_to_none=True)
                logit.sum().backward()
                probs, grad = kept["probs"], kept["probs"].grad
                m = mask[p : p + 1, None, :, None].to(probs.dtype)
                cam = grad[..., 1:].clamp(min=0) * probs[..., 1:] * m
                maps.append(cam.mean(1).mean(1).float().detach().cpu())
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return torch.cat(maps)


def timed(fn, device, repeats: int, warmup: int = 1):
    """fn's result and its wall times (seconds) over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return out, times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--phrases", type=int, default=8, help="phrases per image")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument(
        "--baseline-dtype",
        choices=["fp32", "bf16"],
        default=None,
        help="dtype of the per-pair recipe (default: --dtype; the published recipe runs fp32)",
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="base")
    ap.add_argument("--layer", type=int, default=None, help="text layer (default 8; tiny: 0)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_dtype = args.baseline_dtype or args.dtype
    torch.manual_seed(args.seed)
    model = build(args.size, device)
    layer = args.layer if args.layer is not None else (8 if args.size == "base" else 0)
    pv, ids, mask = inputs(model, args.images, args.phrases, device, args.seed)
    pairs = args.images * args.phrases
    all_ids, all_mask = ids.repeat(args.images, 1), mask.repeat(args.images, 1)
    index = torch.arange(args.images, device=device).repeat_interleave(args.phrases)
    explainer = gc.load(model)

    def batched():
        with autocast(device, args.dtype):
            ex = explainer.explain_tensors(
                pv, all_ids, all_mask, "attn-gradcam", layer=layer, image_index=index
            )
        return ex.raw_maps.flatten(1)

    def forward_only():
        with torch.no_grad(), autocast(device, args.dtype):
            return explainer.adapter.forward(pv, all_ids, all_mask, index, "itm").reported

    def per_pair():
        return per_pair_recipe(model, pv, ids, mask, layer, device, base_dtype)

    results = {}
    # The per-pair loop is the slow one: its warm-up is a single pair.
    one_pair = (pv[:1], ids[:1], mask[:1])
    for name, fn, warm in [
        (
            "per_pair",
            per_pair,
            lambda: per_pair_recipe(model, *one_pair, layer, device, base_dtype),
        ),
        ("batched", batched, batched),
        ("forward_only", forward_only, forward_only),
    ]:
        warm()
        out, times = timed(fn, device, args.repeats, warmup=0)
        best = min(times)
        results[name] = {
            "seconds": times,
            "best_seconds": best,
            "median_seconds": statistics.median(times),
            "pairs_per_s": pairs / best,
            "dtype": base_dtype if name == "per_pair" else args.dtype,
        }
        if name != "forward_only":
            results[name]["maps"] = out
    ref, ours = results["per_pair"].pop("maps"), results["batched"].pop("maps")
    scale = ref.abs().max().item()
    max_rel_diff = (ours - ref).abs().max().item() / scale if scale > 0 else float("nan")

    speedup = results["batched"]["pairs_per_s"] / results["per_pair"]["pairs_per_s"]
    overhead = results["batched"]["best_seconds"] / results["forward_only"]["best_seconds"]
    report = {
        "config": {
            "size": args.size,
            "images": args.images,
            "phrases_per_image": args.phrases,
            "pairs": pairs,
            "layer": layer,
            "dtype": args.dtype,
            "baseline_dtype": base_dtype,
            "repeats": args.repeats,
            "device": str(device),
            "device_name": device_name(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "image_tokens": image_tokens(model),
            "text_tokens": ids.shape[1],
        },
        "results": results,
        "batched_over_per_pair": speedup,
        "batched_cost_over_forward_only": overhead,
        "batched_vs_per_pair_max_rel_diff": max_rel_diff,
    }

    print(
        f"BLIP-ITM {args.size}, {args.images} images x {args.phrases} phrases = {pairs} pairs, "
        f"attn-gradcam on text layer {layer}, {device} ({report['config']['device_name']}), "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'recipe':<48} {'dtype':<6} {'best s':>9} {'pairs/s':>10}")
    labels = {
        "per_pair": "one pair per forward, full backward()",
        "batched": "batched, image once, autograd.grad to layer",
        "forward_only": "forward-only ITM scores",
    }
    for name, label in labels.items():
        r = results[name]
        print(f"{label:<48} {r['dtype']:<6} {r['best_seconds']:>9.3f} {r['pairs_per_s']:>10.2f}")
    print(f"batched / per-pair throughput: {speedup:.1f}x")
    print(f"batched time / forward-only time: {overhead:.2f}x")
    print(f"max |batched - per-pair| / max |per-pair| map: {max_rel_diff:.2e}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
