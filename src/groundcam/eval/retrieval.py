"""Image-text retrieval as the field reports it (DESIGN §15): SCAN's `evaluation.py` and ALBEF's /
BLIP's `evaluation()`.

- i2t: an image's rank is the best rank of any of its captions in its row of the similarity;
  t2i: a caption's rank is the rank of its image in its column; R@K is the percentage of queries
  ranked below K, rsum the sum of the six recalls.
- Ties: a query's candidates are ordered as the references' `np.argsort(scores)[::-1]` orders them
  when numpy sorts stably: by score, highest first, and among equal scores the higher index first.
  So the rank of candidate c is `#{j: s_j > s_c} + #{j > c: s_j == s_c}`.
- COCO 1K: the mean over five folds of 1,000 consecutive images with their captions.
- Re-ranking (ALBEF, BLIP): per query, the top `k_test` candidates by ITC cosine get ITM logit +
  ITC cosine; every other candidate gets -100; one matrix per direction.

`run_retrieval` computes all of it for a model over a `RetrievalSet`, writing as it goes into an out
directory (embeddings per chunk, ITM scores per query), so that a rerun resumes and processes
started by `accelerate launch` share the work; the similarity matrices are saved there as .npy.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from groundcam.errors import InputError
from groundcam.eval.runner import Processes, _open_part, _read_jsonl, check_config

KS = (1, 5, 10)
K_TEST = {"flickr30k": 128, "coco": 256, "shapes": 128}  # ALBEF's and BLIP's retrieval configs
FOLD = 1000  # images per COCO 1K fold
OUTSIDE = -100.0  # the references' score for candidates outside the top k
_CHUNK = 1024  # queries ranked at once (bounds memory on 25,000 captions)
GROUP = 8  # ITM queries of one direction scored together (their pairs share image encodings)


# ----------------------------------------------------------------------------- ranking


def _checked(similarity, image_of_text) -> tuple[torch.Tensor, torch.Tensor]:
    """The similarity as a float64 tensor [images, texts] and `image_of_text` as longs, or an
    InputError saying what is wrong."""

    def tensor(x) -> torch.Tensor:
        return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))

    sim, owner = tensor(similarity).double(), tensor(image_of_text)
    if sim.dim() != 2:
        raise InputError(f"similarity must be [images, texts], got shape {tuple(sim.shape)}")
    n, t = sim.shape
    if owner.shape != (t,) or owner.is_floating_point():
        raise InputError(
            f"image_of_text must be {t} integers (one image per text), got shape "
            f"{tuple(owner.shape)}"
        )
    owner = owner.long()
    if t and not (0 <= int(owner.min()) and int(owner.max()) < n):
        raise InputError(f"image_of_text values must lie in 0..{n - 1}")
    if torch.isnan(sim).any():
        raise InputError("similarity holds NaN values")
    captioned = torch.bincount(owner, minlength=n)
    if n and int(captioned.min()) == 0:
        raise InputError(f"image {int(torch.argmin(captioned))} has no caption in image_of_text")
    return sim, owner


def ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """0-based rank of candidate `correct[q]` in row q of `scores` [Q, C], ties by the module's
    rule (higher index first among equal scores)."""
    mine = scores.gather(1, correct[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)
    later = index[None, :] > correct[:, None]
    return ((scores > mine) | ((scores == mine) & later)).sum(1)


def i2t_ranks(similarity: torch.Tensor, image_of_text: torch.Tensor) -> torch.Tensor:
    """Per image, the best rank of its captions in its row."""
    per_text = torch.cat(
        [
            ranks(
                similarity[image_of_text[s : s + _CHUNK]],
                torch.arange(s, min(s + _CHUNK, len(image_of_text))),
            )
            for s in range(0, len(image_of_text), _CHUNK)
        ]
    )
    best = torch.full((similarity.shape[0],), similarity.shape[1], dtype=torch.long)
    return best.scatter_reduce(0, image_of_text, per_text, reduce="amin")


def t2i_ranks(similarity: torch.Tensor, image_of_text: torch.Tensor) -> torch.Tensor:
    """Per caption, the rank of its image in its column."""
    cols = similarity.T
    return torch.cat(
        [
            ranks(cols[s : s + _CHUNK], image_of_text[s : s + _CHUNK])
            for s in range(0, cols.shape[0], _CHUNK)
        ]
    )


def _recalls(r: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    return {f"R@{k}": 100.0 * float((r < k).double().mean()) for k in ks}


def recall_at_k(
    similarity,
    image_of_text,
    ks: Sequence[int] = KS,
    t2i_similarity=None,
) -> dict:
    """Image->text and text->image R@K (percent) and rsum of a similarity [images, texts] where
    text t describes image `image_of_text[t]`. `t2i_similarity` (default: `similarity`) is the
    matrix the text->image ranks read, for re-ranked results that keep one matrix per direction.
    Ties rank as the references' `np.argsort(scores)[::-1]` with a stable sort: among equal
    scores the higher index first. Returns {"i2t": {"R@1": ..}, "t2i": {..}, "rsum", "images",
    "texts"}."""
    sim, owner = _checked(similarity, image_of_text)
    cols = sim if t2i_similarity is None else _checked(t2i_similarity, owner)[0]
    if cols.shape != sim.shape:
        raise InputError(f"t2i_similarity has shape {tuple(cols.shape)}, not {tuple(sim.shape)}")
    i2t = _recalls(i2t_ranks(sim, owner), ks)
    t2i = _recalls(t2i_ranks(cols, owner), ks)
    rsum = sum(i2t.values()) + sum(t2i.values())
    return {"i2t": i2t, "t2i": t2i, "rsum": rsum, "images": sim.shape[0], "texts": sim.shape[1]}


def five_fold(
    similarity,
    image_of_text,
    ks: Sequence[int] = KS,
    t2i_similarity=None,
    fold: int = FOLD,
    folds: int = 5,
) -> dict:
    """COCO 1K: `recall_at_k` on each of `folds` blocks of `fold` consecutive images with their
    captions, and the mean of every figure ("folds" holds each block's)."""
    sim, owner = _checked(similarity, image_of_text)
    if sim.shape[0] != fold * folds:
        raise InputError(
            f"{folds} folds of {fold} images need {fold * folds} images, got {sim.shape[0]}"
        )
    cols = sim if t2i_similarity is None else _checked(t2i_similarity, owner)[0]
    results = []
    for f in range(folds):
        texts = torch.nonzero((owner >= f * fold) & (owner < (f + 1) * fold)).flatten()
        block = slice(f * fold, (f + 1) * fold)
        results.append(
            recall_at_k(sim[block][:, texts], owner[texts] - f * fold, ks, cols[block][:, texts])
        )
    mean = {
        d: {k: float(np.mean([r[d][k] for r in results])) for k in results[0][d]}
        for d in ("i2t", "t2i")
    }
    rsum = float(np.mean([r["rsum"] for r in results]))
    return mean | {"rsum": rsum, "images": fold, "folds": results}


# ----------------------------------------------------------------------------- re-ranking


def top_candidates(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best texts per image [N, k] and images per text [T, k] by ITC similarity."""
    itc = torch.as_tensor(itc)
    return (
        itc.topk(min(k, itc.shape[1]), dim=1).indices,
        itc.T.topk(min(k, itc.shape[0]), dim=1).indices,
    )


def reranked(
    itc: torch.Tensor,
    i2t_top: torch.Tensor,
    i2t_itm: torch.Tensor,
    t2i_top: torch.Tensor,
    t2i_itm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two re-ranked matrices [images, texts]: ITM + ITC at each query's candidates, -100
    elsewhere (i2t rows from `i2t_top`, t2i columns from `t2i_top`)."""
    itc = torch.as_tensor(itc, dtype=torch.float64)
    i2t = torch.full_like(itc, OUTSIDE)
    i2t.scatter_(1, i2t_top, i2t_itm.double() + itc.gather(1, i2t_top))
    t2i = torch.full_like(itc.T, OUTSIDE)
    t2i.scatter_(1, t2i_top, t2i_itm.double() + itc.T.gather(1, t2i_top))
    return i2t, t2i.T


def rerank(
    itc, k: int, itm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank the top `k` of every query by `itm(images, texts)` (one score per pair) plus ITC,
    as ALBEF and BLIP do; candidates outside the top `k` stay at -100 whatever ITM says."""
    itc = torch.as_tensor(itc, dtype=torch.float64)
    i2t_top, t2i_top = top_candidates(itc, k)
    rows = torch.arange(itc.shape[0])[:, None].expand_as(i2t_top)
    cols = torch.arange(itc.shape[1])[:, None].expand_as(t2i_top)
    i2t_itm = itm(rows.flatten(), i2t_top.flatten()).reshape(i2t_top.shape)
    t2i_itm = itm(t2i_top.flatten(), cols.flatten()).reshape(t2i_top.shape)
    return reranked(itc, i2t_top, i2t_itm, t2i_top, t2i_itm)


# ----------------------------------------------------------------------------- retrieval sets


@dataclass
class RetrievalSet:
    """Images (ids and loaders) and captions; `image_of_text[t]` the image caption t describes.
    `dropped` lists images left out (unreadable), each with its file and why."""

    name: str
    image_ids: list[str]
    load: Callable[[int], Image.Image]
    texts: list[str]
    image_of_text: list[int]
    dropped: list[str] = field(default_factory=list)


def karpathy_set(path: str | Path, images: str | Path, split: str, limit: int | None = None):
    """The images of `split` in a Karpathy split file and their captions (file order), images read
    from `images` (also `images/<val2014|train2014>/` for COCO names). A split the file lacks, or
    an image of the split without a caption, is an InputError naming the file (and row)."""
    from groundcam.data.captions import read_captions
    from groundcam.data.sample import ReadReport

    path, images = Path(path), Path(images)
    with warnings.catch_warnings():  # the problems that matter here are raised below
        warnings.simplefilter("ignore")
        captions = read_captions(path, layout="karpathy", report=ReadReport(), split=split)
    entries = json.loads(path.read_text(encoding="utf-8-sig"))["images"]
    have = {c.image for c in captions}
    wanted = ("train", "restval") if split == "train" else (split,)
    present: set[str] = set()
    order: list[str] = []
    dropped: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        entry_split = str(entry.get("split", "")).strip().lower() if isinstance(entry, dict) else ""
        present.add(entry_split or "(none)")
        if entry_split not in wanted:
            continue
        name = str(entry.get("filename", "")).strip()
        if name not in have:
            raise InputError(
                f"{path}:images[{i}]: image {name or '(no filename)'} of split {split!r} has no "
                "caption; every image of a retrieval set needs at least one"
            )
        if name in seen:
            continue
        seen.add(name)
        if _image_path(images, name).is_file():
            order.append(name)
        else:
            dropped.append(name)
    if not order and not dropped:
        raise InputError(
            f"{path}: no images in split {split!r} (splits present: {', '.join(sorted(present))})"
        )
    if limit:
        order = order[:limit]
    dropped = [f"{_image_path(images, name)}: image not found" for name in dropped]
    index = {name: i for i, name in enumerate(order)}
    kept = [c for c in captions if c.image in index]

    def load(i: int) -> Image.Image:
        from groundcam.io import read_image, to_rgb

        return to_rgb(read_image(_image_path(images, order[i])))

    texts, owner = [c.caption for c in kept], [index[c.image] for c in kept]
    return RetrievalSet(f"{path.name}/{split}", order, load, texts, owner, dropped)


def _image_path(images: Path, name: str) -> Path:
    """Where an image of a split file is: `images/name`, else COCO's `images/val2014/name` or
    `images/train2014/name`."""
    candidates = [images / name] + [images / d / name for d in ("val2014", "train2014")]
    return next((p for p in candidates if p.is_file()), candidates[0])


def shapes_set(split: str, scenes: int, seed: int, image_size: int) -> RetrievalSet:
    """Generated scenes, each with its caption from the generator (objects left to right)."""
    from groundcam.data.shapes import generate_scene
    from groundcam.data.shapes_captions import left_to_right

    samples = [generate_scene(split, i, seed, image_size) for i in range(scenes)]
    return RetrievalSet(
        f"shapes/{split}",
        [s.image_id for s in samples],
        lambda i: samples[i].image.convert("RGB"),
        [left_to_right(s).caption for s in samples],
        list(range(scenes)),
    )


# ----------------------------------------------------------------------------- the run


def _cached(path: Path, compute: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """A tensor saved at `path` by an earlier run, else `compute(*args)`, saved atomically."""
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, OSError, EOFError):
            pass  # a torn file from a kill: computed again
    value = compute(*args)
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def _load_images(data: RetrievalSet, explainer, indices: Sequence[int]) -> torch.Tensor:
    return explainer.prepare_images([data.load(i) for i in indices])


def run_retrieval(
    explainer,
    data: RetrievalSet,
    out: str | Path,
    config: dict,
    k_test: int | None = None,
    batch: int = 64,
    procs=None,
    progress: bool = True,
    dataset: str = "",
) -> dict | None:
    """ITC similarity of every image with every text, then (models with an `itm` target) ITM
    re-ranking of each query's top `k_test`; recalls before and after, also as COCO 1K five folds
    when the set has 5,000 images. Writes `config.json`, `embeddings/`, `parts/`, the matrices
    (`similarity_itc.npy`, `similarity_i2t_itm.npy`, `similarity_t2i_itm.npy`,
    `image_of_text.npy`), `texts.json` and `summary.json` to `out`; a rerun resumes. Returns the
    summary on the main process (None on the others)."""
    from tqdm import tqdm

    procs = procs or Processes()
    out = Path(out)
    if "similarity" not in explainer.targets:
        raise InputError(
            f"a {explainer.family} model has no similarity target: retrieval needs a model that "
            "scores image-text pairs (CLIP, SigLIP, ALBEF, BLIP ITM)"
        )
    rerank_itm = "itm" in explainer.targets
    k = k_test or K_TEST.get(dataset, 128)
    fp = dict(config) | {
        "images": len(data.image_ids),
        "texts": len(data.texts),
        "k_test": k if rerank_itm else None,
    }
    check_config(out, fp)
    procs.barrier()
    if procs.is_main:
        (out / "embeddings").mkdir(parents=True, exist_ok=True)
        (out / "parts").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(fp, indent=1) + "\n")
    procs.barrier()

    # ITC: embeddings (or, for a similarity that is no dot product, rows of the matrix) in
    # fixed chunks, each process its share, saved as they are made
    n, t = len(data.image_ids), len(data.texts)
    apart = explainer.embeds_apart
    jobs = [("images" if apart else "rows", s, min(s + batch, n)) for s in range(0, n, batch)]
    texts = [(s, min(s + 4 * batch, t)) for s in range(0, t, 4 * batch)]
    jobs += [("texts", a, b) for a, b in texts] if apart else []

    def embed(kind: str, a: int, b: int) -> torch.Tensor:
        if kind == "texts":
            ids, mask = explainer.prepare_texts(data.texts[a:b])
            return explainer.embed_texts(ids, mask).float().cpu()
        pixels = _load_images(data, explainer, range(a, b))
        if kind == "images":
            return explainer.embed_images(pixels).float().cpu()
        blocks = []
        for c, d in texts:
            ids, mask = explainer.prepare_texts(data.texts[c:d])
            blocks.append(explainer.similarity_matrix(pixels, ids, mask).float().cpu())
        return torch.cat(blocks, dim=1)

    def cached(job: tuple[str, int, int]) -> torch.Tensor:
        return _cached(out / "embeddings" / f"{job[0]}_{job[1]:07d}.pt", embed, *job)

    for job in tqdm(jobs[procs.rank :: procs.world], desc="embed", disable=not progress):
        cached(job)
    procs.barrier()
    parts = {kind: [cached(j) for j in jobs if j[0] == kind] for kind in ("images", "texts")}
    if apart:
        itc = (torch.cat(parts["images"]) @ torch.cat(parts["texts"]).T).double()
    else:
        itc = torch.cat([cached(j) for j in jobs]).double()
    owner = torch.tensor(data.image_of_text, dtype=torch.long)

    i2t = t2i = None
    if rerank_itm:
        i2t, t2i = _rerank_itm(explainer, data, itc, k, out, procs, progress, batch)
    if not procs.is_main:
        return None
    if i2t is not None:  # the figures are those of the saved float32 matrices (ITC already is)
        i2t, t2i = i2t.float().double(), t2i.float().double()
    np.save(out / "similarity_itc.npy", itc.float().numpy())
    np.save(out / "image_of_text.npy", owner.numpy())
    (out / "texts.json").write_text(
        json.dumps({"image_ids": data.image_ids, "texts": data.texts}) + "\n"
    )
    results = {"itc": recall_at_k(itc, owner)}
    if i2t is not None:
        np.save(out / "similarity_i2t_itm.npy", i2t.float().numpy())
        np.save(out / "similarity_t2i_itm.npy", t2i.float().numpy())
        results["itm"] = recall_at_k(i2t, owner, t2i_similarity=t2i)
    if n == 5 * FOLD:
        results["itc_1k_5fold"] = five_fold(itc, owner)
        if i2t is not None:
            results["itm_1k_5fold"] = five_fold(i2t, owner, t2i_similarity=t2i)
    summary = {"config": fp, "set": data.name, "dropped_images": data.dropped} | results
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _rerank_itm(explainer, data, itc, k, out, procs, progress, batch):
    """ITM scores of every query's top `k` candidates, recorded per query in `parts/`; returns
    the two re-ranked matrices (on every process, after all of them finished). Queries are
    scored in fixed groups of `GROUP` of one direction, their pairs ordered by image so that a
    forward of `batch` pairs encodes few images; a record never depends on what ran before."""
    from tqdm import tqdm

    top = dict(zip(("i2t", "t2i"), top_candidates(itc, k), strict=True))
    groups = [
        [(d, q) for q in range(s, min(s + GROUP, len(top[d])))]
        for d in ("i2t", "t2i")
        for s in range(0, len(top[d]), GROUP)
    ]
    done = _itm_done(out)
    todo = [g for g in groups if any(q not in done for q in g)]
    procs.barrier()  # nobody writes until every process has read what is done
    pixels: dict[int, torch.Tensor] = {}

    def image(i: int) -> torch.Tensor:
        if i not in pixels:
            pixels[i] = _load_images(data, explainer, [i])
        return pixels[i]

    with _open_part(out / "parts" / f"itm_rank{procs.rank}.jsonl") as part:
        for group in tqdm(todo[procs.rank :: procs.world], desc="itm", disable=not progress):
            cands = {(d, q): top[d][q].tolist() for d, q in group}
            scores = {query: [0.0] * len(c) for query, c in cands.items()}
            pairs = sorted(  # (image, text, query, candidate position)
                ((q, c) if d == "i2t" else (c, q)) + ((d, q), j)
                for d, q in group
                for j, c in enumerate(cands[(d, q)])
            )
            for s in range(0, len(pairs), batch):
                chunk = pairs[s : s + batch]
                used = sorted({p[0] for p in chunk})
                ids, mask = explainer.prepare_texts([data.texts[p[1]] for p in chunk])
                index = torch.tensor([used.index(p[0]) for p in chunk])
                pv = torch.cat([image(i) for i in used])
                got = explainer.score_tensors(pv, ids, mask, index, target="itm").explained
                for p, value in zip(chunk, got.float().cpu().tolist(), strict=True):
                    scores[p[2]][p[3]] = value
            seq = time.time_ns()
            part.write(
                "".join(
                    json.dumps(
                        {"dir": d, "q": q, "candidates": top[d][q].tolist()}
                        | {"itm": scores[(d, q)], "_seq": seq}
                    )
                    + "\n"
                    for d, q in group
                )
            )
            part.flush()
    procs.barrier()
    done = _itm_done(out)
    i2t_itm = torch.tensor([done[("i2t", q)] for q in range(itc.shape[0])], dtype=torch.float64)
    t2i_itm = torch.tensor([done[("t2i", q)] for q in range(itc.shape[1])], dtype=torch.float64)
    return reranked(
        itc,
        top["i2t"],
        i2t_itm.reshape(top["i2t"].shape),
        top["t2i"],
        t2i_itm.reshape(top["t2i"].shape),
    )


def _itm_done(out: Path) -> dict[tuple[str, int], list[float]]:
    """ITM scores per (direction, query) recorded by any process of any earlier run."""
    done = {}
    for path in sorted((out / "parts").glob("itm_rank*.jsonl")):
        for rec in _read_jsonl(path):
            done[(rec["dir"], rec["q"])] = rec["itm"]
    return done
