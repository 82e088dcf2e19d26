"""The datasets `groundcam eval` knows, turned into work units: one image with all its phrases.

Readers yield samples in the dataset's own unit (RefCOCO: one sentence per sample); the runner
wants every phrase of an image in one batch, so samples of the same image are merged here, in
order of first appearance. Box conventions the protocols need (the Flickr30k parser's -1) live
here too, so the runner stays dataset-agnostic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from groundcam.data.sample import GroundingSample, ReadReport


@dataclass(frozen=True)
class DatasetSpec:
    """What `groundcam eval NAME` reads and how its boxes relate to the raw annotation."""

    name: str
    splits: tuple[str, ...]
    default_split: str
    needs_root: bool
    # Added back to every box coordinate for protocols that score raw 1-based annotation boxes
    # (`mg`): Flickr30k Entities' reference parser subtracts 1, COCO boxes are already 0-based.
    raw_box_shift: float = 0.0
    root_help: str = ""
    images_help: str = ""
    title: str = ""
    about: str = ""  # what one sample is and where it comes from (the command's help)


_REFCOCO_ABOUT = (
    "Every sentence of every ref of the split is one phrase, its box the ref's annotation box "
    "(COCO xywh, 0-based). The refs pickle is read through an unpickler that refuses anything "
    "but plain builtins; refs whose annotation or image is missing from instances.json are "
    "skipped and counted."
)

DATASETS: dict[str, DatasetSpec] = {
    "flickr30k-entities": DatasetSpec(
        "flickr30k-entities",
        ("train", "val", "test"),
        "test",
        True,
        raw_box_shift=1.0,
        root_help="the Flickr30k Entities directory (Annotations/, Sentences/, test.txt)",
        images_help="the Flickr30k images, <id>.jpg (default: ROOT/flickr30k_images)",
        title="Flickr30k Entities (Plummer et al.)",
        about=(
            "Read from the raw release: ROOT/<split>.txt lists the image ids, "
            "ROOT/Annotations/<id>.xml holds the boxes and ROOT/Sentences/<id>.txt the five "
            "annotated captions. Every phrase mention of every caption whose chain has boxes "
            "is one phrase (boxes as the reference parser gives them: 1-based minus 1; --protocol "
            "mg scores the raw 1-based boxes). A malformed XML or sentence line is reported with "
            "file and line, skipped and counted."
        ),
    ),
    **{
        name: DatasetSpec(
            name,
            ("train", "val", "testA", "testB"),
            "testA,testB",
            True,
            root_help="the directory holding refs(unc).p and instances.json",
            images_help="the COCO train2014 images (required)",
            title=f"{title} (UNC splits)",
            about=_REFCOCO_ABOUT,
        )
        for name, title in (("refcoco", "RefCOCO"), ("refcoco+", "RefCOCO+"))
    },
    "refcocog": DatasetSpec(
        "refcocog",
        ("train", "val", "test"),
        "test",
        True,
        root_help="the directory holding refs(umd).p (or refs(google).p) and instances.json",
        images_help="the COCO train2014 images (required)",
        title="RefCOCOg (UMD splits)",
        about=_REFCOCO_ABOUT,
    ),
    "shapes": DatasetSpec(
        "shapes",
        ("train", "val", "test", "compositional"),
        "test",
        False,
        title="synthetic shapes scenes (no files needed)",
        about=(
            "Scenes of 2-5 coloured shapes, generated on the fly from (--seed, split, index): "
            'the same scenes on every machine. Each referring phrase ("the red circle", '
            '"the star left of the green square") is one phrase with its object\'s box. The '
            "built-in albef-tiny-shapes was trained on the train split; compositional asks only "
            "about colour-shape pairs held out of training."
        ),
    ),
}


@dataclass
class Unit:
    """One image and every phrase to score on it; `index` is its place in dataset order."""

    index: int
    sample: GroundingSample

    @property
    def split(self) -> str:
        return self.sample.split

    def uid(self, k: int) -> str:
        """The key of phrase `k`: stable across runs, processes and `--limit` values."""
        phrase = self.sample.phrases[k]
        return f"{self.sample.split}/{self.sample.image_id}/{phrase.id}"


@dataclass
class Units:
    """The work of one evaluation: units in dataset order and what the readers reported."""

    spec: DatasetSpec
    units: list[Unit]
    reports: dict[str, ReadReport] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.units)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[name]


def parse_splits(spec: DatasetSpec, split: str | None) -> list[str]:
    """`"testA,testB"` -> `["testA", "testB"]`, checked against the dataset's splits."""
    names = [s.strip() for s in (split or spec.default_split).split(",") if s.strip()]
    if not names:
        raise ValueError(f"--split: no split named; {spec.name} has {', '.join(spec.splits)}")
    for name in names:
        if name not in spec.splits:
            raise ValueError(
                f"--split: {spec.name} has no split {name!r}; valid: {', '.join(spec.splits)}"
            )
    return list(dict.fromkeys(names))


def merge_by_image(samples: Iterable[GroundingSample]) -> list[GroundingSample]:
    """Samples of the same (split, image) merged into one, phrases in reading order."""
    merged: dict[tuple[str, str], GroundingSample] = {}
    for sample in samples:
        key = (sample.split, sample.image_id)
        if key not in merged:
            merged[key] = replace(sample, phrases=list(sample.phrases), meta=dict(sample.meta))
        else:
            merged[key].phrases.extend(sample.phrases)
    return list(merged.values())


def _refs_file(name: str, root: Path) -> str | None:
    if name != "refcocog":
        return None
    for candidate in ("refs(umd).p", "refs(google).p"):
        if (root / candidate).is_file():
            return candidate
    return "refs(umd).p"  # the reader names it in its not-found message


def open_units(
    name: str,
    splits: list[str],
    root: str | Path | None = None,
    images: str | Path | None = None,
    scenes: int = 500,
    seed: int = 0,
    limit: int | None = None,
) -> Units:
    """Read dataset `name` (all `splits`) into work units; `limit` keeps the first units of each
    split. A wrong root raises FileNotFoundError naming the file that was expected."""
    spec = dataset_spec(name)
    if spec.needs_root and root is None:
        raise ValueError(f"--root is required for {name}: {spec.root_help}")
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"--root {root}: not a directory ({spec.root_help})")
    samples: list[GroundingSample] = []
    reports: dict[str, ReadReport] = {}
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if scenes < 1:
        raise ValueError(f"--scenes must be at least 1, got {scenes}")
    for split in splits:
        split_samples, report = _read_split(spec, split, root, images, scenes, seed)
        merged = merge_by_image(split_samples)
        _check_not_empty(spec, split, merged, report)
        samples.extend(merged[:limit] if limit is not None else merged)
        if report is not None:
            reports[split] = report
    units = [Unit(i, s) for i, s in enumerate(_drop_duplicates(samples, reports))]
    return Units(spec, units, reports)


def _read_split(spec, split, root, images, scenes, seed):
    if spec.name == "shapes":
        from groundcam.data.shapes import generate_scene

        return [generate_scene(split, i, seed) for i in range(scenes)], None
    if spec.name == "flickr30k-entities":
        from groundcam.data.flickr30k_entities import Flickr30kEntities

        data = Flickr30kEntities(root, split, images)
        if not data.ids:
            raise ValueError(
                f"{spec.name} split {split!r} is empty: {Path(root) / f'{split}.txt'} lists no "
                "image ids"
            )
        return list(data), data.report
    from groundcam.data.refcoco import RefCOCO

    if images is None:
        raise ValueError(f"--images is required for {spec.name}: the COCO train2014 directory")
    data = RefCOCO(root, images, split, refs=_refs_file(spec.name, Path(root)))
    return list(data), data.report


def _check_not_empty(spec, split, samples, report) -> None:
    """A split that yields no phrase at all is an error, not an evaluation of nothing."""
    if any(sample.phrases for sample in samples):
        return
    what = f"{len(samples)} image(s) but no phrase" if samples else "no image"
    why = ""
    if report is not None and report.errors:
        why = f"; {len(report.errors)} reader problem(s), e.g. {report.errors[0]}"
    raise ValueError(f"{spec.name} split {split!r} is empty: {what} to score{why}")


def _drop_duplicates(
    samples: list[GroundingSample], reports: dict[str, ReadReport]
) -> list[GroundingSample]:
    """Phrases whose id was already seen are that phrase's problem: dropped and counted in their
    split's report (results are keyed by id, so a second one would overwrite the first)."""
    seen: set[str] = set()
    kept: list[GroundingSample] = []
    for sample in samples:
        phrases = []
        for phrase in sample.phrases:
            uid = f"{sample.split}/{sample.image_id}/{phrase.id}"
            if uid in seen:
                report = reports.setdefault(sample.split, ReadReport())
                report.skipped_samples += 1
                report.error(uid, "a second phrase with this id; skipped (ids must be unique)")
                continue
            seen.add(uid)
            phrases.append(phrase)
        if phrases:
            kept.append(
                sample if len(phrases) == len(sample.phrases) else replace(sample, phrases=phrases)
            )
    return kept
