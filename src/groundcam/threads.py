"""One model, many threads: a re-entrant lock per model, and hooks that act only in their thread.

Forward hooks live on the model, so a hook one thread installs also fires for another thread's
forward through the same modules. `model_lock` gives each model one lock (shared by all its
submodules) that the Explainer, the Recorder and grouped cross-attention hold while their hooks
are installed, so hooked passes through one model run one at a time while other models run
freely; `this_thread` makes a hook a no-op outside the thread that installed it, for forwards
that do not go through groundcam at all.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

__all__ = ["holding", "model_lock", "this_thread"]

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock serialising hooked passes through `model`, made on first use and
    registered for every submodule (a model holding an already registered module shares its
    lock), so that a Recorder on any part of the model takes the same lock."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            modules = list(model.modules())
            lock = next((_LOCKS[m] for m in modules if m in _LOCKS), None) or threading.RLock()
            for m in modules:
                _LOCKS.setdefault(m, lock)
        return lock


@contextmanager
def holding(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While open, this thread holds the locks of the models `modules` belong to (modules of no
    registered model take none), acquired in one fixed order so that no two holders deadlock."""
    with _GUARD:
        locks = {id(lock): lock for m in modules if (lock := _LOCKS.get(m)) is not None}
    with ExitStack() as stack:
        for key in sorted(locks):
            stack.enter_context(locks[key])
        yield


def this_thread(hook: Callable) -> Callable:
    """`hook`, acting only when called in the thread that wrapped it: elsewhere it returns None,
    which leaves a forward (pre-)hook's module call unchanged."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def run(*args, **kwargs):
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return run
