"""groundcam's own error and warning types: bad input is one clear line, never a deep traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (an argument, a file, an image, a phrase): the message names what
    was wrong and what was expected. A ValueError, so existing `except ValueError` still works."""


class ImageError(InputError):
    """An image that cannot be used: unreadable, truncated, a decompression bomb, too large."""


class GroundcamWarning(UserWarning):
    """Something the user should know but that does not stop the work (an unreadable phrase,
    a truncated text, a processor built from the config)."""
