"""One model shared by threads: every hooked entry is serialised per model, so 4 threads give
exactly the single-thread maps; two model instances still run side by side; hooks act only in the
thread that installed them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_blip import make_processor, tiny
from tiny import noise_images, tiny_albef
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

import groundcam as gc
from groundcam import grouping
from groundcam.adapters.albef import AlbefAdapter
from groundcam.capture import HookPoint, Recorder
from groundcam.explainer import Explainer

THREADS, CALLS = 4, 20
PHRASES = [
    ["the red circle"],
    ["the small blue square", "green"],
    ["a star left of the green square", "red", "the blue circle"],
]
# (method, target): gradient methods twice, as they are the ones whose hooks and backward
# passes a second thread used to disturb
ALBEF_RUNS = [
    ("gradcam", "itm"),
    ("attn-gradcam", "itm"),
    ("attention", "itm"),
    ("gradcam", "similarity"),
    ("rollout", "itm"),
    ("relevance", "itm"),
    ("attn-gradcam", "itm"),
    ("gradcam", "itm"),
]
BLIP_RUNS = [
    ("gradcam", "itm"),
    ("attn-gradcam", "itm"),
    ("attention", "itm"),
    ("relevance", "itm"),
    ("gradcam", "similarity"),
    ("attn-gradcam", "itm"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_thread):
    """Tiny matrices on one intra-op thread: same numbers, whatever the machine."""


@pytest.fixture(scope="module")
def images():
    return noise_images(5, 72, 88, seed=3)


@pytest.fixture(scope="module")
def albef(tokenizer):
    return Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="tiny"))


@pytest.fixture(scope="module")
def blip_itm(tokenizer):
    return gc.load(tiny(BlipForImageTextRetrieval, tokenizer), processor=make_processor(tokenizer))


@pytest.fixture(scope="module")
def blip_caption(tokenizer):
    model = tiny(BlipForConditionalGeneration, tokenizer, seed=1)
    return gc.load(model, processor=make_processor(tokenizer))


def jobs(runs: list[tuple[str, str]], n_images: int) -> list[tuple[str, str, int, int, int]]:
    """THREADS * CALLS calls (method, target, image, phrase group, entry) that mix methods, images,
    phrases and public entries, in an order where neighbours differ."""
    return [
        (*runs[k % len(runs)], k % n_images, k % len(PHRASES), k % 3)
        for k in range(THREADS * CALLS)
    ]


def call(explainer: Explainer, images, job) -> tuple[torch.Tensor, ...]:
    """The job through one of explain, explain_many or explain_tensors, and its scores."""
    method, target, i, p, entry = job
    phrases = PHRASES[p]
    if entry == 0:
        ex = explainer.explain(images[i], phrases, method=method, target=target)
    elif entry == 1:
        other = (i + 1) % len(images)
        ex = explainer.explain_many(
            [images[i], images[other]], [phrases, ["red"]], method=method, target=target
        )
    else:
        batch = explainer.prepare([images[i]], phrases)
        index = torch.zeros(len(phrases), dtype=torch.long)
        ex = explainer.explain_tensors(*batch, method=method, target=target, image_index=index)
    scores = explainer.scores(images[i], phrases, target=target)
    return ex.maps, ex.raw_maps, ex.scores, scores


def threaded(fn, work: list) -> list:
    """`fn(item)` for every item, THREADS threads at once (released together), results in order."""
    start = threading.Barrier(THREADS)

    def worker(part: list) -> list:
        start.wait()
        return [fn(item) for item in part]

    parts = [work[t::THREADS] for t in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        done = list(pool.map(worker, parts))
    out: list = [None] * len(work)
    for t, results in enumerate(done):
        out[t::THREADS] = results
    return out


def assert_same(alone: list[tuple], together: list[tuple], work: list) -> None:
    for job, a, b in zip(work, alone, together, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), f"{job}: threads changed the result"


@pytest.mark.parametrize(("name", "runs"), [("albef", ALBEF_RUNS), ("blip_itm", BLIP_RUNS)])
def test_four_threads_give_the_single_thread_maps_exactly(request, images, name, runs):
    explainer = request.getfixturevalue(name)
    work = jobs(runs, len(images))
    alone = [call(explainer, images, job) for job in work]
    together = threaded(lambda job: call(explainer, images, job), work)
    assert_same(alone, together, work)


def test_generation_in_four_threads_equals_one_thread(blip_caption, images):
    methods = ["gradcam", "attn-gradcam", "attention", "relevance"]
    work = [(methods[k % 4], k % len(images), k % 3) for k in range(THREADS * 5)]

    def generate(job):
        method, i, how = job
        text = None if how else "the red circle"
        gen = blip_caption.explain_generation(images[i], method=method, text=text, max_new_tokens=4)
        return gen.maps, gen.raw_maps, gen.scores, torch.tensor(gen.token_ids)

    alone = [generate(job) for job in work]
    assert_same(alone, threaded(generate, work), work)


def test_the_lock_belongs_to_the_model(tokenizer, albef):
    """Explainers over one model share its lock; another model instance has its own."""
    again = Explainer(AlbefAdapter(albef.model, tokenizer, name="again"))
    other = Explainer(AlbefAdapter(tiny_albef(len(tokenizer)), tokenizer, name="other"))
    assert again.lock is albef.lock
    assert other.lock is not albef.lock


def test_another_model_runs_while_one_is_busy(tokenizer, albef, images):
    """While a thread holds model A's lock (as a long explanation would), model B explains to the
    end in another thread, and model A's caller waits for the lock."""
    other = Explainer(AlbefAdapter(tiny_albef(len(tokenizer), seed=1), tokenizer, name="other"))
    results: dict[str, object] = {}

    def run(name, explainer):
        results[name] = explainer.explain(images[0], ["red"], method="gradcam").maps

    with albef.lock:
        b = threading.Thread(target=run, args=("b", other))
        a = threading.Thread(target=run, args=("a", albef))
        b.start()
        a.start()
        b.join(timeout=120)
        assert not b.is_alive() and "b" in results  # B did not wait for A's lock
        a.join(timeout=0.5)
        assert a.is_alive() and "a" not in results  # A waits while its lock is held
    a.join(timeout=120)
    assert torch.equal(results["a"], albef.explain(images[0], ["red"], method="gradcam").maps)


def test_a_recorder_sees_only_its_own_thread():
    """A forward of the same module in another thread, while a Recorder is open, is neither
    recorded nor changed."""
    layer = torch.nn.Linear(3, 2)
    mine, theirs = torch.ones(1, 3), torch.full((1, 3), 5.0)
    seen: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), Recorder([HookPoint("out", layer)], leaf=True) as rec:
        other = threading.Thread(target=lambda: seen.update(theirs=layer(theirs)))
        other.start()
        other.join()
        out = layer(mine)
        (recorded,) = rec.tensors()
    assert torch.equal(recorded.detach(), layer(mine).detach())
    assert recorded.is_leaf and recorded.requires_grad  # this thread's output became the leaf
    assert out is recorded
    assert torch.equal(seen["theirs"], layer(theirs))
    assert seen["theirs"].grad_fn is not None  # its own graph, not swapped for a leaf


def test_grouping_acts_only_in_its_own_thread():
    """A module grouped in one thread still runs per pair in another, and both threads may group
    the same module at once."""
    seen: list[tuple[int, ...]] = []

    class Shapes(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape))  # the rows the module itself is given
            return x

    module = Shapes()
    groups = grouping.ImageGroups.of(torch.tensor([0, 0, 1, 1]), 2)
    rows = torch.arange(4 * 3 * 2, dtype=torch.float).reshape(4, 3, 2)
    inside = threading.Event()
    release = threading.Event()
    outputs: dict[str, torch.Tensor] = {}

    def other():
        with grouping.grouped([module], groups):
            inside.set()
            release.wait(timeout=60)
            outputs["other grouped"] = module(rows)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(timeout=60)
    outputs["plain"] = module(rows)  # not grouped here: one row per pair
    with grouping.grouped([module], groups):  # no "already grouped" error
        outputs["grouped"] = module(rows)
    release.set()
    t.join(timeout=60)
    assert seen == [(4, 3, 2), (2, 6, 2), (2, 6, 2)]
    for out in outputs.values():
        assert torch.equal(out, rows)


def test_a_recorder_on_a_model_part_holds_the_models_lock(albef):
    """A Recorder watching any module of an explainer's model keeps other threads' explanations
    of that model waiting until it closes."""
    part = albef.model.text_encoder.encoder.layer[-1]
    free: list[bool] = []

    def try_lock():
        got = albef.lock.acquire(blocking=False)
        free.append(got)
        if got:
            albef.lock.release()

    with Recorder([HookPoint("layer", part)]):
        t = threading.Thread(target=try_lock)
        t.start()
        t.join(timeout=60)
    t = threading.Thread(target=try_lock)
    t.start()
    t.join(timeout=60)
    assert free == [False, True]


def test_first_loads_from_several_threads_all_succeed(tmp_path):
    """A fresh process whose threads all load at once (transformers' lazy imports resolved on
    first use by every thread together): every load succeeds, with the same weights."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import threading
        import groundcam as gc
        names = ["albef-tiny-shapes", "trocr-tiny-glyphs", "captioner-tiny-shapes"] * 2
        out, errors = {}, []
        def run(i, name):
            try:
                out[i] = sum(float(p.sum()) for p in gc.load(name).model.parameters())
            except Exception as e:
                errors.append(repr(e))
        threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert out[0] == out[3] and out[1] == out[4] and out[2] == out[5], out
        print("ok", len(out))
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert r.returncode == 0 and "ok 6" in r.stdout, r.stderr[-2000:]
