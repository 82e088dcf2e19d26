"""The page end to end in a real browser: `groundcam serve` started here on a free loopback port,
Debian's headless Chromium driven by Playwright, used as a person would. Screenshots go to
$GROUNDCAM_WEB_ARTIFACTS (default: a pytest tmp folder; the path is printed).

Skipped only where no Chromium binary can be found; with GROUNDCAM_REQUIRE_BROWSER=1 (as .ci/run
sets) a missing browser fails instead."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import assert_close
from web_corpus import bomb_png, noise_png

import groundcam as gc
from groundcam.cli import main
from groundcam.data.shapes import generate_scene

pytestmark = pytest.mark.browser

PHRASES = ["the yellow star", "the orange circle"]
UPLOAD_MB = 1  # the server's --max-upload-mb: a 2 MB photo is too large
# The flags Chromium needs here: no sandbox as root, and no background connections (the network
# is closed; without them Chromium keeps retrying Google's hosts).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


def chromium() -> str | None:
    """A Chromium binary: $GROUNDCAM_CHROMIUM, Debian's /usr/bin/chromium, or one on PATH."""
    candidates = [
        os.environ.get("GROUNDCAM_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _no_browser(reason: str) -> None:
    if os.environ.get("GROUNDCAM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (GROUNDCAM_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, request) -> Path:
    """Where the screenshots go; said on the terminal at the end."""
    named = os.environ.get("GROUNDCAM_WEB_ARTIFACTS")
    path = Path(named) if named else tmp_path_factory.mktemp("web-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    yield path
    shots = sorted(p.name for p in path.glob("*.png"))
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None and shots:
        with capture.global_and_fixture_disabled():
            print(f"\nweb test screenshots ({len(shots)}): {path}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`groundcam serve` in its own process on a free port; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "groundcam", "serve", "--port", str(port)]
    command += ["--max-upload-mb", str(UPLOAD_MB)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while not _answers(url) or url not in log.read_text():  # the URL it says it serves
            if proc.poll() is not None:
                pytest.fail(f"groundcam serve exited ({proc.returncode}): {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"groundcam serve did not answer in 180 s: {log.read_text()}")
            time.sleep(0.5)
        assert f"groundcam serve: {url} (Ctrl+C to stop)" in log.read_text()  # loopback
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def page(server, artifacts):
    binary = chromium()
    if binary is None:
        _no_browser(
            "no Chromium binary found (GROUNDCAM_CHROMIUM, /usr/bin/chromium, PATH): install "
            "Debian's with 'apt-get install chromium'"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed (pip install 'groundcam[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS)
        context = browser.new_context(
            viewport={"width": 1280, "height": 900}, accept_downloads=True
        )
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(server)
        pg.wait_for_selector("#gc-status textarea")
        wait_status(pg, "", contains="phrase mode")
        pg.errors = errors
        yield pg
        browser.close()


def status(pg) -> str:
    return pg.locator("#gc-status textarea").input_value()


def wait_status(pg, old: str, contains: str = "", timeout: float = 90_000) -> str:
    """The status box once it differs from `old` (and holds `contains`)."""
    pg.wait_for_function(
        """([old, part]) => {
            const v = document.querySelector('#gc-status textarea').value;
            return v && v !== old && v.includes(part);
        }""",
        arg=[old, contains],
        timeout=timeout,
    )
    return status(pg)


def upload(pg, path: Path) -> None:
    clear = pg.locator("#gc-image button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    pg.locator("#gc-image input[type=file]").set_input_files(str(path))


def choose(pg, elem_id: str, option: str) -> None:
    pg.locator(f"#{elem_id} input").click()
    pg.get_by_role("option", name=option, exact=True).click()


def captions(pg, gallery: str) -> list[str]:
    return pg.locator(f"#{gallery} .thumbnail-item .caption-label").all_inner_texts()


def download(pg, name: str, to: Path) -> Path:
    with pg.expect_download() as info:
        pg.locator(f"#gc-files a[download='{name}']").click()
    target = to / name
    info.value.save_as(target)
    return target


def _maps(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_phrases_explained_method_switched_maps_downloaded_and_a_box_scored(
    page, artifacts, tmp_path
):
    image = tmp_path / "scene.png"
    generate_scene("test", 5).image.save(image)
    before = status(page)
    upload(page, image)
    assert wait_status(page, before, "image: 128x128") == "image: 128x128 pixels"
    page.locator("#gc-phrases textarea").fill("\n".join(PHRASES))
    before = status(page)
    page.locator("#gc-explain").click()
    text = wait_status(page, before, "explained")
    assert text.startswith("explained 2 phrase(s) with attn-gradcam (layer 2, target itm)")
    labels = captions(page, "gc-overlays")
    assert [label.split(" - score ")[0] for label in labels] == PHRASES
    scores = [float(label.split(" - score ")[1]) for label in labels]
    assert all(0 <= s <= 1 for s in scores)
    assert page.locator("#gc-overlays .thumbnail-item img").count() == 2
    tokens = captions(page, "gc-tokens")
    assert tokens[:4] == ["0: [CLS]", "1: the", "2: yellow", "3: star"]
    page.screenshot(path=artifacts / "1-explained.png", full_page=True)

    choose(page, "gc-method", "gradcam")
    assert page.locator("#gc-layer input").input_value().endswith("(default)")
    before = status(page)
    page.locator("#gc-explain").click()
    text = wait_status(page, before, "explained")
    assert "with gradcam" in text and "no per-token maps" in text
    assert len(captions(page, "gc-overlays")) == 2
    got = download(page, "maps.npz", tmp_path)
    meta = download(page, "meta.json", tmp_path)
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        main, ["explain", str(image), *PHRASES, "--method", "gradcam", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    ours, cli = _maps(got), _maps(out / "maps.npz")
    assert ours.keys() == cli.keys() == {"maps", "raw_maps"}
    assert ours["maps"].shape[0] == 2 and ours["maps"].max() == 1.0
    for key in ours:  # another process, maybe other thread counts: equal to the tensor's scale
        assert_close(torch.from_numpy(ours[key]), torch.from_numpy(cli[key]), rel=1e-4)
    assert '"method": "gradcam"' in meta.read_text()

    # drag a box on the first phrase's map: the pointing game scores it
    stage = page.locator("#gc-drawer img.gc-draw")
    stage.scroll_into_view_if_needed()
    box = stage.bounding_box()
    before = status(page)
    page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.3, steps=4)
    page.mouse.move(box["x"] + box["width"] * 0.85, box["y"] + box["height"] * 0.45, steps=4)
    page.mouse.up()
    text = wait_status(page, before, "pointed pixel")
    drawn = [float(page.locator(f"#gc-{k} input").input_value()) for k in ("x0", "y0", "x1", "y1")]
    assert drawn == pytest.approx([0.55 * 128, 0.15 * 128, 0.85 * 128, 0.45 * 128], abs=1.5)
    expected = gc.pointing_game(ours["maps"][0], [drawn], image_size=(128, 128))
    word = "hit" if expected.hit else "miss"
    assert text.startswith(f"phrase 0 'the yellow star': {word}, pointed pixel {expected.point}")
    assert f"pointing: {int(expected.hit)} of 1 hit" in page.locator("#gc-accuracy").inner_text()
    assert captions(page, "gc-overlays")[0].endswith(f"{word} at {expected.point}")
    page.screenshot(path=artifacts / "2-gradcam-box.png", full_page=True)
    assert page.errors == []


def test_bad_uploads_get_one_clear_line(page, artifacts, tmp_path):
    big = noise_png(tmp_path / "big-photo.png", 900, 900)  # ~2.4 MB of noise
    assert big.stat().st_size > UPLOAD_MB * 1024 * 1024
    upload(page, big)
    toast = page.locator(".toast-body", has_text="exceed the maximum allowed size")
    toast.first.wait_for(timeout=30_000)
    message = " ".join(toast.first.inner_text().split())
    assert "big-photo.png" in message and f"{UPLOAD_MB}" in message
    page.screenshot(path=artifacts / "3-too-large.png")

    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    before = status(page)
    upload(page, bomb)
    text = wait_status(page, before, "bomb.png")
    assert text == (
        "error: bomb.png: 100000x100000 (10,000,000,000 pixels) is larger than the limit of "
        "64,000,000 pixels (groundcam.io.MAX_PIXELS)"
    )
    (tmp_path / "notes.png").write_text("not an image\n")
    before = status(page)
    upload(page, tmp_path / "notes.png")
    assert wait_status(page, before, "notes.png").startswith("error: cannot read image notes.png")
    before = status(page)
    page.locator("#gc-phrases textarea").fill("")
    page.locator("#gc-explain").click()
    assert wait_status(page, before, "error") in (
        "error: no phrases given: type one phrase per line",
        "error: no image: upload one, paste one, or pick an example scene",
    )
    page.screenshot(path=artifacts / "4-errors.png")
    assert "Traceback" not in page.content()


def test_caption_mode_shows_each_tokens_map_on_hover(page, artifacts):
    before = status(page)
    page.locator("#gc-example input").click()
    page.get_by_role("option", name="text line 0", exact=False).click()
    wait_status(page, before, "caption mode")
    assert page.locator("#gc-model input").input_value() == "trocr-tiny-glyphs"
    assert (
        page.locator("#gc-generate").is_visible() and not page.locator("#gc-explain").is_visible()
    )
    assert not page.locator("#gc-prompt").is_visible()  # an OCR model reads no prompt
    before = status(page)
    page.locator("#gc-generate").click()
    text = wait_status(page, before, "generated")
    assert "with attention (layer 1, target token) on trocr-tiny-glyphs" in text
    tokens = page.locator("#gc-caption .gc-tok")
    n = tokens.count()
    assert n >= 3 and len(captions(page, "gc-caption-maps")) == n
    pop = tokens.nth(1).locator(".gc-pop")
    assert not pop.is_visible()
    tokens.nth(1).hover()
    assert pop.is_visible() and pop.locator("img").evaluate("i => i.naturalWidth") > 0
    page.screenshot(path=artifacts / "5-caption-hover.png")
    assert page.errors == []
