"""What the page keeps is bounded: results in one store limited in bytes and age (a session holds
only a key), a copy of the image at the overlays' size instead of the decoded upload, pastes named
by content, and uploads and served files pruned. The end-to-end test drives 50 explains of a
64-megapixel image through a running `groundcam serve` and watches its memory and its folders."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from groundcam.cli import main
from groundcam.data.shapes import generate_scene
from groundcam.errors import InputError
from groundcam.viz.overlay import overlay
from groundcam.web import handlers as h
from groundcam.web.limits import MB, Limits, save_data_url
from groundcam.web.models import ModelCache
from groundcam.web.store import ResultStore, display_copy, nbytes, prune_files

DECODED_64MP = 8000 * 8000 * 3  # bytes of one decoded 8000x8000 RGB image (183 MiB)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_store_drops_the_least_recently_used_beyond_its_bytes():
    store = ResultStore(max_bytes=100, ttl=60, clock=Clock())
    a, b = store.put("a", 40), store.put("b", 40)
    assert store.get(a) == "a"  # a is now the most recently used
    c = store.put("c", 40)
    assert store.get(b) is None and store.get(a) == "a" and store.get(c) == "c"
    assert len(store) == 2 and store.nbytes == 80
    big = store.put("big", 500)  # alone over the limit: kept, everything older dropped
    assert store.get(big) == "big" and len(store) == 1 and store.nbytes == 500
    assert store.get(None) is None and store.get(123) is None and store.get("nope") is None
    assert len({a, b, c, big}) == 4 and all(len(k) >= 20 for k in (a, b, c, big))


def test_the_store_drops_what_was_not_used_for_its_ttl():
    clock = Clock()
    store = ResultStore(max_bytes=1000, ttl=10, clock=clock)
    old, kept = store.put("old", 1), store.put("kept", 1)
    clock.now = 8
    assert store.get(kept) == "kept"  # used at 8: its ten seconds start again
    clock.now = 12
    assert store.get(old) is None and store.get(kept) == "kept"
    clock.now = 30
    assert store.get(kept) is None and len(store) == 0 and store.nbytes == 0


def test_files_older_than_the_age_then_the_oldest_beyond_the_bytes_are_deleted(tmp_path):
    now = time.time()
    paths = []
    for i, age in enumerate([5000, 300, 200, 100, 0]):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - age, now - age))
        paths.append(path)
    missing = tmp_path / "missing"
    gone = prune_files([*paths, missing], max_bytes=250, max_age=3600, keep=[str(paths[1])])
    # f0 is too old; f1 is kept though oldest; f2 goes for the bytes; f3 and f4 fit (200 bytes)
    assert gone == {str(paths[0]), str(paths[2]), str(missing)}
    assert [p.exists() for p in paths] == [False, True, False, True, True]
    assert prune_files(paths[3:], max_bytes=1000, max_age=3600) == set()


def test_a_paste_sent_again_is_one_file(tmp_path):
    def url(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (9, 7), colour).save(buffer, "PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    first = save_data_url(url("red"), tmp_path, Limits())
    again = save_data_url(url("red"), tmp_path, Limits())
    other = save_data_url(url("blue"), tmp_path, Limits())
    assert first == again != other
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])
    assert Image.open(again).size == (9, 7)


def test_limits_and_serve_options_for_what_the_server_keeps():
    limits = Limits()
    assert (limits.cache_mb, limits.cache_ttl, limits.files_mb) == (256.0, 3600.0, 512.0)
    assert limits.cache_bytes == 256 * MB and limits.files_bytes == 512 * MB
    for name in ("cache_mb", "cache_ttl", "files_mb"):
        with pytest.raises(InputError, match=f"{name} must be positive, got 0"):
            Limits(**{name: 0})
    assert limits.sessions == 1000
    with pytest.raises(InputError, match="sessions must be at least 1"):
        Limits(sessions=0)
    params = {p.name: p.default for p in main.commands["serve"].params}
    for name in ("cache_mb", "cache_ttl", "files_mb", "sessions"):
        assert params[name] == getattr(limits, name), name
    result = CliRunner().invoke(main, ["serve", "--cache-mb", "0"])
    assert result.exit_code == 2 and "--cache-mb" in result.output


@pytest.fixture(scope="module")
def cache(one_thread) -> ModelCache:
    return ModelCache()


def test_a_result_keeps_the_image_at_the_overlays_size_and_draws_as_from_the_upload(
    cache, tmp_path
):
    """An upload larger than the overlays keeps only a copy at their size; the overlays, the
    drawn box and the pointed pixel are those of the full image, and boxes stay in its pixels."""
    scene = generate_scene("test", 5)
    full = scene.image.resize((2000, 1500), Image.Resampling.BICUBIC)
    path = tmp_path / "big.png"
    full.save(path)
    phrase = scene.phrases[0]
    box = [v * 2000 / scene.image.width for v in phrase.boxes[0]]
    res = h.explain_phrases(
        cache,
        h.Workspace(tmp_path / "ws"),
        Limits(),
        "albef-tiny-shapes",
        str(path),
        phrase.text,
        "gradcam",
        known_boxes={phrase.text: [tuple(box)]},
    )
    assert res.size == (2000, 1500) and res.image.size == (1024, 768)
    assert res.explanation.images == [res.image]
    assert nbytes(res) < 1024 * 768 * 3 + 200_000  # the copy and the maps, not the upload
    point = res.points[0]
    picture, _ = h.phrase_overlays(res, 0.5, "inferno")[0]
    expected = overlay(
        full, res.explanation.maps[0], boxes=[box], point=point.point, hit=point.hit, colorbar=True
    )
    assert np.array_equal(np.asarray(picture), np.asarray(expected))
    saved = next((res.folder / "explain").glob("000_*.png"))
    plain = overlay(full, res.explanation.maps[0], colorbar=True)
    assert np.array_equal(np.asarray(Image.open(saved)), np.asarray(plain))
    assert 'data-w="2000" data-h="1500"' in h.drawer_html(res, 0, 0.5, "inferno")
    assert h.parse_box((0, 0, 5000, 5000), res.size) == (0, 0, 2000, 1500)
    small = Image.new("RGB", (640, 480))
    assert display_copy(small) is small


def test_a_caption_result_keeps_the_image_at_the_overlays_size(cache, tmp_path):
    line = h.make_examples(tmp_path / "ex", scenes=0, lines=1)[0]
    full = Image.open(line.path).convert("RGB")
    big = full.resize((full.width * 12, full.height * 12), Image.Resampling.NEAREST)
    big.save(tmp_path / "line.png")
    res = h.explain_caption(
        cache,
        h.Workspace(tmp_path / "ws"),
        Limits(),
        "trocr-tiny-glyphs",
        str(tmp_path / "line.png"),
    )
    assert max(big.size) > 1024 and max(res.image.size) == 1024
    assert res.generation.image is res.image and len(res.generation) > 0
    k = len(res.generation) - 1
    picture, _ = h.caption_overlays(res, 0.5, "inferno")[k]
    expected = overlay(big, res.generation.maps[k], colorbar=True)
    assert np.array_equal(np.asarray(picture), np.asarray(expected))


# ---------------------------------------------------------------- the running server
EXPLAINS = 50
CACHE_MB = 8
FILES_MB = 2


def _png_64mp(tag: int) -> bytes:
    """An 8000x8000 palette PNG (64 megapixels, decoded to 183 MiB of RGB; a few tens of KB as a
    file) made distinct by a text chunk carrying `tag`."""
    global _BASE_PNG
    if _BASE_PNG is None:
        picture = Image.new("P", (8000, 8000), 1)
        picture.putpalette([255, 255, 255, 220, 30, 30, 30, 30, 220])
        ImageDraw.Draw(picture).ellipse((2000, 2500, 4500, 5000), fill=2)
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        _BASE_PNG = buffer.getvalue()
    body = b"tag\0" + str(tag).encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return _BASE_PNG[:33] + chunk + _BASE_PNG[33:]  # after the 8-byte signature and IHDR


_BASE_PNG: bytes | None = None


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _bytes_under(*folders: Path) -> int:
    return sum(f.stat().st_size for d in folders if d.exists() for f in d.rglob("*") if f.is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`groundcam serve` with small caches, its temporary files under this test's folders: its
    process, URL, and the folders of its workspace and of Gradio's files."""
    pytest.importorskip("gradio_client")
    base = tmp_path_factory.mktemp("memory")
    (base / "tmp").mkdir()
    port = _free_port()
    log = base / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.update(PYTHONUNBUFFERED="1", TMPDIR=str(base / "tmp"), GRADIO_TEMP_DIR=str(base / "gr"))
    env.update(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "groundcam", "serve", "--port", str(port)]
    command += ["--cache-mb", str(CACHE_MB), "--files-mb", str(FILES_MB)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while url not in log.read_text():
            if proc.poll() is not None:
                pytest.fail(f"groundcam serve exited ({proc.returncode}): {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"groundcam serve did not start in 180 s: {log.read_text()}")
            time.sleep(0.5)
        urllib.request.urlopen(url, timeout=30).close()
        workspace = next((base / "tmp").glob("groundcam-web-*"))
        yield proc, url, workspace, base / "gr"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_fifty_explains_of_a_64_megapixel_image_keep_the_server_bounded(server, tmp_path):
    """Each request a new session, the image uploaded or pasted (distinct bytes each time): the
    server's memory after the first few explains grows by less than one decoded image, its
    uploads and Gradio's files stay within --files-mb (plus one request's files; uploads alone
    are pruned too), and a session whose result was pushed out of the store is told so in one
    line."""
    from gradio_client import Client, handle_file

    proc, url, workspace, gradio_files = server
    client = Client(url, verbose=False, download_files=False)
    sessions, rss, disk = [], [], []
    for i in range(EXPLAINS):
        data = _png_64mp(i)
        if i % 2:
            image = {"url": "data:image/png;base64," + base64.b64encode(data).decode()}
            image["meta"] = {"_type": "gradio.FileData"}
        else:
            path = tmp_path / f"upload-{i}.png"
            path.write_bytes(data)
            image = handle_file(str(path))
        client.session_hash = str(uuid.uuid4())
        sessions.append(client.session_hash)
        out = client.predict(
            "albef-tiny-shapes",
            image,
            "the red circle",
            "gradcam",
            "",
            "itm",
            0.5,
            "inferno",
            api_name="/on_explain",
        )
        assert out[-1].startswith("explained 1 phrase(s) with gradcam"), (i, out[-1])
        rss.append(_rss_mb(proc.pid))
        disk.append(_bytes_under(workspace / "uploads", gradio_files))
        warm = rss[min(len(rss), 5) - 1]
        # stop at once when memory runs away (the old page kept every decoded image)
        assert rss[-1] - warm < DECODED_64MP / MB * 0.8, f"explain {i}: RSS {rss} MB"
        assert disk[-1] < (FILES_MB + 1) * MB, f"explain {i}: files {disk} bytes"
    print(f"\nserver RSS after each explain (MB): {[round(r) for r in rss]}")
    print(f"uploads and Gradio files (KB): {[d // 1024 for d in disk]}")
    assert max(rss[5:]) - rss[4] < 120, rss
    pasted = list((workspace / "uploads").iterdir())
    assert 0 < len(pasted) < EXPLAINS // 2, "pastes were not pruned"

    # uploads alone (no request of the page runs): pruned all the same, within seconds
    import httpx

    for i in range(40):  # 4 MB, twice --files-mb
        junk = np.random.default_rng(i).bytes(100_000)
        reply = httpx.post(f"{url}gradio_api/upload", files=[("files", (f"x{i}.png", junk))])
        assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 30
    while _bytes_under(workspace / "uploads", gradio_files) > FILES_MB * MB:
        assert time.monotonic() < deadline, "uploads were not pruned in 30 s"
        time.sleep(0.5)

    box = (0, "amc", 1500, 2000, 5000, 5500, 0.5, "inferno")  # in the upload's pixels
    *_, message = client.predict(*box, api_name="/on_score")  # the latest session: kept
    assert (
        message.startswith("phrase 0 'the red circle': ") and "(1500, 2000, 5000, 5500)" in message
    )
    client.session_hash = sessions[0]  # the first result: pushed out by 49 newer ones
    *_, message = client.predict(*box, api_name="/on_score")
    assert re.fullmatch(
        r"error: that result is no longer kept on the server .*explain again", message
    )


def test_serve_gives_gradio_the_session_limit(monkeypatch):
    gr = pytest.importorskip("gradio")
    import groundcam.web as web

    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    web.serve(port=_free_port(), limits=Limits(sessions=7), echo=lambda *a, **k: None)
    assert seen["state_session_capacity"] == 7


def test_result_folders_are_bounded_by_bytes_as_well_as_count(tmp_path) -> None:
    """Saved results (overlays, maps) of old requests go once the folders exceed `max_bytes`;
    the newest request's folder always stays, and `keep` still bounds their number."""
    from groundcam.web.handlers import Workspace

    ws = Workspace(tmp_path, keep=5, max_bytes=3000)
    folders = []
    for i in range(6):
        folder = ws.new_folder("explain")
        (folder / "overlay.png").write_bytes(bytes(1000))
        os.utime(folder, (i, i))  # creation order, whatever the clock's resolution
        folders.append(folder)
    alive = [f for f in folders if f.exists()]
    assert alive == folders[-4:]  # the three before the newest fit 3000 bytes
    big = ws.new_folder("explain")
    (big / "all.zip").write_bytes(bytes(5000))  # one request alone over the bound stays
    assert big.exists()
    ws.new_folder("explain")
    assert not any(f.exists() for f in folders) and not big.exists()
    ws2 = Workspace(tmp_path / "count", keep=2)
    made = [ws2.new_folder("x") for _ in range(4)]
    assert sum(f.exists() for f in made) == 2
