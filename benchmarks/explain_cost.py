"""What an explanation costs next to scoring, on BLIP-ITM, in one run: for each image size and
number of phrases per image,

1. explain: groundcam's `explain_tensors` (attn-gradcam on text layer 8: each image encoded once,
   its phrases attending as one query block, no graph below the recorded layer);
2. forward only: groundcam's `score_tensors` of the same pairs;
3. plain transformers: no-grad ITM scoring written with the model's own modules, the vision
   tower once per image and the text encoder over the batch (`encoder_hidden_states` indexed per
   pair), the way one would score many phrases without groundcam;
4. per pair: one (image, phrase) per forward and a full `backward()` (ALBEF's Grounding.py and
   LAVIS's `compute_gradcam` recipe), timed on `--per-pair` pairs and given per pair (its cost
   is linear in the pairs); its maps are compared with the explanation's.

Peak memory is read from the process while each recipe runs (the CPU's resident set, or the CUDA
allocator's peak), and the bytes autograd saves during an explanation are counted.

    python benchmarks/explain_cost.py --threads 2 --repeats 1 --out benchmarks/results/explain_cost_cpu.json
    python benchmarks/explain_cost.py --device cuda --dtype bf16 --images 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import warnings
from pathlib import Path

import torch
from transformers import BlipConfig, BlipForImageTextRetrieval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batching import inputs, per_pair_recipe  # noqa: E402
from common import (  # noqa: E402
    PeakMemory,
    SavedTensors,
    autocast,
    cost,
    environment,
    measure,
    measure_rounds,
)

import groundcam as gc  # noqa: E402

warnings.filterwarnings("ignore", message="no processor given")

BASE = dict(text=dict(num_attention_heads=12), vision=dict(patch_size=16))  # BERT-/ViT-B/16


def build(image_size: int, device: torch.device, tiny: bool = False) -> BlipForImageTextRetrieval:
    """BLIP-ITM base-shaped (or tiny), random weights, eager attention, eval mode."""
    text, vision = dict(BASE["text"]), dict(BASE["vision"], image_size=image_size)
    if tiny:
        small = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        text, vision = dict(small), dict(small, image_size=image_size, patch_size=16)
    vision["initializer_range"] = 0.02  # BLIP's 1e-10 default gives ~0 maps
    cfg = BlipConfig(text_config=text, vision_config=vision)
    model = BlipForImageTextRetrieval._from_config(cfg, attn_implementation="eager")
    return model.to(device).eval()


def plain_scores(model, pv, ids, mask, index):
    """No-grad ITM match probabilities with transformers' modules: vision once per image, text
    encoder over all pairs with per-pair image states."""
    with torch.no_grad():
        image = model.vision_model(pixel_values=pv).last_hidden_state
        text = model.text_encoder(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image.index_select(0, index),
        ).last_hidden_state
        return model.itm_head(text[:, 0]).softmax(-1)[:, 1]


def recipes(model, explainer, args, device, phrases: int):
    """The batch and the three batched recipes (explain, forward_only, plain) over it."""
    pv, ids, mask = inputs(model, args.images, phrases, device, args.seed)
    all_ids, all_mask = ids.repeat(args.images, 1), mask.repeat(args.images, 1)
    index = torch.arange(args.images, device=device).repeat_interleave(phrases)
    layer = args.layer

    def explain():
        with autocast(device, args.dtype):
            ex = explainer.explain_tensors(
                pv, all_ids, all_mask, "attn-gradcam", layer=layer, image_index=index
            )
        return ex.raw_maps.flatten(1)

    def forward_only():
        with autocast(device, args.dtype):
            return explainer.score_tensors(pv, all_ids, all_mask, index, "itm").reported

    def plain():
        with autocast(device, args.dtype):
            return plain_scores(model, pv, all_ids, all_mask, index)

    fns = {"explain": explain, "forward_only": forward_only, "plain": plain}
    return (pv, ids, mask), fns


def run_case(model, explainer, args, device, size: int, phrases: int) -> dict:
    """All recipes at one image size and phrases-per-image count."""
    (pv, ids, mask), fns = recipes(model, explainer, args, device, phrases)
    explain, layer = fns["explain"], args.layer
    pairs = args.images * phrases
    rows = measure_rounds(fns, device, args.repeats, warmup=1)
    with SavedTensors(exclude=model.parameters()) as saved:
        explain()
    rows["explain"]["saved_bytes"] = saved.bytes
    pairs = args.images * phrases
    out = {"pairs": pairs, "text_tokens": ids.shape[1]}
    maps = rows["explain"].pop("out")
    scores_ours = rows["forward_only"].pop("out").float().cpu()
    scores_plain = rows["plain"].pop("out").float().cpu()
    out["max_score_diff_forward_only_vs_plain"] = (scores_ours - scores_plain).abs().max().item()
    for name, r in rows.items():
        r["pairs_per_s"] = pairs / r["best_seconds"]
        out[name] = r
    n = min(args.per_pair, phrases)
    if n > 0:
        # the first n phrases of image 0, one forward and one full backward each
        one = (pv[:1], ids[:n], mask[:n])
        per = measure(
            lambda: per_pair_recipe(model, *one, layer, device, args.dtype), device, 1, warmup=0
        )
        ref = per.pop("out")
        per["pairs_timed"] = n
        per["seconds_per_pair"] = per["best_seconds"] / n
        per["pairs_per_s"] = n / per["best_seconds"]
        out["per_pair"] = per
        ours = maps[:n]
        scale = ref.abs().max().item()
        out["max_rel_map_diff_explain_vs_per_pair"] = (ours - ref).abs().max().item() / scale
    e, f, p = (cost(out[k], args.clock) for k in ("explain", "forward_only", "plain"))
    out["explain_over_forward_only"] = e / f
    out["explain_over_plain"] = e / p
    if "per_pair" in out:
        per_pair = cost(out["per_pair"], args.clock) / out["per_pair"]["pairs_timed"]
        out["explain_speedup_over_per_pair"] = per_pair * pairs / e
    return out


def memory_child(args, device) -> None:
    """In a fresh process: build the model, run one recipe once, print its peak memory (the
    resident set sampled from /proc, and ru_maxrss) above what the process held before it."""
    size, phrases = (int(x) for x in args.memory_child[1].split("x"))
    torch.manual_seed(args.seed)
    model = build(size, device, args.tiny)
    explainer = gc.load(model)
    (pv, ids, mask), fns = recipes(model, explainer, args, device, phrases)
    if args.memory_child[0] == "per_pair":
        fns["per_pair"] = lambda: per_pair_recipe(
            model, pv[:1], ids[:1], mask[:1], args.layer, device, args.dtype
        )
    # libraries and kernels initialise on a one-phrase batch first; the case then needs memory
    _, warm = recipes(model, explainer, args, device, 1)
    warm["explain" if args.memory_child[0] == "per_pair" else args.memory_child[0]]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakMemory(device) as mem:
        fns[args.memory_child[0]]()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": mem.peak_bytes, "maxrss_growth_bytes": after - before}))


def memory_runs(args, cases: list[str]) -> dict:
    """Peak memory of each recipe at each `SIZExPHRASES` case, each in its own process (a
    process that ran before keeps freed memory, which hides peaks)."""
    import subprocess

    out = {}
    for case in cases:
        for recipe in ("explain", "forward_only", "plain", "per_pair"):
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                recipe,
                case,
                "--layer",
                str(args.layer),
            ]
            cmd += ["--device", args.device, "--dtype", args.dtype, "--images", str(args.images)]
            cmd += ["--threads", str(torch.get_num_threads())] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[f"{case} {recipe}"] = json.loads(done.stdout.strip().splitlines()[-1])
            mb = out[f"{case} {recipe}"]["peak_bytes"] / 2**20
            print(f"peak memory {case} {recipe:<13} {mb:>8.0f} MB", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--sizes", default="224,384", help="image sizes (px)")
    ap.add_argument("--phrases", default="1,4,16,64", help="phrases per image")
    ap.add_argument("--images", type=int, default=1, help="images per batch")
    ap.add_argument("--per-pair", type=int, default=2, help="pairs the per-pair recipe times")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="times compared: process CPU seconds (default on the CPU: robust to other work on "
        "shared cores) or wall seconds (default on a GPU)",
    )
    ap.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--memory-cases",
        default="224x64,384x64",
        help="SIZExPHRASES cases whose peak memory is read, each recipe in its own process",
    )
    ap.add_argument("--memory-only", action="store_true", help="read peak memory, time nothing")
    ap.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.layer = min(args.layer, 1)
    device = torch.device(args.device)
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if args.memory_child:
        memory_child(args, device)
        return {}
    report = {
        "config": {**vars(args), "out": str(args.out), **environment(device)},
        "cases": [],
    }
    head = (
        f"{'px':>4} {'phr/img':>7} {'pairs':>5} {'explain s':>10} {'fwd-only s':>10} "
        f"{'plain s':>9} {'per-pair s/pair':>15} {'expl/fwd':>8} {'expl/plain':>10} "
        f"{'x per-pair':>10} {'saved MB':>8}"
    )
    print(
        f"BLIP-ITM {'tiny' if args.tiny else 'base'}-shaped (random weights), attn-gradcam on text "
        f"layer {args.layer}, {args.images} image(s) per batch, {args.dtype}, "
        f"{report['config']['device_name']}, {torch.get_num_threads()} threads; times: best "
        f"{args.clock} seconds of {args.repeats} interleaved rounds"
    )
    print(head)
    for size in [] if args.memory_only else (int(s) for s in args.sizes.split(",")):
        torch.manual_seed(args.seed)
        model = build(size, device, args.tiny)
        explainer = gc.load(model)
        for phrases in (int(p) for p in args.phrases.split(",")):
            case = run_case(model, explainer, args, device, size, phrases)
            case.update(image_size=size, phrases_per_image=phrases)
            report["cases"].append(case)
            per = case.get("per_pair", {})
            per = cost(per, args.clock) / per["pairs_timed"] if per else float("nan")
            print(
                f"{size:>4} {phrases:>7} {case['pairs']:>5} "
                f"{cost(case['explain'], args.clock):>10.3f} "
                f"{cost(case['forward_only'], args.clock):>10.3f} "
                f"{cost(case['plain'], args.clock):>9.3f} {per:>15.3f} "
                f"{case['explain_over_forward_only']:>8.2f} {case['explain_over_plain']:>10.2f} "
                f"{case.get('explain_speedup_over_per_pair', float('nan')):>10.1f} "
                f"{case['explain']['saved_bytes'] / 2**20:>8.0f}",
                flush=True,
            )
        del model, explainer
    if args.memory_cases:
        report["peak_memory"] = memory_runs(args, args.memory_cases.split(","))
    cases = report["cases"]
    goals = {}
    if cases:
        goals["explain_le_1.2x_forward_only_everywhere"] = all(
            c["explain_over_forward_only"] <= 1.2 for c in cases
        )
    big = [c for c in cases if c["image_size"] == 384 and c["phrases_per_image"] == 64]
    if big:
        goals["explain_le_0.5x_plain_at_384px_64_phrases"] = big[0]["explain_over_plain"] <= 0.5
    report["goals"] = goals
    for name, ok in goals.items():
        print(f"goal {name}: {'met' if ok else 'NOT met'}")
    diffs = [c["max_rel_map_diff_explain_vs_per_pair"] for c in cases if "per_pair" in c]
    if diffs:
        print(f"largest map difference explain vs per-pair recipe: {max(diffs):.2e} of its max")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
