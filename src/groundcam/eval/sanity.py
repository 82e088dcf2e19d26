"""Sanity checks of saliency maps (Adebayo et al., NeurIPS 2018): does a map change when the model does?

Cascading randomisation re-initialises the model's layers from the top down, one more at each step,
and recomputes the map of the same image and phrase; independent randomisation re-initialises one
layer at a time (the others trained). Each randomised map is compared with the original by Spearman
rank correlation (raw and of absolute values) and SSIM. A map that stays the same while the model
is destroyed explains the image, not the model.

Layers are found by structure, the same way for every family: the elements of the model's outermost
`nn.ModuleList`s (its transformer blocks), and between them the runs of other modules holding
parameters (embeddings, norms, projections, heads), ordered by when the forward pass of one
explanation first calls them; modules the explanation never calls are left alone. "Top" is the
last in that order. A layer is re-initialised by the model's own `_init_weights` (transformers
models) and, for a tensor that leaves unchanged or a model without one, by the module's
`reset_parameters()` (PyTorch's default init) or normal(0, 0.02) for a bare parameter; every
layer's init is seeded from (seed, layer index). All of it happens on a copy of the model.

The data-randomisation variant compares the maps of the model with those of a second model of the
same family trained on permuted labels (`data_model`): `groundcam train captioner
--randomise-labels` trains one for the captioner.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from groundcam.errors import InputError

# A method whose mean |Spearman| with the original map is still above this after every layer is
# randomised is flagged; a method "breaks" at the cascading step from which it stays at or below.
SURVIVES = 0.5
SSIM_SIZE = 64  # maps are resized (bilinear) to this square before SSIM: the 11 x 11 window fits

# name -> map(explainer, image, phrases) -> [P, h, w]: maps that are not a groundcam method
# (tests register an edge detector here to see it flagged).
CUSTOM_MAPS: dict[str, Callable[[object, Image.Image, list[str]], torch.Tensor]] = {}


# ----------------------------------------------------------------------------- the measures


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-d array, ties sharing their mean rank (as Spearman's rho needs)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation of two maps (flattened): Pearson's r of their average ranks.
    A constant map carries no order: 1.0 when both maps are equal, else 0.0."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"spearman: maps of {a.size} and {b.size} values cannot be compared")
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if den == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float((ra * rb).sum() / den)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised [size, size] Gaussian window of Wang et al.'s SSIM."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return w / w.sum()


def ssim(a, b, data_range: float = 1.0, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two [H, W] images (Wang et al. 2004, their reference code): local statistics
    under an 11 x 11 Gaussian window (sigma 1.5) at every position where it fits ("valid"),
    K1 = 0.01, K2 = 0.03, C = (K * data_range)^2."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape or a.dim() != 2:
        raise InputError(
            f"ssim: needs two [H, W] images of one size, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape) < size:
        raise InputError(f"ssim: images of {tuple(a.shape)} are smaller than the {size} px window")
    w = torch.as_tensor(gaussian_window(size, sigma))[None, None]

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x[None, None], w)[0, 0]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def _unit_range(m: torch.Tensor) -> torch.Tensor:
    """A map resized to SSIM_SIZE squared and scaled to [0, 1] (a constant map becomes 0)."""
    m = F.interpolate(m[None, None].double(), size=(SSIM_SIZE, SSIM_SIZE), mode="bilinear")[0, 0]
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def compare(original: torch.Tensor, other: torch.Tensor) -> dict:
    """Spearman (raw and of absolute values) and SSIM of two [h, w] maps; SSIM of the maps
    resized to 64 x 64 and scaled to [0, 1] each (Adebayo et al. scale the same way). A flat
    original is marked (`flat_original`): it has no order to lose, so it tests nothing."""
    o, r = original.detach().float().cpu(), other.detach().float().cpu()
    return {
        "spearman": spearman(o.numpy(), r.numpy()),
        "spearman_abs": spearman(o.abs().numpy(), r.abs().numpy()),
        "ssim": ssim(_unit_range(o).numpy(), _unit_range(r).numpy()),
        "flat_original": bool(o.max() == o.min()),
    }


# ----------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """One unit of randomisation: a name, its modules, and whether each is re-initialised whole
    (a block) or only its own direct parameters (its children belong to other layers)."""

    name: str
    modules: list[nn.Module]
    whole: bool

    def parts(self) -> list[nn.Module]:
        """The modules whose own parameters this layer re-initialises."""
        if self.whole:
            return [sub for m in self.modules for sub in m.modules()]
        return list(self.modules)


def _blocks(model: nn.Module) -> dict[nn.Module, str]:
    """The elements of the outermost ModuleLists that hold parameters, with their names."""
    found: dict[nn.Module, str] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, nn.ModuleList):
            inside.append(name)
            for i, child in enumerate(mod):
                if any(True for _ in child.parameters()):
                    found[child] = f"{name}.{i}"
    return found


def find_layers(model: nn.Module, run: Callable[[], object]) -> list[Layer]:
    """`model`'s layers in forward order (see the module doc), found while `run()` explains once."""
    blocks = _blocks(model)
    block_prefixes = [n + "." for n in blocks.values()]
    others = {
        mod: name
        for name, mod in model.named_modules()
        if mod not in blocks
        and not any((name + ".").startswith(p) for p in block_prefixes)
        and any(True for _ in mod.parameters(recurse=False))
    }
    order: list[nn.Module] = []
    seen: set[int] = set()

    def note(mod, *_):
        if id(mod) not in seen:
            seen.add(id(mod))
            order.append(mod)

    handles = [m.register_forward_pre_hook(note) for m in list(blocks) + list(others)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    layers: list[Layer] = []
    for mod in order:
        if mod in blocks:
            layers.append(Layer(blocks[mod], [mod], whole=True))
        elif layers and not layers[-1].whole:
            layers[-1].modules.append(mod)
            layers[-1].name += "+" + (others[mod] or "<root>")
        else:
            layers.append(Layer(others[mod] or "<root>", [mod], whole=False))
    return layers


def randomise(model: nn.Module, layer: Layer, seed: int) -> None:
    """Re-initialise `layer` of `model` in place (see the module doc), seeded by `seed`."""
    parts = layer.parts()
    params = [p for sub in parts for p in sub.parameters(recurse=False)]
    before = {id(p): p.detach().clone() for p in params}
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        init = getattr(model, "_init_weights", None)
        if callable(init):
            for p in params:
                if hasattr(p, "_is_hf_initialized"):
                    p._is_hf_initialized = False  # transformers skips the tensors it loaded
            for sub in parts:
                init(sub)
        for sub in parts:
            stale = [p for p in sub.parameters(recurse=False) if torch.equal(p, before[id(p)])]
            if not stale:
                continue
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
            else:
                for p in stale:
                    p.normal_(0.0, 0.02)


# ----------------------------------------------------------------------------- the run


def copy_explainer(explainer):
    """An Explainer over a deep copy of the model (tokenizer and processor shared): randomising
    it leaves the user's model as it was."""
    adapter = explainer.adapter
    memo = {id(x): x for x in (adapter.tokenizer, adapter.processor) if x is not None}
    return type(explainer)(copy.deepcopy(adapter, memo), explainer.grad_chunk)


def method_maps(
    explainer, image: Image.Image, phrases: list[str], method: str | None
) -> torch.Tensor:
    """[P, h, w] maps of every phrase over `image` by `method` (a registered custom map first;
    None: the family's default). A family that reads no phrases (OCR) maps each text as the mean of its token maps, the
    text teacher-forced as if written."""
    if method in CUSTOM_MAPS:
        return CUSTOM_MAPS[method](explainer, image, phrases)
    if not explainer.adapter.reads_phrases:
        maps = [
            explainer.explain_generation(image, method=method, text=t).raw_maps for t in phrases
        ]
        return torch.stack([m.mean(0) for m in maps]).detach().float().cpu()
    return explainer.explain(image, phrases, method=method).maps.detach().float().cpu()


def shapes_samples(
    scenes: int, seed: int = 0, split: str = "test"
) -> list[tuple[str, Image.Image, list[str]]]:
    """(image id, image, phrases) of the first `scenes` shapes scenes of `split`."""
    from groundcam.data.shapes import generate_scene

    out = []
    for i in range(scenes):
        s = generate_scene(split, i, seed)
        out.append((s.image_id, s.image, [p.text for p in s.phrases]))
    return out


def glyph_samples(
    lines: int, seed: int = 0, split: str = "test"
) -> list[tuple[str, Image.Image, list[str]]]:
    """(line id, image, [its text]) of the first `lines` glyph lines of `split`: what an OCR
    model is checked on."""
    from groundcam.data.glyphs import render_line

    out = []
    for i in range(lines):
        line = render_line(split, i, seed)
        out.append((f"{split}/{i}", line.image, [line.text]))
    return out


def _read_done(path: Path) -> set[tuple]:
    """Keys of the records already written (a torn last line, from a kill, is dropped)."""
    done = set()
    if not path.is_file():
        return done
    lines = path.read_text().splitlines()
    good = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line)
        done.add(_key(rec))
    if len(good) != len(lines):
        path.write_text("".join(g + "\n" for g in good))
    return done


def _key(rec: dict) -> tuple:
    return (rec["variant"], rec["step"], rec["method"], rec["image_id"], rec["index"])


def sanity_records(
    explainer,
    samples: Sequence[tuple[str, Image.Image, list[str]]],
    methods: Sequence[str],
    out: Path,
    seed: int = 0,
    variants: Sequence[str] = ("cascading", "independent"),
    data_model=None,
) -> Iterator[dict]:
    """Run the checks, appending one record per (variant, step, method, image, phrase index) to
    `out/results.jsonl` as it goes and skipping those already there (resume); yields new ones.
    A sample whose map fails is recorded with its error and skipped, not the run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = _read_done(path)
    work = copy_explainer(explainer)
    original: dict[tuple[str, str], torch.Tensor | str] = {}

    def maps_of(ex, method, image, phrases):
        try:
            return method_maps(ex, image, phrases, method)
        except ValueError as e:  # this sample's problem (groundcam's bad-input errors)
            return f"{type(e).__name__}: {' '.join(str(e).split())}"

    first_image, first_phrases = samples[0][1:]
    layers = find_layers(work.model, lambda: method_maps(work, first_image, first_phrases, None))
    if not layers:
        raise InputError(f"model {explainer.name!r}: no layer with parameters ran in its forward")
    for image_id, image, phrases in samples:
        for method in methods:
            original[method, image_id] = maps_of(work, method, image, phrases)

    def step(variant, k, name, ex):
        for image_id, image, phrases in samples:
            for method in methods:
                base = {"variant": variant, "step": k, "layer": name, "method": method}
                base["image_id"] = image_id
                if _key(base | {"index": None}) in done:
                    continue  # an error recorded for the whole image
                todo = [p for p in range(len(phrases)) if _key(base | {"index": p}) not in done]
                if not todo:
                    continue
                orig = original[method, image_id]
                new = orig if isinstance(orig, str) else maps_of(ex, method, image, phrases)
                if isinstance(new, str):
                    recs = [base | {"index": None, "phrase": None, "error": new}]
                else:
                    recs = [
                        base | {"index": p, "phrase": phrases[p]} | compare(orig[p], new[p])
                        for p in todo
                    ]
                with path.open("a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in recs))
                yield from recs

    top_down = list(reversed(layers))
    if "cascading" in variants:
        for k, layer in enumerate(top_down, 1):
            randomise(work.model, layer, seed * 10007 + k)
            yield from step("cascading", k, layer.name, work)
        work.model.load_state_dict(explainer.model.state_dict())
    if "independent" in variants:
        for k, layer in enumerate(top_down, 1):
            saved = {n: p.detach().clone() for n, p in _named_tensors(layer)}
            randomise(work.model, layer, seed * 10007 + k)
            yield from step("independent", k, layer.name, work)
            with torch.no_grad():
                for n, p in _named_tensors(layer):
                    p.copy_(saved[n])
    if data_model is not None:
        yield from step("data", 1, data_model.name, data_model)


def _named_tensors(layer: Layer) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
    for i, sub in enumerate(layer.parts()):
        for n, p in sub.named_parameters(recurse=False):
            yield (i, n), p
        for n, b in sub.named_buffers(recurse=False):
            yield (i, n), b


def summarize(records: Sequence[dict], methods: Sequence[str]) -> dict:
    """Per method and variant, the mean of each measure at each step; for cascading, the step at
    from which the mean |Spearman| stays at or below SURVIVES ("breaks") and whether the map survives
    the randomisation of every layer (flagged). Pairs whose original map is flat are left out of
    the means and counted (`flat`): two flat maps are equal whatever the model, which would read
    as surviving; a method whose original maps are all flat gets no verdict."""
    summary: dict = {"threshold": SURVIVES, "methods": {}}
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        errors = [r for r in mine if "error" in r]
        failed = {(r["image_id"], r["error"]) for r in errors}
        entry: dict = {"errors": len(errors)}
        entry["failed"] = [{"image_id": i, "error": e} for i, e in sorted(failed)]
        for variant in ("cascading", "independent", "data"):
            rows = [r for r in mine if r["variant"] == variant and "error" not in r]
            flat = [r for r in rows if r.get("flat_original")]
            rows = [r for r in rows if not r.get("flat_original")]
            if flat:  # how many of the original maps (image, phrase) are flat
                pairs = {(r["image_id"], r.get("index", r.get("phrase"))) for r in flat}
                entry.setdefault("flat", {})[variant] = len(pairs)
            if not rows:
                continue
            steps = []
            for k in sorted({r["step"] for r in rows}):
                at = [r for r in rows if r["step"] == k]
                steps.append(
                    {"step": k, "layer": at[0]["layer"], "n": len(at)}
                    | {
                        m: float(np.mean([r[m] for r in at]))
                        for m in ("spearman_abs", "spearman", "ssim")
                    }
                )
            entry[variant] = steps
        cascade = entry.get("cascading")
        if cascade:
            # a mean can dip and recover: the break is the first step of the last run below
            broke = None
            for s in reversed(cascade):
                if s["spearman_abs"] > SURVIVES:
                    break
                broke = s
            entry["breaks_at"] = (
                None if broke is None else {"step": broke["step"], "layer": broke["layer"]}
            )
            entry["final"] = {m: cascade[-1][m] for m in ("spearman_abs", "spearman", "ssim")}
            entry["flagged"] = cascade[-1]["spearman_abs"] > SURVIVES
        summary["methods"][method] = entry
    summary["flagged"] = [m for m, e in summary["methods"].items() if e.get("flagged")]
    return summary


def table(summary: dict) -> str:
    """The summary as a plain-text table, one row per method: the cascade's end, where it
    breaks, the lowest mean |rho| of one layer randomised alone, and the data test's |rho|."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    head = (
        f"{'method':<18} {'|rho| all':>9} {'rho all':>8} {'SSIM all':>8} {'breaks at':<30} "
        f"{'indep min':>9} {'data':>6}  verdict"
    )
    rows = [head, "-" * len(head)]
    for method, e in summary["methods"].items():
        f = e.get("final", {})
        b = e.get("breaks_at")
        where = "-" if "final" not in e else "never" if b is None else f"{b['step']} {b['layer']}"
        indep = min((s["spearman_abs"] for s in e.get("independent", [])), default=None)
        data = e["data"][0]["spearman_abs"] if e.get("data") else None
        if "flagged" in e:
            verdict = "FLAGGED: survives randomisation" if e["flagged"] else "passes"
        elif e.get("flat", {}).get("cascading"):
            verdict = "no verdict: every original map is flat"
        else:
            verdict = "no cascade"
        if e.get("flat"):
            verdict += f" ({max(e['flat'].values())} flat originals left out)"
        if e["errors"]:
            verdict += f" ({e['errors']} failed)"
        rows.append(
            f"{method:<18} {num(f.get('spearman_abs')):>9} {num(f.get('spearman')):>8} "
            f"{num(f.get('ssim')):>8} {where[:30]:<30} {num(indep):>9} {num(data):>6}  {verdict}"
        )
    return "\n".join(rows)


def check_methods(explainer, methods: Sequence[str] | None) -> list[str]:
    """The methods to check: every one the model supports when None; an unknown one is an
    InputError naming those it has."""
    from groundcam.explainer import supported_methods

    have = supported_methods(explainer.adapter)
    if not methods:
        return have
    wrong = [m for m in methods if m not in have and m not in CUSTOM_MAPS]
    if wrong:
        raise InputError(
            f"--methods: {', '.join(wrong)} not available on {explainer.name!r} "
            f"(it has {', '.join(have)})"
        )
    return list(methods)


def read_records(path: Path) -> list[dict]:
    """Every record of a results.jsonl."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_sanity(
    explainer,
    samples: Sequence[tuple[str, Image.Image, list[str]]],
    methods: Sequence[str],
    out: Path,
    config: dict,
    seed: int = 0,
    variants: Sequence[str] = ("cascading", "independent"),
    data_model=None,
    progress: Callable[[Iterator[dict]], Iterator[dict]] = lambda it: it,
) -> dict:
    """The whole check into `out`: refuses an `out` written under another `config`, resumes one
    written under this one, and writes results.jsonl, config.json and summary.json."""
    from groundcam.eval.runner import check_config

    if not samples:
        raise InputError("sanity check: no samples to explain")
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for _ in progress(sanity_records(explainer, samples, methods, out, seed, variants, data_model)):
        pass
    summary = summarize(read_records(out / "results.jsonl"), methods) | {"config": config}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
