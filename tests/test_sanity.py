"""Sanity checks: the measures on inputs with known answers, the verdicts on a method that ignores
the model and on one that does not, the user's model left alone, and resume after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from tiny import saved, tiny_albef

import groundcam as gc
from groundcam.cli import main
from groundcam.eval import sanity
from groundcam.eval.sanity import gaussian_window, spearman, ssim

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spearman_known_answers():
    a = np.arange(10.0)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, a[::-1]) == pytest.approx(-1.0)
    assert spearman(a, a**3) == pytest.approx(1.0)  # ranks only
    # b's ranks are 1, 2, 3.5, 5, 3.5 (a tie): rho = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95))
    assert spearman(np.ones(4), a[:4]) == 0.0
    assert spearman(np.ones(4), np.ones(4)) == 1.0


def _ssim_by_loops(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al.'s SSIM written out window by window, as the reference to check against."""
    w = gaussian_window()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            x, y = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
            cov = (w * (x - mx) * (y - my)).sum()
            values.append(
                (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(values))


def test_ssim_known_answers():
    rng = np.random.default_rng(0)
    a = rng.random((16, 20))
    assert ssim(a, a) == pytest.approx(1.0)
    # Flat black against flat white: only the luminance term, C1 / (1 + C1).
    assert ssim(np.zeros((11, 11)), np.ones((11, 11))) == pytest.approx(1e-4 / (1 + 1e-4))
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1)
    assert ssim(a, b) == pytest.approx(_ssim_by_loops(a, b), rel=1e-9)
    assert ssim(a, b) < 0.9
    assert gaussian_window().sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="window"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def _edges(explainer, image, phrases):
    """An edge detector on the image: the model is never asked."""
    g = torch.tensor(np.asarray(image.convert("L")), dtype=torch.float32)[None, None]
    gx = F.conv2d(g, torch.tensor([[[[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]]]))
    gy = F.conv2d(g, torch.tensor([[[[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]]]]))
    m = F.adaptive_avg_pool2d((gx**2 + gy**2).sqrt(), (8, 8))[0, 0]
    return m.expand(len(phrases), 8, 8)


@pytest.fixture
def explainer(tokenizer):
    return gc.load(tiny_albef(len(tokenizer), seed=3), tokenizer=tokenizer)


def test_flags_the_edge_detector_and_passes_attn_gradcam(explainer, monkeypatch, tmp_path):
    monkeypatch.setitem(sanity.CUSTOM_MAPS, "edges", _edges)
    before = {k: v.clone() for k, v in explainer.model.state_dict().items()}
    methods = ["edges", "attn-gradcam"]
    summary = sanity.run_sanity(
        explainer, sanity.shapes_samples(3), methods, tmp_path, {"t": 1}, variants=["cascading"]
    )
    edges, agc = summary["methods"]["edges"], summary["methods"]["attn-gradcam"]
    assert edges["flagged"] and edges["breaks_at"] is None
    assert edges["final"]["spearman_abs"] == pytest.approx(1.0)
    assert edges["final"]["ssim"] == pytest.approx(1.0)
    assert not agc["flagged"] and agc["breaks_at"] is not None
    assert agc["final"]["spearman_abs"] < sanity.SURVIVES
    assert summary["flagged"] == ["edges"]
    # The top layer goes first (the ITM head), the patch embedding last.
    steps = agc["cascading"]
    assert steps[0]["layer"] == "itm_head" and "patch_embed" in steps[-1]["layer"]
    names = [s["layer"] for s in steps]
    assert names[1:4] == [f"text_encoder.encoder.layer.{i}" for i in (2, 1, 0)]
    assert names[5:7] == ["visual_encoder.blocks.1", "visual_encoder.blocks.0"]
    assert names[4].startswith("visual_encoder.norm+text_encoder.embeddings.")
    assert len(names) == 8
    # The user's model is untouched: same tensors, no hooks left behind.
    after = explainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks for m in explainer.model.modules())
    assert "edges" in sanity.table(summary) and "FLAGGED" in sanity.table(summary)


def test_randomise_changes_only_its_layer(explainer):
    work = sanity.copy_explainer(explainer)
    image, phrases = sanity.shapes_samples(1)[0][1:]
    layers = sanity.find_layers(work.model, lambda: work.explain(image, phrases))
    top = layers[-1]
    before = {k: v.clone() for k, v in work.model.state_dict().items()}
    sanity.randomise(work.model, top, seed=1)
    after = work.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"itm_head.weight", "itm_head.bias"}
    again = sanity.copy_explainer(explainer)
    sanity.randomise(again.model, top_of(again, image, phrases), seed=1)
    assert torch.equal(again.model.itm_head.weight, work.model.itm_head.weight)  # seeded


def top_of(ex, image, phrases):
    return sanity.find_layers(ex.model, lambda: ex.explain(image, phrases))[-1]


class Killed(Exception):
    pass


def test_resume_after_an_interruption(explainer, tmp_path):
    samples = sanity.shapes_samples(2)
    args = (explainer, samples, ["attn-gradcam", "gradcam"])
    whole = sanity.run_sanity(*args, tmp_path / "whole", {"t": 1})
    expected = sanity.read_records(tmp_path / "whole" / "results.jsonl")

    def kill_after(it, n=20):
        for i, rec in enumerate(it):
            if i == n:
                raise Killed
            yield rec

    out = tmp_path / "cut"
    with pytest.raises(Killed):
        sanity.run_sanity(*args, out, {"t": 1}, progress=kill_after)
    # A kill while an image's lines were written: its last phrase lost, a line torn.
    lines = (out / "results.jsonl").read_text().splitlines()[:-1]
    (out / "results.jsonl").write_text("".join(x + "\n" for x in lines) + '{"variant": "casc')
    resumed = sanity.run_sanity(*args, out, {"t": 1})
    got = sanity.read_records(out / "results.jsonl")
    key = lambda r: (r["variant"], r["step"], r["method"], r["image_id"], r["phrase"])  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    assert len({key(r) for r in got}) == len(got)  # nothing twice
    for a, b in zip(sorted(got, key=key), sorted(expected, key=key), strict=True):
        assert a.keys() == b.keys()
        for m in ("spearman", "spearman_abs", "ssim"):
            assert a[m] == pytest.approx(b[m], abs=1e-6)
    assert resumed["methods"] == whole["methods"]
    with pytest.raises(ValueError, match="different configuration"):
        sanity.run_sanity(*args, out, {"t": 2})


def test_cli_writes_a_table_and_refuses_bad_methods(tokenizer, tmp_path):
    model_dir = saved(tmp_path / "m", tiny_albef(len(tokenizer), seed=3), tokenizer)
    base = ["eval", "sanity", "--model", str(model_dir), "--scenes", "1"]
    res = CliRunner().invoke(main, base + ["--out", str(tmp_path / "o"), "--methods", "nope"])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1
    assert "--methods: nope not available" in res.output
    args = base + ["--out", str(tmp_path / "o"), "--methods", "gradcam", "--variants", "cascading"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "gradcam" in res.output and "verdict" in res.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["config"]["methods"] == ["gradcam"]
    assert len(summary["methods"]["gradcam"]["cascading"]) == 8
    res = CliRunner().invoke(main, args + ["--seed", "1"])
    assert res.exit_code == 2 and "different configuration" in res.output
    assert "seed: 0 there, 1 now" in res.output and "Traceback" not in res.output


def test_data_randomisation_compares_with_the_other_model(explainer, tokenizer, tmp_path):
    other = gc.load(tiny_albef(len(tokenizer), seed=4), tokenizer=tokenizer)
    summary = sanity.run_sanity(
        explainer,
        sanity.shapes_samples(2),
        ["gradcam"],
        tmp_path,
        {},
        variants=[],
        data_model=other,
    )
    data = summary["methods"]["gradcam"]["data"]
    assert len(data) == 1 and data[0]["n"] > 0
    assert -1 <= data[0]["spearman"] < 0.9  # another model's map, not the same one
    records = sanity.read_records(tmp_path / "results.jsonl")
    assert {r["variant"] for r in records} == {"data"}


def test_a_failing_sample_is_recorded_and_skipped(explainer, monkeypatch, tmp_path):
    def picky(ex, image, phrases):
        if image.size == (5, 5):
            raise ValueError("image too small for this map")
        return _edges(ex, image, phrases)

    monkeypatch.setitem(sanity.CUSTOM_MAPS, "picky", picky)
    samples = sanity.shapes_samples(2) + [("bad", Image.new("RGB", (5, 5)), ["red circle"])]
    summary = sanity.run_sanity(explainer, samples, ["picky"], tmp_path, {}, variants=["cascading"])
    entry = summary["methods"]["picky"]
    assert entry["failed"] == [
        {"image_id": "bad", "error": "ValueError: image too small for this map"}
    ]
    assert entry["errors"] == len(entry["cascading"])  # one per step, that sample only
    assert entry["flagged"] and entry["cascading"][-1]["n"] > 0


def test_summary_break_is_the_last_run_below_the_threshold():
    rows = [(1, 0.3), (2, 0.7), (3, 0.5), (4, 0.1)]  # dips at 1, recovers at 2, breaks at 3
    records = [
        {"variant": "cascading", "step": k, "layer": f"L{k}", "method": "m", "image_id": "a"}
        | {"phrase": "p", "spearman_abs": v, "spearman": -v, "ssim": v / 2}
        for k, v in rows
    ]
    entry = sanity.summarize(records, ["m"])["methods"]["m"]
    assert entry["breaks_at"] == {"step": 3, "layer": "L3"}
    assert entry["final"] == {"spearman_abs": 0.1, "spearman": -0.1, "ssim": 0.05}
    assert not entry["flagged"]
    records[-1]["spearman_abs"] = 0.51  # survives: flagged, never breaks
    entry = sanity.summarize(records, ["m"])["methods"]["m"]
    assert entry["flagged"] and entry["breaks_at"] is None


@pytest.mark.filterwarnings("ignore:phrase .* unknown to the model's vocabulary")
def test_a_generative_family_through_the_same_surface(tmp_path):
    import tiny_vlm

    model, processor = tiny_vlm.llava()
    ex = gc.load(model, processor=processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = sanity.run_sanity(
        ex, sanity.shapes_samples(1), ["gradcam"], tmp_path, {}, variants=["cascading"]
    )
    steps = summary["methods"]["gradcam"]["cascading"]
    names = [s["layer"] for s in steps]
    assert names[0] == "model.language_model.norm+lm_head"
    assert names[1:3] == [f"model.language_model.layers.{i}" for i in (1, 0)]
    assert names[4:6] == [f"model.vision_tower.encoder.layers.{i}" for i in (1, 0)]
    assert summary["methods"]["gradcam"]["errors"] == 0 and steps[-1]["n"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_flat_original_maps_are_left_out_not_counted_as_surviving():
    """Two flat maps are equal whatever the model: such pairs must not read as rho = 1."""
    flat, ramp = torch.zeros(8, 8), torch.arange(64.0).reshape(8, 8)
    assert sanity.compare(flat, flat)["flat_original"]
    assert sanity.compare(flat, flat)["spearman_abs"] == 1.0  # what would have been averaged
    assert not sanity.compare(ramp, flat)["flat_original"]
    base = {"variant": "cascading", "layer": "L1", "method": "m", "image_id": "a", "phrase": "p"}
    records = [
        base
        | {"step": 1}
        | sanity.compare(ramp, torch.rand(8, 8, generator=torch.Generator().manual_seed(0))),
        base | {"step": 1, "index": 1} | sanity.compare(flat, flat),
        base | {"step": 1, "index": 2} | sanity.compare(flat, flat),
        base | {"step": 2, "layer": "L2", "index": 2} | sanity.compare(flat, flat),
    ]
    entry = sanity.summarize(records, ["m"])["methods"]["m"]
    assert entry["flat"] == {"cascading": 2}  # original maps, not (map, step) pairs
    assert entry["cascading"][0]["n"] == 1
    assert entry["final"]["spearman_abs"] == pytest.approx(records[0]["spearman_abs"])
    only_flat = sanity.summarize(records[1:], ["m"])
    assert "flagged" not in only_flat["methods"]["m"] and only_flat["flagged"] == []
    assert "no verdict: every original map is flat" in sanity.table(only_flat)


def test_an_ocr_model_is_checked_on_lines_it_reads_as_written(tmp_path):
    """OCR reads no phrases: each line's text is teacher-forced and its token maps averaged."""
    out = tmp_path / "o"
    args = ["eval", "sanity", "--model", "trocr-tiny-glyphs", "--scenes", "1"]
    args += ["--methods", "attention", "--variants", "cascading", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == "glyphs"
    entry = summary["methods"]["attention"]
    assert entry["errors"] == 0 and entry["cascading"][-1]["n"] == 1
    ocr = gc.load("trocr-tiny-glyphs")
    ((_, image, texts),) = sanity.glyph_samples(1)
    tokens = ocr.explain_generation(image, method="attention", text=texts[0]).raw_maps
    got = sanity.method_maps(ocr, image, texts, "attention")
    assert got.shape == (1, *tokens.shape[1:])
    torch.testing.assert_close(got[0], tokens.mean(0))
