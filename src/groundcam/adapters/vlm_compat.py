"""Loading generative VLM processors on installs without torchvision (groundcam prepares video
frames itself, `groundcam.video`, and hands them to a copy of the processor per call, so the
loaded processor's video slot never runs).

transformers exports `VideoProcessorMixin` (which every processor with a video slot checks its video
processor against) only when torchvision is installed, and `AutoVideoProcessor` cannot build one
without it: Qwen2/2.5/3-VL, LLaVA-OneVision, SmolVLM and InternVL processors then cannot be built or
loaded at all. `load_processor` fills that slot with `ImageOnlyVideoProcessor`; a package the
processor needs for images too is named in a one-line `InputError`, never transformers' ImportError.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from groundcam.errors import InputError


def _mixin():
    """transformers' `VideoProcessorMixin`, exported where processors look it up (at the top of
    the transformers module) when torchvision is missing and transformers left it out."""
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    if not hasattr(transformers, "VideoProcessorMixin"):
        transformers.VideoProcessorMixin = VideoProcessorMixin
    return VideoProcessorMixin


@functools.cache
def _image_only_class() -> type:
    """The class of `image_only_video_processor` (built on first use: transformers loads lazily)."""

    class ImageOnlyVideoProcessor(_mixin()):
        """Stands in for a video processor; any video given to it is an error."""

        def __call__(self, *args, **kwargs):
            raise InputError(
                "videos need torchvision, which is not installed (pip install torchvision)"
            )

        def to_dict(self) -> dict:
            return {}

    return ImageOnlyVideoProcessor


def image_only_video_processor():
    """A video processor that refuses videos: fills a processor's video slot where torchvision
    (which every real video processor needs) is missing."""
    return _image_only_class()()


def _package(exc: ImportError) -> str | None:
    """The package an ImportError from transformers says is missing: named in backquotes, or in
    its "X requires the Y library" template."""
    text = str(exc)
    named = re.search(r"`([\w.-]+)`", text) or re.search(r"requires the (\w+) library", text)
    return named.group(1).lower() if named else exc.name


def load_processor(source, **kwargs):
    """`AutoProcessor.from_pretrained(source)` (no remote code) that also works without torchvision
    (the video slot filled by `image_only_video_processor`); a package the processor still lacks
    is a one-line `InputError` naming it."""
    from transformers import AutoProcessor

    from groundcam.model_files import check_no_remote_code

    if Path(source).is_dir():
        check_no_remote_code(Path(source))  # a folder's auto_map is refused before transformers
    kwargs.pop("trust_remote_code", None)
    try:
        try:
            return AutoProcessor.from_pretrained(source, trust_remote_code=False, **kwargs)
        except ValueError as exc:
            if "torchvision" not in str(exc) or importlib.util.find_spec("torchvision"):
                raise
        return AutoProcessor.from_pretrained(
            source,
            trust_remote_code=False,
            video_processor=image_only_video_processor(),
            **kwargs,
        )
    except ImportError as exc:
        package = _package(exc)
        if package is None:
            first = next(
                (line for line in str(exc).splitlines() if line.strip()), type(exc).__name__
            )
            raise InputError(f"{source}: its processor cannot be loaded here: {first}") from None
        raise InputError(
            f"{source}: its processor needs the package {package!r}, which this install lacks "
            f"(pip install {package})"
        ) from None


@functools.cache
def _frame_processor_class() -> type:
    """`FrameProcessor`'s class (built on first use: transformers loads lazily)."""

    class FrameProcessor(_mixin()):
        """A processor's video slot that returns features prepared in advance (one video) and
        its metadata, carrying the sizes the processor's text expansion reads."""

        def __init__(self, features: dict, metadata, **sizes):
            self.features, self.metadata = features, metadata
            for key, value in sizes.items():
                setattr(self, key, value)

        def __call__(self, videos=None, **kwargs):
            from transformers import BatchFeature

            return BatchFeature({**self.features, "video_metadata": [self.metadata]})

        def to_dict(self) -> dict:
            return {}

    return FrameProcessor


def with_frames(processor, features: dict, metadata, **sizes):
    """A shallow copy of `processor` whose video slot hands over `features` (the user's
    processor is left as it is)."""
    import copy

    out = copy.copy(processor)
    out.video_processor = _frame_processor_class()(features, metadata, **sizes)
    return out
