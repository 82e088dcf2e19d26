"""The page: Gradio components wired to `groundcam.web.handlers` (layout and events only)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from groundcam.errors import InputError  # noqa: E402
from groundcam.web import handlers as h  # noqa: E402
from groundcam.web.limits import Limits, save_data_url  # noqa: E402
from groundcam.web.models import ModelCache  # noqa: E402
from groundcam.web.store import (  # noqa: E402
    ResultStore,
    nbytes,
    prune_page_files,
    trim_heap,
)

log = logging.getLogger("groundcam.web")

TITLE = "groundcam: where does the model find this text?"
POINT_HEADERS = ["phrase", "score", "box (x0, y0, x1, y1)", "pointing", "pointed pixel (x, y)"]

CAPTION_CSS = """
.gc-text { font-size: 1.5em; line-height: 2.4em; margin: 0; }
.gc-tok { position: relative; padding: 2px 5px; margin: 0 2px; border-radius: 4px;
  background: #fde68a; color: #111; cursor: pointer; }
.gc-tok:hover, .gc-tok:focus { background: #f59e0b; outline: none; }
.gc-pop { display: none; position: absolute; left: 0; top: 2.1em; z-index: 1000; background: #fff;
  border: 1px solid #999; border-radius: 4px; padding: 4px; line-height: 1.2em; }
.gc-tok:hover .gc-pop, .gc-tok:focus .gc-pop { display: block; }
.gc-pop img { display: block; width: 320px; max-width: 60vw; image-rendering: pixelated; }
.gc-pop small { font-size: 0.6em; }
.gc-hint { color: #666; font-size: 0.9em; }
"""


DRAW_CSS = """
.gc-stage { position: relative; display: inline-block; cursor: crosshair; touch-action: none;
  user-select: none; }
.gc-stage img { display: block; width: 512px; max-width: 100%; image-rendering: pixelated; }
.gc-rect { position: absolute; display: none; border: 2px dashed #22c55e; pointer-events: none; }
.gc-hint, .gc-empty { color: #666; font-size: 0.9em; }
"""

# A drag on the map becomes a box in the image's pixels, sent to the server as a click event.
DRAW_JS = """
let start = null;
const at = (e) => {
  const img = element.querySelector('img.gc-draw');
  if (!img) return null;
  const r = img.getBoundingClientRect();
  const cx = Math.min(Math.max(e.clientX - r.left, 0), r.width);
  const cy = Math.min(Math.max(e.clientY - r.top, 0), r.height);
  return {cx, cy, x: cx / r.width * Number(img.dataset.w), y: cy / r.height * Number(img.dataset.h)};
};
const show = (a, b) => {
  const el = element.querySelector('.gc-rect');
  if (!el) return;
  el.style.display = 'block';
  el.style.left = Math.min(a.cx, b.cx) + 'px';
  el.style.top = Math.min(a.cy, b.cy) + 'px';
  el.style.width = Math.abs(a.cx - b.cx) + 'px';
  el.style.height = Math.abs(a.cy - b.cy) + 'px';
};
element.addEventListener('pointerdown', (e) => {
  if (!e.target.closest('.gc-stage')) return;
  start = at(e);
  if (!start) return;
  e.preventDefault();
  element.setPointerCapture(e.pointerId);
  show(start, start);
});
element.addEventListener('pointermove', (e) => {
  const p = start && at(e);
  if (p) show(start, p);
});
element.addEventListener('pointerup', (e) => {
  if (!start) return;
  const a = start, p = at(e);
  start = null;
  if (!p || Math.abs(p.cx - a.cx) < 3 || Math.abs(p.cy - a.cy) < 3) return;
  const r = Math.round;
  trigger('click', {box: [r(Math.min(a.x, p.x)), r(Math.min(a.y, p.y)),
                          r(Math.max(a.x, p.x)), r(Math.max(a.y, p.y))]});
});
"""


def uploaded_image(upload_dir: Path, limits: Limits, **kwargs: Any) -> gr.Image:
    """A `gr.Image` whose upload reaches the handler as the saved file's path, undecoded, so that
    `groundcam.io.read_image` reads it and refuses decompression bombs from the header (Gradio's
    own image preprocessing would open the file first). The instance's `preprocess` is replaced
    rather than the class subclassed: Gradio writes a .pyi stub beside any component subclass."""
    image = gr.Image(type="filepath", **kwargs)

    def preprocess(payload: Any) -> str | None:
        if payload is None:
            return None
        url = getattr(payload, "url", None)
        if url and url.startswith("data:"):  # a pasted image sent inline: bytes to a file
            return str(save_data_url(url, upload_dir, limits))
        return payload.path

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _guard(outputs: int, status: int) -> Callable:
    """Run a handler; bad input becomes its one-line message in the status box (and a toast),
    other outputs unchanged; anything else is logged on the server and shown in one line."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except (InputError, ValueError, OSError, Image.DecompressionBombError) as e:
                message = f"error: {h.one_line(e)}"
            except Exception as e:  # noqa: BLE001 - the page shows one line, the log the rest
                log.exception("groundcam serve: request failed")
                message = (
                    f"internal error (see the server log): {type(e).__name__}: {h.one_line(e)}"
                )
            gr.Warning(message)
            values: list[Any] = [gr.skip()] * outputs
            values[status] = message
            return values[0] if outputs == 1 else tuple(values)

        return run

    return wrap


def _labels(result: h.PhraseResult) -> list[tuple[str, int]]:
    return [(f"{i}: {p}", i) for i, p in enumerate(result.phrases)]


def _summary(result: h.PhraseResult | h.CaptionResult, what: str) -> str:
    if isinstance(result, h.PhraseResult):
        ex = result.explanation
    else:
        ex = result.generation
    layer = "every layer" if ex.layer is None else f"layer {ex.layer}"
    target = ex.target if isinstance(result, h.PhraseResult) else "token"
    lines = [
        f"{what} with {ex.method} ({layer}, target {target}) on {ex.model} in {result.seconds:.1f} s"
    ]
    if ex.score_kind is not None:  # what the number beside each phrase or token is
        lines.append(f"score: {ex.score_kind.name} - {ex.score_kind.description}")
    warned = list(result.warnings)
    if isinstance(result, h.PhraseResult) and not ex.text_conditioned:
        lines.append(
            f"note: {ex.method} on this model does not read the text (same map for every phrase)"
        )
        warned = [w for w in warned if "does not read the text" not in w]  # said once, above
    lines += [f"warning: {w}" for w in warned]
    return "\n".join(lines)


def build_app(
    cache: ModelCache,
    limits: Limits | None = None,
    workspace: h.Workspace | None = None,
) -> gr.Blocks:
    """The page over the models of `cache`, within `limits`, writing results under `workspace`."""
    limits = limits or Limits()
    workspace = workspace or h.Workspace(max_bytes=limits.files_bytes)
    examples = h.make_examples(workspace.root / "examples")
    by_label = {e.label: e for e in examples}
    first = cache.names[0]
    targets0, target0 = h.target_choices(cache, first)
    methods0, method0 = h.method_choices(cache, first, target0)
    layers0, layer0 = h.layer_choices(cache, first, method0, target0)

    results = ResultStore(limits.cache_bytes, limits.cache_ttl)
    ttl = max(1, round(limits.cache_ttl))
    with gr.Blocks(
        title="groundcam", analytics_enabled=False, delete_cache=(max(1, ttl // 4), ttl)
    ) as app:
        result = gr.State(None)  # the key of the session's result in `results`, never the result
        known_boxes = gr.State({})
        gr.Markdown(
            f"## {TITLE}\nUpload or paste an image (or pick an example), type phrases one per "
            "line, and explain. Drag a box on a phrase's map to score it with the pointing game. Models are the built-ins and those named at start-up."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = uploaded_image(
                    workspace.uploads,
                    limits,
                    label="Image",
                    sources=["upload", "clipboard"],
                    elem_id="gc-image",
                    height=360,
                )
                example = gr.Dropdown(
                    choices=[e.label for e in examples],
                    value=None,
                    label="Example scenes",
                    elem_id="gc-example",
                )
                model = gr.Dropdown(
                    choices=cache.names, value=first, label="Model", elem_id="gc-model"
                )
                with gr.Group(visible=True) as phrase_inputs:
                    phrases = gr.Textbox(
                        label=f"Phrases, one per line (at most {limits.max_phrases})",
                        lines=4,
                        max_length=limits.max_text_chars,
                        placeholder="the red circle\nthe star left of the green square",
                        elem_id="gc-phrases",
                    )
                with gr.Group(visible=False) as caption_inputs:
                    prompt = gr.Textbox(
                        label="Prompt (optional; blank: the model's default question)",
                        max_length=limits.max_phrase_chars,
                        placeholder="What does the sign say?",
                        visible=False,
                        elem_id="gc-prompt",
                    )
                    text = gr.Textbox(
                        label="Text to explain instead of generating (optional)",
                        max_length=limits.max_phrase_chars,
                        elem_id="gc-text",
                    )
                    max_new = gr.Number(
                        label=f"Most new tokens (0: the model's own setting; at most "
                        f"{limits.max_new_tokens})",
                        value=0,
                        precision=0,
                        minimum=0,
                        maximum=limits.max_new_tokens,
                        elem_id="gc-max-new",
                    )
                with gr.Row():
                    # custom values allowed: the handlers check them against the chosen model
                    # (the choices change per model and per session)
                    method = gr.Dropdown(
                        choices=methods0,
                        value=method0,
                        label="Method",
                        elem_id="gc-method",
                        allow_custom_value=True,
                    )
                    layer = gr.Dropdown(
                        choices=layers0,
                        value=layer0,
                        label="Layer",
                        elem_id="gc-layer",
                        allow_custom_value=True,
                    )
                    target = gr.Dropdown(
                        choices=targets0,
                        value=target0,
                        label="Target",
                        elem_id="gc-target",
                        allow_custom_value=True,
                    )
                explain = gr.Button("Explain", variant="primary", elem_id="gc-explain")
                generate = gr.Button(
                    "Generate and explain", variant="primary", visible=False, elem_id="gc-generate"
                )
                status = gr.Textbox(
                    label="Status", interactive=False, lines=2, max_lines=8, elem_id="gc-status"
                )
            with gr.Column(scale=3, min_width=360):
                with gr.Row():
                    alpha = gr.Slider(
                        0, 1, value=0.5, step=0.05, label="Opacity", elem_id="gc-alpha"
                    )
                    cmap = gr.Dropdown(
                        choices=list(h.CMAPS),
                        value="inferno",
                        label="Colour map",
                        elem_id="gc-cmap",
                    )
                with gr.Group(visible=True) as phrase_outputs:
                    overlays = gr.Gallery(
                        label="Overlays (one per phrase, with its score)",
                        columns=3,
                        height="auto",
                        format="png",
                        object_fit="contain",
                        elem_id="gc-overlays",
                    )
                    with gr.Accordion("Per-token maps", open=True):
                        token_phrase = gr.Dropdown(
                            label="Phrase", elem_id="gc-token-phrase", allow_custom_value=True
                        )
                        tokens = gr.Gallery(
                            label="One map per token",
                            columns=6,
                            height=220,
                            format="png",
                            object_fit="contain",
                            elem_id="gc-tokens",
                        )
                    with gr.Accordion("Pointing game: a box drawn on the image", open=True):
                        with gr.Row():
                            point_phrase = gr.Dropdown(
                                label="Phrase", elem_id="gc-point-phrase", allow_custom_value=True
                            )
                            protocol = gr.Dropdown(
                                choices=list(h.PROTOCOLS),
                                value="amc",
                                label="Protocol",
                                elem_id="gc-protocol",
                            )
                        drawer = gr.HTML(
                            h.drawer_html(None, None, None, None),
                            css_template=DRAW_CSS,
                            js_on_load=DRAW_JS,
                            elem_id="gc-drawer",
                        )
                        with gr.Row():
                            x0 = gr.Number(label="x0", value=None, elem_id="gc-x0")
                            y0 = gr.Number(label="y0", value=None, elem_id="gc-y0")
                            x1 = gr.Number(label="x1", value=None, elem_id="gc-x1")
                            y1 = gr.Number(label="y1", value=None, elem_id="gc-y1")
                        score = gr.Button("Score the box", elem_id="gc-score")
                        accuracy = gr.Markdown(elem_id="gc-accuracy")
                        table = gr.Dataframe(
                            headers=POINT_HEADERS,
                            interactive=False,
                            wrap=True,
                            elem_id="gc-pointing",
                        )
                with gr.Group(visible=False) as caption_outputs:
                    caption = gr.HTML(
                        css_template=CAPTION_CSS, elem_id="gc-caption", js_on_load=None
                    )
                    caption_maps = gr.Gallery(
                        label="One map per generated token",
                        columns=6,
                        height="auto",
                        format="png",
                        object_fit="contain",
                        elem_id="gc-caption-maps",
                    )
                files = gr.File(
                    label="Downloads: overlays, maps.npz, meta.json (as groundcam explain / "
                    "caption write them) and a zip of all",
                    file_count="multiple",
                    interactive=False,
                    elem_id="gc-files",
                )

        ui = {"concurrency_id": "ui", "concurrency_limit": 8}

        def _prune() -> None:
            prune_page_files(app, workspace.uploads, limits.files_bytes, limits.cache_ttl)
            trim_heap()

        def _kept(key: str | None) -> h.PhraseResult | h.CaptionResult | None:
            """The result a session's key names (None before any); one dropped is refused. Files
            of earlier requests are pruned first: every view of a result writes new ones."""
            _prune()
            if key is None:
                return None
            res = results.get(key)
            if res is None:
                raise InputError(
                    "that result is no longer kept on the server (results unused for "
                    f"{limits.cache_ttl:g} s, or beyond {limits.cache_mb:g} MB, are dropped): "
                    "explain again"
                )
            return res

        modes = [phrase_inputs, caption_inputs, phrase_outputs, caption_outputs, explain, generate]

        # ------------------------------------------------------------ model, method, layer, target
        @_guard(outputs=11, status=10)
        def on_model(name: str) -> tuple:
            info = cache.info(name)
            targets, default_target = h.target_choices(cache, name)
            methods, default_method = h.method_choices(cache, name, default_target)
            layers, default_layer = h.layer_choices(cache, name, default_method, default_target)
            c = info.captions
            visible = [not c, c, not c, c, not c, c]
            notes = [
                f"model {name} ({info.family}): "
                + (
                    "caption mode: generates text, one map per token"
                    if c
                    else "phrase mode: one map per phrase"
                )
            ]
            notes += [f"warning: {w}" for w in cache.load_warnings(name)]
            return (
                gr.update(choices=methods, value=default_method),
                gr.update(choices=layers, value=default_layer, interactive=len(layers) > 1),
                gr.update(choices=targets, value=default_target, interactive=len(targets) > 1),
                *[gr.update(visible=v) for v in visible],
                gr.update(visible=info.prompt),
                "\n".join(notes),
            )

        model_outputs = [method, layer, target, *modes, prompt, status]
        model.change(on_model, model, model_outputs, **ui)
        app.load(on_model, model, model_outputs, **ui)

        @_guard(outputs=2, status=1)
        def on_method(name: str, method_name: str, target_name: str) -> tuple:
            layers, default_layer = h.layer_choices(cache, name, method_name, target_name)
            return gr.update(
                choices=layers, value=default_layer, interactive=len(layers) > 1
            ), gr.skip()

        method.input(on_method, [model, method, target], [layer, status], **ui)

        @_guard(outputs=3, status=2)
        def on_target(name: str, target_name: str) -> tuple:
            methods, default_method = h.method_choices(cache, name, target_name)
            layers, default_layer = h.layer_choices(cache, name, default_method, target_name)
            return (
                gr.update(choices=methods, value=default_method),
                gr.update(choices=layers, value=default_layer, interactive=len(layers) > 1),
                gr.skip(),
            )

        target.input(on_target, [model, target], [method, layer, status], **ui)

        # ------------------------------------------------------------ image, examples, box corners
        @_guard(outputs=5, status=4)
        def on_example(label: str | None, name: str) -> tuple:
            if not label:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            chosen = by_label[label]
            fits = [n for n in cache.names if cache.info(n).captions == chosen.captions]
            keep = cache.info(name).captions == chosen.captions
            if keep or not fits:
                new_model = name
            else:
                new_model = chosen.prefer if chosen.prefer in fits else fits[0]
            return (
                str(chosen.path),
                "\n".join(chosen.phrases) if chosen.phrases else gr.skip(),
                dict(chosen.boxes),
                new_model,
                f"example loaded: {label}"
                + (" (true boxes known: each phrase is scored)" if chosen.boxes else ""),
            )

        example.input(
            on_example, [example, model], [image, phrases, known_boxes, model, status], **ui
        )

        @_guard(outputs=3, status=2)
        def on_upload(path: str | None) -> tuple:
            picture = h.read_upload(path, limits)
            _prune()
            return {}, None, f"image: {picture.width}x{picture.height} pixels"

        image.upload(on_upload, image, [known_boxes, example, status], **ui)

        # ------------------------------------------------------------ explain (phrase mode)
        phrase_views = [overlays, token_phrase, tokens, point_phrase, drawer, table, accuracy]

        def _phrase_views(res: h.PhraseResult, a: float, c: str, index: int = 0) -> tuple:
            labels = _labels(res)
            try:
                token_view = h.token_overlays(res, index, a, c)
            except InputError:
                token_view = []
            return (
                h.phrase_overlays(res, a, c),
                gr.update(choices=labels, value=index),
                token_view,
                gr.update(choices=labels, value=index),
                h.drawer_html(res, index, a, c),
                h.pointing_rows(res),
                h.accuracy_line(res),
            )

        @_guard(outputs=10, status=9)
        def on_explain(
            name: str,
            path: str | None,
            text_: str,
            method_name: str,
            layer_value: str,
            target_name: str,
            a: float,
            c: str,
            boxes: dict,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way
        ) -> tuple:
            res = h.explain_phrases(
                cache,
                workspace,
                limits,
                name,
                path,
                text_,
                method_name,
                layer_value,
                target_name,
                a,
                c,
                known_boxes=boxes,
                progress=lambda f, d: progress(f, desc=d),
            )
            summary = _summary(res, f"explained {len(res.phrases)} phrase(s)")
            if res.explanation.raw_token_maps is None:
                summary += f"\nnote: {res.explanation.method} has no per-token maps"
            files_ = [str(p) for p in h.saved_files(res.folder)]
            _prune()
            return results.put(res, nbytes(res)), *_phrase_views(res, a, c), files_, summary

        explain.click(
            on_explain,
            [model, image, phrases, method, layer, target, alpha, cmap, known_boxes],
            [result, *phrase_views, files, status],
            concurrency_id="model",
            concurrency_limit=limits.workers,
        )

        @_guard(outputs=2, status=1)
        def on_token_phrase(res: str | None, index: int | None, a: float, c: str) -> tuple:
            res = _kept(res)
            if not isinstance(res, h.PhraseResult) or index is None:
                return gr.skip(), gr.skip()
            return h.token_overlays(res, int(index), a, c), gr.skip()

        token_phrase.input(
            on_token_phrase, [result, token_phrase, alpha, cmap], [tokens, status], **ui
        )

        @_guard(outputs=2, status=1)
        def on_point_phrase(res: str | None, index: int | None, a: float, c: str) -> tuple:
            return h.drawer_html(_kept(res), index, a, c), gr.skip()

        point_phrase.input(
            on_point_phrase, [result, point_phrase, alpha, cmap], [drawer, status], **ui
        )

        @_guard(outputs=5, status=4)
        def on_pick(res: str | None, a: float, c: str, evt: gr.SelectData) -> tuple:
            res = _kept(res)
            if not isinstance(res, h.PhraseResult):
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            i = int(evt.index)
            try:
                token_view = h.token_overlays(res, i, a, c)
            except InputError:
                token_view = gr.skip()
            return i, token_view, i, h.drawer_html(res, i, a, c), gr.skip()

        overlays.select(
            on_pick,
            [result, alpha, cmap],
            [token_phrase, tokens, point_phrase, drawer, status],
            **ui,
        )

        def _scored(res: h.PhraseResult, i: int, box: h.Box, proto: str, a: float, c: str):
            point = h.score_box(res, i, [box], proto)
            return (
                h.phrase_overlays(res, a, c),
                h.drawer_html(res, i, a, c),
                h.pointing_rows(res),
                h.accuracy_line(res),
                *box,
                f"phrase {i} {res.phrases[i]!r}: {h.point_word(point)}, pointed pixel "
                f"{tuple(point.point)}, box {tuple(round(v) for v in box)} ({proto})",
            )

        score_outputs = [overlays, drawer, table, accuracy, x0, y0, x1, y1, status]

        def _checked(res: Any, index: Any) -> int:
            if not isinstance(res, h.PhraseResult):
                raise InputError("explain some phrases first, then score a box")
            if index is None:
                raise InputError("choose the phrase the box belongs to")
            return int(index)

        @_guard(outputs=9, status=8)
        def on_score(res: str | None, index: int | None, proto: str, *values: Any) -> tuple:
            *box_values, a, c = values
            res = _kept(res)
            i = _checked(res, index)
            return _scored(res, i, h.parse_box(box_values, res.size), proto, a, c)

        score.click(
            on_score,
            [result, point_phrase, protocol, x0, y0, x1, y1, alpha, cmap],
            score_outputs,
            **ui,
        )

        @_guard(outputs=9, status=8)
        def on_draw(
            res: str | None,
            index: int | None,
            proto: str,
            a: float,
            c: str,
            evt: gr.EventData,
        ) -> tuple:
            drawn = (getattr(evt, "_data", None) or {}).get("box")
            if not drawn:
                return tuple(gr.skip() for _ in score_outputs)
            res = _kept(res)
            i = _checked(res, index)
            return _scored(res, i, h.parse_box(drawn, res.size), proto, a, c)

        drawer.click(on_draw, [result, point_phrase, protocol, alpha, cmap], score_outputs, **ui)

        # ------------------------------------------------------------ caption mode
        @_guard(outputs=5, status=4)
        def on_generate(
            name: str,
            path: str | None,
            method_name: str,
            layer_value: str,
            text_: str,
            most: float | None,
            a: float,
            c: str,
            prompt_: str,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way
        ) -> tuple:
            res = h.explain_caption(
                cache,
                workspace,
                limits,
                name,
                path,
                method_name,
                layer_value,
                text_,
                int(most) if most else None,
                a,
                c,
                progress=lambda f, d: progress(f, desc=d),
                prompt=prompt_,
            )
            _prune()
            return (
                results.put(res, nbytes(res)),
                h.caption_html(res, a, c),
                h.caption_overlays(res, a, c),
                [str(p) for p in h.saved_files(res.folder)],
                _summary(res, f"generated {res.generation.text!r} ({len(res.generation)} tokens)"),
            )

        generate.click(
            on_generate,
            [model, image, method, layer, text, max_new, alpha, cmap, prompt],
            [result, caption, caption_maps, files, status],
            concurrency_id="model",
            concurrency_limit=limits.workers,
        )

        # ------------------------------------------------------------ opacity and colour map
        @_guard(outputs=5, status=4)
        def on_style(res: Any, a: float, c: str, index: int | None) -> tuple:
            res = _kept(res)
            if isinstance(res, h.PhraseResult):
                i = int(index or 0)
                try:
                    token_view = h.token_overlays(res, i, a, c)
                except InputError:
                    token_view = []
                files_ = [str(p) for p in h.save_phrases(res, a, c)]
                return h.phrase_overlays(res, a, c), token_view, gr.skip(), files_, gr.skip()
            if isinstance(res, h.CaptionResult):
                files_ = [str(p) for p in h.save_caption(res, a, c)]
                return gr.skip(), gr.skip(), h.caption_overlays(res, a, c), files_, gr.skip()
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()

        style_outputs = [overlays, tokens, caption_maps, files, status]
        alpha.release(on_style, [result, alpha, cmap, token_phrase], style_outputs, **ui)
        cmap.input(on_style, [result, alpha, cmap, token_phrase], style_outputs, **ui)

        @_guard(outputs=2, status=1)
        def on_caption_style(res: Any, a: float, c: str) -> tuple:
            res = _kept(res)
            if isinstance(res, h.CaptionResult):
                return h.caption_html(res, a, c), gr.skip()
            return gr.skip(), gr.skip()

        alpha.release(on_caption_style, [result, alpha, cmap], [caption, status], **ui)
        cmap.input(on_caption_style, [result, alpha, cmap], [caption, status], **ui)

    app.queue(max_size=limits.queue_size, default_concurrency_limit=limits.workers)
    return app
