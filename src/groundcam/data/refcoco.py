"""RefCOCO / RefCOCO+ / RefCOCOg read from `refs(unc).p` (or `refs(umd).p`) and `instances.json`.

One `GroundingSample` per sentence of every ref of the split (DESIGN §6 `amc`), its one phrase
boxed by the ref's COCO annotation: `bbox [x, y, w, h]` from instances.json becomes
`(x, y, x + w, y + h)` (no -1). The pickle is read with `SafeUnpickler`, which loads only plain
builtins (dict, list, str, int, float, tuple, bool, None) and refuses any global, so a pickle
holding anything else is rejected without running it.
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from groundcam.data.sample import GroundingSample, Phrase, ReadReport
from groundcam.data.textfile import read_json
from groundcam.errors import InputError

SPLITS = ("train", "val", "test", "testA", "testB")
REFS_FILES = ("refs(unc).p", "refs(umd).p", "refs(google).p")


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global (class, function), which a plain-data pickle never does."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for plain-builtin data: every global lookup is refused, so nothing is executed."""

    def __init__(self, file: Any, *, name: str = "<pickle>") -> None:
        # Python 2 pickles (the public refs files) hold byte strings: decode them as UTF-8.
        super().__init__(file, encoding="utf-8", errors="replace")
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.name}: refusing to unpickle global {module}.{name}; this file should hold "
            "only plain builtins (dict, list, str, int, float, tuple, bool, None)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.name}: refusing persistent id {pid!r}")


def safe_load_pickle(path: str | Path) -> Any:
    """Load a plain-data pickle; `UnsafePickleError` naming `path` if it holds anything else."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return SafeUnpickler(io.BytesIO(data), name=str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or corrupt pickle
        raise pickle.UnpicklingError(f"{path}: cannot unpickle ({e})") from e


def _find_refs(root: Path, refs: str | Path | None) -> Path:
    if refs is not None:
        path = Path(refs) if Path(refs).is_absolute() else root / refs
        if not path.is_file():
            raise FileNotFoundError(f"RefCOCO refs file not found: {path}")
        return path
    for name in REFS_FILES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"RefCOCO refs file not found: {root / REFS_FILES[0]} (nor {', '.join(REFS_FILES[1:])})"
    )


class RefCOCO:
    """Samples of one split (`val`, `testA`, `testB`, `train`, `test`; None for all).

    `root` holds the refs pickle and `instances.json`; `images` the COCO train2014 images,
    looked up by the file name instances.json gives the ref's `image_id` (the refs' own
    `file_name` carries an `_<ann_id>` suffix and names no file). `Phrase.text` is the ref's
    `sent`, `kind` the category name; sample and phrase `meta` hold `ref_id`, `sent_id`,
    `ann_id`, `category`, `raw`. A missing image sets `sample.meta["error"]`; refs whose
    annotation or image is absent from instances.json or malformed (no `bbox` of 4 finite
    numbers, no `file_name`, `width` or `height`), and sentences that are not objects with a
    `sent` string, are skipped and counted in `self.report`.
    """

    def __init__(
        self,
        root: str | Path,
        images: str | Path,
        split: str | None = "val",
        refs: str | Path | None = None,
        instances: str | Path = "instances.json",
    ) -> None:
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown RefCOCO split {split!r}; use one of {SPLITS} or None")
        self.root = Path(root)
        self.images = Path(images)
        self.split = split
        self.refs_path = _find_refs(self.root, refs)
        inst_path = Path(instances) if Path(instances).is_absolute() else self.root / instances
        if not inst_path.is_file():
            raise FileNotFoundError(f"RefCOCO instances file not found: {inst_path}")
        self.instances_path = inst_path
        self.report = ReadReport()
        self._samples = self._load()

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[GroundingSample]:
        return iter(self._samples)

    def __getitem__(self, index: int) -> GroundingSample:
        return self._samples[index]

    def _load(self) -> list[GroundingSample]:
        report = self.report
        refs = safe_load_pickle(self.refs_path)
        if not isinstance(refs, list):
            raise ValueError(
                f"{self.refs_path}: expected a list of refs, got {type(refs).__name__}"
            )
        inst = read_json(self.instances_path, report)
        if not isinstance(inst, dict):
            raise InputError(
                f"{self.instances_path}: expected an object with 'images', 'annotations' and "
                f"'categories', got {type(inst).__name__}"
            )
        images = self._index(inst, "images")
        anns = self._index(inst, "annotations")
        cats = {k: c.get("name") for k, c in self._index(inst, "categories").items()}
        samples: list[GroundingSample] = []
        for k, ref in enumerate(refs):
            where = f"{self.refs_path}: ref #{k}"
            try:
                if self.split is not None and ref["split"] != self.split:
                    continue
                ref_id, ann_id, image_id = ref["ref_id"], ref["ann_id"], ref["image_id"]
                sentences = ref["sentences"]
            except (KeyError, TypeError) as e:
                report.skipped_samples += 1
                report.error(where, f"malformed ref ({e!r}); skipped")
                continue
            where = f"{where} (ref_id {ref_id!r})"
            if not isinstance(sentences, list):
                report.skipped_samples += 1
                report.error(
                    where, f"'sentences' is {type(sentences).__name__}, not a list; skipped"
                )
                continue
            ann, image = _get(anns, ann_id), _get(images, image_id)
            if ann is None or image is None:
                missing = f"annotation {ann_id}" if ann is None else f"image {image_id}"
                report.skipped_samples += len(sentences)
                report.error(where, f"{missing} not in {self.instances_path}; skipped")
                continue
            try:
                box = _xywh_box(ann.get("bbox"))
                image_size = (int(image["width"]), int(image["height"]))
                file_name = image["file_name"]
                if not isinstance(file_name, str) or not file_name.strip():
                    raise ValueError(f"file_name {file_name!r} is not a file name")
                if Path(file_name).is_absolute() or ".." in Path(file_name).parts:
                    raise ValueError(f"file_name {file_name!r} leaves the --images folder")
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                report.skipped_samples += len(sentences)
                what = f"missing {e}" if isinstance(e, KeyError) else str(e)
                report.error(
                    where,
                    f"annotation {ann_id} / image {image_id} in {self.instances_path}: {what}; "
                    "skipped",
                )
                continue
            category_id = ref.get("category_id", ann.get("category_id"))
            category = _get(cats, category_id)
            category = category if isinstance(category, str) else ""
            image_path = self.images / file_name
            error = None
            if not image_path.is_file():
                error = f"image not found: {image_path}"
                report.missing_images.append(str(image_path))
                report.error(str(image_path), "image not found")
            for j, sent in enumerate(sentences):
                text = sent.get("sent", sent.get("raw")) if isinstance(sent, dict) else None
                if not isinstance(text, str):
                    report.skipped_samples += 1
                    report.error(
                        f"{where} sentence #{j}",
                        f"expected an object with a 'sent' string, got {sent!r:.60}; skipped",
                    )
                    continue
                meta = {
                    "ref_id": ref_id,
                    "sent_id": sent.get("sent_id"),
                    "ann_id": ann_id,
                    "category": category,
                    "category_id": ref.get("category_id"),
                    "raw": sent.get("raw", text),
                }
                sample_meta = dict(meta)
                if error:
                    sample_meta["error"] = error
                samples.append(
                    GroundingSample(
                        image_id=str(image_id),
                        phrases=[Phrase(text, [box], category, str(sent.get("sent_id")), meta)],
                        image_size=image_size,
                        image_path=image_path,
                        caption=text,
                        split=ref.get("split", ""),
                        meta=sample_meta,
                    )
                )
                report.samples += 1
                report.phrases += 1
        return samples

    def _index(self, inst: dict, key: str) -> dict[Any, dict]:
        """`inst[key]` by `id`; entries that are not objects with an int or str `id` are skipped
        and counted (`report.skipped_rows`)."""
        entries = inst.get(key, [])
        if not isinstance(entries, list):
            raise InputError(
                f"{self.instances_path}: '{key}' must be a list, got {type(entries).__name__}"
            )
        out: dict[Any, dict] = {}
        for i, entry in enumerate(entries):
            ident = entry.get("id") if isinstance(entry, dict) else None
            if isinstance(ident, bool) or not isinstance(ident, int | str):
                self.report.skipped_rows += 1
                self.report.error(
                    f"{self.instances_path}: {key}[{i}]",
                    f"expected an object with an int or str 'id', got {entry!r:.60}; skipped",
                )
                continue
            out[ident] = entry
        return out


def _get(table: dict, key: Any) -> Any:
    """`table.get(key)`, None for a key that cannot be one (a list, a dict)."""
    try:
        return table.get(key)
    except TypeError:
        return None


def _xywh_box(bbox: Any) -> tuple[float, float, float, float]:
    """COCO `[x, y, w, h]` as `(x, y, x + w, y + h)`; ValueError unless 4 finite numbers."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise ValueError(f"bbox {bbox!r:.60} is not [x, y, w, h]")
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in bbox):
        raise ValueError(f"bbox {bbox!r:.60} is not 4 numbers")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"bbox {bbox!r} is not finite")
    return (x, y, x + w, y + h)
