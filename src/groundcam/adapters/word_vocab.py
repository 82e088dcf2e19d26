"""What groundcam's own word-vocabulary models (the captioner, SCAN) share as adapters: which of a
phrase's words their vocabulary lacks, and the words their token ids stand for."""

from __future__ import annotations

from groundcam.adapters.base import Adapter
from groundcam.data.caption_text import tokenize


class WordVocabAdapter(Adapter):
    """An adapter over a model with a `vocab` (`index`: word -> id, `words`: id -> word)."""

    def unknown_words(self, phrases: list[str]) -> list[list[str]]:
        """Per phrase, its words (as the model tokenises them) missing from its vocabulary."""
        index = self.model.vocab.index
        return [list(dict.fromkeys(w for w in tokenize(p) if w not in index)) for p in phrases]

    def token_strings(self, input_ids, attention_mask):
        words = self.model.vocab.words
        return [
            [words[i] for i, keep in zip(ids, m, strict=True) if keep]
            for ids, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)
        ]
