"""The page's limits: phrases, tokens, upload bytes, and images read exactly as the CLI and the API
read them (the same refusals, the same pixels, the same pixel limit)."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from web_corpus import CORPUS, bomb_png, noise_png, write_corpus

import groundcam.io as gio
from groundcam.cli import main
from groundcam.errors import ImageError, InputError
from groundcam.web.limits import (
    MB,
    Limits,
    check_text,
    check_token_count,
    generation_cap,
    parse_phrases,
    read_upload,
    save_data_url,
)


def test_phrases_one_per_line_within_the_limits():
    limits = Limits(max_phrases=3, max_phrase_chars=20)
    assert parse_phrases("  the red circle \n\n the star\n", limits) == [
        "the red circle",
        "the star",
    ]
    with pytest.raises(InputError, match="no phrases given"):
        parse_phrases(" \n \n", limits)
    with pytest.raises(InputError, match="4 phrases given; the page explains at most 3"):
        parse_phrases("a\nb\nc\nd", limits)
    with pytest.raises(InputError, match="21 characters long; at most 20"):
        parse_phrases("x" * 21, limits)
    with pytest.raises(InputError, match="characters long; the page takes at most 63"):
        parse_phrases("a\n" * 40, limits)


def test_token_and_text_limits():
    limits = Limits(max_tokens=10, max_phrase_chars=5)
    check_token_count(10, limits)
    with pytest.raises(InputError, match="the phrases make 11 tokens; .* at most 10 tokens"):
        check_token_count(11, limits)
    assert check_text("  ", limits) is None
    assert check_text(" abc ", limits) == "abc"
    with pytest.raises(InputError, match="6 characters long; at most 5"):
        check_text("abcdef", limits)


def test_generation_cap_follows_the_model_unless_it_allows_more_than_the_limit():
    limits = Limits(max_new_tokens=40)
    assert generation_cap(SimpleNamespace(max_length=8, max_new_tokens=None), None, limits) is None
    assert generation_cap(SimpleNamespace(max_length=512, max_new_tokens=None), None, limits) == 40
    assert generation_cap(None, None, limits) == 40
    assert generation_cap(SimpleNamespace(max_length=8), 12, limits) == 12
    with pytest.raises(InputError, match="most new tokens is 41; the page generates at most 40"):
        generation_cap(None, 41, limits)
    with pytest.raises(InputError, match="positive whole number"):
        generation_cap(None, 0, limits)


def test_limits_refuse_nonsense():
    with pytest.raises(InputError, match="max_phrases must be at least 1"):
        Limits(max_phrases=0)
    with pytest.raises(InputError, match="max_upload_mb must be positive"):
        Limits(max_upload_mb=0)


def test_upload_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    path = noise_png(tmp_path / "photo.png", 300, 300)  # ~270 kB of noise
    size = path.stat().st_size
    monkeypatch.setattr("groundcam.web.limits.read_image", lambda p: pytest.fail("read"))
    with pytest.raises(ImageError) as error:
        read_upload(path, Limits(max_upload_mb=size / MB / 2))
    assert f"{size / MB:.1f} MB; the page takes files up to" in str(error.value)


def test_upload_messages_name_the_file_not_the_server_folder(tmp_path):
    bomb = bomb_png(tmp_path / "holiday.png", 100_000, 100_000)
    with pytest.raises(ImageError) as error:
        read_upload(bomb, Limits())
    message = str(error.value)
    assert message.startswith("holiday.png: 100000x100000 (10,000,000,000 pixels) is larger")
    assert str(tmp_path) not in message and "\n" not in message
    with pytest.raises(InputError, match="no image: upload one"):
        read_upload(None, Limits())
    with pytest.raises(InputError, match="gone from the server"):
        read_upload(tmp_path / "missing.png", Limits())


def test_the_page_reads_images_exactly_as_the_api_and_the_cli(tmp_path):
    """Every corpus file: refused by the page iff refused by read_image (the API) and by
    `groundcam explain` (exit 2, one line); read ones give the same pixels."""
    files = write_corpus(tmp_path / "corpus")
    runner = CliRunner()
    for name, refused in CORPUS.items():
        path = files[name]
        if refused:
            with pytest.raises(ImageError) as api:
                gio.read_image(path)
            with pytest.raises(ImageError) as page:
                read_upload(path, Limits())
            assert str(page.value) == str(api.value).replace(str(path), path.name), name
            result = runner.invoke(
                main, ["explain", str(path), "a circle", "--out", str(tmp_path / "o")]
            )
            assert result.exit_code == 2, (name, result.output)
            assert len(result.output.strip().splitlines()) == 1, result.output
        else:
            ours, theirs = read_upload(path, Limits()), gio.read_image(path)
            assert ours.mode == "RGB" and ours.size == theirs.size, name
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), name


def test_the_pixel_limit_is_the_shared_one(tmp_path, monkeypatch):
    path = noise_png(tmp_path / "small.png", 20, 10)
    assert read_upload(path, Limits()).size == (20, 10)
    monkeypatch.setattr(gio, "MAX_PIXELS", 199)
    with pytest.raises(ImageError, match="small.png: 20x10 .* larger than the limit of 199 pixels"):
        read_upload(path, Limits())
    with pytest.raises(ImageError, match="larger than the limit of 199 pixels"):
        gio.read_image(path)


def test_pasted_data_url_is_written_as_bytes_and_limited(tmp_path):
    path = noise_png(tmp_path / "p.png", 8, 8)
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    saved = save_data_url(url, tmp_path / "uploads", Limits())
    assert saved.read_bytes() == path.read_bytes()
    assert np.array_equal(np.asarray(Image.open(saved)), np.asarray(Image.open(path)))
    with pytest.raises(ImageError, match="pasted image is about"):
        save_data_url(url, tmp_path / "uploads", Limits(max_upload_mb=10 / MB))
    with pytest.raises(ImageError, match="not valid base64"):
        save_data_url("data:image/png;base64,@@@", tmp_path / "uploads", Limits())
    with pytest.raises(InputError, match="not a base64 data URL"):
        save_data_url("http://example.org/x.png", tmp_path / "uploads", Limits())
