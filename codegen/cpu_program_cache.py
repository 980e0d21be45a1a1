"""Emitted programs (cpu_x86_emit.Program) on disk, keyed by what they were emitted from, so that a
warm compile of a model loads its layers' machine code instead of emitting it again (BERT-base:
1.4 s of emission out of a 5-6 s warm compile at batch 16; hashing and loading its 8.5M nonzeros'
programs takes ~0.2 s).

The key hashes the emitter's version, the layer's shape and segment count, and the bytes of crow,
col and values: any change to the weight, its pattern or the thread count is another entry. Files
live in `<SPARSIFY_CACHE_DIR or ~/.cache/sparsify>/cpu/programs/`, written atomically; past
SPARSIFY_PROGRAM_CACHE_MB (default 2048) the oldest go. SPARSIFY_PROGRAM_CACHE=0 (or
SPARSIFY_NO_COST_CACHE) turns it off. A file that does not read back whole is emitted again.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import cpu_build, cpu_x86_emit

DEFAULT_LIMIT_MB = 2048


def enabled() -> bool:
    return os.environ.get("SPARSIFY_PROGRAM_CACHE", "1") != "0" and not os.environ.get("SPARSIFY_NO_COST_CACHE")


def folder() -> Path:
    return cpu_build.cache_dir() / "programs"


def key(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int, k: int, segments: int) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{cpu_x86_emit.EMIT_VERSION}|{n}|{k}|{segments}|{values.dtype}|{crow.numel()}|{col.numel()}".encode())
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for t in (crow, col, values):
        h.update(memoryview(t.contiguous().view(as_int[t.element_size()]).numpy()))
    return h.hexdigest()


def load(name: str) -> cpu_x86_emit.Program | None:
    path = folder() / f"{name}.npy"
    try:
        with open(path, "rb") as f:
            n, k = (int(v) for v in np.load(f))
            segments = np.load(f)
            code = np.load(f)
            values = np.load(f)
    except (OSError, ValueError, EOFError):
        return None
    try:
        os.utime(path)          # recently used: the last to go
    except OSError:
        pass
    return cpu_x86_emit.Program(code.tobytes(), torch.from_numpy(values), segments, n, k)


def store(name: str, program: cpu_x86_emit.Program) -> None:
    try:
        d = folder()
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, suffix=".tmp", delete=False) as f:
            np.save(f, np.array([program.n, program.k], np.int64))
            np.save(f, np.ascontiguousarray(program.segments))
            np.save(f, np.frombuffer(program.code, np.uint8))
            np.save(f, program.values.numpy())
        Path(f.name).replace(d / f"{name}.npy")
        _prune(d)
    except OSError:
        pass            # a read-only or full cache folder must not break compilation


def _prune(d: Path) -> None:
    limit = float(os.environ.get("SPARSIFY_PROGRAM_CACHE_MB", DEFAULT_LIMIT_MB)) * 2 ** 20
    files = sorted(d.glob("*.npy"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    for p in files:
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)
