"""BLIP reads text through its own `pre_caption` (not ALBEF's): the cleaning on hand-made cases,
and the ITM adapter feeding the cleaned text to the tokenizer, with a warning where it cuts."""

from __future__ import annotations

import pytest
import torch
from test_blip import make_processor, tiny
from transformers import BlipForImageTextRetrieval

import groundcam as gc
from groundcam.data.text import blip_pre_caption, pre_caption
from groundcam.errors import GroundcamWarning

CASES = [
    ("A Dog.", "a dog"),
    ("two  dogs!!  play (outside)", "two dogs play outside"),
    ("a man's hat, red-ish/blue?", "a man's hat, red-ish/blue?"),
    ('say "hi"; ok: #1 ~fine*', "say hi ok 1 fine"),
    ("  trailing spaces \n", "trailing spaces"),
]


@pytest.mark.parametrize(("raw", "clean"), CASES)
def test_blip_pre_caption_cases(raw, clean):
    assert blip_pre_caption(raw) == clean


def test_blip_pre_caption_differs_from_albef_where_the_papers_do():
    assert pre_caption("a man's hat, red-ish") == "a mans hat red ish"
    assert blip_pre_caption("a man's hat, red-ish") == "a man's hat, red-ish"


def test_blip_pre_caption_cuts_at_max_words():
    text = " ".join(f"w{i}" for i in range(40))
    assert blip_pre_caption(text).split() == [f"w{i}" for i in range(30)]
    assert blip_pre_caption(text, max_words=5) == "w0 w1 w2 w3 w4"


@pytest.fixture(scope="module")
def itm(tokenizer):
    return gc.load(tiny(BlipForImageTextRetrieval, tokenizer), processor=make_processor(tokenizer))


def test_itm_feeds_cleaned_text(itm):
    ids_raw, mask_raw = itm.prepare_texts(["The RED circle!", "green (star)."])
    ids, mask = itm.prepare_texts(["the red circle", "green star"])
    assert torch.equal(ids_raw, ids) and torch.equal(mask_raw, mask)
    assert itm.adapter.fed_text("The RED circle!") == "the red circle"


def test_itm_warns_when_pre_caption_cuts(itm):
    long = " ".join(["red"] * 31)
    with pytest.warns(GroundcamWarning, match="truncated to BLIP's 30 words"):
        itm.prepare_texts([long])
