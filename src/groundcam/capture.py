"""The Recorder: forward hooks that keep the tensors an explanation needs, always removed on exit."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HookPoint:
    """A module whose output (or item `index` of its tuple output) is recorded under `name`.
    `per_image` marks tensors computed once per image (row i = image i) rather than per pair."""

    name: str
    module: nn.Module
    index: int | None = None
    per_image: bool = False


class Recorder:
    """Context manager recording the outputs of hook points during one forward pass.

    With `leaf=True` (and gradients enabled) the first recorded tensor of the pass is replaced by
    a detached copy that requires grad, so that `autograd.grad` stops there: gradients then go
    only back to the recorded layer, and work even when the model's weights are frozen. A later
    recorded tensor that does not require grad (nothing before it does) becomes a leaf too; one
    that does keeps its graph, so gradients through later layers' attention stay exact.
    """

    def __init__(self, points: list[HookPoint], leaf: bool = False):
        self.points = points
        self.leaf = leaf
        self.records: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, point: HookPoint):
        def record(module, inputs, output):
            t = output if point.index is None else output[point.index]
            if t is None:
                raise RuntimeError(
                    f"{point.name}: the module returned no tensor to record "
                    "(attention weights need the eager attention implementation)"
                )
            replaced = None
            first = not self.records
            if self.leaf and torch.is_grad_enabled() and (first or not t.requires_grad):
                t = replaced = t.detach().requires_grad_(True)
            self.records[point.name] = t
            if replaced is None:
                return None
            if point.index is None:
                return replaced
            return (*output[: point.index], replaced, *output[point.index + 1 :])

        return record

    def __enter__(self) -> Recorder:
        try:
            for p in self.points:
                self._handles.append(p.module.register_forward_hook(self._hook(p)))
        except Exception:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def tensors(self) -> list[torch.Tensor]:
        """Recorded tensors in the order of the hook points; an error names any that never fired."""
        missing = [p.name for p in self.points if p.name not in self.records]
        if missing:
            raise RuntimeError(f"hook points never ran during the forward pass: {missing}")
        return [self.records[p.name] for p in self.points]
