"""The Recorder: forward hooks that keep the tensors an explanation needs, always removed on exit."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import nn

from groundcam import grouping
from groundcam.contract import HookPoint
from groundcam.threads import holding, this_thread

__all__ = ["HookPoint", "Recorder", "trainable"]

Unfold = Callable[[torch.Tensor], torch.Tensor]


class Recorder:
    """Context manager recording the outputs of hook points during one forward pass.

    With `leaf=True` (and gradients enabled) the first recorded tensor of the pass is replaced by
    a detached copy that requires grad, so that `autograd.grad` stops there: gradients then go
    only back to the recorded layer, and work even when the model's weights are frozen. A later
    recorded tensor that does not require grad (nothing before it does) becomes a leaf too; one
    that does keeps its graph, so gradients through later layers' attention stay exact. Side
    outputs (the attention weights a transformers module returns beside its output) are recorded
    as they are: they carry gradient when the model's graph does.

    With `cut=True` as well, the forward keeps no graph below the recorded layers: it runs
    without gradients until the first hook point's module is called, which switches them on; a
    hook point that records a side output gets its module's input (`hidden_states`) as a leaf when
    that input has no graph yet, so its attention weights carry gradient without any parameter
    requiring grad. Nothing upstream of a recorded tensor can change its gradient, so the
    gradients are those of the full graph.

    A module running grouped cross-attention (`groundcam.grouping`) returns its probabilities per
    image block; they are recorded in that layout (the tensor the model computed with), and
    `unfolds()` gives, per hook point, the function that presents such a tensor (or its
    gradients, with leading axes) per pair.

    Threads: while open, the Recorder holds the lock of the model its modules belong to
    (`groundcam.threads.model_lock`, registered by the Explainer), so recordings of one model by
    several threads run one after another; its hooks act only in the thread that opened it.
    """

    def __init__(self, points: list[HookPoint], leaf: bool = False, cut: bool = False):
        self.points = points
        self.leaf = leaf
        self.cut = cut and leaf
        self.records: dict[str, torch.Tensor] = {}
        self._unfold: dict[str, Unfold] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_before: bool | None = None
        self._held = ExitStack()

    def _enter_hook(self, point: HookPoint):
        def enter(module, args, kwargs):
            torch.set_grad_enabled(True)
            if point.index in (None, 0):
                return None  # the output itself becomes the leaf (see `record`)
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
                if x.is_floating_point() and not x.requires_grad:
                    return (x.detach().requires_grad_(True), *args[1:]), kwargs
                return None
            x = kwargs.get("hidden_states")
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
                return args, {**kwargs, "hidden_states": x.detach().requires_grad_(True)}
            return None

        return enter

    def _hook(self, point: HookPoint):
        def record(module, inputs, output):
            t = output if point.index is None else output[point.index]
            if t is None:
                raise RuntimeError(
                    f"{point.name}: the module returned no tensor to record "
                    "(attention weights need the eager attention implementation)"
                )
            grouped = grouping.layout(module)
            if grouped is not None and point.index not in (None, 0):
                groups, tokens = grouped
                self._unfold[point.name] = lambda x: groups.probs_to_rows(x, tokens)
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
        self._held.enter_context(holding(p.module for p in self.points))
        try:
            for p in self.points:
                if self.cut:
                    hook = this_thread(self._enter_hook(p))
                    self._handles.append(p.module.register_forward_pre_hook(hook, with_kwargs=True))
                self._handles.append(p.module.register_forward_hook(this_thread(self._hook(p))))
        except Exception:
            self.remove()
            raise
        if self.cut:
            self._grad_before = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._grad_before is not None:
            torch.set_grad_enabled(self._grad_before)
            self._grad_before = None
        self._held.close()

    def tensors(self) -> list[torch.Tensor]:
        """Recorded tensors in the order of the hook points; an error names any that never fired."""
        missing = [p.name for p in self.points if p.name not in self.records]
        if missing:
            raise RuntimeError(f"hook points never ran during the forward pass: {missing}")
        return [self.records[p.name] for p in self.points]

    def unfolds(self) -> list[Unfold | None]:
        """Per hook point: None, or the function presenting its grouped record per pair."""
        return [self._unfold.get(p.name) for p in self.points]


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
