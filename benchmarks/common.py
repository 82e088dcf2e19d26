"""What the benchmarks share: timing, device names, autocast, and peak memory read from the process."""

from __future__ import annotations

import platform
import resource
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def autocast(device: torch.device, dtype: str):
    """bf16 autocast on the device, or nothing for fp32."""
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """Peak memory of the process while inside, above what it held on entry: on CUDA the
    allocator's peak (`max_memory_allocated`), on the CPU the resident set sampled from
    /proc/self/statm every millisecond; also the minor page faults taken meanwhile."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.page_faults = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _rss_bytes())
            self.peak_bytes = self._peak - self._base
        self.page_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults


class SavedTensors:
    """Bytes autograd saves for backward while inside (each storage counted once; the storages
    of `exclude`, e.g. a model's parameters, which a graph references but does not add)."""

    def __init__(self, exclude=()):
        self.bytes = 0
        self._seen: set[int] = {t.untyped_storage().data_ptr() for t in exclude}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = t.untyped_storage().data_ptr()
            size = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += size
        return t

    def __enter__(self) -> SavedTensors:
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1):
    """fn's last result and its wall times in seconds over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return out, times


def measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Best and all times of `fn` (wall and process CPU), then one more run for its peak
    memory and page faults."""
    return measure_rounds({"fn": fn}, device, repeats, warmup)["fn"]


def measure_rounds(fns: dict, device: torch.device, rounds: int, warmup: int = 1) -> dict:
    """`measure` for several recipes, interleaved: each round runs every recipe once, so a burst
    of load from other processes hits them alike; the best time of each is kept."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    out = {}
    for name, fn in fns.items():
        with PeakMemory(device) as mem:
            result = fn()
        out[name] = {
            "best_seconds": min(times[name]),
            "seconds": times[name],
            "best_cpu_seconds": min(cpu[name]),
            "cpu_seconds": cpu[name],
            "peak_bytes": mem.peak_bytes,
            "page_faults": mem.page_faults,
            "out": result,
        }
    return out


def cost(row: dict, clock: str) -> float:
    """A recipe's best time on `clock`: "cpu" (process CPU seconds: on a CPU shared with other
    work, what the recipe itself computed) or "wall"."""
    return row["best_cpu_seconds"] if clock == "cpu" else row["best_seconds"]


def environment(device: torch.device) -> dict:
    import transformers

    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
