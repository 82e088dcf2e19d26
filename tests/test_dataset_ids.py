"""Duplicate phrase ids and image names that leave the images folder are one record's problem."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import pytest

from groundcam.data.refcoco import RefCOCO, safe_load_pickle
from groundcam.eval.datasets import open_units


@pytest.fixture
def refcoco(fixtures: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "refcoco+"
    shutil.copytree(fixtures / "refcoco+", root)
    return root, fixtures / "coco" / "train2014"


def test_a_duplicate_phrase_id_is_skipped_and_counted_not_the_run(refcoco) -> None:
    root, images = refcoco
    before = open_units("refcoco+", ["train"], root, images)
    uids = [u.uid(k) for u in before.units for k in range(len(u.sample.phrases))]
    refs = safe_load_pickle(root / "refs(unc).p")
    first = next(r for r in refs if r["split"] == "train")
    # a second ref (its own ref_id) re-uses the first one's sentence id on the same image
    refs.append(copy.deepcopy(first) | {"ref_id": 10**6})
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.warns(UserWarning, match="a second phrase with this id; skipped"):
        after = open_units("refcoco+", ["train"], root, images)
    uids_after = [u.uid(k) for u in after.units for k in range(len(u.sample.phrases))]
    assert uids_after == uids  # the copy is dropped, the first kept
    report = after.reports["train"]
    assert report.skipped_samples == 1
    assert any("a second phrase with this id" in e for e in report.errors)


@pytest.mark.parametrize("name", ["../../secret.jpg", "/etc/passwd", "sub/../../x.jpg"])
def test_refcoco_file_names_outside_the_images_folder_are_skipped(refcoco, name: str) -> None:
    root, images = refcoco
    full = len(RefCOCO(root, images, None))
    inst = json.loads((root / "instances.json").read_text())
    image = inst["images"][0]
    image["file_name"] = name
    (root / "instances.json").write_text(json.dumps(inst))
    with pytest.warns(UserWarning, match="leaves the --images folder"):
        data = RefCOCO(root, images, None)
    assert data.report.skipped_samples > 0
    assert len(data) == full - data.report.skipped_samples
    assert all(s.image_path is None or images in s.image_path.parents for s in data)
