"""What one request to the page may ask for: upload bytes, phrases, tokens; images are read with
`groundcam.io.read_image`, so the page refuses exactly what the CLI and the API refuse."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from groundcam.errors import ImageError, InputError
from groundcam.io import read_image

MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """The page's limits; `groundcam serve` options set them (`--max-upload-mb` and so on)."""

    max_upload_mb: float = 20.0  # bytes of one uploaded file (also enforced by Gradio's upload)
    max_phrases: int = 16  # phrases per request
    max_phrase_chars: int = 200  # characters of one phrase (or of caption mode's text)
    max_tokens: int = 256  # text tokens of all phrases of one request, as the model reads them
    max_new_tokens: int = 40  # tokens a captioning / OCR model may generate per request
    workers: int = 1  # model requests run at once (each model also runs one at a time)
    queue_size: int = 32  # requests waiting in the queue before new ones are turned away
    cache_mb: float = 256.0  # results kept in memory for all sessions together (oldest dropped)
    cache_ttl: float = 3600.0  # seconds a result, an upload or a served file is kept unused
    files_mb: float = 512.0  # uploads and served files on disk, and as much for saved results
    sessions: int = 1000  # sessions whose page state Gradio keeps (oldest dropped; ~100 KB each)

    def __post_init__(self) -> None:
        for name in ("max_phrases", "max_phrase_chars", "max_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 1 or self.queue_size < 1 or self.sessions < 1:
            raise InputError("workers, queue_size and sessions must be at least 1")
        if not self.max_upload_mb > 0:
            raise InputError(f"max_upload_mb must be positive, got {self.max_upload_mb}")
        for name in ("cache_mb", "cache_ttl", "files_mb"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * MB)

    @property
    def files_bytes(self) -> int:
        return int(self.files_mb * MB)

    @property
    def max_text_chars(self) -> int:
        """The most characters the phrases box takes (the page also stops typing there)."""
        return self.max_phrases * (self.max_phrase_chars + 1)


def parse_phrases(text: str | None, limits: Limits) -> list[str]:
    """One phrase per non-blank line, stripped; refused when there are none, too many, or one is
    longer than `limits.max_phrase_chars`."""
    text = text or ""
    if len(text) > limits.max_text_chars:
        raise InputError(
            f"the phrases are {len(text):,} characters long; the page takes at most "
            f"{limits.max_text_chars:,} ({limits.max_phrases} phrases of "
            f"{limits.max_phrase_chars} characters)"
        )
    phrases = [line.strip() for line in text.splitlines() if line.strip()]
    if not phrases:
        raise InputError("no phrases given: type one phrase per line")
    if len(phrases) > limits.max_phrases:
        raise InputError(
            f"{len(phrases)} phrases given; the page explains at most {limits.max_phrases} "
            "per request"
        )
    for phrase in phrases:
        if len(phrase) > limits.max_phrase_chars:
            raise InputError(
                f"phrase {phrase[:30]!r}... is {len(phrase)} characters long; at most "
                f"{limits.max_phrase_chars} per phrase"
            )
    return phrases


def check_text(text: str | None, limits: Limits, what: str = "the text") -> str | None:
    """Caption mode's optional text to explain (None or blank: generate), or its prompt (`what`),
    within the limits."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if len(text) > limits.max_phrase_chars:
        raise InputError(
            f"{what} is {len(text)} characters long; at most {limits.max_phrase_chars}"
        )
    return text


def check_token_count(count: int, limits: Limits) -> None:
    """Refuse a request whose phrases make more than `limits.max_tokens` tokens."""
    if count > limits.max_tokens:
        raise InputError(
            f"the phrases make {count} tokens; the page explains at most {limits.max_tokens} "
            "tokens per request (fewer or shorter phrases)"
        )


def generation_cap(generation_config: object, requested: int | None, limits: Limits) -> int | None:
    """`max_new_tokens` for a captioning request: what was asked (at most the limit); when nothing
    was asked, None (the model's own generation config decides, as `groundcam caption` does)
    unless that config would allow more than the limit."""
    if requested is not None:
        if isinstance(requested, bool) or int(requested) != requested or requested < 1:
            raise InputError(f"most new tokens must be a positive whole number, got {requested}")
        if requested > limits.max_new_tokens:
            raise InputError(
                f"most new tokens is {int(requested)}; the page generates at most "
                f"{limits.max_new_tokens}"
            )
        return int(requested)
    own = getattr(generation_config, "max_new_tokens", None) or getattr(
        generation_config, "max_length", None
    )
    if isinstance(own, int) and 0 < own <= limits.max_new_tokens:
        return None
    return limits.max_new_tokens


def read_upload(path: str | os.PathLike | None, limits: Limits) -> Image.Image:
    """The uploaded image at `path` (a file the upload component saved), refused when missing,
    larger than the upload limit, or anything `groundcam.io.read_image` refuses (the pixel limit
    from the header before decoding, broken files, non-images)."""
    if path is None or not str(path):
        raise InputError("no image: upload one, paste one, or pick an example scene")
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError("the uploaded image is gone from the server: upload it again") from None
    if size > limits.max_upload_bytes:
        raise ImageError(
            f"the image file is {size / MB:.1f} MB; the page takes files up to "
            f"{limits.max_upload_mb:g} MB"
        )
    try:
        return read_image(path)
    except ImageError as e:
        # the server-side folder of an upload means nothing to the user: name the file only
        raise ImageError(str(e).replace(str(path), path.name)) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path.name}: {e}") from None


def save_data_url(url: str, directory: Path, limits: Limits) -> Path:
    """A `data:image/...;base64,` URL (a pasted image) written as bytes to a file in `directory`
    named by its content (the same paste is one file), checked against the upload limit first;
    nothing is decoded here."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise InputError("the pasted image is not a base64 data URL: upload it as a file")
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise ImageError(
            f"the pasted image is about {len(payload) * 3 / 4 / MB:.1f} MB; the page takes files "
            f"up to {limits.max_upload_mb:g} MB"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the pasted image is not valid base64 data") from None
    directory.mkdir(parents=True, exist_ok=True)
    # named by content: the same paste sent with every request is one file, not one per request
    path = directory / f"pasted-{hashlib.sha256(data).hexdigest()[:32]}.img"
    if path.is_file() and path.stat().st_size == len(data):
        path.touch()  # recently used: the last to be pruned
        return path
    fd, name = tempfile.mkstemp(prefix="pasting-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(name, path)
    return path
