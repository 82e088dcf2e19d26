"""Text preprocessing of the grounding protocols."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")
_BLIP_PUNCT = re.compile(r"[.!\"()*#:;~]")


def pre_caption(text: str, max_words: int = 30) -> str:
    """ALBEF's caption cleaning: lower-case, drop `,.'!?"()*#:;~`, `-` and `/` to spaces,
    `<person>` to `person`, runs of whitespace to one space, trimmed, at most `max_words` words."""
    text = _PUNCT.sub("", text.lower()).replace("-", " ").replace("/", " ")
    text = _SPACES.sub(" ", text.replace("<person>", "person"))
    words = text.rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])


def blip_pre_caption(text: str, max_words: int = 30) -> str:
    """BLIP's caption cleaning (its retrieval sets cut at 30 words): lower-case, each of
    `.!"()*#:;~` to a space, runs of whitespace to one space, trimmed, at most `max_words` words.
    Unlike ALBEF's, commas, apostrophes, `?`, `-` and `/` stay."""
    text = _SPACES.sub(" ", _BLIP_PUNCT.sub(" ", text.lower()))
    words = text.rstrip("\n").strip(" ").split(" ")
    return " ".join(words[:max_words])
