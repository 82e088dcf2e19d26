"""Videos for generative VLMs that read them (Qwen2/2.5/3-VL, LLaVA-OneVision): the frames of one
clip (`Video`); the adapters prepare them for their models without torchvision.

A `Video` is read from a list of PIL images or HxWx3 uint8 arrays (or one [F, H, W, 3] array), a
folder of image files (sorted by name) or an animated GIF, WebP or PNG (APNG); `frames=N` keeps N
frames spread evenly over the clip (frame ``round(i * (total - 1) / (N - 1))``, Qwen3-VL's rule).
Every frame is converted to RGB and resized to the first frame's size. `fps` is the clip's frame
rate: an animated file's own (from its frame durations) unless given, else taken as 24 (what
transformers' processors assume) where a model reads timestamps (Qwen2.5-VL, Qwen3-VL).

Preparation (transformers' video processors need torchvision, which groundcam does not use): each
frame goes through the family's image processor, exactly as a still image would, and the family
regroups the result into what its model's video path reads (`adapters.qwen_vl.qwen_video_features`,
`adapters.llava_next.onevision_video_features`); the processor's own text expansion (video
tokens, Qwen3-VL's timestamps, Qwen2.5-VL's `second_per_grid_ts`) then runs on those features
(`adapters.vlm_compat.with_frames`).
The frame size is the image processor's (a still image's `smart_resize` for Qwen, the base tile for
OneVision), not a video processor's own budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence

from groundcam.errors import ImageError, InputError
from groundcam.io import check_image, read_image, to_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
STRIP_WIDTH = 1600  # most pixels across a figure's frame strip (frames are shrunk to fit)


def sample_indices(total: int, wanted: int | None) -> list[int]:
    """`wanted` frame indices spread evenly over `total` frames (all of them when None)."""
    if wanted is None:
        return list(range(total))
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise InputError(f"frames must be a positive integer, got {wanted!r}")
    if wanted > total:
        raise InputError(f"frames={wanted}: the video has only {total} frame(s)")
    return np.linspace(0, total - 1, wanted).round().astype(int).tolist()


def _as_frame(frame, what: str) -> Image.Image:
    """One frame as an RGB PIL image: a PIL image or an HxWx3 (or HxW) uint8 array."""
    if isinstance(frame, np.ndarray | torch.Tensor):
        array = np.asarray(frame)
        channels = array.ndim == 2 or array.ndim == 3 and array.shape[-1] in (1, 3, 4)
        if array.dtype != np.uint8 or not channels:
            raise InputError(
                f"{what} must be an HxWx3 uint8 array (or a PIL image), got "
                f"{array.dtype} of shape {tuple(array.shape)}"
            )
        frame = Image.fromarray(
            array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
        )
    return to_rgb(check_image(frame, what))


def _read_animated(
    path: Path, wanted: int | None
) -> tuple[list[Image.Image], list[int], int, float | None]:
    """The chosen frames of an animated (or still) image file, their indices, the file's frame
    count and its frame rate from the frames' durations (None when they declare none)."""
    first = read_image(path)  # the size limits and decoding checks of a still image
    try:
        with Image.open(path) as im:
            total = int(getattr(im, "n_frames", 1))
            indices = sample_indices(total, wanted)
            keep = set(indices)
            chosen, durations = [], []
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                frame.load()  # WebP declares a frame's duration once it is decoded
                durations.append(float(frame.info.get("duration") or 0))
                if i in keep:
                    chosen.append(to_rgb(frame.copy()) if i else first)
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise ImageError(f"cannot read video {path}: {' '.join(str(e).split())}") from None
    mean = sum(durations) / len(durations) if durations else 0.0
    return chosen, indices, total, (1000.0 / mean if mean > 0 else None)


def _read_folder(path: Path, wanted: int | None) -> tuple[list[Image.Image], list[int], int]:
    """The chosen frames of a folder of image files sorted by name."""
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise InputError(f"video folder {path} holds no image files ({' '.join(FRAME_SUFFIXES)})")
    indices = sample_indices(len(files), wanted)
    return [read_image(files[i]) for i in indices], indices, len(files)


class Video:
    """The frames of one video clip, for `explain_generation` and `explain` on the families that
    read videos (module docstring): `Video(source, frames=None, fps=None)` with `source` a list
    of PIL images or uint8 arrays, a [F, H, W, 3] array, a folder of images or an animated
    GIF/WebP/PNG; `frames=N` keeps N evenly spread frames; `fps` the clip's frame rate."""

    def __init__(self, source, frames: int | None = None, fps: float | None = None):
        if fps is not None and (
            isinstance(fps, bool) or not isinstance(fps, int | float) or not fps > 0
        ):
            raise InputError(f"fps must be a positive number, got {fps!r}")
        rate = None
        if isinstance(source, str | Path):
            path = Path(source)
            if not path.exists():
                raise InputError(f"video not found: {path}")
            if path.is_dir():
                pictures, indices, total = _read_folder(path, frames)
            else:
                pictures, indices, total, rate = _read_animated(path, frames)
            self.name = str(path)
        else:
            if isinstance(source, np.ndarray | torch.Tensor) and np.asarray(source).ndim == 4:
                source = list(np.asarray(source))
            if isinstance(source, Image.Image) or not isinstance(source, Sequence) or not source:
                raise InputError(
                    "a video is a non-empty list of frames (PIL images or HxWx3 uint8 arrays), "
                    f"a folder of images or an animated GIF/WebP/PNG; got {type(source).__name__}"
                )
            total = len(source)
            indices = sample_indices(total, frames)
            pictures = [_as_frame(source[i], f"video frame {i}") for i in indices]
            self.name = "video"
        size = pictures[0].size
        self.frames = [p if p.size == size else p.resize(size, Image.BICUBIC) for p in pictures]
        self.indices = indices
        self.total = total
        self.fps = float(fps) if fps is not None else rate

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return (
            f"Video({len(self)} of {self.total} frames, {self.width}x{self.height}, {self.name!r})"
        )

    @property
    def width(self) -> int:
        return self.frames[0].width

    @property
    def height(self) -> int:
        return self.frames[0].height

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every frame."""
        return self.height, self.width

    def metadata(self):
        """transformers' `VideoMetadata` of the kept frames (what the processors' timestamps and
        Qwen2.5-VL's temporal positions read)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(
            total_num_frames=self.total,
            fps=self.fps or 24.0,
            width=self.width,
            height=self.height,
            frames_indices=list(self.indices),
        )

    def strip(self) -> Image.Image:
        """The frames side by side, in order (shrunk so the strip is at most `STRIP_WIDTH`
        pixels wide): the image a video's figures and overlays are drawn on."""
        return frame_strip(self.frames)


def frame_strip(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames of one size side by side, each shrunk alike so the strip is at most `STRIP_WIDTH`
    pixels wide."""
    w, h = frames[0].size
    scale = min(1.0, STRIP_WIDTH / (w * len(frames)))
    fw, fh = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))
    sheet = Image.new("RGB", (fw * len(frames), fh))
    for i, frame in enumerate(frames):
        sheet.paste(frame if scale == 1.0 else frame.resize((fw, fh), Image.BICUBIC), (i * fw, 0))
    return sheet
