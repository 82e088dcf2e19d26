"""Reading a model's files without trusting them: no Python code from a model folder, no model
larger than the machine's memory, no "Loading weights" bars, and every file that cannot be read
refused in one line naming it."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from groundcam.errors import InputError

REMOTE_CODE_KEY = "auto_map"  # transformers' pointer to Python files shipped with a model
MAX_MODEL_ENV = "GROUNDCAM_MAX_MODEL_GB"
# The config files transformers reads from a model folder: each must be a JSON object.
TRANSFORMERS_CONFIGS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "video_preprocessor_config.json",
)
BYTES_PER_PARAMETER = 4  # models are loaded in float32

# Sizes in a transformers config (any nesting level) that must be whole numbers; layer counts may
# be 0, the others must be positive.
LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers", "decoder_layers")
WIDTH_KEYS = ("hidden_size", "d_model", "n_embd")
FFN_KEYS = ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner")
POSITIVE_KEYS = (
    *WIDTH_KEYS,
    *FFN_KEYS,
    "num_attention_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "vocab_size",
    "max_position_embeddings",
    "projection_dim",
    "num_channels",
    "image_size",
    "patch_size",
)


def read_json(path: Path, what: str = "a JSON object") -> dict:
    """The JSON object in `path`, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected {what}, got a JSON {type(data).__name__}")
    return data


def _has_key(data: Any, key: str) -> bool:
    """Whether `key` is a key of any object in `data`, however deeply nested."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if key in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_no_remote_code(directory: Path) -> None:
    """Refuse a model folder whose config files (config.json, tokenizer_config.json,
    preprocessor_config.json, processor_config.json, ...) carry `auto_map`: transformers would
    offer to run the folder's Python files, and groundcam never runs code from a model folder."""
    for path in sorted(directory.glob("*config*.json")):
        if not path.is_file():
            continue
        try:
            data = read_json(path)
        except InputError:
            if path.name in TRANSFORMERS_CONFIGS:
                raise
            continue  # a file of the user's own, which transformers does not read
        if _has_key(data, REMOTE_CODE_KEY):
            raise InputError(
                f"{path}: carries {REMOTE_CODE_KEY!r}, which asks to run Python code shipped "
                "with the model; groundcam never runs code from a model folder (use a model "
                "that transformers supports without custom code)"
            )


def check_safetensors(path: Path) -> None:
    """Refuse a `.safetensors` file whose header cannot be read or does not cover the file
    exactly (empty, truncated, an absurd header length, shapes larger than the data); only the
    header is read, nothing is allocated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # noqa: BLE001 - the reader's every refusal is this file's problem
        raise InputError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def check_tokenizer_file(path: Path) -> None:
    """Refuse a `tokenizer.json` the tokenizers library cannot build a tokenizer from (invalid
    JSON, the wrong structure, wrong types inside)."""
    read_json(path, "a tokenizer (a JSON object)")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the reader's every refusal is this file's problem
        raise InputError(f"{path}: not a tokenizer file ({one_line(e)})") from None


def check_directory(directory: Path) -> None:
    """Everything that can be checked before loading a saved model folder: no `auto_map`, config
    files that are JSON objects, a readable `tokenizer.json`, safetensors headers that fit
    their files."""
    check_no_remote_code(directory)
    if (directory / "tokenizer.json").is_file():
        check_tokenizer_file(directory / "tokenizer.json")
    for path in sorted(directory.glob("*.safetensors")):
        check_safetensors(path)


def check_transformers_config(cfg_file: Path) -> None:
    """Refuse a `config.json` transformers cannot build its config from (a field of the wrong
    type, heads that do not divide the width, ...) in one line naming the file."""
    from transformers import AutoConfig

    with quiet_loading():
        try:
            AutoConfig.from_pretrained(str(cfg_file.parent), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - the reader's every refusal is this file's problem
            raise InputError(
                f"{cfg_file}: not a config transformers can use ({one_line(e)})"
            ) from None


def _sizes(config: dict, where: Path) -> Iterator[dict]:
    """`config` and every config nested in it, their sizes checked to be whole numbers."""
    for key, value in config.items():
        if key in POSITIVE_KEYS or key in LAYER_KEYS:
            least = 0 if key in LAYER_KEYS else 1
            values = (
                value
                if key in ("image_size", "patch_size") and isinstance(value, list)
                else [value]
            )
            if value is not None and not all(_whole(v, least) for v in values):
                raise InputError(
                    f"{where}: {key} must be a whole number of at least {least}, got {value!r}"
                )
    yield config
    for value in config.values():
        if isinstance(value, dict):
            yield from _sizes(value, where)


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _first(config: dict, keys: tuple[str, ...]) -> int | None:
    return next((config[k] for k in keys if isinstance(config.get(k), int)), None)


def estimate_parameters(config: dict, where: Path) -> int:
    """About how many parameters a transformers `config` describes (every transformer tower
    in it: attention and MLP weights per layer, token, position and patch embeddings), from the
    numbers alone; sizes that are not whole numbers are refused naming `where`."""
    total = 0
    for part in _sizes(config, where):
        width = _first(part, WIDTH_KEYS)
        if width is None:
            continue
        layers = sum(part[k] for k in LAYER_KEYS if isinstance(part.get(k), int))
        ffn = _first(part, FFN_KEYS) or 4 * width
        rows = (part.get("vocab_size") or 0) + (part.get("max_position_embeddings") or 0)
        image, patch = part.get("image_size"), part.get("patch_size")
        if isinstance(image, int) and isinstance(patch, int) and patch:
            rows += (image // patch) ** 2 + (part.get("num_channels") or 3) * patch * patch
        total += layers * (4 * width * width + 2 * width * ffn) + rows * width
    return total


def max_model_bytes() -> int:
    """The largest model (float32 bytes) groundcam builds: GROUNDCAM_MAX_MODEL_GB when set,
    else this machine's physical memory."""
    named = os.environ.get(MAX_MODEL_ENV, "").strip()
    if named:
        try:
            gb = float(named)
        except ValueError:
            gb = math.nan
        if not math.isfinite(gb) or gb <= 0:
            raise InputError(f"{MAX_MODEL_ENV}={named!r}: expected a positive number of GB")
        return int(gb * 1e9)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): no limit known
        return 2**63


def check_model_size(parameters: int, where: Path | str) -> None:
    """Refuse, before anything is allocated, a model whose float32 weights alone would not fit
    in `max_model_bytes()`."""
    need, limit = parameters * BYTES_PER_PARAMETER, max_model_bytes()
    if need > limit:
        raise InputError(
            f"{where}: describes a model of about {parameters / 1e9:.3g} billion parameters "
            f"({need / 1e9:.3g} GB in float32), more than the {limit / 1e9:.3g} GB allowed "
            f"(this machine's memory, or {MAX_MODEL_ENV}); refused before allocating"
        )


class _Held(logging.Filter):
    """On transformers' log handlers while groundcam loads: the records of a thread that is
    loading are kept back for it (`keep`, `release`); every other record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[int, list[logging.LogRecord]] = {}
        self.handlers: list[logging.Handler] = []

    def filter(self, record: logging.LogRecord) -> bool:
        kept = self.kept.get(record.thread or 0)
        if kept is None:
            return True
        if not kept or kept[-1] is not record:  # each handler sees the record
            kept.append(record)
        return False

    def keep(self) -> list[logging.LogRecord]:
        return self.kept.setdefault(threading.get_ident(), [])

    def release(self) -> None:
        self.kept.pop(threading.get_ident(), None)


_quiet_lock = threading.Lock()
_quiet_depth = 0
_bars_before: tuple[bool, bool] = (True, True)
_held = _Held()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """While groundcam loads: transformers' progress bars ("Loading weights") off (the hub's
    download bars left as they are) and the log records of loading threads held back (`_held`,
    a filter on transformers' log handlers); afterwards all as the caller had them (nested and
    concurrent loads included)."""
    global _quiet_depth, _bars_before
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers")
    with _quiet_lock:
        if _quiet_depth == 0:
            _bars_before = (
                hf_logging.is_progress_bar_enabled(),
                not hub.are_progress_bars_disabled(),
            )
            hf_logging.disable_progress_bar()
            if _bars_before[1]:  # the hub's download bars stay: a long download is no hang
                hub.enable_progress_bars()
            _held.handlers = list(logger.handlers)
            for handler in _held.handlers:
                handler.addFilter(_held)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for handler in _held.handlers:
                    handler.removeFilter(_held)
                transformers_bars, hub_bars = _bars_before
                if transformers_bars:
                    hf_logging.enable_progress_bar()  # turns the hub's on too
                if hub_bars:
                    hub.enable_progress_bars()
                else:
                    hub.disable_progress_bars()


def pretrained(cls: Any, source: str | Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(source)` as groundcam always calls it: `trust_remote_code=False`
    (never code from the model, never a prompt), a local folder with `auto_map` refused first,
    no progress bars, and a failure one line naming the source (transformers' log of a failed
    load, such as its table of mismatched weights, summed up in that line instead)."""
    if Path(source).is_dir():
        check_no_remote_code(Path(source))
    with quiet_loading():
        outer = threading.get_ident() in _held.kept  # a load inside a load: the outer one reports
        records = _held.keep()
        try:
            loaded = cls.from_pretrained(str(source), trust_remote_code=False, **kwargs)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - a model's files that cannot be loaded: one line
            name = getattr(cls, "__name__", cls)
            why = _mismatch(records) or one_line(e)
            raise InputError(f"{source}: cannot load {name} from it ({why})") from None
        finally:
            if not outer:
                _held.release()
    if not outer:
        logger = logging.getLogger("transformers")
        for record in records:  # a load that worked logs as it always did
            logger.handle(record)
    return loaded


MISMATCH = re.compile(
    r"^\s*(\S+)\s*\|\s*MISMATCH\s*\|.*?ckpt:\s*torch\.Size\(\[([^\]]*)\]\)"
    r"\s*vs\s*model:\s*torch\.Size\(\[([^\]]*)\]\)",
    re.MULTILINE,
)


def _mismatch(records: list[logging.LogRecord]) -> str:
    """transformers' load report of weights whose shapes differ from the config's, in words."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(r.getMessage() for r in records))
    found = MISMATCH.findall(text)
    if not found:
        return ""
    key, file, config = found[0]
    more = f"; {len(found) - 1} more rows like it" if len(found) > 1 else ""
    return (
        f"the weights do not fit config.json: {key} is [{file}] in the weights file but "
        f"[{config}] by the config{more}"
    )


def one_line(e: BaseException) -> str:
    """An exception as one line of at most 300 characters, its type first (for torch's refusal
    of a pickle under weights_only=True, the refusal itself rather than its advice)."""
    text = str(e)
    refusal = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", text, re.MULTILINE)
    if refusal:
        text = f"it holds more than tensors, which weights_only=True refuses: {refusal.group(1)}"
    text = " ".join(text.split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
