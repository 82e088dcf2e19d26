"""The models the page offers: the built-ins and those named at start-up, each loaded once."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import groundcam as gc
from groundcam.errors import GroundcamWarning, InputError
from groundcam.explainer import Explainer


@dataclass(frozen=True)
class ModelInfo:
    """What the page shows for one model: its methods, targets and defaults, and its mode."""

    name: str
    family: str
    methods: list[str]
    targets: list[str]
    default_target: str
    captions: bool  # generates text (captioning / OCR): caption mode instead of phrases
    prompt: bool = False  # caption mode takes a prompt (generative VLMs, BLIP captioning)


class ModelCache:
    """Loads each offered model on first use and keeps it; a name not offered is refused (the page
    never loads a path or hub id typed into it). `run(name)` is a lock: one request at a time per
    model, as the recorder's hooks on a model serve one forward at a time."""

    def __init__(
        self,
        extra: Sequence[str] = (),
        device: str | None = None,
        builtins: bool = True,
    ) -> None:
        names = list(extra) + (list(gc.builtin_models()) if builtins else [])
        self.names: list[str] = list(dict.fromkeys(str(n) for n in names))
        if not self.names:
            raise InputError("no models to offer: name one with --model")
        self.device = device
        self._models: dict[str, Explainer] = {}
        self._warnings: dict[str, list[str]] = {}
        self._locks = {name: threading.Lock() for name in self.names}
        self._run_locks = {name: threading.Lock() for name in self.names}
        self.loads = 0  # how many times a model was loaded (each name at most once)

    def check(self, name: str | None) -> str:
        """`name` when the page offers it, else a one-line refusal."""
        if not name or name not in self._locks:
            raise InputError(f"model {name!r} is not offered here; choose one of {self.names}")
        return name

    def get(self, name: str | None) -> Explainer:
        """The loaded model `name` (loaded now on first use, once even under concurrent calls)."""
        name = self.check(name)
        with self._locks[name]:
            if name not in self._models:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    self._models[name] = gc.load(name, device=self.device)
                self._warnings[name] = [
                    " ".join(str(w.message).split())
                    for w in caught
                    if issubclass(w.category, GroundcamWarning)
                ]
                self.loads += 1
            return self._models[name]

    def load_warnings(self, name: str) -> list[str]:
        """What loading `name` warned about (e.g. a processor built from the config)."""
        return list(self._warnings.get(name, []))

    def loaded(self, name: str) -> bool:
        return name in self._models

    def run(self, name: str) -> threading.Lock:
        """The lock to hold while model `name` computes."""
        return self._run_locks[self.check(name)]

    def info(self, name: str) -> ModelInfo:
        """Methods, targets and mode of model `name` (loading it if needed)."""
        explainer = self.get(name)
        methods = gc.families().get(explainer.family, gc.methods())
        targets = list(explainer.targets)
        return ModelInfo(
            name=name,
            family=explainer.family,
            methods=list(methods),
            targets=targets,
            default_target=explainer.default_target,
            captions="token" in targets,
            prompt="token" in targets and explainer.adapter.takes_prompt,
        )
