"""`groundcam eval` counts each phrase that warns while tokenising once, whatever `--batch-images`
and however often the report explains it again."""

from __future__ import annotations

from pathlib import Path

import pytest
from flickr_like import write_flickr_like

from groundcam.api import load
from groundcam.eval.datasets import open_units
from groundcam.eval.runner import EvalConfig, run_eval

UNKNOWN = "zorp blat qux flib "  # four words the shapes vocabulary lacks: most tokens [UNK]


@pytest.fixture(scope="module")
def warned_data(tmp_path_factory) -> tuple[Path, int]:
    """Six scenes; the first phrase of images 0, 2, 3 and 4 is mostly unknown words (image 4's
    longer than ALBEF's 30 words, cut by pre_caption)."""
    root = write_flickr_like(tmp_path_factory.mktemp("f30k") / "flickr30k", 6)
    files = sorted((root / "Sentences").glob("*.txt"))
    for i in (0, 2, 3):
        text = files[i].read_text()
        files[i].write_text(text.replace("/other ", "/other " + UNKNOWN, 1))
    text = files[4].read_text()
    files[4].write_text(text.replace("/other ", "/other " + UNKNOWN * 9, 1))
    return root, 4


def test_warned_phrases_are_counted_once_whatever_the_batching(
    one_thread, warned_data, tiny_model_dir, tmp_path
):
    root, warned = warned_data
    explainer = load(tiny_model_dir)
    counts = {}
    for batch in (1, 4, 6):
        units = open_units("flickr30k-entities", ["test"], root)
        cfg = EvalConfig("flickr30k-entities", ("test",), str(tiny_model_dir), batch_images=batch)
        result = run_eval(cfg, units, explainer, tmp_path / str(batch), progress=False, report=True)
        counts[batch] = sorted(result.text_warnings)
        assert result.summary["n"] > warned
    assert len(counts[1]) == warned
    assert counts[1] == counts[4] == counts[6]
    assert all("zorp" in m for m in counts[1])
