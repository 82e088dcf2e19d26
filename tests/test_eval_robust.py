"""A dataset with broken images: each is that image's error in the records, never the run's."""

from __future__ import annotations

import json

from flickr_like import write_flickr_like

from groundcam.api import load
from groundcam.eval.datasets import open_units
from groundcam.eval.runner import EvalConfig, run_eval


def test_broken_and_bomb_images_are_recorded_per_phrase_and_the_rest_is_scored(
    tmp_path, tiny_model_dir
):
    root = write_flickr_like(tmp_path / "f30k", 4)
    images = root / "flickr30k_images"
    (images / "3000000001.jpg").write_bytes(b"")  # empty
    good = (images / "3000000002.jpg").read_bytes()
    (images / "3000000002.jpg").write_bytes(good[: len(good) // 3])  # truncated
    cfg = EvalConfig(dataset="flickr30k-entities", splits=("test",), model=str(tiny_model_dir))
    result = run_eval(
        cfg, open_units("flickr30k-entities", ["test"], root), load(tiny_model_dir), tmp_path / "o"
    )
    records = [json.loads(x) for x in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    broken = {r["image_id"] for r in records if r.get("error")}
    assert broken == {"3000000001", "3000000002"}
    errors = {r["image_id"]: r["error"] for r in records if r.get("error")}
    assert errors["3000000001"].endswith("3000000001.jpg: the file is empty (0 bytes)")
    assert "3000000002.jpg: image file is truncated" in errors["3000000002"]
    scored = [r for r in records if not r.get("error")]
    assert scored and all(r["hit"] in (True, False) and r["flat"] in (True, False) for r in scored)
    assert result.summary["errors"] == len(records) - len(scored)
    assert result.summary["n"] == len(scored)
