"""Taps: identity modules a Recorder can watch, for tensors that are not a module's output
(a slice of rows, a reordering); the model goes on with what passed through the tap."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import nn

from groundcam.threads import this_thread


class Tap(nn.Module):
    """An identity a Recorder can watch: a view of a model tensor passes through it, and the model
    goes on with the tensor rebuilt from the tap's (possibly replaced) output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def route(
    stack: ExitStack,
    module: nn.Module,
    tap: Tap,
    take: Callable[[torch.Tensor], torch.Tensor],
    put: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    index: int | None = None,
) -> None:
    """While `stack` is open, `module`'s output `t` (item `index` of a tuple) becomes
    `put(t, tap(take(t)))`; nothing is installed when no hook watches `tap`."""
    if not tap._forward_hooks:
        return

    def hook(_module, _inputs, output):
        t = output if index is None else output[index]
        new = put(t, tap(take(t)))
        return new if index is None else (*output[:index], new, *output[index + 1 :])

    stack.callback(module.register_forward_hook(this_thread(hook)).remove)
