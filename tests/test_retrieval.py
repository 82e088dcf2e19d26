"""Retrieval as SCAN and ALBEF/BLIP report it: R@K on matrices with known ranks (ties by the
documented argsort rule), ITM re-ranking that stays inside the top k, COCO 1K five folds, a resumed
run equal to an uninterrupted one, and `groundcam eval retrieval` on tiny ALBEF and CLIP models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_clip import processor_for as clip_processor
from test_clip import tiny_clip
from tiny import noise_images, saved

import groundcam as gc
from groundcam.cli import main
from groundcam.errors import InputError
from groundcam.eval.retrieval import (
    OUTSIDE,
    five_fold,
    recall_at_k,
    rerank,
    run_retrieval,
    shapes_set,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# 3 images, 2 captions each (texts 0,1 -> image 0; 2,3 -> 1; 4,5 -> 2)
SIM = np.array(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
        [0.5, 0.6, 0.1, 0.7, 0.9, 0.2],
        [0.9, 0.8, 0.7, 0.6, 0.1, 0.2],
    ]
)
OWNER = [0, 0, 1, 1, 2, 2]


def reference(sim: np.ndarray, owner: list[int], ks, cols: np.ndarray | None = None) -> dict:
    """SCAN's evaluation.py loops, transcribed with a stable argsort (the documented tie rule);
    `cols` the matrix text->image reads (ALBEF's score_matrix_t2i.T), default `sim`."""
    owner, cols = np.asarray(owner), sim if cols is None else cols
    i2t = []
    for i in range(sim.shape[0]):
        inds = np.argsort(sim[i], kind="stable")[::-1]
        i2t.append(min(int(np.where(inds == t)[0][0]) for t in np.nonzero(owner == i)[0]))
    t2i = []
    for t in range(sim.shape[1]):
        inds = np.argsort(cols[:, t], kind="stable")[::-1]
        t2i.append(int(np.where(inds == owner[t])[0][0]))
    return {
        "i2t": {f"R@{k}": 100 * np.mean(np.array(i2t) < k) for k in ks},
        "t2i": {f"R@{k}": 100 * np.mean(np.array(t2i) < k) for k in ks},
    }


def test_recall_on_a_matrix_with_known_ranks():
    # i2t best ranks [0, 1, 4]; t2i ranks [1, 2, 2, 0, 2, 1]: text 0 ties image 0 with image 2
    # (0.9) and text 5 ties image 2 with image 1 (0.2): the higher index ranks first
    r = recall_at_k(SIM, OWNER, ks=(1, 2, 5))
    assert r["i2t"] == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@5": 100.0})
    assert r["t2i"] == pytest.approx({"R@1": 100 / 6, "R@2": 50.0, "R@5": 100.0})
    assert r["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 100 / 6 + 50 + 100)
    assert (r["images"], r["texts"]) == (3, 6)


def test_ties_follow_the_reversed_stable_argsort():
    # all equal: image i's own text has the 3 - i later indices ahead of it
    r = recall_at_k(np.zeros((4, 4)), [0, 1, 2, 3], ks=(1, 2))
    assert r["i2t"] == {"R@1": 25.0, "R@2": 50.0}
    assert r["t2i"] == {"R@1": 25.0, "R@2": 50.0}
    rng = np.random.default_rng(0)
    for _ in range(20):  # many ties: integer scores 0..3
        sim = rng.integers(0, 4, (7, 14)).astype(float)
        owner = list(rng.permutation(np.arange(14) % 7))
        got = recall_at_k(sim, owner, ks=(1, 3, 5))
        want = reference(sim, owner, (1, 3, 5))
        assert got["i2t"] == pytest.approx(want["i2t"])
        assert got["t2i"] == pytest.approx(want["t2i"])


def test_bad_inputs_are_one_line():
    with pytest.raises(InputError, match="image 2 has no caption"):
        recall_at_k(np.zeros((3, 2)), [0, 1])
    with pytest.raises(InputError, match="image_of_text must be 6 integers"):
        recall_at_k(SIM, [0, 1])
    with pytest.raises(InputError, match=r"lie in 0\.\.2"):
        recall_at_k(SIM, [0, 0, 1, 1, 2, 3])


def test_rerank_stays_inside_the_top_k():
    itc = torch.tensor(
        [[0.9, 0.8, 0.1, 0.0], [0.7, 0.6, 0.5, 0.2], [0.1, 0.2, 0.3, 0.4], [0.0, 0.1, 0.9, 0.3]]
    )

    def itm(images, texts):  # promotes the pair (0, 3), outside image 0's top 2, far above all
        return torch.where((images == 0) & (texts == 3), 1000.0, (texts == 1).double())

    i2t, t2i = rerank(itc, 2, itm)
    # image 0: candidates 0, 1 get ITM + ITC; text 3 stays at -100 whatever ITM said
    assert i2t[0].tolist() == pytest.approx([0.9, 1.8, OUTSIDE, OUTSIDE])
    assert i2t[2].tolist() == pytest.approx([OUTSIDE, OUTSIDE, 0.3, 0.4])
    # text 3's candidates are images 2 (0.4) and 3 (0.3); image 0's 1000 never enters
    assert t2i[:, 3].tolist() == pytest.approx([OUTSIDE, OUTSIDE, 0.4, 0.3])
    assert t2i[:, 1].tolist() == pytest.approx([1.8, 1.6, OUTSIDE, OUTSIDE])
    r = recall_at_k(i2t, [0, 1, 2, 3], ks=(1,), t2i_similarity=t2i)
    # i2t: image 0 now ranks text 1 first (miss), 1: text 1 (hit), 2: 3 over 2, 3: 2 over 3
    assert r["i2t"]["R@1"] == 25.0
    # t2i: text 0 image 0 (hit); text 1 image 0 (1.8 over 1.6); text 2 image 3 (its own image
    # 2 is outside the top 2); text 3 image 2 (0.4 over 0.3)
    assert r["t2i"]["R@1"] == 25.0


def test_five_fold_is_the_mean_of_its_folds():
    sim = np.eye(10)
    sim[0, 1] = 2.0  # fold 0: image 0 prefers text 1, text 1 prefers image 0
    sim[2, 0] = 5.0  # fold 1's image 2 beats image 0 on text 0: only in the 10-image ranking
    folds = five_fold(sim, list(range(10)), ks=(1,), fold=2)
    assert folds["i2t"] == {"R@1": 90.0} and folds["t2i"] == {"R@1": 90.0}
    assert [f["i2t"]["R@1"] for f in folds["folds"]] == [50.0, 100.0, 100.0, 100.0, 100.0]
    assert folds["rsum"] == 180.0
    whole = recall_at_k(sim, list(range(10)), ks=(1,))
    assert whole["t2i"]["R@1"] == 80.0  # text 0 lost to image 2, text 1 to image 0
    with pytest.raises(InputError, match="need 10 images"):
        five_fold(np.eye(8), list(range(8)), fold=2)


@pytest.fixture(scope="module")
def albef(tiny_model_dir):
    return gc.load(tiny_model_dir)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-clip")
    return saved(path, tiny_clip(len(tokenizer), seed=1), clip_processor(tokenizer))


class Killed(Exception):
    pass


class DiesAfter:
    """The explainer, dying at its `calls`-th ITM forward (a kill mid-run)."""

    def __init__(self, explainer, calls: int):
        self.explainer, self.calls = explainer, calls

    def __getattr__(self, name):
        return getattr(self.explainer, name)

    def score_tensors(self, *args, **kwargs):
        self.calls -= 1
        if self.calls < 0:
            raise Killed
        return self.explainer.score_tensors(*args, **kwargs)


def test_a_resumed_run_gives_the_uninterrupted_result(albef, tmp_path):
    data = shapes_set("test", 6, 0, 64)
    cfg = {"model": "tiny"}
    args = dict(k_test=3, batch=4, progress=False)  # 18 pairs per group of 6 queries: 5 forwards
    whole = run_retrieval(albef, data, tmp_path / "whole", cfg, **args)
    with pytest.raises(Killed):  # killed in the second group's second forward
        run_retrieval(DiesAfter(albef, 7), data, tmp_path / "cut", cfg, **args)
    part = tmp_path / "cut" / "parts" / "itm_rank0.jsonl"
    assert len(part.read_text().splitlines()) == 6
    with part.open("a") as f:
        f.write('{"dir": "t2i", "q": 0, "cand')  # a torn line, as a kill mid-write leaves
    resumed = run_retrieval(DiesAfter(albef, 5), data, tmp_path / "cut", cfg, **args)
    assert resumed == whole | {"config": resumed["config"]}
    for name in ("similarity_itc", "similarity_i2t_itm", "similarity_t2i_itm"):
        np.testing.assert_array_equal(
            np.load(tmp_path / "cut" / f"{name}.npy"), np.load(tmp_path / "whole" / f"{name}.npy")
        )
    i2t, t2i = (np.load(tmp_path / "whole" / f"similarity_{d}_itm.npy") for d in ("i2t", "t2i"))
    assert ((i2t != OUTSIDE).sum(1) == 3).all() and ((t2i != OUTSIDE).sum(0) == 3).all()
    with pytest.raises(ValueError, match="different configuration"):
        run_retrieval(albef, data, tmp_path / "cut", cfg, k_test=2, progress=False)


def run(*args):
    return CliRunner().invoke(main, ["eval", "retrieval", *map(str, args)])


def recomputed(out, i2t: str = "itc", t2i: str = "itc") -> dict:
    """Recalls recomputed from the saved matrices by the transcribed reference."""
    owner = list(np.load(out / "image_of_text.npy"))
    rows, cols = (np.load(out / f"similarity_{n}.npy").astype(np.float64) for n in (i2t, t2i))
    return reference(rows, owner, (1, 5, 10), cols)


def test_cli_on_tiny_albef_and_clip(tiny_model_dir, clip_dir, tmp_path):
    for model, reranks in ((tiny_model_dir, True), (clip_dir, False)):
        out = tmp_path / model.name
        r = run("--model", model, "--dataset", "shapes", "--scenes", 5, "--k-test", 2, "--out", out)
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["itc"]["images"] == summary["itc"]["texts"] == 5
        assert ("itm" in summary) is reranks and ("itm:" in r.output) is reranks
        want = recomputed(out)
        assert summary["itc"]["i2t"] == pytest.approx(want["i2t"], abs=1e-6)
        assert summary["itc"]["t2i"] == pytest.approx(want["t2i"], abs=1e-6)
        if reranks:
            want = recomputed(out, "i2t_itm", "t2i_itm")
            assert summary["itm"]["i2t"] == pytest.approx(want["i2t"], abs=1e-6)
            assert summary["itm"]["t2i"] == pytest.approx(want["t2i"], abs=1e-6)
        sim = np.load(out / "similarity_itc.npy")
        assert sim.shape == (5, 5) and np.all(np.abs(sim) <= 1 + 1e-5)  # cosines
        again = run(
            "--model", model, "--dataset", "shapes", "--scenes", 5, "--k-test", 2, "--out", out
        )
        assert again.exit_code == 0 and json.loads((out / "summary.json").read_text()) == summary


def karpathy(tmp_path, images: list[dict]):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for entry, image in zip(images, noise_images(len(images), 40, 48), strict=True):
        image.save(tmp_path / "imgs" / entry["filename"])
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images}))
    return path


def entry(name: str, split: str, *captions: str) -> dict:
    return {"filename": name, "split": split, "sentences": [{"raw": c} for c in captions]}


def test_cli_reads_a_karpathy_split(clip_dir, tmp_path):
    images = [
        entry("a.jpg", "test", "the red circle", "green"),
        entry("b.jpg", "train", "blue"),
        entry("c.jpg", "test", "a small blue square"),
        entry("d.jpg", "test", "red", "blue", "green"),
    ]
    path = karpathy(tmp_path, images)
    (tmp_path / "imgs" / "d.jpg").unlink()  # a missing image is left out, and said so
    out = tmp_path / "out"
    args = ["--model", clip_dir, "--dataset", "flickr30k", "--captions", path]
    r = run(*args, "--images", tmp_path / "imgs", "--out", out)
    assert r.exit_code == 0, r.output
    assert "1 image(s) left out" in r.output and "d.jpg" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["itc"]["images"], summary["itc"]["texts"]) == (2, 3)
    assert json.loads((out / "texts.json").read_text())["texts"] == [
        "the red circle",
        "green",
        "a small blue square",
    ]
    assert list(np.load(out / "image_of_text.npy")) == [0, 0, 1]


def test_bad_split_files_are_one_line_and_exit_2(clip_dir, tmp_path):
    path = karpathy(tmp_path, [entry("a.jpg", "train", "red"), entry("b.jpg", "val", "blue")])
    common = ["--model", clip_dir, "--dataset", "flickr30k", "--images", tmp_path / "imgs"]
    r = run(*common, "--captions", path, "--out", tmp_path / "out")
    assert r.exit_code == 2
    assert r.output.strip() == (
        f"groundcam: error: {path}: no images in split 'test' (splits present: train, val)"
    )
    path = karpathy(
        tmp_path, [entry("a.jpg", "test", "red"), entry("b.jpg", "test"), entry("c.jpg", "test")]
    )
    r = run(*common, "--captions", path, "--out", tmp_path / "out")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert f"{path}:images[1]: image b.jpg of split 'test' has no caption" in r.output
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_two_processes_share_the_work_and_give_one_result(albef, tmp_path):
    import threading

    from groundcam.eval.runner import Processes

    data = shapes_set("test", 5, 0, 64)
    one = run_retrieval(albef, data, tmp_path / "one", {"model": "tiny"}, k_test=2, progress=False)
    wait = threading.Barrier(2).wait
    results = [None, None]

    def process(rank: int) -> None:
        procs = Processes(rank=rank, world=2, barrier=wait)
        results[rank] = run_retrieval(
            albef, data, tmp_path / "two", {"model": "tiny"}, k_test=2, procs=procs, progress=False
        )

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[1] is None and results[0] == one
    lines = [
        len((tmp_path / "two" / "parts" / f"itm_rank{r}.jsonl").read_text().splitlines())
        for r in (0, 1)
    ]
    assert lines == [5, 5]  # 10 queries, each computed once
    np.testing.assert_array_equal(
        np.load(tmp_path / "two" / "similarity_t2i_itm.npy"),
        np.load(tmp_path / "one" / "similarity_t2i_itm.npy"),
    )


@pytest.mark.parametrize("name", ["albef-tiny-shapes", "albef-tiny-shapes-amc"])
def test_builtins_retrieve_far_above_chance_and_their_cards_say_how(name):
    """Recomputed by ITC on 40 val scenes (the cards' figures are on 1,000 test scenes): R@5 in
    both directions far above its 12.5% chance."""
    from groundcam.zoo import ZOO

    card = (ZOO / name / "README.md").read_text()
    assert f"groundcam eval retrieval --model {name} --dataset shapes" in card
    model = gc.load(name)
    data = shapes_set("val", 40, 0, 128)
    images = model.embed_images(model.prepare_images([data.load(i) for i in range(40)]))
    texts = model.embed_texts(*model.prepare_texts(data.texts))
    r = recall_at_k(images @ texts.T, data.image_of_text)
    assert r["i2t"]["R@5"] > 70 and r["t2i"]["R@5"] > 70, r


class CrossOnly:
    """The explainer as a model whose similarity reads image and text together (SCAN): no
    embeddings apart, only `similarity_matrix`."""

    embeds_apart = False

    def __init__(self, explainer):
        self.explainer = explainer

    def __getattr__(self, name):
        if name in ("embed_images", "embed_texts"):
            raise AssertionError(f"{name} used on a model that does not embed apart")
        return getattr(self.explainer, name)


def test_a_similarity_without_embeddings_is_computed_block_by_block(albef, tmp_path):
    data = shapes_set("test", 7, 0, 64)
    args = dict(config={"model": "tiny"}, k_test=2, batch=3, progress=False)
    apart = run_retrieval(albef, data, tmp_path / "apart", **args)
    blocks = run_retrieval(CrossOnly(albef), data, tmp_path / "blocks", **args)
    assert sorted(p.name for p in (tmp_path / "blocks" / "embeddings").iterdir()) == [
        "rows_0000000.pt",
        "rows_0000003.pt",
        "rows_0000006.pt",
    ]
    np.testing.assert_allclose(
        np.load(tmp_path / "blocks" / "similarity_itc.npy"),
        np.load(tmp_path / "apart" / "similarity_itc.npy"),
        atol=1e-6,
    )
    assert blocks["itc"] == apart["itc"]


def families(tokenizer, tiny_model_dir):
    """A tiny model of every family with a similarity target, loaded as users load them."""
    from test_blip import make_processor, tiny
    from test_siglip import processor_for as siglip_processor
    from test_siglip import tiny_siglip
    from transformers import BlipForImageTextRetrieval

    yield "albef", gc.load(tiny_model_dir)
    yield "clip", gc.load(tiny_clip(len(tokenizer), 1), processor=clip_processor(tokenizer))
    blip = tiny(BlipForImageTextRetrieval, tokenizer)
    yield "blip", gc.load(blip, processor=make_processor(tokenizer))
    siglip = tiny_siglip(len(tokenizer), 1)
    yield "siglip", gc.load(siglip, processor=siglip_processor(tokenizer))


def test_every_family_ranks_pairs_as_its_similarity_target_scores_them(tokenizer, tiny_model_dir):
    images = noise_images(3, 64, 64, seed=4)
    phrases = ["the red circle", "a small blue square", "green", "blue star"]
    for family, model in families(tokenizer, tiny_model_dir):
        pixels = model.prepare_images(images)
        ids, mask = model.prepare_texts(phrases)
        sim = model.similarity_matrix(pixels, ids, mask)
        assert sim.shape == (3, 4) and model.embeds_apart
        rows = torch.arange(3).repeat_interleave(4)
        pairs = model.score_tensors(pixels, ids.repeat(3, 1), mask.repeat(3, 1), rows, "similarity")
        # the target's logit is an increasing function of the cosine (scale > 0, SigLIP's bias)
        logits = pairs.explained.reshape(3, 4).double()
        scale = (logits[0, 0] - logits[0, 1]) / (sim[0, 0] - sim[0, 1])
        assert scale > 0, family
        torch.testing.assert_close(
            logits,
            scale * sim.double() + (logits[0, 0] - scale * sim[0, 0]),
            rtol=1e-4,
            atol=1e-4,
            msg=family,
        )


def test_a_model_without_a_similarity_is_refused_before_writing(tmp_path):
    r = run("--model", "captioner-tiny-shapes", "--dataset", "shapes", "--out", tmp_path / "o")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "captioner model has no similarity target" in r.output
    assert not (tmp_path / "o").exists()


def test_scan_is_ranked_by_its_own_similarity_block_by_block(tmp_path):
    """SCAN reads words and regions together: it does not embed apart, its matrix equals its
    score of each pair, and the built-in retrieves far above chance on fresh scenes."""
    model = gc.load("scan-tiny-shapes")
    assert not model.embeds_apart
    data = shapes_set("val", 12, 0, 96)
    pixels = model.prepare_images([data.load(i) for i in range(12)])
    ids, mask = model.prepare_texts(data.texts)
    sim = model.similarity_matrix(pixels, ids, mask)
    n, t = sim.shape
    rows = torch.arange(n).repeat_interleave(t)
    pairs = model.score_tensors(pixels, ids.repeat(n, 1), mask.repeat(n, 1), rows, "similarity")
    torch.testing.assert_close(sim, pairs.explained.reshape(n, t), rtol=1e-5, atol=1e-5)
    summary = run_retrieval(model, data, tmp_path / "scan", config={"model": "scan"}, batch=5)
    r = summary["itc"]
    assert r["i2t"]["R@5"] > 70 and r["t2i"]["R@5"] > 70, r
