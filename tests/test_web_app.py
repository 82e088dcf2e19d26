"""The served page: requests are queued, a slow one does not block the page, model requests run
one at a time; `groundcam serve` binds 127.0.0.1 unless told and refuses bad starts in one line."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from click.testing import CliRunner
from web_corpus import CORPUS, write_corpus

pytest.importorskip("gradio", reason="the web extra is not installed: pip install 'groundcam[web]'")

import gradio as gr  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

import groundcam.web as web  # noqa: E402
from groundcam.cli import main  # noqa: E402
from groundcam.data.shapes import generate_scene  # noqa: E402
from groundcam.io import read_image  # noqa: E402
from groundcam.web import handlers as h  # noqa: E402
from groundcam.web.limits import Limits  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, one_thread):
    """The page launched in this process on a free loopback port, and a client of it."""
    app, cache, workspace = web.create_app(workdir=tmp_path_factory.mktemp("ws"))
    _, url, _ = app.launch(
        server_name="127.0.0.1",
        server_port=_free_port(),
        prevent_thread_lock=True,
        quiet=True,
        allowed_paths=[str(workspace.root)],
    )
    client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    yield app, cache, client
    client.close()
    app.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    generate_scene("test", 5).image.save(path)
    return path


def _explain_args(scene, method="attn-gradcam"):
    image = handle_file(str(scene))
    return ("albef-tiny-shapes", image, "the yellow star", method, "", "itm", 0.5, "inferno")


def test_a_slow_request_does_not_block_the_page_and_model_requests_queue(
    served, scene, monkeypatch
):
    app, cache, client = served
    release, started = threading.Event(), threading.Event()
    spans: list[tuple[float, float]] = []
    real = h.explain_phrases

    def slow(*args, **kwargs):
        start = time.monotonic()
        started.set()
        release.wait(timeout=30)  # held until the test has used the page meanwhile
        try:
            return real(*args, **kwargs)
        finally:
            spans.append((start, time.monotonic()))

    monkeypatch.setattr(h, "explain_phrases", slow)
    first = client.submit(*_explain_args(scene), api_name="/on_explain")
    second = client.submit(*_explain_args(scene, "gradcam"), api_name="/on_explain")
    assert started.wait(timeout=60), "the first request never started"
    t0 = time.monotonic()
    layer, status = client.predict("albef-tiny-shapes", "gradcam", "itm", api_name="/on_method")
    quick = time.monotonic() - t0
    assert quick < 10, f"a light request took {quick:.1f} s behind a slow one"
    assert not first.done() and not second.done()
    assert layer["value"] == "3" and ("3 (default)", "3") in [tuple(c) for c in layer["choices"]]
    release.set()
    out_first, out_second = first.result(timeout=60), second.result(timeout=60)
    assert out_first[-1].startswith("explained 1 phrase(s) with attn-gradcam")
    assert out_second[-1].startswith("explained 1 phrase(s) with gradcam")
    assert len(spans) == 2
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start >= a_end - 0.05, "two model requests ran at once (workers=1)"


def test_bad_input_through_the_server_is_one_line_not_a_traceback(served, tmp_path):
    _, _, client = served
    (tmp_path / "notes.png").write_text("hello\n")
    args = list(_explain_args(tmp_path / "notes.png"))
    out = client.predict(*args, api_name="/on_explain")
    message = out[-1]
    assert message == "error: cannot read image notes.png: cannot identify image file 'notes.png'"
    args[0] = "/etc/passwd"  # a model name the page does not offer is refused before the handler
    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict(*args, api_name="/on_explain")


def test_the_bad_image_corpus_through_the_served_page(served, tmp_path):
    """Each corpus file uploaded to the page: refused in one line iff read_image refuses it."""
    _, _, client = served
    files = write_corpus(tmp_path / "corpus")
    for name, refused in CORPUS.items():
        *_, message = client.predict(handle_file(str(files[name])), api_name="/on_upload")
        assert "\n" not in message and "Traceback" not in message, (name, message)
        if refused:
            assert message.startswith("error: ") and name in message, (name, message)
        else:
            w, h_ = read_image(files[name]).size
            assert message == f"image: {w}x{h_} pixels", (name, message)


def test_serve_binds_loopback_by_default_with_the_upload_limit(monkeypatch):
    seen = {}

    def launch(self, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    lines = []
    port = _free_port()
    web.serve(port=port, limits=Limits(max_upload_mb=3), echo=lambda *a, **k: lines.append(a[0]))
    assert seen["server_name"] == "127.0.0.1" and seen["server_port"] == port
    assert seen["max_file_size"] == 3 * 1024 * 1024 and seen["share"] is False
    assert lines[-1] == f"groundcam serve: http://127.0.0.1:{port}/ (Ctrl+C to stop)"
    lines.clear()
    web.serve(host="0.0.0.0", port=port, echo=lambda *a, **k: lines.append(a[0]))
    assert seen["server_name"] == "0.0.0.0"
    assert any("not only this machine" in line for line in lines)
    assert web.is_loopback("127.0.0.1") and web.is_loopback("::1")
    assert web.is_loopback("localhost") and not web.is_loopback("0.0.0.0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_refuses_a_busy_port_and_a_model_that_does_not_load_in_one_line(tmp_path):
    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"groundcam: error: cannot listen on 127.0.0.1:{port}")
    assert len(result.output.strip().splitlines()) == 1
    missing = tmp_path / "no-such-model"
    result = runner.invoke(main, ["serve", "--port", str(_free_port()), "--model", str(missing)])
    assert result.exit_code == 2
    assert (
        result.output.strip() == f"groundcam: error: model '{missing}': no such file or directory"
    )


def test_serve_defaults_are_the_limits_defaults():
    params = {p.name: p.default for p in main.commands["serve"].params}
    limits = Limits()
    assert params["host"] == "127.0.0.1" and params["port"] == 7860
    for name in ("max_upload_mb", "max_phrases", "max_tokens", "max_new_tokens", "workers"):
        assert params[name] == getattr(limits, name), name
