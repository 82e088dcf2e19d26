"""`groundcam serve`: a local web page over the API (needs the `web` extra: Gradio)."""

from __future__ import annotations

import ipaddress
import logging
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from groundcam.errors import InputError
from groundcam.web.limits import Limits

__all__ = ["Limits", "create_app", "serve"]


def _need_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError("groundcam serve needs Gradio: pip install 'groundcam[web]'") from None


def create_app(
    models: Sequence[str] = (),
    limits: Limits | None = None,
    device: str | None = None,
    workdir: str | Path | None = None,
    builtins: bool = True,
):
    """The page (a queued `gradio.Blocks`), its model cache and its workspace, for `models` plus
    the built-ins; the `models` named here are loaded now, so one that does not load fails at
    once."""
    _need_gradio()
    from groundcam.web.app import build_app
    from groundcam.web.handlers import Workspace
    from groundcam.web.models import ModelCache

    cache = ModelCache(models, device=device, builtins=builtins)
    for name in models:
        cache.get(name)
    limits = limits or Limits()
    workspace = Workspace(
        Path(workdir) if workdir is not None else None, max_bytes=limits.files_bytes
    )
    return build_app(cache, limits, workspace), cache, workspace


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """Refuse a port another program already listens on, in one line, before Gradio starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the server will: connections of an earlier run in TIME_WAIT do not block the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(
    models: Sequence[str] = (),
    host: str = "127.0.0.1",
    port: int = 7860,
    limits: Limits | None = None,
    device: str | None = None,
    echo: Callable[..., None] = print,
) -> None:
    """Start the page on http://host:port and serve until interrupted (127.0.0.1 unless asked)."""
    limits = limits or Limits()
    check_port(host, port)
    app, cache, workspace = create_app(models, limits, device)

    if not is_loopback(host):
        echo(
            f"groundcam serve: warning: listening on {host}, not only this machine; the page has "
            "no login, so anyone who can reach this address can use it",
            file=sys.stderr,
        )
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=limits.max_upload_bytes,
        state_session_capacity=limits.sessions,
        allowed_paths=[str(workspace.root)],
        share=False,
        inbrowser=False,
        quiet=True,
        show_error=False,
        prevent_thread_lock=True,
    )
    echo(f"groundcam serve: models {', '.join(cache.names)}")
    echo(f"groundcam serve: http://{host}:{port}/ (Ctrl+C to stop)")
    previous = _stop_on_sigterm()
    stop = _prune_every(PRUNE_SECONDS, app, workspace, limits)
    try:
        app.block_thread()  # until Ctrl+C (or SIGTERM)
    finally:
        stop.set()
        app.close()
        shutil.rmtree(workspace.root, ignore_errors=True)  # this run's results and uploads
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


PRUNE_SECONDS = 2.0  # how often the server prunes its files besides after each request


def _prune_every(seconds: float, app, workspace, limits: Limits) -> threading.Event:
    """Prune the page's files every `seconds` in a daemon thread (uploads arrive without any
    request of ours running); set the event returned to stop."""
    from groundcam.web.store import prune_page_files, trim_heap

    stop = threading.Event()

    def run() -> None:
        while not stop.wait(seconds):
            try:
                prune_page_files(app, workspace.uploads, limits.files_bytes, limits.cache_ttl)
                trim_heap()
            except Exception:  # noqa: BLE001 - keep pruning; the log says why it failed
                logging.getLogger("groundcam.web").exception("groundcam serve: pruning failed")

    threading.Thread(target=run, name="groundcam-prune", daemon=True).start()
    return stop


def _stop_on_sigterm():
    """SIGTERM stops the server as Ctrl+C does (so its files are removed); the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)
