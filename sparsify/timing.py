"""Timing on the ground floor: the timer the planner, the end-to-end check and the benchmarks share.

`measure_ms` / `compare_ms` time functions as a model calls them (back-to-back calls; on CPU the
minimum of interleaved single calls). `compare_rounds` compares candidates with a baseline in the
same rounds until the ratios are steady (or says which are too noisy to decide on). `CostModel`
memoises comparisons in memory and on disk (`SPARSIFY_CACHE_DIR`, default
~/.cache/sparsify/cost.json) under keys that start with the device name, the torch version and the
timing method, followed by what the caller passes (kernel name and version, pattern, shapes,
epilogue). Nothing is estimated: a time is measured or absent.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import torch

_LOCK = threading.Lock()
TIMING_METHOD = "rounds-3"  # part of every cache key: a change of timing method invalidates old entries


def cache_path() -> Path:
    root = os.environ.get("SPARSIFY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsify")
    return Path(root) / "cost.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    import platform

    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


@dataclasses.dataclass
class Timed:
    """One function's result in a comparison against the first (the baseline, e.g. dense).

    ms: its time (minimum over rounds). ratio: baseline / this, the median of the per-round ratios
    (the same round's baseline, so drift between rounds cancels). spread: (max - min) / median of
    those ratios over the last MIN_ROUNDS rounds. stable: the spread is within RATIO_TOLERANCE.
    cached: read from the cost cache, not measured now. error: why it could not be timed (then ms is None).
    """

    ms: float | None
    ratio: float | None = None
    spread: float = 0.0
    stable: bool = True
    cached: bool = False
    error: str = ""


MIN_ROUNDS, MAX_ROUNDS = 3, 8
RATIO_TOLERANCE = 0.15      # a ratio whose per-round spread stays above this is too noisy to decide on
# A round of compare_rounds takes at most about this long (fewer calls per function when one call is
# long, never under MIN_CALLS): a 60 ms dense layer (BERT-base at 2048 tokens) timed 5 times a round,
# with its warm-up calls, over three or more rounds and 72 layers made a compile take many minutes,
# for no steadier ratio than 2 calls of that length give.
ROUND_BUDGET_MS, MIN_CALLS = 400.0, 2
# With a threshold, a candidate at least this many times the threshold in each of two rounds is
# decided faster (the mirror of the 0.6 below which one is decided slower): every round it would
# still sit in costs a call of each function (two seconds of BERT-base at batch 16, dense).
DECIDED_FASTER = 1 / 0.6
CACHE_TTL_DAYS = 30         # an older cached timing is stale: measured again


def machine_busy() -> str | None:
    """Why this machine is visibly busy with other work (more runnable threads than cores), or None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    return f"load average {load:.2f} on {cores} cores" if load > cores + 0.5 else None


class CostModel:
    """Interleaved comparisons of a baseline and its candidates, memoised in memory and on disk
    (`SPARSIFY_CACHE_DIR`; `SPARSIFY_NO_COST_CACHE=1` keeps them in memory only).

    A disk entry records when and under what load it was measured; an entry older than
    CACHE_TTL_DAYS, or from another key (device, torch version, timing method, kernel version,
    pattern, shapes, epilogue: all in the key), is not used. Nothing measured while the machine was
    visibly busy, or whose ratio was too noisy to decide on, is written to disk.
    """

    def __init__(self, device: torch.device, repeats: int = 20, use_disk: bool = True):
        self.device = device
        self.repeats = repeats
        self.use_disk = use_disk and not os.environ.get("SPARSIFY_NO_COST_CACHE")
        self._mem: dict[str, dict] = {}
        if self.use_disk:
            try:
                disk = json.loads(cache_path().read_text())
            except (OSError, ValueError):
                disk = {}
            now = time.time()
            self._mem.update({k: v for k, v in disk.items() if isinstance(v, dict) and
                              now - v.get("when", 0) < CACHE_TTL_DAYS * 86400})

    def key(self, *parts) -> str:
        return "|".join([device_name(self.device), torch.__version__, TIMING_METHOD] + [str(p) for p in parts])

    def compare(self, entries: list[tuple[str, Callable[[], object]]], threshold: float | None = None) -> list[Timed]:
        """Time `entries` [(key, fn)], the first being the baseline, interleaved in the same rounds;
        every result's ratio is against the baseline (see compare_rounds for `threshold`). Served
        from the cache only when every key is."""
        keys = [k for k, _ in entries]
        pair = "||".join(keys[:1])
        hits = [self._mem.get(k) for k in keys]
        if all(h is not None and h.get("baseline", pair) == pair for h in hits):
            return [Timed(h["ms"], h.get("ratio"), h.get("spread", 0.0), True, cached=True) for h in hits]
        results = compare_rounds([fn for _, fn in entries], self.device, max(1, self.repeats // 4),
                                 threshold=threshold)
        busy = machine_busy()
        for k, r in zip(keys, results):
            if r.ms is None:
                continue
            entry = {"ms": r.ms, "ratio": r.ratio, "spread": r.spread, "baseline": pair, "when": time.time(),
                     "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
            self._mem[k] = entry
            if self.use_disk and r.stable and busy is None:
                self._save(k, entry)
        return results

    def time(self, key: str, fn: Callable[[], object]) -> float:
        """One function alone (no baseline): its time in ms."""
        return self.compare([(key, fn)])[0].ms

    def _save(self, key: str, entry: dict) -> None:
        path = cache_path()
        with _LOCK:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    data = {}
                data[key] = entry
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(path)
            except OSError:
                pass  # a read-only home must not break compilation; timings stay in memory


def compare_rounds(fns, device: torch.device, repeats: int = 5, min_rounds: int = MIN_ROUNDS,
                   max_rounds: int = MAX_ROUNDS, tolerance: float = RATIO_TOLERANCE,
                   threshold: float | None = None) -> list[Timed]:
    """fns[0] (the baseline) and the others, timed in rounds of `compare_ms` (interleaved call by call)
    until the ratio of every function to the baseline, round by round, varies by at most `tolerance`
    over the last `min_rounds` rounds, or `max_rounds` rounds have run (then the unsteady ones are
    marked not stable). With a decision `threshold` (the speedup a candidate needs), a candidate
    whose ratio is below 0.6 x threshold after a round is decided, slower, and leaves the rounds: no
    noise seen on a shared machine turns that around; one whose ratio was at least DECIDED_FASTER x
    threshold in each of two or more rounds is decided, faster, and leaves too (a 4x model does not
    need a third two-second round to be called faster than dense). A function that raises is not
    timed (its error is kept)."""
    errors, once_ms = {}, []
    for i, fn in enumerate(fns):
        try:
            with torch.no_grad():
                fn()        # the first call may build a kernel or fill a cache: not what a call costs
                t0 = time.perf_counter()
                fn()
                once_ms.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001 - the caller reports it per candidate
            errors[i] = f"{type(e).__name__}: {str(e)[:160]}"
    if once_ms and device.type == "cpu":
        repeats = max(min(repeats, MIN_CALLS), min(repeats, int(ROUND_BUDGET_MS / sum(once_ms))))
    # each fn ran twice above; a round's warm-up call guards the next calls against what ran in
    # between, and a call that alone spends the round's budget is its own warm-up
    warmup = 0 if once_ms and device.type == "cpu" and max(once_ms) >= ROUND_BUDGET_MS else 1
    if 0 in errors:
        raise RuntimeError(f"the baseline failed to run: {errors[0]}")
    ratios: dict[int, list[float]] = {i: [] for i in range(1, len(fns)) if i not in errors}
    best: dict[int, float] = {}
    live = [0, *ratios]
    for r in range(max_rounds):
        times = compare_ms([fns[i] for i in live], device, repeats, warmup=warmup)
        for i, ms in zip(live, times):
            best[i] = min(best.get(i, ms), ms)
            if i:
                ratios[i].append(times[0] / ms)
        if threshold is not None:
            live = [0] + [i for i in live[1:] if statistics.median(ratios[i]) >= 0.6 * threshold
                          and not (len(ratios[i]) >= 2 and min(ratios[i]) >= DECIDED_FASTER * threshold)]
        if r + 1 >= min_rounds and all(_spread(ratios[i][-min_rounds:]) <= tolerance for i in live[1:]):
            break
        if len(live) == 1:
            break
    out = []
    for i in range(len(fns)):
        if i in errors:
            out.append(Timed(None, error=errors[i], stable=False))
        elif i == 0:
            out.append(Timed(best[0], 1.0))
        else:
            spread = _spread(ratios[i][-min_rounds:]) if i in live else 0.0   # a dropped one is decided
            out.append(Timed(best[i], statistics.median(ratios[i]), spread, spread <= tolerance))
    return out


def _spread(values: list[float]) -> float:
    """(max - min) / median of a few ratios; 0 for fewer than two."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med > 0 else 0.0


def measure_ms(fn, device: torch.device, repeats: int = 20) -> float:
    """Time per call as a model sees it: calls back to back, host and device both counted.

    CUDA: events around a run of back-to-back calls (median of 5 runs). triton's do_bench is not used
    here on purpose: it flushes L2 with a GPU memset before every call, and that GPU work hides up to
    ~0.1 ms of host launch cost per call, which is exactly the overhead a sparse op pays inside a model.
    CPU: the minimum of `repeats` single calls (preemption on a shared machine only ever adds time).
    """
    return compare_ms([fn], device, repeats)[0]


def compare_ms(fns, device: torch.device, repeats: int = 20, warmup: int = 2) -> list[float]:
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
            for _ in range(warmup):
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

