"""Explaining generated text: generate (or take the given text), then one map per generated
token from one teacher-forced forward and a batched backward (`gradients`). The family's adapter
says what a generation reads (a prompt, how many images) and which recorded row scored each
token; `Explainer.explain_generation` is the public entry and holds the model's lock."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from groundcam.adapters.base import Adapter
from groundcam.adapters.hf import unknown_words_message
from groundcam.contract import (
    ATTENTION_GRAPH,
    TEXT_TO_IMAGE,
    TOKEN_LOGITS,
    RecordSpec,
    Scores,
    TokenLayout,
)
from groundcam.errors import GroundcamWarning, InputError
from groundcam.explanation import Explanation, GenerationExplanation, normalize_maps
from groundcam.geometry import Geometry
from groundcam.gradients import HeadRows, record
from groundcam.methods.lm_relevance import lm_relevance
from groundcam.methods.qformer_relevance import compose_to_patches
from groundcam.methods.relative_attention import GENERIC_PROMPT, relative
from groundcam.methods.sinks import SINK_THRESHOLD, sink_tokens
from groundcam.methods.tam import tam_maps
from groundcam.placement import place
from groundcam.video import Video

if TYPE_CHECKING:
    from groundcam.explainer import Explainer


def check_images(adapter: Adapter, given: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    """The images of one generation as a list, or one line saying how many the family reads."""
    if isinstance(given, Image.Image):
        return [given]
    if not isinstance(given, list | tuple):
        raise TypeError(f"image must be a PIL.Image, got {type(given).__name__}")
    if not given:
        raise InputError("no image given: explain_generation needs an image")
    if any(isinstance(g, Video) for g in given):
        raise InputError("a video is explained alone: pass the Video itself, not in a list")
    most = adapter.images_per_generation
    if len(given) > most:
        raise InputError(
            f"the {adapter.family} family generates from "
            f"{'one image' if most == 1 else f'at most {most} images'}; got a list of "
            f"{len(given)} images"
        )
    return list(given)


def check_video(adapter: Adapter) -> None:
    """One line when the family reads no videos."""
    if not getattr(adapter, "videos", False):
        raise InputError(
            f"the {adapter.family} family reads images, not videos: video frames are read by "
            "qwen-vl (Qwen2/2.5/3-VL) and llava-onevision"
        )


def check_prompt(adapter: Adapter, prompt: str | None) -> dict[str, str]:
    """The prompt as the adapter's generation keyword (none when not given), or one line saying
    that the family takes no prompt."""
    if prompt is None:
        return {}
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    if not adapter.takes_prompt:
        raise InputError(
            f"the {adapter.family} family generates from the image alone and takes no prompt "
            "(leave prompt out)"
        )
    return {"prompt": prompt}


def explain_generation(
    explainer: Explainer,
    image_or_images: Image.Image | Sequence[Image.Image],
    prompt: str | None = None,
    method: str | None = None,
    layer: int | None = None,
    max_new_tokens: int | None = None,
    text: str | None = None,
    beam: int = 1,
    sinks: str | None = None,
) -> GenerationExplanation:
    """`Explainer.explain_generation` (which see), run by the caller under the model's lock."""
    a = explainer.adapter
    if "token" not in a.targets:
        raise InputError(
            f"the {a.family} family does not generate text; explain_generation needs a "
            "captioning or OCR model"
        )
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise InputError(f"beam must be a positive integer, got {beam!r}")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise InputError(f"text= must be a non-empty string to explain, got {text!r}")
    if isinstance(image_or_images, Video):
        check_video(a)
        images = image_or_images
    else:
        images = check_images(a, image_or_images)
    extra = check_prompt(a, prompt)
    if getattr(a, "vlm", False):
        return explain_vlm(
            explainer, images, prompt, method, layer, max_new_tokens, text, beam, sinks=sinks
        )
    if sinks is not None:
        raise InputError(f"sinks= is for generative VLMs; the {a.family} family has no sinks rule")
    method_obj, source, target, layer = explainer.resolve(method, layer, "token")
    method = method_obj.name
    pixel_values = explainer.prepare_images(images)
    ids, first, unknown = _text_ids(
        a,
        text,
        lambda: a.generate(pixel_values, max_new_tokens, beam, **extra),
        lambda: a.teacher_ids(text, **extra),
        "with the model's start and prompt tokens",
        stacklevel=3,
    )
    skip = a.special_ids()
    positions = [k for k in range(first, ids.shape[1]) if int(ids[0, k]) not in skip]
    if not positions:  # nothing but start/end tokens: an empty explanation, not an error
        g = a.geometry(pixel_values)
        empty = torch.zeros(0, g.grid_h, g.grid_w)
        return GenerationExplanation(
            text="",
            tokens=[],
            token_ids=[],
            positions=[],
            maps=empty,
            raw_maps=empty,
            scores=torch.zeros(0),
            method=method,
            layer=layer,
            model=explainer.name,
            image=images[0],
            score_kind=a.score_kind("token"),
            unknown_words=unknown,
        )
    pos = torch.tensor(positions, device=ids.device)
    spec = a.record_spec(source, layer, "token")

    head = a.output_head()
    picked = None if head is None else HeadRows(head, pos - 1)

    def run():
        if picked is None:
            logits = a.decoder_logits(pixel_values, ids, spec.expand_vision_at)[0, pos - 1]
        else:  # the LM head computes the rows that predict the chosen tokens, nothing else
            with picked:
                logits = a.decoder_logits(pixel_values, ids, spec.expand_vision_at)[0]
        logp = logits.float().log_softmax(-1)
        chosen = logp.gather(-1, ids[0, pos][:, None])[:, 0]
        return Scores(chosen, chosen.detach().exp())

    k = len(positions)
    zeros = torch.zeros(k, dtype=torch.long, device=ids.device)
    scores, recorded, grads = record(
        method_obj, replace(spec, per_image=True), run, k, zeros, explainer.grad_chunk, root=picked
    )
    geometry = a.geometry(pixel_values).select(zeros)
    mask = torch.ones(k, ids.shape[1], dtype=torch.long, device=ids.device)
    out = method_obj.compute(source, recorded, grads, geometry, mask, spec.graph)
    if out.raw_token_maps is not None:  # the decoder row that predicted token k
        raw = out.raw_token_maps[torch.arange(k), a.scored_rows(pos)]
    else:
        raw = out.raw_maps
    raw = raw.detach().float().cpu()
    if not out.text_conditioned and k > 1:
        warnings.warn(
            f"method {method!r} does not read the text on this model: the {k} generated "
            "tokens all get the same image-only map",
            GroundcamWarning,
            stacklevel=2,
        )
    id_list = ids[0].tolist()
    return GenerationExplanation(
        text=a.decode(id_list[first:]),
        tokens=a.token_strings(ids[:, pos], torch.ones_like(ids[:, pos]))[0],
        token_ids=[id_list[p] for p in positions],
        positions=positions,
        maps=normalize_maps(raw),
        raw_maps=raw,
        scores=scores.reported.detach().float().cpu(),
        method=method,
        layer=layer,
        model=explainer.name,
        image=images[0],
        text_conditioned=out.text_conditioned,
        score_kind=a.score_kind("token"),
        unknown_words=unknown,
    )


def explain_vlm(
    explainer: Explainer,
    images: list[Image.Image] | Video,
    prompt: str | None,
    method: str | None,
    layer: int | str | tuple[int, int] | list[int] | range | None,
    max_new_tokens: int | None,
    text: str | None,
    beam: int,
    columns_only: bool = False,
    sinks: str | None = None,
) -> GenerationExplanation | torch.Tensor:
    """`explain_generation` on a generative VLM (`adapters.vlm`): the prompt and images through
    the processor, `generate()` under no_grad (or `text` teacher-forced), then one teacher-forced
    forward and a batched backward for every generated token; each token's values over the
    image-token columns are placed on every image through the family's `TokenLayout`
    (`columns_only`: the per-token values over the image-token columns, [K, N], unplaced;
    `sinks="drop"`: visual sink tokens read 0, `methods.sinks`). `images` may be one `Video`:
    one map per frame, side by side in `maps` (`video_note`, `frames_of`)."""
    from groundcam.io import check_image

    a = explainer.adapter
    if sinks not in (None, "drop"):
        raise InputError(f'sinks must be None or "drop", got {sinks!r}')
    video = images if isinstance(images, Video) else None
    for i, image in enumerate([] if video else images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}")
        check_image(image, f"image {i}")
    wanted = layer_range(layer)
    method_obj, source, _, first_layer = explainer.resolve(method, wanted[0], "token")
    layers = [first_layer] + [explainer.resolve(method, n, "token").layer for n in wanted[1:]]
    layer = first_layer if len(layers) == 1 else tuple(layers)
    inputs = a.inputs(images, prompt) if video is None else a.video_inputs(video, prompt)
    ids, first, unknown = _text_ids(
        a,
        text,
        lambda: a.generate(inputs, max_new_tokens, beam),
        lambda: a.teacher_ids(inputs, text),
        "with the prompt and image tokens",
        stacklevel=4,
    )
    if video is None:
        layout = a.token_layout(inputs, ids, [(im.height, im.width) for im in images])
    else:
        layout, frame_map = a.video_layout(inputs, ids, video)
    columns = TokenLayout(
        torch.arange(len(layout.positions)),
        layout.tile,
        layout.row,
        layout.col,
        layout.tiles,
        layout.sizes,
    )  # the same cells, indexed by image-token column rather than sequence position
    read = a.lm_columns(ids, layout)  # the LM columns whose values are composed into the cells
    if sinks == "drop" and not torch.equal(read.cpu(), layout.positions.cpu()):
        raise InputError(
            f'sinks="drop" finds sink tokens among the image tokens the language model reads; '
            f"the {a.family} family's language model reads queries composed onto the image, not "
            "image tokens: leave sinks= out"
        )
    skip = a.special_ids()
    positions = [k for k in range(first, ids.shape[1]) if int(ids[0, k]) not in skip]
    id_list = ids[0].tolist()
    # as templated, before expansion
    prompt_text = a.prompt_text(prompt, 1, True) if video else a.prompt_text(prompt, len(images))
    notes: dict[str, str] = {}
    k = len(positions)
    composed, at_cells = None, source == ATTENTION_GRAPH  # relevance composes its own values
    if k and source == ATTENTION_GRAPH:  # relevance: every layer, row by row in the backward
        pos = torch.tensor(positions, device=ids.device)
        full = a.teacher_inputs(inputs, ids)
        values, logp, more = relevance_values(a, full, read, pos, ids[0, pos])
        notes.update(more)
        reported = logp.exp()
    elif k:
        pos = torch.tensor(positions, device=ids.device)
        token_ids = ids[0, pos]
        specs = [a.record_spec(source, n, "token") for n in layers]
        spec = RecordSpec([p for one in specs for p in one.points], first_layer)
        full = a.teacher_inputs(inputs, ids)
        picked = HeadRows(a.output_head(), pos - 1)
        hidden: list[torch.Tensor] = []  # the LM head's input: the last hidden state

        def run() -> Scores:
            with picked, a.recording(spec) as note:
                logits = a.model(**full, use_cache=False).logits[0]
            if any(p.module in a.attn for p in spec.points):
                notes["attention"] = note
            chosen = logits.float().log_softmax(-1).gather(-1, token_ids[:, None])[:, 0]
            hidden.append(picked.x.detach())
            if source == TOKEN_LOGITS:
                a.lens(picked.x.detach(), token_ids)  # recorded by the spec's hook
            return Scores(chosen, chosen.detach().exp())

        zeros = torch.zeros(k, dtype=torch.long, device=ids.device)
        scores, recorded, grads = record(
            method_obj, spec, run, k, zeros, explainer.grad_chunk, root=picked
        )
        composed = a.composition(inputs)  # kept by this forward (BLIP-2), before any other
        if source == TEXT_TO_IMAGE:  # only the row that scored each token
            rows = a.scored_rows(pos).to(recorded[0].device)
            pick = torch.arange(k, device=rows.device)
            recorded = [t[pick, :, rows][:, :, None] for t in recorded]
            grads = None if grads is None else [g[pick, :, rows][:, :, None] for g in grads]
        geometry = Geometry(1, len(read), 0, columns=read)
        mask = torch.ones(k, 1, dtype=torch.long, device=ids.device)
        values = 0
        for i in range(len(layers)):  # a layer range: the mean of its layers' maps
            out = method_obj.compute(
                source, recorded[i : i + 1], None if grads is None else grads[i : i + 1],
                geometry, mask, spec.graph,
            )  # fmt: skip
            one = out.raw_maps if out.raw_token_maps is None else out.raw_token_maps[:, 0]
            values = values + one.detach().float().cpu().reshape(k, -1) / len(layers)
        reported = scores.reported.detach().float().cpu()
        if getattr(method_obj, "whole_sequence", False):  # tam reads every position
            mix = None if composed is None else composed[0].detach().float().cpu()
            values = sequence_tam(a, hidden[-1], ids, read, columns, pos, mix)
            at_cells = True
        if getattr(method_obj, "relative", False):
            values = relative_to_generic(explainer, images, layer, id_list[first:], values)
            notes["relative-attention"] = (
                f"divided by the attention of the generic prompt {GENERIC_PROMPT!r}"
            )
    else:  # nothing but special tokens: an empty explanation, not an error
        values, reported = torch.zeros(0, len(layout.positions)), torch.zeros(0)
    if sinks == "drop" and k:
        values = drop_sinks(a, inputs, ids, layout, layers, values, notes)
    if columns_only:
        return values
    if composed is not None:  # LM columns that are not cells (BLIP-2's queries) -> cells
        if not at_cells:
            values = values @ composed[0].detach().float().cpu()
        notes["composition"] = composed[1]
    placed = place(values, columns)
    image = images[0] if video is None else video.strip()
    if video is not None:  # one map per frame, side by side
        placed = [torch.cat([placed[m] for m in frame_map], -1)]
        notes["video"] = video_note(video, frame_map)
    words, word_tokens = group_words(a.tokenizer, [id_list[p] for p in positions])
    word_raw = torch.stack([placed[0][t].mean(0) for t in word_tokens]) if words else None
    return GenerationExplanation(
        text=a.decode(id_list[first:]),
        tokens=a.token_strings(ids[:, positions], torch.ones(1, k, dtype=torch.long))[0],
        token_ids=[id_list[p] for p in positions],
        positions=positions,
        maps=normalize_maps(placed[0]),
        raw_maps=placed[0],
        scores=reported,
        method=method_obj.name,
        layer=layer,
        model=explainer.name,
        image=image,
        score_kind=a.score_kind("token"),
        unknown_words=unknown,
        words=words,
        word_tokens=word_tokens,
        word_maps=None if word_raw is None else normalize_maps(word_raw),
        image_maps=[normalize_maps(m) for m in placed]
        if video is None
        else frames_of(placed[0], video),
        prompt=prompt_text,
        notes=notes,
        frames=None if video is None else video.frames,
    )


def video_note(video: Video, frame_map: list[int]) -> str:
    """What the maps of a video are: which frames, and which map each frame shows."""
    shared = len(set(frame_map)) < len(frame_map)
    how = (
        f"{len(set(frame_map))} temporal steps: each frame shows its step's map "
        f"(frame -> map {frame_map})"
        if shared
        else "one map per frame"
    )
    return f"{len(video)} frames (indices {video.indices} of {video.total}); {how}"


def frames_of(strip: torch.Tensor, video: Video) -> list[torch.Tensor]:
    """A video's per-frame maps [K, h, w] cut from the normalised strip [K, h, F*w] (normalised
    over all frames together, so frames compare)."""
    return list(normalize_maps(strip).chunk(len(video), -1))


def sequence_tam(
    a: Adapter,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    image: torch.Tensor,
    columns: TokenLayout,
    pos: torch.Tensor,
    compose: torch.Tensor | None = None,
) -> torch.Tensor:
    """TAM (`methods.tam`) of the tokens at `pos` from the last hidden state [1, T, C]: the
    logit lens of every text token's class and of the explained ones, at every position;
    `image` the LM's image columns, `compose` [columns, cells] where they are not the cells."""
    seq = ids[0].cpu()
    skip = a.special_ids()
    is_image = torch.zeros(len(seq), dtype=torch.bool)
    is_image[image] = True
    text = torch.tensor(
        [j for j in range(len(seq)) if not is_image[j] and int(seq[j]) not in skip],
        dtype=torch.long,
    )
    classes = torch.unique(torch.cat([seq[text], seq[pos.cpu()]]))
    with torch.no_grad():
        lens = a.lens(hidden, classes.to(hidden.device)).cpu()
    return tam_maps(lens, classes, seq, image, text, pos.cpu(), columns, compose)


def relevance_values(
    a: Adapter, inputs: dict, columns: torch.Tensor, pos: torch.Tensor, token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """`relevance` of the tokens at `pos`: values over the layout's cells [K, N] (the LM's rows
    at the image columns `columns`, or, where the adapter names attention below the LM, those
    rows composed through it: `methods.qformer_relevance`), log-probabilities [K] and notes."""
    below = a.relevance_below()
    if below is None:
        values, logp, note = lm_relevance(a, inputs, columns, pos, token_ids)
        return values, logp, {"attention": note}
    kinds, modules = below

    def compose(row: torch.Tensor, bars: list[torch.Tensor]) -> torch.Tensor:
        return compose_to_patches(row, kinds, bars)

    with a.relevance_scope(kinds, modules) as note:
        values, logp, lm_note = lm_relevance(a, inputs, columns, pos, token_ids, modules, compose)
    return values, logp, {"attention": lm_note, "composition": a.relevance_note(kinds, note)}


def drop_sinks(
    a: Adapter,
    inputs: dict[str, torch.Tensor],
    ids: torch.Tensor,
    layout: TokenLayout,
    layers: list,
    values: torch.Tensor,
    notes: dict[str, str],
) -> torch.Tensor:
    """`values` [K, N] with the columns of visual sink tokens (`methods.sinks`, at the hidden
    state entering each explained layer; every-layer methods: the default layer) set to 0."""
    chosen = [n for n in layers if isinstance(n, int)] or [a.default_lm_layer()]
    with torch.no_grad():
        out = a.model(**a.teacher_inputs(inputs, ids), use_cache=False, output_hidden_states=True)
    found = torch.zeros(len(layout.positions), dtype=torch.bool)
    for n in chosen:
        found |= sink_tokens(out.hidden_states[n][0], layout.positions)
    cols = torch.nonzero(found)[:, 0].tolist()
    notes["sinks"] = (
        f"dropped {len(cols)} visual sink token(s) (image columns {cols}; |h|/rms(h) >= "
        f"{SINK_THRESHOLD:g} in the begin-of-sequence sink dimensions, layer(s) {chosen})"
    )
    return values.masked_fill(found, 0)


def relative_to_generic(
    explainer: Explainer,
    images: list[Image.Image] | Video,
    layer: int | tuple,
    text_ids: list[int],
    values: torch.Tensor,
) -> torch.Tensor:
    """`values` [K, N] (attention rows) divided by the last prompt token's row for
    `GENERIC_PROMPT` on the same images, at the same layers (`methods.relative_attention`)."""
    text = explainer.adapter.decode(text_ids)
    layers = list(layer) if isinstance(layer, tuple) else layer
    generic = explain_vlm(
        explainer, images, GENERIC_PROMPT, "attention", layers, None, text or " ", 1, True
    )
    if not len(generic):
        raise InputError(
            f"relative-attention: the text {text[:60]!r} left no token to read the generic "
            "prompt's attention row from"
        )
    return relative(values, generic[0])


def explain_phrases(
    explainer: Explainer,
    images: Sequence[Image.Image],
    phrases: Sequence[str | Sequence[str]],
    method: str | None,
    layer: int | str | tuple | list | range | None,
    prompt: str | None,
) -> Explanation:
    """Given phrases on a generative VLM (`Explainer.explain_many`): each phrase teacher-forced
    after `prompt` in the family's template (`prompt=None`: `vlm.DEFAULT_PROMPT`); its map is
    the mean of its tokens' maps (`explain_vlm`), its score the sum of its tokens'
    log-probabilities (`phrase_log_likelihood`). Maps of one call share one size: images of
    other shapes go in separate calls."""
    a = explainer.adapter
    rows, scores, tokens, token_maps, flat, index = [], [], [], [], [], []
    for i, (image, group) in enumerate(zip(images, phrases, strict=True)):
        if isinstance(image, Video):
            check_video(a)
        for phrase in [group] if isinstance(group, str) else group:
            if not isinstance(phrase, str) or not phrase.strip():
                raise InputError(f"phrases must be non-empty strings, got {phrase!r}")
            seen = image if isinstance(image, Video) else [image]
            gen = explain_vlm(explainer, seen, prompt, method, layer, None, phrase, 1)
            if not gen.tokens:
                raise InputError(
                    f"phrase {phrase!r} tokenizes to nothing the {a.family} model writes "
                    "(special tokens only): give words"
                )
            if rows and gen.raw_maps.shape[1:] != rows[0].shape:
                raise InputError(
                    f"image {i} gives {tuple(gen.raw_maps.shape[1:])} maps, image 0 "
                    f"{tuple(rows[0].shape)}: explain images of other shapes in separate calls"
                )
            rows.append(gen.raw_maps.mean(0))
            scores.append(gen.scores.double().log().sum().float())
            tokens.append(gen.tokens)
            token_maps.append(gen.raw_maps)
            flat.append(phrase)
            index.append(i)
            used = gen
    longest = max(len(t) for t in tokens)
    padded = torch.zeros(len(rows), longest, *rows[0].shape)
    for p, m in enumerate(token_maps):
        padded[p, : len(m)] = m
    raw = torch.stack(rows)
    return Explanation(
        maps=normalize_maps(raw),
        raw_maps=raw,
        scores=torch.stack(scores),
        phrases=flat,
        tokens=tokens,
        method=used.method,
        layer=used.layer,
        target="phrase",
        model=explainer.name,
        raw_token_maps=padded,
        images=[im.strip() if isinstance(im, Video) else im for im in images],
        image_index=index,
        score_kind=a.score_kind("phrase"),
        unknown_words=a.unknown_words(flat),
    )


def phrase_log_likelihood(
    explainer: Explainer, image: Image.Image, phrase: str, prompt: str | None = None
) -> float:
    """The log-probability of `phrase` after `prompt` on `image` (forward only): the score
    `explain_phrases` reports, for deletion and insertion curves."""
    a = explainer.adapter
    inputs = a.inputs([image], prompt)
    ids, first = a.teacher_ids(inputs, phrase)
    skip = a.special_ids()
    pos = torch.tensor([k for k in range(first, ids.shape[1]) if int(ids[0, k]) not in skip])
    with torch.no_grad():
        logits = a.model(**a.teacher_inputs(inputs, ids), use_cache=False).logits[0]
    logp = logits[pos - 1].float().log_softmax(-1).gather(-1, ids[0, pos][:, None])
    return float(logp.sum())


def layer_range(layer: int | str | tuple | list | range | None) -> list:
    """The layers asked for: one (an int, a string of digits, None for the default), or a range
    (`(first, last)`, a list, a `range`, or "first-last", both ends included)."""
    if isinstance(layer, range):
        layer = list(layer)
    if isinstance(layer, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", layer):
        lo, hi = (int(x) for x in layer.split("-"))
        layer = list(range(lo, hi + 1))
        if not layer:
            raise InputError(f"layer range {lo}-{hi} is empty: write first-last with first <= last")
    ends = isinstance(layer, tuple) and len(layer) == 2
    if ends and all(isinstance(n, int) and not isinstance(n, bool) for n in layer):
        layer = list(range(layer[0], layer[1] + 1))
    if isinstance(layer, list | tuple):
        if not layer:
            raise InputError("layer: an empty range of layers (write first-last, first <= last)")
        return list(dict.fromkeys(layer))
    return [layer]


def group_words(tokenizer, token_ids: list[int]) -> tuple[list[str], list[list[int]]]:
    """Sub-word tokens grouped into words. Rule: decode the tokens one by one (each decode of
    the tokens so far); a token whose new text starts with whitespace, or the first token,
    begins a word, any other token continues the word before it; a token that adds no text
    (a special token) belongs to the word before it, or starts the first. Returns each word's
    text (stripped) and its token indices."""
    words: list[str] = []
    groups: list[list[int]] = []
    text = ""
    for i in range(len(token_ids)):
        now = tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)
        new = now[len(text) :] if now.startswith(text) else " " + tokenizer.decode([token_ids[i]])
        text = now
        if not groups or (new[:1].isspace() and new.strip()):
            words.append(new.strip())
            groups.append([i])
        else:
            words[-1] += new.strip()
            groups[-1].append(i)
    return words, groups


def _text_ids(a, text, generate, teacher, counted: str, stacklevel: int):
    """The ids to explain, the first explained position and the unknown words of `text`:
    `generate()` under no_grad, or `text` taken as if generated (`teacher()`), refused in one
    line when longer than the model reads (`counted`: what its length includes) and warned
    about when a word of it is unknown to the model."""
    if text is None:
        with torch.no_grad():
            ids, first = generate()
        return ids, first, []
    ids, first = teacher()
    limit = a.max_positions()
    if limit is not None and ids.shape[1] > limit:
        raise InputError(
            f"text= is {ids.shape[1]} tokens {counted}; this model reads at most {limit}: "
            f"{text[:60]!r}"
        )
    unknown = a.unknown_words([text])[0]
    if unknown:
        warnings.warn(
            unknown_words_message(text, unknown, getattr(a.tokenizer, "unk_token", None)),
            GroundcamWarning,
            stacklevel=stacklevel,
        )
    return ids, first, unknown
