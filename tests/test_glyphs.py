"""Synthetic text lines and the trocr-tiny-glyphs trainer: exact boxes, a character tokenizer,
non-square cross-attention geometry, and a run that resumes to the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    VisionEncoderDecoderModel,
    ViTImageProcessor,
)

from groundcam.data.glyphs import (
    IMAGE_SIZE,
    MAX_CHARS,
    MIN_CHARS,
    SPLIT_IDS,
    GlyphDataset,
    alphabet,
    render_line,
)
from groundcam.train.trocr_glyphs import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TrainConfig,
    build_model,
    char_accuracy,
    char_tokenizer,
    column_targets,
    edit_distance,
    evaluate_text,
    image_processor,
    pixel_values,
    train,
)


def _pixels(sample) -> np.ndarray:
    return np.asarray(sample.image, dtype=np.int16)


def test_render_line_is_deterministic_and_well_formed():
    a, b = render_line("train", 7, seed=3), render_line("train", 7, seed=3)
    assert a.text == b.text and a.font == b.font and a.char_boxes == b.char_boxes
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(render_line("train", 7, seed=4)))
    for i in range(50):
        s = render_line("val", i)
        assert s.image.mode == "RGB" and s.image.size == (IMAGE_SIZE[1], IMAGE_SIZE[0])
        assert MIN_CHARS <= len(s.text) <= MAX_CHARS and set(s.text) <= set(alphabet())
        assert " " not in s.text and len(s.char_boxes) == len(s.text)


def test_splits_never_share_a_line():
    seen = {}
    for split in SPLIT_IDS:
        for i in range(40):
            s = render_line(split, i)
            key = _pixels(s).tobytes()
            assert key not in seen, f"{split}/{i} repeats {seen[key]}"
            seen[key] = f"{split}/{i}"
    with pytest.raises(ValueError, match="unknown split"):
        render_line("dev", 0)
    ds = GlyphDataset("test", 3)
    assert len(ds) == 3 and ds[-1].text == render_line("test", 2).text


def test_char_boxes_are_inside_ordered_and_hold_ink():
    h, w = IMAGE_SIZE
    fonts = set()
    for i in range(60):
        s = render_line("train", i)
        fonts.add(s.font)
        px = _pixels(s)
        bg = np.median(px.reshape(-1, 3), axis=0)  # most pixels are background
        ink = np.abs(px - bg).max(-1) > 40
        lefts = []
        for x1, y1, x2, y2 in s.char_boxes:
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert ink[int(y1) : int(y2), int(x1) : int(x2)].any()
            lefts.append(x1)
        assert lefts == sorted(lefts)
        # All the ink lies inside the union of the character boxes (give or take a pixel of AA).
        union = np.zeros_like(ink)
        for x1, y1, x2, y2 in s.char_boxes:
            union[max(0, int(y1) - 1) : int(y2) + 1, max(0, int(x1) - 1) : int(x2) + 1] = True
        assert not (ink & ~union).any()
    assert len(fonts) >= 3


def test_tokenizer_round_trip_and_reload(tmp_path):
    tok = char_tokenizer()
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (BOS_ID, PAD_ID, EOS_ID)
    assert len(tok) == 4 + len(alphabet())
    for text in ["abc", "z09x", "hello", "q1w2e3"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert len(ids) == len(text)
        assert tok(text).input_ids == ids + [EOS_ID]
        assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID], skip_special_tokens=True) == text
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again("q1w2e3").input_ids == tok("q1w2e3").input_ids
    assert again.decode(tok("q1w2e3").input_ids, skip_special_tokens=True) == "q1w2e3"


def test_column_targets_put_each_character_in_its_box_column():
    tok = char_tokenizer()
    for i in range(20):
        s = render_line("train", i)
        target = column_targets(s, tok, 16).tolist()
        assert len(target) == 16 and sum(t != PAD_ID for t in target) <= len(s.text)
        ch, (x1, _, x2, _) = s.text[-1], s.char_boxes[-1]  # the last character is never overwritten
        assert target[int((x1 + x2) / 2 // 8)] == tok.convert_tokens_to_ids(ch)


def test_edit_distance_and_char_accuracy():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert char_accuracy("abc", "abc") == 1.0
    assert char_accuracy("abd", "abc") == pytest.approx(2 / 3)
    assert char_accuracy("xxxxxxxx", "ab") == 0.0


def test_pixel_values_match_the_saved_image_processor(tmp_path):
    images = [render_line("val", i).image for i in range(3)]
    ours = pixel_values(images)
    assert ours.shape == (3, 3, *IMAGE_SIZE) and ours.min() >= -1 and ours.max() <= 1
    image_processor().save_pretrained(tmp_path)
    proc = ViTImageProcessor.from_pretrained(tmp_path)
    theirs = proc(images=images, return_tensors="pt").pixel_values
    assert torch.allclose(ours, theirs, atol=1e-6)
    big = images[0].resize((256, 64))
    assert pixel_values(big).shape == (1, 3, *IMAGE_SIZE)


def test_cross_attentions_cover_the_non_square_grid():
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = build_model(len(tok), hidden=32, encoder_layers=1, decoder_layers=2, heads=4)
    assert model.config.encoder._attn_implementation == "eager"
    pv = pixel_values([render_line("val", i).image for i in range(2)])
    dec = torch.tensor([[BOS_ID, 4, 5, 6], [BOS_ID, 7, 8, EOS_ID]])
    out = model(pixel_values=pv, decoder_input_ids=dec, output_attentions=True)
    grid_h, grid_w = IMAGE_SIZE[0] // 8, IMAGE_SIZE[1] // 8
    assert (grid_h, grid_w) == (4, 16)
    assert len(out.cross_attentions) == 2
    for att in out.cross_attentions:
        assert isinstance(att, torch.Tensor)
        assert att.shape == (2, 4, 4, 1 + grid_h * grid_w)
        assert torch.allclose(att.sum(-1), torch.ones(2, 4, 4), atol=1e-5)
    assert len(out.encoder_attentions) == 1  # eager encoder: not an empty tuple
    assert out.encoder_attentions[0].shape == (2, 4, 65, 65)
    ids = model.generate(pixel_values=pv)
    assert ids.shape[1] <= MAX_CHARS + 2 and (ids[:, 0] == BOS_ID).all()


def _cfg(out) -> TrainConfig:
    return TrainConfig(
        out=str(out),
        steps=3,
        batch_size=4,
        warmup=1,
        pool=12,
        hidden=16,
        encoder_layers=1,
        decoder_layers=1,
        heads=2,
        eval_every=2,
        eval_lines=4,
        log_every=1,
    )


def test_training_writes_everything_and_resumes_exactly(tmp_path):
    full = train(_cfg(tmp_path / "full"), threads=1)
    assert full == tmp_path / "full" / "model"
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json"]:
        assert (full / name).exists(), name
    assert (full / "preprocessor_config.json").exists()
    log = [
        json.loads(ln) for ln in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"loss", "lr", "elapsed_s"} <= set(log[0]) and "val" in log[1] and "val" in log[2]
    assert 0 <= log[2]["val"]["char_acc"] <= 1
    assert json.loads((tmp_path / "full" / "state.json").read_text())["step"] == 3

    # Stop after step 1 (as a crash would, with a checkpoint), then resume with the same --out.
    part = tmp_path / "part"
    assert train(_cfg(part), threads=1, stop_at=1) == part
    assert json.loads((part / "state.json").read_text())["step"] == 1
    assert not (part / "model").exists()
    train(_cfg(part), threads=1)
    log2 = [json.loads(ln) for ln in (part / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log2] == [1, 2, 3]
    assert [r["loss"] for r in log2] == [r["loss"] for r in log]
    a, b = load_file(full / "model.safetensors"), load_file(part / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The saved directory reloads as a model, tokenizer and processor, and reads the same.
    model = VisionEncoderDecoderModel.from_pretrained(full, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(full)
    tok = PreTrainedTokenizerFast.from_pretrained(full)
    assert model.generation_config.decoder_start_token_id == BOS_ID
    assert model.generation_config.eos_token_id == EOS_ID
    assert proc.tokenizer("ab1").input_ids == tok("ab1").input_ids
    r = evaluate_text(model, tok, "val", n=4)
    assert r["n"] == 4 and 0 <= r["char_acc"] <= 1 and 0 <= r["exact"] <= 1

    with pytest.raises(ValueError, match="another configuration"):
        cfg = _cfg(part)
        cfg.lr = 0.5
        train(cfg, threads=1)
