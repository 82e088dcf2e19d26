"""The Recorder: forward hooks that keep the tensors an explanation needs, always removed on exit."""

from __future__ import annotations

import torch
from torch import nn

from groundcam.contract import HookPoint

__all__ = ["HookPoint", "Recorder", "trainable"]


class Recorder:
    """Context manager recording the outputs of hook points during one forward pass.

    With `leaf=True` (and gradients enabled) the first recorded tensor of the pass is replaced by
    a detached copy that requires grad, so that `autograd.grad` stops there: gradients then go
    only back to the recorded layer, and work even when the model's weights are frozen. A later
    recorded tensor that does not require grad (nothing before it does) becomes a leaf too; one
    that does keeps its graph, so gradients through later layers' attention stay exact. Side
    outputs (the attention weights a transformers module returns beside its output) are recorded
    as they are: they carry gradient when the model's graph does (see `trainable`).
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
            # Only a module's main output (item 0) feeds the rest of the model; replacing a side
            # output such as the attention weights transformers returns would cut nothing.
            main = point.index in (None, 0)
            if self.leaf and main and torch.is_grad_enabled() and (first or not t.requires_grad):
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


class trainable:
    """Context manager: every parameter of `model` requires grad while inside, so that tensors
    recorded from a frozen model still have a graph; the previous flags come back on exit.
    (`autograd.grad` computes only the gradients it is asked for, never the parameters'.)"""

    def __init__(self, model: nn.Module):
        self.model = model
        self._frozen: list[nn.Parameter] = []

    def __enter__(self) -> trainable:
        self._frozen = [p for p in self.model.parameters() if not p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for p in self._frozen:
            p.requires_grad_(False)
        self._frozen = []
