"""Per-token maps of a generative VLM's answer against a teacher-forced forward and against the
naive recipe (one forward and one backward per token, on the prefix that scored it), with
tokens/s and peak memory, in one run of interleaved rounds:

1. processor: the prompt and image through the processor (`adapter.inputs`), alone;
2. forward: one no-grad teacher-forced forward of prompt + image + answer (the floor);
3. forward+backward: that forward with grad and one backward of the summed log-probabilities;
4. per method, `explain_generation(image, prompt=..., text=answer)`: everything the public call
   does (processor, one teacher-forced forward, the batched backward, placement, words);
5. per method in --naive, the naive recipe written from the definitions (DESIGN §12), whose
   maps are also compared with the batched ones.

Models (random weights, built from configs, nothing downloaded): tiny-llava (LLaVA-1.5 geometry,
336 px / 14 px patches = 576 image tokens, a 2-layer 32-wide LM: CPU), llava-7b (CLIP ViT-L/14-336
+ Llama-2-7B shapes), qwen2.5-vl-7b (Qwen2.5-VL-7B shapes, 448 px = 256 image tokens); the
7B-shaped ones are built on the device in --dtype, under the model's own attention (sdpa).

    python benchmarks/vlm_tokens.py --threads 1 --out benchmarks/results/vlm_tokens_cpu_tiny_llava.json
    python benchmarks/vlm_tokens.py --model llava-7b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))  # the offline tokenizer and processor builders
import tiny_vlm  # noqa: E402
from common import cost, environment, measure_rounds  # noqa: E402

import groundcam as gc  # noqa: E402
from groundcam.contract import TokenLayout  # noqa: E402
from groundcam.errors import GroundcamWarning  # noqa: E402
from groundcam.placement import place  # noqa: E402

MODELS = ("tiny-llava", "llava-7b", "qwen2.5-vl-7b")
PROMPT = "describe the image"


def build(name: str, device: torch.device, dtype: torch.dtype, depth: int | None = None):
    """(model, processor) of `name` with random weights, on `device` in `dtype`; `depth`: the
    7B shapes with only that many LM and vision layers (to try the script on a small machine)."""
    import transformers

    if name == "tiny-llava":
        model, processor = tiny_vlm.llava(image_size=336, patch_size=14)
        return tiny_vlm.sharpen(model).to(device, dtype), processor
    if name == "llava-7b":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tok = tiny_vlm.word_tokenizer(["<image>"])
        config = transformers.LlavaConfig(  # text defaults: Llama 7B
            text_config={"model_type": "llama", "vocab_size": 32064},
            vision_config=dict(  # CLIP ViT-L/14-336
                model_type="clip_vision_model",
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=depth or 24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
                projection_dim=768,
            ),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_seq_length=576,
        )
        images = CLIPImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
        )
        processor = transformers.LlavaProcessor(
            image_processor=images,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        model_class = transformers.LlavaForConditionalGeneration
    elif name == "qwen2.5-vl-7b":
        tok = tiny_vlm.word_tokenizer(tiny_vlm.QWEN_SPECIALS)
        start, image_id, end, video_id = (
            tok.convert_tokens_to_ids(t) for t in tiny_vlm.QWEN_SPECIALS
        )
        config = transformers.Qwen2_5_VLConfig(
            text_config=dict(
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=depth or 28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
                rope_parameters=dict(
                    rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]
                ),
            ),
            vision_config=dict(out_hidden_size=3584, intermediate_size=3420, depth=depth or 32),
            image_token_id=image_id,
            video_token_id=video_id,
            vision_start_token_id=start,
            vision_end_token_id=end,
        )
        images = transformers.Qwen2VLImageProcessorPil(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 448 * 448, "longest_edge": 448 * 448},
        )
        processor = transformers.Qwen2_5_VLProcessor(
            image_processor=images,
            tokenizer=tok,
            video_processor=tiny_vlm.image_only_video_processor(),
        )
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise SystemExit(f"--model {name}: one of {', '.join(MODELS)}")
    if depth and name == "llava-7b":
        config.text_config.num_hidden_layers = depth
    torch.manual_seed(0)
    with torch.device(device):  # parameters made (and randomly initialised) in place
        model = model_class._from_config(config, dtype=dtype)
    return model.eval(), processor


def naive(explainer, inputs, ids, first: int, method: str, layer: int) -> torch.Tensor:
    """One forward and one backward per answer token on the prefix that scored it, from the
    definitions (DESIGN §12): values over the image-token columns, [K, N]."""
    a, model = explainer.adapter, explainer.model
    cols = a.image_positions(ids).to(ids.device)
    head = model.get_output_embeddings().weight
    reads_attention = method in ("attention", "attn-gradcam")
    before = model.config._attn_implementation
    if reads_attention and before != "eager":
        model.set_attn_implementation("eager")
    maps = []
    try:
        for t in range(first, ids.shape[1]):
            full = a.teacher_inputs(inputs, ids[:, :t])
            grad = method in ("attn-gradcam", "gradcam")
            with torch.set_grad_enabled(grad):
                out = model(
                    **full,
                    use_cache=False,
                    output_attentions=reads_attention,
                    output_hidden_states=not reads_attention,
                )
                y = ids[0, t]
                logp = out.logits[0, -1].float().log_softmax(-1)[y]
                if method == "attention":
                    m = out.attentions[layer][0][:, -1, cols].mean(0)
                elif method == "attn-gradcam":
                    A = out.attentions[layer]
                    g = torch.autograd.grad(logp, A)[0][0]
                    m = (g.clamp(min=0) * A[0])[:, -1, cols].mean(0)
                elif method == "gradcam":
                    H = out.hidden_states[layer + 1]
                    g = torch.autograd.grad(logp, H)[0][0]
                    m = (H[0, cols] * g[cols].mean(0)).sum(-1).clamp(min=0)
                else:  # logit-lens
                    m = (out.hidden_states[-1][0, cols] @ head[y]).clamp(min=0)
            maps.append(m.detach().float())
    finally:
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)
    return torch.stack(maps)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=MODELS, default="tiny-llava")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--tokens", type=int, default=30, help="answer tokens explained")
    ap.add_argument("--methods", default="attention,attn-gradcam,gradcam,logit-lens")
    ap.add_argument("--naive", default="attention,attn-gradcam,gradcam,logit-lens")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None, help="cpu on a CPU")
    ap.add_argument("--depth", type=int, default=None, help="7B shapes, this many layers")
    ap.add_argument("--profile", default=None, help="a method to profile once (cProfile)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    warnings.filterwarnings("ignore", category=GroundcamWarning)
    model, processor = build(args.model, device, dtype, args.depth)
    explainer = gc.load(model, processor=processor, device=str(device))
    a = explainer.adapter
    words = [w for w in tiny_vlm.WORDS if w.islower()]
    answer = " ".join(words[i % len(words)] for i in range(args.tokens))
    rng = np.random.default_rng(0)
    side = 448 if args.model.startswith("qwen") else 336
    image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
    inputs = a.inputs([image], PROMPT)
    ids, first = a.teacher_ids(inputs, answer)
    full = a.teacher_inputs(inputs, ids)
    layer = a.default_lm_layer()
    last = len(a.lm_layers) - 1

    def processor_only():
        return a.inputs([image], PROMPT)

    def forward():
        with torch.no_grad():
            return model(**full, use_cache=False).logits[0, -1].float()

    def forward_backward():  # to the default layer's hidden states, no parameter gradients
        out = model(**full, use_cache=False, output_hidden_states=True)
        logp = out.logits[0, first - 1 : -1].float().log_softmax(-1)
        logp = logp.gather(-1, ids[0, first:, None]).sum()
        return torch.autograd.grad(logp, out.hidden_states[layer + 1])[0].float().norm()

    def maps(method: str):
        return lambda: (
            explainer.explain_generation(image, prompt=PROMPT, method=method, text=answer).raw_maps
        )

    methods = args.methods.split(",")
    fns = {"processor": processor_only, "forward": forward, "forward+backward": forward_backward}
    fns |= {m: maps(m) for m in methods}
    naive_methods = [m for m in args.naive.split(",") if m]
    for m in naive_methods:
        n = last if m == "logit-lens" else layer
        fns[f"naive {m}"] = lambda m=m, n=n: naive(explainer, inputs, ids, first, m, n)
    rows = measure_rounds(fns, device, args.repeats)
    k = ids.shape[1] - first
    n_image = len(a.image_positions(ids))
    report = {
        "config": {**vars(args), "out": str(args.out), **environment(device)},
        "sequence": {"tokens": int(ids.shape[1]), "image_tokens": n_image, "answer_tokens": k},
        "rows": {},
    }
    fwd = cost(rows["forward"], args.clock)
    print(
        f"{args.model} (random weights), {n_image} image tokens, {ids.shape[1]} positions, "
        f"{k} answer tokens explained, {args.dtype}, {report['config']['device_name']}, "
        f"{torch.get_num_threads()} threads, best {args.clock} seconds of {args.repeats} "
        "interleaved rounds"
    )
    print(f"{'recipe':<22} {'best s':>8} {'tokens/s':>9} {'x forward':>9} {'peak MB':>8}")
    outs = {}
    for name, r in rows.items():
        outs[name] = r.pop("out")
        r["tokens_per_s"] = k / cost(r, args.clock)
        r["over_forward"] = cost(r, args.clock) / fwd
        report["rows"][name] = r
        print(
            f"{name:<22} {cost(r, args.clock):>8.3f} {r['tokens_per_s']:>9.1f} "
            f"{r['over_forward']:>9.2f} {r['peak_bytes'] / 2**20:>8.0f}"
        )
    layout = a.token_layout(inputs, ids, [(image.height, image.width)])
    columns = TokenLayout(  # the cells by image-token column, as explain_vlm places them
        torch.arange(len(layout.positions)),
        layout.tile,
        layout.row,
        layout.col,
        layout.tiles,
        layout.sizes,
    )
    goals = {"per_token_maps_le_2.5x_forward": {}, "naive_over_batched_ge_20x": {}}
    for m in methods:
        goals["per_token_maps_le_2.5x_forward"][m] = report["rows"][m]["over_forward"] <= 2.5
        if f"naive {m}" not in rows:
            continue
        speedup = cost(rows[f"naive {m}"], args.clock) / cost(rows[m], args.clock)
        report["rows"][m]["naive_over_batched"] = speedup
        goals["naive_over_batched_ge_20x"][m] = speedup >= 20
        batched = outs[m].float().cpu()
        want = place(outs[f"naive {m}"].cpu(), columns)[0]
        scale = float(want.abs().max())
        diff = float((batched - want).abs().max()) / max(scale, 1e-30)
        report["rows"][m]["max_rel_diff_to_naive"] = diff
        print(f"{m}: naive / batched {speedup:.1f}x; maps differ by {diff:.1e} (of max)")
    report["goals"] = goals
    for goal, by_method in goals.items():
        for m, ok in by_method.items():
            print(f"goal {goal} ({m}): {'met' if ok else 'NOT met'}")
    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(maps(args.profile))
        stats = pstats.Stats(prof).sort_stats("cumulative")
        print(f"profile of explain_generation({args.profile}), by cumulative time:")
        stats.print_stats(25)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
