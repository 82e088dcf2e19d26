"""Caption text for the attention captioner and the caption metrics: one tokenizer, one vocabulary.

`tokenize` lower-cases and splits a caption into words, dropping punctuation, as the COCO caption
evaluation's PTB tokenizer does before scoring: "A dog, running." -> ["a", "dog", "running"].
A word is a run of letters or digits; an apostrophe or hyphen between two such runs stays inside it
("don't", "t-shirt"). Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, SOS, EOS, UNK = "<PAD>", "<SOS>", "<EOS>", "<UNK>"
SPECIALS = (PAD, SOS, EOS, UNK)
_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of `text`, punctuation dropped (see the module docstring)."""
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """`text` as the space-joined tokens the metrics compare."""
    return " ".join(tokenize(text))


class Vocabulary:
    """Word <-> id: `<PAD>`=0, `<SOS>`=1, `<EOS>`=2, `<UNK>`=3, then words in the order given."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if list(words[: len(SPECIALS)]) != list(SPECIALS):
            words = [*SPECIALS, *(w for w in words if w not in SPECIALS)]
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary lists every word once")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}

    pad_id, sos_id, eos_id, unk_id = 0, 1, 2, 3
    unk_token = UNK  # as transformers tokenizers name it (for messages)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Every word used at least `min_count` times, most frequent first (ties alphabetical)."""
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        counts = Counter(w for c in captions for w in tokenize(c))
        kept = sorted(
            (w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, text: str) -> list[int]:
        """`<SOS>` + word ids (unknown words -> `<UNK>`) + `<EOS>`."""
        body = [self.index.get(w, self.unk_id) for w in tokenize(text)]
        return [self.sos_id, *body, self.eos_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first `<EOS>`, specials left out."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i >= len(self.words):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(self)} words")
            if i not in (self.pad_id, self.sos_id):
                out.append(self.words[i])
        return " ".join(out)

    def unknown_share(self, text: str) -> float:
        """The fraction of `text`'s words that are not in the vocabulary (1.0 for no words)."""
        words = tokenize(text)
        if not words:
            return 1.0
        return sum(w not in self.index for w in words) / len(words)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, indent=0) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read `vocab.json`; a file that is not a word list is a one-line ValueError naming it."""
        path = Path(path)
        try:
            words = json.loads(path.read_text(encoding="utf-8-sig"))["words"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a groundcam vocabulary file ({e})") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{path}: 'words' must be a list of strings")
        if words[: len(SPECIALS)] != list(SPECIALS):
            raise ValueError(f"{path}: a vocabulary starts with {', '.join(SPECIALS)}")
        return cls(words)
