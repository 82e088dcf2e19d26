"""Per-token maps of generated text against a teacher-forced forward, on a TrOCR-base-shaped
VisionEncoderDecoder (ViT-B/16 encoder, 12-layer 1024-wide TrOCR decoder, a 50,265-token
vocabulary; random weights), in one run:

1. forward: one no-grad teacher-forced forward of the image and its text (the floor);
2. per-token maps: `explain_generation(..., text=...)` for each method: the LM head computes only
   the explained rows, and the batched backward starts at its input;
3. full logits: the same with the LM head left whole (the path before: vocabulary-sized logits
   for every position, the batched backward starting from the scores through the head).

    python benchmarks/generation_cost.py --threads 1 --out benchmarks/results/generation_cost_cpu.json
    python benchmarks/generation_cost.py --device cuda --dtype bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    TrOCRConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import autocast, cost, environment, measure_rounds  # noqa: E402

import groundcam as gc  # noqa: E402
from groundcam.adapters import hf  # noqa: E402
from groundcam.train.trocr_glyphs import char_tokenizer  # noqa: E402

warnings.filterwarnings("ignore", message="no processor given")


def build(image_size: int, device: torch.device, tiny: bool = False):
    """TrOCR-base-shaped (or tiny) VisionEncoderDecoder, random weights, eager, eval."""
    if tiny:
        enc = ViTConfig(
            image_size=image_size,
            patch_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
        dec = TrOCRConfig(
            vocab_size=1000,
            d_model=32,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            cross_attention_hidden_size=32,
        )
    else:
        enc = ViTConfig(image_size=image_size, patch_size=16)  # ViT-B/16
        dec = TrOCRConfig(cross_attention_hidden_size=768)  # TrOCR-base decoder
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 2
    model = VisionEncoderDecoderModel._from_config(cfg, attn_implementation="eager")
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=24, help="generated tokens explained")
    ap.add_argument("--methods", default="gradcam,attn-gradcam,attention")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--clock", choices=["cpu", "wall"], default=None, help="cpu on a CPU, else wall"
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    torch.manual_seed(args.seed)
    model = build(args.image_size, device, args.tiny)
    tok = char_tokenizer()
    size = {"height": args.image_size, "width": args.image_size}
    processor = hf.build_image_processor("ViTImageProcessor", size=size)
    explainer = gc.load(model, processor=processor, tokenizer=tok)
    a = explainer.adapter
    rng = np.random.default_rng(args.seed)
    image = Image.fromarray(rng.integers(0, 255, (args.image_size,) * 2 + (3,), dtype=np.uint8))
    body = rng.integers(3, len(tok), args.tokens).tolist()  # text tokens, no special ones
    ids = torch.tensor([[0, *body, 2]], device=device)
    a.teacher_ids = lambda text: (ids, 1)  # explain exactly these ids
    pv = explainer.prepare_images([image])
    head = a.output_head
    full = lambda: None  # noqa: E731  (no head to select rows on: the whole logits)

    def forward():
        with torch.no_grad(), autocast(device, args.dtype):
            return model(pixel_values=pv, decoder_input_ids=ids).logits

    def maps(method: str, whole: bool = False):
        def run():
            a.output_head = full if whole else head
            try:
                with autocast(device, args.dtype):
                    return explainer.explain_generation(image, method=method, text="x").raw_maps
            finally:
                a.output_head = head

        return run

    fns = {"forward": forward}
    methods = args.methods.split(",")
    for m in methods:
        fns[m] = maps(m)
        if m != "attention":  # no backward: the head's size changes only the forward
            fns[f"{m} (full logits)"] = maps(m, whole=True)
    rows = measure_rounds(fns, device, args.repeats)
    fwd = cost(rows["forward"], args.clock)
    report = {"config": {**vars(args), "out": str(args.out), **environment(device)}, "rows": {}}
    print(
        f"VisionEncoderDecoder {'tiny' if args.tiny else 'TrOCR-base'}-shaped (random weights), "
        f"{args.image_size} px, {args.tokens} tokens, {args.dtype}, "
        f"{report['config']['device_name']}, {torch.get_num_threads()} threads, best "
        f"{args.clock} seconds of {args.repeats} interleaved rounds"
    )
    print(f"{'recipe':<28} {'best s':>8} {'tokens/s':>9} {'x forward':>9} {'peak MB':>8}")
    for name, r in rows.items():
        out = r.pop("out")
        if name != "forward":
            r["max_abs_raw_map"] = float(out.abs().max())
        r["tokens_per_s"] = args.tokens / cost(r, args.clock)
        r["over_forward"] = cost(r, args.clock) / fwd
        report["rows"][name] = r
        print(
            f"{name:<28} {cost(r, args.clock):>8.3f} {r['tokens_per_s']:>9.1f} "
            f"{r['over_forward']:>9.2f} {r['peak_bytes'] / 2**20:>8.0f}"
        )
    for m in methods:
        if f"{m} (full logits)" in rows:
            same = torch.allclose(
                maps(m)(), maps(m, whole=True)(), rtol=1e-4, atol=1e-6 * rows[m]["max_abs_raw_map"]
            )
            report["rows"][m]["equal_to_full_logits"] = same
            print(f"{m}: maps equal to the full-logits path: {same}")
    report["goals"] = {
        "per_token_maps_le_2.5x_forward": {
            m: report["rows"][m]["over_forward"] <= 2.5 for m in methods
        }
    }
    for m, ok in report["goals"]["per_token_maps_le_2.5x_forward"].items():
        print(
            f"goal per-token maps ({m}) <= 2.5x teacher-forced forward: {'met' if ok else 'NOT met'}"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
