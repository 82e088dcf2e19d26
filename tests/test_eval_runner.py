"""`groundcam eval DATASET`: records checked against independent scoring, summaries, resume after a
crash or a kill, refusal to mix configurations, 1 vs 2 processes, sweep-layers and the report."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from flickr_like import write_flickr_like

from groundcam.api import load
from groundcam.cli import main
from groundcam.data.text import pre_caption
from groundcam.eval.datasets import open_units
from groundcam.eval.runner import EvalConfig, UnitScorer, run_eval
from groundcam.eval.summary import wilson_interval
from groundcam.eval.sweep import sweep_layers_of

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def explainer(tiny_model_dir):
    return load(tiny_model_dir)


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory):
    return write_flickr_like(tmp_path_factory.mktemp("f30k") / "flickr30k", 8)


def flickr_cfg(model, **kw) -> EvalConfig:
    return EvalConfig("flickr30k-entities", ("test",), str(model), **kw)


# ----------------------------------------------------------------------------- records


def test_flickr_records_match_independent_amc_scoring(
    fixtures, explainer, tiny_model_dir, tmp_path
):
    root = fixtures / "flickr30k_entities"
    units = open_units("flickr30k-entities", ["test"], root)
    result = run_eval(flickr_cfg(tiny_model_dir), units, explainer, tmp_path, progress=False)
    records = lines(tmp_path / "results.jsonl")
    assert len(records) == 18 == result.summary["n"]  # the fixture's 18 test phrases
    from PIL import Image

    for rec in records:
        image = Image.open(root / "flickr30k_images" / f"{rec['image_id']}.jpg").convert("RGB")
        ex = explainer.explain(image, [pre_caption(rec["phrase"])])
        h, w = image.height, image.width
        up = F.interpolate(ex.raw_maps[None], (h, w), mode="bicubic", align_corners=False)[0, 0]
        flat = int(torch.argmax(up))  # first maximum, row-major
        x, y = flat % w, flat // w
        hit = any(x1 < x < x2 and y1 < y < y2 for x1, y1, x2, y2 in rec["boxes"])
        assert rec["point"] == [x, y] and rec["hit"] == hit
        assert rec["text"] == pre_caption(rec["phrase"]) and rec["skipped"] is False
        assert rec["score"] == pytest.approx(float(ex.scores[0]), abs=1e-5)
    # the parser's boxes: 1-based <bndbox> minus 1; the woman's chain has two boxes
    woman = next(r for r in records if r["phrase"] == "A young woman")
    assert woman["boxes"] == [[39.0, 59.0, 149.0, 219.0], [59.0, 79.0, 119.0, 199.0]]
    hits = sum(r["hit"] for r in records)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["accuracy"] == hits / 18 and s["hits"] == hits
    assert s["by_split"]["test"]["n"] == 18
    assert sum(b["n"] for b in s["by_type"].values()) >= 18  # multi-type phrases count twice
    assert s["config"]["layer"] is not None and s["config"]["protocol"] == "amc"


def test_wilson_interval_solves_the_score_equation():
    z = 1.959963984540054
    for hits, n in [(6, 18), (1, 3), (480, 1000), (0, 7), (7, 7)]:
        lo, hi = wilson_interval(hits, n)
        p = hits / n
        # the interval's ends are the roots of (p - q)^2 = z^2 q (1 - q) / n
        a, b, c = 1 + z * z / n, -(2 * p + z * z / n), p * p
        disc = math.sqrt(b * b - 4 * a * c)
        assert lo == pytest.approx((-b - disc) / (2 * a), abs=1e-12)
        assert hi == pytest.approx((-b + disc) / (2 * a), abs=1e-12)
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    assert wilson_interval(0, 0) is None


def test_refcoco_units_group_sentences_of_one_image(fixtures, explainer, tiny_model_dir, tmp_path):
    units = open_units(
        "refcoco+",
        ["testA", "testB", "val"],
        fixtures / "refcoco+",
        fixtures / "coco" / "train2014",
    )
    # testA: one ref with two sentences on image 580001 -> one unit with both phrases
    assert [(u.split, u.sample.image_id, len(u.sample.phrases)) for u in units.units] == [
        ("testA", "580001", 2),
        ("testB", "580001", 1),
        ("val", "580002", 1),
    ]
    cfg = EvalConfig("refcoco+", ("testA", "testB", "val"), str(tiny_model_dir))
    s = run_eval(cfg, units, explainer, tmp_path, progress=False).summary
    assert {k: v["n"] for k, v in s["by_split"].items()} == {"testA": 2, "testB": 1, "val": 1}
    records = lines(tmp_path / "results.jsonl")
    assert all(len(r["boxes"]) == 1 for r in records)  # a ref has its one box


def test_mg_scores_raw_one_based_boxes(fixtures, explainer, tiny_model_dir, tmp_path):
    units = open_units("flickr30k-entities", ["test"], fixtures / "flickr30k_entities")
    run_eval(flickr_cfg(tiny_model_dir, protocol="mg"), units, explainer, tmp_path, progress=False)
    woman = next(r for r in lines(tmp_path / "results.jsonl") if r["phrase"] == "A young woman")
    assert woman["boxes"] == [[40.0, 60.0, 150.0, 220.0], [60.0, 80.0, 120.0, 200.0]]


def test_albef_boxes_ranks_the_given_proposals(fixtures, explainer, tiny_model_dir, tmp_path):
    inst = json.loads((fixtures / "refcoco+" / "instances.json").read_text())
    dets = {str(im["id"]): [[0, 0, im["width"], im["height"]]] for im in inst["images"]}
    dets_path = tmp_path / "dets.json"
    dets_path.write_text(json.dumps(dets))
    units = open_units("refcoco+", ["val"], fixtures / "refcoco+", fixtures / "coco" / "train2014")
    cfg = EvalConfig(
        "refcoco+", ("val",), str(tiny_model_dir), protocol="albef-boxes", dets=str(dets_path)
    )
    run_eval(cfg, units, explainer, tmp_path / "out", progress=False)
    (rec,) = lines(tmp_path / "out" / "results.jsonl")
    assert rec["proposal"] == dets[rec["image_id"]][0]  # the only proposal is chosen
    assert rec["hit"] == (rec["iou"] >= 0.5)
    cfg2 = EvalConfig("refcoco+", ("val",), str(tiny_model_dir), protocol="albef-boxes")
    with pytest.raises(ValueError, match="--dets"):
        run_eval(cfg2, units, explainer, tmp_path / "out2", progress=False)


def test_deletion_insertion_metrics_in_records_and_summary(
    fixtures, explainer, tiny_model_dir, tmp_path
):
    units = open_units(
        "refcoco+", ["testA"], fixtures / "refcoco+", fixtures / "coco" / "train2014"
    )
    cfg = EvalConfig(
        "refcoco+",
        ("testA",),
        str(tiny_model_dir),
        metrics=("pointing", "deletion", "insertion"),
        steps=4,
    )
    s = run_eval(cfg, units, explainer, tmp_path, progress=False).summary
    records = lines(tmp_path / "results.jsonl")
    for rec in records:
        assert len(rec["deletion"]) == len(rec["insertion"]) == 5
        assert rec["deletion"][0] == pytest.approx(rec["score"], abs=1e-5)  # nothing removed yet
        assert rec["insertion"][-1] == pytest.approx(rec["score"], abs=1e-5)
    assert s["deletion_auc"] == pytest.approx(sum(r["deletion_auc"] for r in records) / 2)
    assert s["insertion_auc"] == pytest.approx(sum(r["insertion_auc"] for r in records) / 2)


def test_batches_of_images_give_the_one_image_results(
    flickr_like, explainer, tiny_model_dir, tmp_path
):
    units = open_units("flickr30k-entities", ["test"], flickr_like)
    one = run_eval(flickr_cfg(tiny_model_dir, batch_images=1), units, explainer, tmp_path / "1")
    four = run_eval(flickr_cfg(tiny_model_dir, batch_images=4), units, explainer, tmp_path / "4")
    a, b = lines(tmp_path / "1" / "results.jsonl"), lines(tmp_path / "4" / "results.jsonl")
    assert [(r["uid"], r["point"], r["hit"]) for r in a] == [
        (r["uid"], r["point"], r["hit"]) for r in b
    ]
    for x, y in zip(a, b, strict=True):
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
    assert one.summary["accuracy"] == four.summary["accuracy"]
    assert json.loads((tmp_path / "4" / "config.json").read_text())["batch_images"] == 4


def test_batches_never_cross_a_split():
    from groundcam.data.sample import GroundingSample
    from groundcam.eval.datasets import Unit, Units
    from groundcam.eval.runner import batches_of

    def unit(i, split):
        return Unit(i, GroundingSample(str(i), [], (1, 1), split=split))

    units = Units(None, [unit(0, "a"), unit(1, "a"), unit(2, "a"), unit(3, "b"), unit(4, "b")])
    assert [[u.index for u in b] for b in batches_of(units, 2)] == [[0, 1], [2], [3, 4]]


# ----------------------------------------------------------------------------- bad input


def test_missing_image_is_recorded_and_retried_on_resume(tmp_path, explainer, tiny_model_dir):
    root = write_flickr_like(tmp_path / "f30k", 3, missing_images=(1,))
    units = open_units("flickr30k-entities", ["test"], root)
    s = run_eval(
        flickr_cfg(tiny_model_dir), units, explainer, tmp_path / "out", progress=False
    ).summary
    errors = [r for r in lines(tmp_path / "out" / "results.jsonl") if r.get("error")]
    assert errors and all(r["image_id"] == "3000000001" for r in errors)
    assert all(r["hit"] is None for r in errors) and s["errors"] == len(errors)
    assert "image not found" in errors[0]["error"]
    from groundcam.data.shapes import generate_scene

    generate_scene("val", 1).image.save(root / "flickr30k_images" / "3000000001.jpg", quality=95)
    units = open_units("flickr30k-entities", ["test"], root)
    result = run_eval(
        flickr_cfg(tiny_model_dir), units, explainer, tmp_path / "out", progress=False
    )
    # the image's whole batch (here all 3 images) is recomputed, as an uninterrupted run has it
    assert result.summary["errors"] == 0 and result.computed == result.summary["n"]
    run_eval(flickr_cfg(tiny_model_dir), units, explainer, tmp_path / "new", progress=False)
    assert (tmp_path / "out" / "results.jsonl").read_text() == (
        tmp_path / "new" / "results.jsonl"
    ).read_text()


def test_malformed_files_are_reported_and_skipped(tmp_path):
    root = write_flickr_like(tmp_path / "f30k", 4, malformed_xml=(1,), malformed_line=(2,))
    with pytest.warns(UserWarning):
        units = open_units("flickr30k-entities", ["test"], root)
    assert [u.sample.image_id for u in units.units] == ["3000000000", "3000000002", "3000000003"]
    report = units.reports["test"]
    assert report.skipped_samples == 1 and report.skipped_lines == 1
    assert any("3000000002.txt:" in e for e in report.errors)  # file and line


def test_wrong_root_names_the_expected_file(tmp_path, tiny_model_dir):
    r = run(
        "eval",
        "flickr30k-entities",
        "--root",
        tmp_path,
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 2
    assert f"split file not found: {tmp_path / 'test.txt'}" in r.output
    r = run(
        "eval",
        "refcoco+",
        "--root",
        tmp_path / "nope",
        "--images",
        tmp_path,
        "--out",
        tmp_path / "o",
    )
    assert r.exit_code == 2 and f"--root {tmp_path / 'nope'}: not a directory" in r.output
    r = run("eval", "refcoco+", "--root", tmp_path, "--images", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "refs file not found" in r.output and "refs(unc).p" in r.output
    r = run("eval", "flickr30k-entities", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--root is required" in r.output
    r = run("eval", "refcoco+", "--root", tmp_path, "--split", "testC", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no split 'testC'" in r.output


def test_a_pickle_with_globals_is_refused_unrun(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    import pickle

    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps([Evil()], protocol=2))
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": []}')
    r = run("eval", "refcoco+", "--root", tmp_path, "--images", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "refusing to unpickle global posix.system" in r.output.splitlines()[-1]
    assert not (tmp_path / "ran").exists()


def test_out_of_another_configuration_is_refused(flickr_like, tiny_model_dir, tmp_path):
    args = ["eval", "flickr30k-entities", "--root", flickr_like, "--model", tiny_model_dir]
    args += ["--limit", "2", "--out", tmp_path]
    assert run(*args).exit_code == 0
    before = (tmp_path / "results.jsonl").read_text()
    r = run(*args, "--method", "gradcam")
    assert r.exit_code == 2
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"groundcam: error: --out {tmp_path} holds results of a different")
    assert "method: 'attn-gradcam' there, 'gradcam' now" in line and "delete" in line
    assert (tmp_path / "results.jsonl").read_text() == before  # nothing was touched


# ----------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_to_identical_results(
    flickr_like, explainer, tiny_model_dir, tmp_path, monkeypatch
):
    units = open_units("flickr30k-entities", ["test"], flickr_like)
    cfg = flickr_cfg(tiny_model_dir, batch_images=1)
    full = run_eval(cfg, units, explainer, tmp_path / "full", progress=False)

    calls = {"n": 0}
    original = UnitScorer.__call__

    def crash_after_three(self, batch, images=None):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original(self, batch, images)

    monkeypatch.setattr(UnitScorer, "__call__", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, units, explainer, tmp_path / "cut", progress=False)
    monkeypatch.setattr(UnitScorer, "__call__", original)
    part = tmp_path / "cut" / "parts" / "rank0.jsonl"
    written = part.read_text().splitlines()
    assert len(written) == sum(len(u.sample.phrases) for u in units.units[:3])
    with part.open("a") as f:  # a torn line, as a kill in mid-write leaves
        f.write('{"uid": "test/30000000')
    resumed = run_eval(cfg, units, explainer, tmp_path / "cut", progress=False)
    assert resumed.resumed == len(written)
    assert resumed.computed == full.computed - len(written)
    cut_results = (tmp_path / "cut" / "results.jsonl").read_text()
    assert cut_results == (tmp_path / "full" / "results.jsonl").read_text()
    assert resumed.summary == full.summary


def _cli(*args, env=None):
    cmd = [sys.executable, "-m", "groundcam", *[str(a) for a in args]]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _env():
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# The real CLI in a process that SIGKILLs itself at the start of its Nth batch: a kill at a known
# point (N - 1 batches written and flushed), with no hook in the production code.
KILLED_AT_BATCH = """
import os, signal, sys

import groundcam.cli
from groundcam.eval.runner import UnitScorer

kill_at, scored, original = int(sys.argv[1]), 0, UnitScorer.__call__


def kill_at_batch(self, batch, images=None):
    global scored
    scored += 1
    if scored == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, batch, images)


UnitScorer.__call__ = kill_at_batch
groundcam.cli.main(sys.argv[2:], prog_name="groundcam")
"""


def test_killed_process_resumes_to_identical_results(flickr_like, tiny_model_dir, tmp_path):
    args = ["eval", "flickr30k-entities", "--root", flickr_like, "--model", tiny_model_dir]
    args += ["--threads", "1", "--batch-images", "1"]
    full = _cli(*args, "--out", tmp_path / "full", env=_env())
    victim = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_BATCH, "3", *map(str, args), "--out", tmp_path / "cut"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == -signal.SIGKILL, err
    part = tmp_path / "cut" / "parts" / "rank0.jsonl"
    assert full.wait(timeout=120) == 0
    total = len((tmp_path / "full" / "results.jsonl").read_text().splitlines())
    done = len(part.read_text().splitlines())
    assert 4 <= done < total, "the kill came too late to test a resume"
    again = _cli(*args, "--out", tmp_path / "cut", env=_env())
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"resumed: {done} phrase(s)" in out
    for name in ("results.jsonl", "summary.json"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "full" / name).read_text()


# ----------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_give_the_single_process_results(
    flickr_like, tiny_model_dir, tmp_path
):
    args = ["eval", "flickr30k-entities", "--root", flickr_like, "--model", tiny_model_dir]
    args += ["--threads", "1", "--batch-images", "3"]
    single = _cli(*args, "--out", tmp_path / "one", env=_env())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run(
        [*launch, "-m", "groundcam", *map(str, args), "--out", str(tmp_path / "two")],
        cwd=ROOT,
        env=_env() | {"CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert single.wait(timeout=300) == 0
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("*.jsonl"))
    assert parts == ["rank0.jsonl", "rank1.jsonl"]
    sizes = [len((tmp_path / "two" / "parts" / p).read_text().splitlines()) for p in parts]
    assert all(sizes)  # both processes did work
    for name in ("results.jsonl", "summary.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


# ----------------------------------------------------------------------------- sweep, report


def test_sweep_layers_table_matches_single_layer_runs(explainer, tiny_model_dir, tmp_path):
    r = run(
        "sweep-layers",
        "shapes",
        "--scenes",
        "4",
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "sweep",
    )
    assert r.exit_code == 0, r.output
    table = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    layers = [row["layer"] for row in table["layers"]]
    cfg = EvalConfig("shapes", ("val",), str(tiny_model_dir))
    assert layers == sweep_layers_of(explainer, cfg) and len(layers) >= 2
    for row in table["layers"]:
        one = run(
            "eval",
            "shapes",
            "--split",
            "val",
            "--scenes",
            "4",
            "--model",
            tiny_model_dir,
            "--layer",
            row["layer"],
            "--out",
            tmp_path / f"l{row['layer']}",
        )
        assert one.exit_code == 0, one.output
        s = json.loads((tmp_path / f"l{row['layer']}" / "summary.json").read_text())
        assert (row["accuracy"], row["n"]) == (s["accuracy"], s["n"])
    leader = max(table["layers"], key=lambda row: (row["accuracy"], -row["layer"]))["layer"]
    # the leader is the best layer only when its interval separates (tests/test_reports_job.py)
    assert table["best_layer"] in (leader, None)
    assert (table["best_layer"] is None) == (leader in table["tied"])
    assert ("<- best" in r.output) == (table["best_layer"] is not None)
    tsv = (tmp_path / "sweep" / "sweep.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["layer", "accuracy", "ci95_low", "ci95_high", "n"]
    assert len(tsv) == 1 + len(layers)


def test_report_shows_best_and_worst_examples(flickr_like, tiny_model_dir, tmp_path):
    r = run(
        "eval",
        "flickr30k-entities",
        "--root",
        flickr_like,
        "--model",
        tiny_model_dir,
        "--report",
        "--examples",
        "2",
        "--out",
        tmp_path,
    )
    assert r.exit_code == 0, r.output
    html = (tmp_path / "report.html").read_text()
    records = lines(tmp_path / "results.jsonl")
    n_hits = sum(bool(x["hit"]) for x in records)
    n_images = min(2, n_hits) + min(2, len(records) - n_hits)
    assert html.count("<img") == n_images
    assert "http://" not in html and "https://" not in html
    s = json.loads((tmp_path / "summary.json").read_text())
    assert f"{s['accuracy']:.1%}" in html
