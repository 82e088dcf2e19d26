"""`gc.load` and the catalogue functions: resolve a model into its family adapter."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from groundcam.adapters import (
    FAMILIES,
    Adapter,
    adapter_class,
    checkpoint_suffixes,
    family_of_class,
    family_of_config,
    family_of_file,
    supported_classes,
)
from groundcam.contract import ScoreKind
from groundcam.errors import GroundcamWarning, InputError
from groundcam.explainer import Explainer
from groundcam.methods import METHODS
from groundcam.model_files import (
    check_directory,
    check_model_size,
    check_transformers_config,
    estimate_parameters,
    quiet_loading,
    read_json,
)
from groundcam.zoo import BUILTIN, builtin_path

OWN_FORMATS = (
    "albef",
    "captioner",
    "scan",
)  # families saved in groundcam's formats, checked on load
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
HUB_PROBE_SECONDS = 3.0


# Loads run one at a time: transformers resolves its lazy imports on first use, and threads that
# first load at once can see a half-imported module ("cannot import name 'AutoConfig'").
_LOADING = threading.RLock()


def load(
    model: str | Path | nn.Module,
    processor=None,
    tokenizer=None,
    num_heads: int = 12,
    text_num_heads: int = 12,
    device: str | torch.device | None = None,
) -> Explainer:
    """A model ready to explain: a built-in name, a hub id, a local directory, an official ALBEF
    checkpoint file (`num_heads`/`text_num_heads` give its head counts), or a model instance
    (with its `processor`/`tokenizer`; an image processor that follows from the config is built
    when none is given)."""
    if not isinstance(model, nn.Module) and not (
        isinstance(model, str | Path) and str(model).strip()
    ):
        raise InputError(
            f"gc.load(model): expected a built-in name {sorted(BUILTIN)}, a hub id, a directory, "
            f"a checkpoint file or a model instance, got {model!r}"
        )
    with _LOADING:
        if isinstance(model, nn.Module):
            adapter = _from_instance(model, processor, tokenizer, type(model).__name__)
        else:
            adapter = _from_name(str(model), processor, tokenizer, num_heads, text_num_heads)
    adapter.model.eval()
    if device is not None:
        adapter.model.to(_device(device))
    return Explainer(adapter)


def _device(device: str | torch.device) -> torch.device:
    """A device that exists on this machine, or a one-line error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"device {device!r}: not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    problem = device_problem(dev)
    if problem:
        raise InputError(f"device {device!r} is not available on this machine: {problem}")
    return dev


def device_problem(device: torch.device) -> str | None:
    """Why `device` cannot be used on this machine, or None when it can."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA GPU visible"
            return f"CUDA is not available on this machine (torch {torch.__version__}: {build})"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"there are {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})"
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "MPS (Apple GPU) is not available on this machine"
        return None
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        return "unsupported device type; use cpu, cuda, cuda:N or mps"
    if not backend.is_available():
        return f"{device.type} is not available on this machine"
    return None


def _from_name(name: str, processor, tokenizer, num_heads: int, text_num_heads: int) -> Adapter:
    if name in BUILTIN:
        return _from_directory(builtin_path(name), processor, tokenizer, name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_directory(path, processor, tokenizer, name)
    family = family_of_file(path.suffix)
    if path.is_file():
        if family is None:
            raise InputError(
                f"{name}: a file, but not a checkpoint groundcam reads "
                f"({', '.join(checkpoint_suffixes())}); a saved model is a directory"
            )
        return adapter_class(family).from_pretrained(
            str(path),
            processor,
            tokenizer,
            name=name,
            num_heads=num_heads,
            text_num_heads=text_num_heads,
        )
    if family is not None or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise InputError(f"model {name!r}: no such file or directory")
    return _from_hub(name, processor, tokenizer)


def _from_instance(model: nn.Module, processor, tokenizer, name: str) -> Adapter:
    family = family_of_class(type(model).__name__)
    if family is None:
        raise InputError(
            f"unsupported model class {type(model).__name__}; supported classes: "
            f"{', '.join(supported_classes())}"
        )
    cls = adapter_class(family)
    if processor is None:
        processor = cls.default_image_processor(model)
        if processor is not None:
            warnings.warn(
                f"no processor given for {type(model).__name__}: built "
                f"{type(processor).__name__} from the model's config (image size "
                "and the family's normalisation); pass processor= to use the checkpoint's own",
                GroundcamWarning,
                stacklevel=3,
            )
    return cls(model, tokenizer=tokenizer, processor=processor, name=name)


def _from_directory(path: Path, processor, tokenizer, name: str) -> Adapter:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not a saved model directory")
    config = read_json(cfg_file, "a model config (a JSON object)")
    check_directory(path)
    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
    ):
        raise InputError(f"{cfg_file}: architectures must be a list of class names")
    family = family_of_config(config.get("model_type"), architectures)
    if family is None:
        raise InputError(
            f"{cfg_file}: model_type {config.get('model_type')!r} is not a supported family "
            f"(architectures: {config.get('architectures')}); "
            f"supported families: {sorted(FAMILIES)}"
        )
    if family not in OWN_FORMATS:
        check_model_size(estimate_parameters(config, cfg_file), cfg_file)
        check_transformers_config(cfg_file)
    return adapter_class(family).from_pretrained(str(path), processor, tokenizer, name=name)


def _unknown(model_id: str, why: str) -> InputError:
    return InputError(
        f"unknown model {model_id!r}: not a built-in model {sorted(BUILTIN)}, a local "
        f"directory, a checkpoint file ({', '.join(checkpoint_suffixes())}), or a hub id "
        f"that could be loaded ({why})"
    )


def _from_hub(model_id: str, processor, tokenizer) -> Adapter:
    """A hub id: its config names the family; the family's adapter loads the weights. Offline
    (HF_HUB_OFFLINE, or the hub unreachable) only the local cache is read, so a model that is not
    there fails at once instead of after the hub client's retries."""
    from transformers import AutoConfig

    if not HUB_ID.match(model_id):
        raise _unknown(model_id, "hub ids look like owner/name")
    with _offline_unless_reachable():
        _check_cached(model_id)
        try:
            with quiet_loading():
                config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if _hub_offline() and isinstance(e, OSError):
                first = "offline: the hub cannot be reached and it is not in the local cache"
            raise _unknown(model_id, first) from None
        family = family_of_config(config.model_type, getattr(config, "architectures", None))
        if family is None:
            raise InputError(
                f"{model_id}: model_type {config.model_type!r} is not a supported family; "
                f"supported families: {sorted(FAMILIES)}"
            )
        return adapter_class(family).from_pretrained(model_id, processor, tokenizer, name=model_id)


def _check_cached(model_id: str) -> None:
    """The checks of a saved folder (`check_directory`, the model's size) on the hub id's
    downloaded files."""
    from transformers.utils import cached_file

    try:
        cfg_file = Path(cached_file(model_id, "config.json"))
    except (OSError, ValueError):
        return  # nothing cached to check; the loaders pass trust_remote_code=False
    check_directory(cfg_file.parent)
    config = read_json(cfg_file, "a model config (a JSON object)")
    check_model_size(estimate_parameters(config, cfg_file), cfg_file)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _offline_unless_reachable():
    """Hub offline mode for the duration, when the hub's endpoint does not answer a TCP connect
    within a few seconds (the hub client would otherwise retry for tens of seconds)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _reachable(constants.ENDPOINT):
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _reachable(endpoint: str) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def methods() -> list[str]:
    """Names of the explanation methods."""
    return sorted(METHODS)


def families() -> dict[str, list[str]]:
    """Supported model families and the methods defined on each (the support matrix)."""
    from groundcam.explainer import supported_methods

    out = {}
    for family in FAMILIES:
        try:
            cls = adapter_class(family)
        except ImportError:  # an optional family whose module is unavailable
            continue
        out[family] = supported_methods(cls)
    return out


def score_kinds() -> dict[str, dict[str, ScoreKind]]:
    """Per family and target, what the reported score is (each family's own declaration)."""
    out = {}
    for family in FAMILIES:
        try:
            out[family] = dict(adapter_class(family).SCORES)
        except ImportError:  # an optional family whose module is unavailable
            continue
    return out


def builtin_models() -> dict[str, dict[str, str]]:
    """Built-in models: name -> family and description."""
    return {k: dict(v) for k, v in BUILTIN.items()}
