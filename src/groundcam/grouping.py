"""Grouped cross-attention: each image's keys and values once, all of its phrases as one query block.

A text side that cross-attends to image tokens (ALBEF, BLIP, TrOCR-style decoders) projects the
keys and values of the same image tokens again for every phrase of that image when it is fed
`image.index_select(0, image_index)`. Here the text rows of each image are gathered into one
query block instead: row b of `[B, T, C]` goes to block `image_index[b]` of `[G, P*T, C]` (P:
the most phrases any image has; shorter blocks are padded with a copy of a real row, whose output
is dropped), the module attends to the per-image states `[G, N, C]`, and its outputs go back to
`[B, T, ...]`. Every query row attends on its own (softmax per row), so the result equals the
per-pair computation up to float rounding.

`grouped(modules, groups)` does this for unmodified modules with forward hooks that are removed
on exit, also on exceptions. A module's output is `(context, probs, ...)` under eager attention;
the context goes back to per-pair rows for the model to go on with. The probabilities it returns
are in the grouped layout `[G, H, P*T, N]` when a Recorder watches the module: the Recorder keeps
that tensor (the one the context was computed from, so gradients with respect to it are exact)
with `groups.probs_to_rows` to present it, and its gradients, per pair.

Threads: while open, `grouped` holds the lock of the model its modules belong to
(`groundcam.threads`); its hooks and the layouts `layout` reports belong to the thread that
opened it, so another thread's forward through the same modules runs per pair, untouched.

Where it applies: ALBEF (inside its own attention), BLIP ITM and captioning, and the decoders of
VisionEncoderDecoder models (TrOCR, GPT-2, BERT). Single-stream models (FLAVA's multimodal
encoder, ViLT) have no such keys and values: their image tokens attend to the phrase from the
first fused layer on, so no image state after it is shared by an image's phrases, and what is
per image before it (FLAVA's image-to-multimodal projection) already runs once per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from threading import local

import torch
from torch import nn

from groundcam.threads import holding, this_thread

__all__ = ["ImageGroups", "grouped", "layout", "row_images"]


@dataclass(frozen=True, eq=False)
class ImageGroups:
    """How B pair rows fall into G image blocks of `size` rows each. `take[g * size + s]` is the
    pair row in slot s of image g (a real row of image g, or any row, for padding slots);
    `place[b]` is the slot of pair row b in that flat layout."""

    n_images: int
    size: int
    take: torch.Tensor  # [G * size] pair rows forming the blocks
    place: torch.Tensor  # [B] flat slot of each pair row
    regular: bool  # rows already sorted by image with `size` rows each: regrouping is a view

    @classmethod
    def of(cls, image_index: torch.Tensor, n_images: int) -> ImageGroups | None:
        """The grouping of `image_index` over `n_images` images; None when no image has two
        rows (grouping would save nothing)."""
        device = image_index.device
        index = image_index.detach().long().cpu()  # one transfer; the bookkeeping is tiny
        rows = index.shape[0]
        if rows == 0 or n_images == 0:
            return None
        counts = torch.bincount(index, minlength=n_images)
        size = int(counts.max())
        if size < 2:
            return None
        order = torch.argsort(index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(index)
        slot[order] = torch.arange(rows) - starts[index[order]]
        place = index * size + slot
        first = torch.where(counts > 0, order[starts.clamp(max=rows - 1)], order[0])
        take = first.repeat_interleave(size)  # padding: the image's first row
        take[place] = torch.arange(rows)
        regular = rows == n_images * size and bool(torch.equal(place, torch.arange(rows)))
        return cls(n_images, size, take.to(device), place.to(device), regular)

    @property
    def rows(self) -> int:
        return self.place.shape[0]

    def rows_to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] pair rows -> [G, size * T, ...] query blocks."""
        if not self.regular:
            x = x.index_select(0, self.take.to(x.device))
        return x.reshape(self.n_images, self.size * x.shape[1], *x.shape[2:])

    def blocks_to_rows(self, y: torch.Tensor, tokens: int) -> torch.Tensor:
        """[G, size * T, ...] -> [B, T, ...] (padding rows dropped)."""
        y = y.reshape(self.n_images * self.size, tokens, *y.shape[2:])
        return y if self.regular else y.index_select(0, self.place.to(y.device))

    def probs_to_rows(self, p: torch.Tensor, tokens: int) -> torch.Tensor:
        """Attention probabilities [..., G, H, size * T, N] -> [..., B, H, T, N]; leading axes
        (a batch of gradients) are kept."""
        lead, (g, h, _, n) = p.shape[:-4], p.shape[-4:]
        p = p.reshape(*lead, g, h, self.size, tokens, n).transpose(-4, -3)
        p = p.reshape(*lead, g * self.size, h, tokens, n)
        return p if self.regular else p.index_select(len(lead), self.place.to(p.device))

    def rows_to_probs(self, p: torch.Tensor) -> torch.Tensor:
        """[B, H, T, N] per pair -> [G, H, size * T, N] (the inverse of `probs_to_rows`)."""
        if not self.regular:
            p = p.index_select(0, self.take.to(p.device))
        b, h, t, n = p.shape
        p = p.reshape(self.n_images, self.size, h, t, n).transpose(1, 2)
        return p.reshape(self.n_images, h, self.size * t, n)


def row_images(n_images: int, rows: int, device: torch.device) -> torch.Tensor:
    """The image of each text row: all rows read image 0 when there is one image, else row b
    reads image b."""
    if n_images == 1:
        return torch.zeros(rows, dtype=torch.long, device=device)
    if n_images != rows:
        raise ValueError(f"{n_images} images for {rows} texts: give one image, or one per text")
    return torch.arange(rows, device=device)


@dataclass
class _Layout:
    groups: ImageGroups
    tokens: int = 0
    inside: bool = False  # between the module's pre- and post-hook of the current call


class _Layouts(local):
    """Per thread: the modules grouped in it (by id) and their layouts (empty: false)."""

    def __init__(self) -> None:
        self.by_id: dict[int, _Layout] = {}

    def __len__(self) -> int:
        return len(self.by_id)


_ACTIVE = _Layouts()


def layout(module: nn.Module) -> tuple[ImageGroups, int] | None:
    """(groups, tokens per row) when `module` is running grouped right now (called from its own
    forward hooks), else None. A module that already returned per-pair outputs to the model is
    an error: the hook asking was registered after the grouping and would miss the gradients."""
    state = _ACTIVE.by_id.get(id(module))
    if state is None:
        return None
    if not state.inside:
        raise RuntimeError(
            f"{type(module).__name__}: its grouped outputs were already turned back into pair "
            "rows; record it with hooks registered before the grouping"
        )
    return state.groups, state.tokens


def _query(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], True
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], False
    raise ValueError("grouped cross-attention: the module got no hidden_states to group")


@contextmanager
def grouped(modules: Iterable[nn.Module], groups: ImageGroups | None) -> Iterator[bool]:
    """While open, each cross-attention module in `modules` reads its query rows as per-image
    blocks (the caller passes per-image encoder states `[G, N, C]`, not per pair, and no encoder
    attention mask) and returns per-pair outputs. Yields whether grouping is on (False, and
    nothing installed, when `groups` is None)."""
    if groups is None:
        yield False
        return
    handles: list[torch.utils.hooks.RemovableHandle] = []
    keys: list[int] = []
    active = _ACTIVE.by_id

    def before(module, args, kwargs):
        state = active[id(module)]
        x, positional = _query(args, kwargs)
        if x.shape[0] != groups.rows:
            raise ValueError(
                f"grouped cross-attention: {x.shape[0]} query rows for {groups.rows} pairs"
            )
        state.tokens, state.inside = x.shape[1], True
        blocks = groups.rows_to_blocks(x)
        if positional:
            return (blocks, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": blocks}

    def after(module, args, kwargs, output):
        state = active[id(module)]
        state.inside = False
        t = state.tokens
        items = output if isinstance(output, tuple) else (output,)
        out = [groups.blocks_to_rows(items[0], t)]
        for item in items[1:]:
            if isinstance(item, torch.Tensor) and item.dim() == 4:
                item = groups.probs_to_rows(item, t)
            out.append(item)
        return tuple(out) if isinstance(output, tuple) else out[0]

    modules = list(modules)
    with holding(modules):
        try:
            for module in modules:
                if id(module) in active:
                    raise RuntimeError(f"{type(module).__name__} is already grouped")
                active[id(module)] = _Layout(groups)
                keys.append(id(module))
                pre = this_thread(before)
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(module.register_forward_hook(this_thread(after), with_kwargs=True))
            yield True
        finally:
            for h in handles:
                h.remove()
            for k in keys:
                active.pop(k, None)
