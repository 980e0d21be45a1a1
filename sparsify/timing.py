"""Timing on the ground floor: the timer the planner, the end-to-end check and the benchmarks share.

`measure_ms` / `compare_ms` time functions as a model calls them (back-to-back calls; on CPU the
minimum of interleaved single calls). `CostModel` memoises measured times in memory and on disk
(`SPARSIFY_CACHE_DIR`, default ~/.cache/sparsify/cost.json) under keys that start with the device
name, the torch version and the timing method, followed by what the caller passes (kernel name and
version, pattern, shapes). Nothing is estimated: a time is measured or absent.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

_LOCK = threading.Lock()
TIMING_METHOD = "b2b-1"  # part of every cache key: a change of timing method invalidates old entries


def cache_path() -> Path:
    root = os.environ.get("SPARSIFY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsify")
    return Path(root) / "cost.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    import platform

    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


class CostModel:
    """Measured times in milliseconds, memoised in memory and on disk (`SPARSIFY_CACHE_DIR`)."""

    def __init__(self, device: torch.device, repeats: int = 20, use_disk: bool = True):
        self.device = device
        self.repeats = repeats
        self.use_disk = use_disk and not os.environ.get("SPARSIFY_NO_COST_CACHE")
        self._mem: dict[str, float] = {}
        if self.use_disk:
            try:
                self._mem.update(json.loads(cache_path().read_text()))
            except (OSError, ValueError):
                pass

    def key(self, *parts) -> str:
        return "|".join([device_name(self.device), torch.__version__, TIMING_METHOD] + [str(p) for p in parts])

    def time(self, key: str, fn: Callable[[], object]) -> float:
        if key in self._mem:
            return self._mem[key]
        ms = self._measure(fn)
        self._mem[key] = ms
        if self.use_disk:
            self._save(key, ms)
        return ms

    def _measure(self, fn) -> float:
        return measure_ms(fn, self.device, self.repeats)

    def _save(self, key: str, ms: float) -> None:
        path = cache_path()
        with _LOCK:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    data = {}
                data[key] = ms
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(path)
            except OSError:
                pass  # a read-only home must not break compilation; timings stay in memory


def measure_ms(fn, device: torch.device, repeats: int = 20) -> float:
    """Time per call as a model sees it: calls back to back, host and device both counted.

    CUDA: events around a run of back-to-back calls (median of 5 runs). triton's do_bench is not used
    here on purpose: it flushes L2 with a GPU memset before every call, and that GPU work hides up to
    ~0.1 ms of host launch cost per call, which is exactly the overhead a sparse op pays inside a model.
    CPU: the minimum of `repeats` single calls (preemption on a shared machine only ever adds time).
    """
    return compare_ms([fn], device, repeats)[0]


def compare_ms(fns, device: torch.device, repeats: int = 20) -> list[float]:
    """`measure_ms` of several functions, measured interleaved (a, b, a, b, ...): a shared machine's
    drift (clock, other load) between two measurements would otherwise decide a close comparison."""
    with torch.no_grad():
        if device.type == "cuda":
            calls = []
            for fn in fns:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(device)
                once = time.perf_counter() - t0
                calls.append(max(5, min(200, int(0.01 / max(once, 1e-6)))))  # ~10 ms per run
            runs = [[] for _ in fns]
            for _ in range(5):
                for fn, n, out in zip(fns, calls, runs):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(n):
                        fn()
                    end.record()
                    end.synchronize()
                    out.append(start.elapsed_time(end) / n)
            return [sorted(r)[2] for r in runs]
        for fn in fns:
            for _ in range(2):
                fn()
        samples = [[] for _ in fns]
        for _ in range(repeats):
            for fn, out in zip(fns, samples):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        # Minimum, not median: on a shared CPU, preemption only ever adds time, and a noisy sample
        # cached on disk would decide layers for good.
        return [min(s) for s in samples]

