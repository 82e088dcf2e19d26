"""What the page keeps between requests, bounded: results in memory (by bytes and age, shared by
all sessions; a session holds only a key) and the files uploads and Gradio leave on disk."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
from PIL import Image

from groundcam.viz.overlay import MAX_SIDE, drawn_size


class ResultStore:
    """Results by key, the least recently used dropped first once they hold more than `max_bytes`
    together, and any unused for `ttl` seconds dropped; the newest is always kept (so a request
    can use its own result even when it alone is over the limit)."""

    def __init__(
        self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._items: OrderedDict[str, tuple[object, int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, value: object, size: int) -> str:
        """Keep `value` (about `size` bytes); its new key."""
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._items[key] = (value, size, self._clock())
            self._evict()
        return key

    def get(self, key: object) -> object | None:
        """The value kept under `key` (now the most recently used), or None when it was dropped."""
        with self._lock:
            self._evict()
            item = self._items.get(key) if isinstance(key, str) else None
            if item is None:
                return None
            self._items[key] = (item[0], item[1], self._clock())
            self._items.move_to_end(key)
            return item[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the values kept, as their `put` said."""
        with self._lock:
            return sum(size for _, size, _ in self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (_, _, used) in self._items.items() if now - used > self.ttl]:
            del self._items[key]
        total = sum(size for _, size, _ in self._items.values())
        while total > self.max_bytes and len(self._items) > 1:
            _, (_, size, _) = self._items.popitem(last=False)
            total -= size


def nbytes(value: object, _seen: set[int] | None = None) -> int:
    """About how many bytes `value` holds in tensors and images (a dataclass's fields, lists and
    dicts followed; an object reached twice counted once), the memory a kept result costs."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), seen) for f in fields(value))
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v, seen) for v in value)
    return 0


def display_copy(image: Image.Image) -> Image.Image:
    """`image` at the size overlays draw it (at most `MAX_SIDE` px a side; `overlay`'s own
    resampling, so overlays of the copy are those of the original); the image itself when
    already that small."""
    size = drawn_size(image.size, MAX_SIDE)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def prune_files(
    paths: Iterable[str | Path], max_bytes: int, max_age: float, keep: Iterable[str] = ()
) -> set[str]:
    """Delete the files of `paths` older than `max_age` seconds, then the oldest until the rest
    hold at most `max_bytes`; `keep` is never deleted. The paths deleted or already gone."""
    kept, now = set(map(str, keep)), time.time()
    files, gone = [], set()
    for path in map(str, paths):
        try:
            st = Path(path).stat()
        except OSError:
            gone.add(path)
            continue
        if path not in kept:
            files.append((st.st_mtime, st.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    for mtime, size, path in files:
        if now - mtime <= max_age and total <= max_bytes:
            continue
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            continue  # not ours to delete after all: leave it, and count it
        gone.add(path)
        total -= size
    return gone


def prune_page_files(app: object, uploads: Path, max_bytes: int, max_age: float) -> None:
    """Bound the files a page (a `gradio.Blocks`) leaves on disk: pasted images in `uploads` and
    the files Gradio cached for it (uploads, each request's overlays and downloads), as
    `prune_files` does; the files Gradio must keep (`keep_in_cache`) stay."""
    tracked = list(getattr(app, "temp_file_sets", []))  # Gradio's record of the files it wrote
    blocks = getattr(app, "blocks", {}).values()
    keep = set().union(*(getattr(b, "keep_in_cache", set()) for b in blocks))
    pasted = list(uploads.iterdir()) if uploads.is_dir() else []
    gone = prune_files(
        [p for files in tracked for p in list(files)] + pasted, max_bytes, max_age, keep
    )
    for files in tracked:
        files -= gone
    cache = Path(getattr(app, "GRADIO_CACHE", uploads)).resolve()
    for path in gone:  # Gradio caches each file in a folder of its own: remove it when empty
        folder = Path(path).parent
        if cache in folder.resolve().parents:
            try:
                folder.rmdir()
            except OSError:
                pass


def _libc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def trim_heap() -> None:
    """Hand freed heap memory back to the system. A decoded upload (183 MiB at 64 MP) is freed
    once its request ends, but glibc keeps freed chunks in the arena of the worker thread that
    allocated them, so each new worker thread could keep one more image resident; trimming after
    each request keeps the server's resident memory at what it actually holds."""
    if _TRIM is not None:
        _TRIM(0)
