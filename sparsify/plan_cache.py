"""The plan cache: a compile that planned stores its final plan and prepared buffers on disk, and a
later compile of the same model with the same config and inputs applies them as a given plan.

An entry lives in `$SPARSIFY_CACHE_DIR/plans/` (default ~/.cache/sparsify/plans/), one file per key.
The key is a sha256 of everything the plan was decided on:

  the model: every parameter's and buffer's name, shape, dtype, device and a digest of the values
    (non-persistent buffers too), the captured graphs' code and tensor constants, and the forward
    code of its module classes (what runs eagerly where a part could not be captured);
  Config.to_dict() (a config holding a callable metric or output is not cached: a name is not an
    identity); the pipeline's passes and the registered families;
  the inputs: structure, shapes, dtypes and devices of the example and of every calibration batch,
    and a digest of their values (wanda masks and calibrated thresholds depend on them);
  every registered kernel's name and version; torch, sparsify and Python versions; the device (CPU:
    machine, model name, a digest of the /proc/cpuinfo flags that -march=native builds for, and
    torch's thread count, which timings depend on; CUDA: device name and capability); the
    environment variables that change what kernels run or how they are built.

A hit is applied like `compile(model, plan=..., prepared=...)`: no planning, timing, rollback or
end-to-end check; the model error is measured again and, should it exceed both the budget and the
error recorded in the entry, or should the plan not apply (a site it names is missing), the entry
is dropped and the model planned afresh. An entry that does not load (corrupt, another format,
older than CACHE_TTL_DAYS, incomplete) is ignored with a note, never an error. Nothing is stored
while the machine is visibly busy (as for the cost cache); storing an entry removes the least
recently used beyond MAX_ENTRIES / MAX_BYTES.

Off: `sparsify.compile(..., plan_cache=False)`, `SPARSIFY_PLAN_CACHE=0`, or `SPARSIFY_NO_COST_CACHE=1`
(fresh timings asked for: a cached plan would be made of old ones).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

FORMAT = "sparsify-plan-cache-1"
# when an entry is stored, the least recently used beyond these are removed (BERT-base at 90%: 64 MB)
MAX_ENTRIES, MAX_BYTES = 64, 4 << 30
_ENV = ("SPARSIFY_KERNELS", "TRITON_INTERPRET", "SPARSIFY_CFLAGS", "SPARSIFY_CC")
_OFF = ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("SPARSIFY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsify")
    return Path(root) / "plans"


def enabled(flag: bool = True) -> bool:
    """Whether the plan cache is on: the caller's flag, SPARSIFY_PLAN_CACHE, SPARSIFY_NO_COST_CACHE."""
    if not flag or os.environ.get("SPARSIFY_NO_COST_CACHE"):
        return False
    return os.environ.get("SPARSIFY_PLAN_CACHE", "1").strip().lower() not in _OFF


# ---- digests -----------------------------------------------------------------------------------
def _update(h, t: torch.Tensor) -> None:
    """Feed a tensor's bytes to a hash without copying them more than needed (a sha256 with the CPU's
    SHA extensions hashes BERT-base's 440 MB in about 0.25 s; .tobytes() would add a copy)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))


def _tensor_meta(t: torch.Tensor) -> list:
    return [list(t.shape), str(t.dtype).replace("torch.", ""), t.device.type]


def model_digest(model: torch.nn.Module) -> tuple[list, str]:
    """([name, shape, dtype, device] of every parameter and buffer, persistent or not; a sha256 of
    their values)."""
    h = hashlib.sha256()
    meta = []
    tensors = [("p:" + n, t) for n, t in model.named_parameters()] + \
              [("b:" + n, t) for n, t in model.named_buffers()]
    for name, t in sorted(tensors, key=lambda x: x[0]):
        meta.append([name, *_tensor_meta(t)])
        h.update(name.encode())
        _update(h, t)
    return meta, h.hexdigest()


def graph_digest(cap) -> list:
    """Per captured part: its prefix, capture method, a sha256 of its code and of the tensors the
    graph holds itself (constants torch.export lifted, not the model's parameters or buffers)."""
    out = []
    for part in cap.parts:
        gm = part.gm
        h = hashlib.sha256(gm.code.encode())
        known = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
        for n in gm.graph.nodes:
            if n.op != "get_attr":
                continue
            obj = gm
            try:
                for atom in str(n.target).split("."):
                    obj = getattr(obj, atom)
            except AttributeError:
                continue
            if isinstance(obj, torch.Tensor) and id(obj) not in known:
                h.update(str(n.target).encode())
                h.update(json.dumps(_tensor_meta(obj)).encode())
                _update(h, obj)
        out.append([part.prefix, part.method, h.hexdigest()])
    out.append(["failures", sorted(f.prefix for f in cap.failures)])
    return out


def _code(h, code) -> None:
    """A function's code, stable across processes (no addresses, no set order)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            _code(h, c)
        elif isinstance(c, frozenset):
            h.update(repr(sorted(map(repr, c))).encode())
        else:
            h.update(repr(c).encode())


def code_digest(model: torch.nn.Module) -> str:
    """A sha256 of the forward code of every module class in the model (what a part that could not
    be captured runs eagerly; a captured part's graph is hashed itself, see graph_digest)."""
    h = hashlib.sha256()
    seen = set()
    for m in model.modules():
        cls = type(m)
        if cls in seen:
            continue
        seen.add(cls)
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        fwd = getattr(cls.forward, "__code__", None)
        if fwd is not None:
            _code(h, fwd)
    return h.hexdigest()


def inputs_digest(example, batches) -> tuple[list, str]:
    """(structure of the example and of each calibration batch: pytree spec, tensor shapes / dtypes /
    devices, other leaves' repr; a sha256 of every tensor's values, in order)."""
    h = hashlib.sha256()
    structure = []
    for item in [example, *batches]:
        leaves, spec = pytree.tree_flatten(item)
        sig = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                sig.append(["T", *_tensor_meta(leaf)])
                _update(h, leaf)
            else:
                sig.append(["V", type(leaf).__name__, repr(leaf)])
            h.update(b"|")
        structure.append([str(spec), sig])
    return structure, h.hexdigest()


@functools.lru_cache(maxsize=None)
def _cpu() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and "model" not in info:
                    info["model"] = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and "flags" not in info:
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    info["flags"] = hashlib.sha256(flags.encode()).hexdigest()[:16]
    except OSError:
        pass
    return info


def _device(device: torch.device) -> dict:
    d = {"device": str(device), "threads": torch.get_num_threads(), "cpu": _cpu()}
    if device.type == "cuda":
        d["cuda"] = [torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device)),
                     torch.version.cuda]
    return d


def uncacheable(config) -> str | None:
    """Why a compile with this config is not cached (None when it can be)."""
    for field in ("metric", "output"):
        if callable(getattr(config, field)):
            return f"Config.{field} is a callable (its name does not identify it)"
    return None


def key_of(*, model, config, device, cap, pipeline_names, example, batches) -> tuple[str, dict]:
    """(the cache key, what it was made of) of a compile."""
    import sparsify

    from .codegen import registry
    from .family import families

    names, digest = model_digest(model)
    structure, values = inputs_digest(example, batches)
    parts = {
        "format": FORMAT,
        "versions": {"sparsify": sparsify.__version__, "torch": str(torch.__version__),
                     "python": platform.python_version()},
        "device": _device(device),
        "env": {k: os.environ.get(k) for k in _ENV},
        "kernels": sorted([name, spec.version] for name, spec in registry.specs().items()),
        "families": [[f.name, bool(f.supported)] for f in families()],
        "pipeline": list(pipeline_names),
        "config": config.to_dict(),
        "model": {"tensors": names, "digest": digest, "code": code_digest(model)},
        "graphs": graph_digest(cap),
        "inputs": {"structure": structure, "digest": values},
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), parts


# ---- entries -----------------------------------------------------------------------------------
def _path(key: str) -> Path:
    return cache_dir() / f"{key}.pt"


def _own(t: torch.Tensor) -> torch.Tensor:
    """The tensor alone: torch.save writes a view's whole storage."""
    t = t.detach()
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def store(key: str, plan, prepared: dict, seconds: float) -> str:
    """Write an entry (plan, the prepared data of every changed site); returns what happened, for
    the caller's note."""
    from .timing import machine_busy

    busy = machine_busy()
    if busy:
        return f"plan not stored in the plan cache: the machine is busy ({busy})"
    from .plan import CHANGED

    packed = {k: {"buffers": {n: _own(t) for n, t in p.buffers.items()}, "static": dict(p.static)}
              for k, p in prepared.items() if k in plan and plan.layers[k].status in CHANGED}
    plan_dict = plan.to_dict()
    plan_dict["notes"] = [n for n in plan_dict["notes"] if not n.startswith("plan cache")]
    entry = {"format": FORMAT, "key": key, "when": time.time(), "seconds": float(seconds),
             "plan": plan_dict, "prepared": packed}
    path = _path(key)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(entry, tmp)
        tmp.replace(path)
    except Exception as e:  # noqa: BLE001 - a read-only or full disk must not break compilation
        try:
            tmp.unlink()
        except OSError:
            pass
        return f"plan not stored in the plan cache: {type(e).__name__}: {str(e)[:120]}"
    _evict()
    return f"plan stored in the plan cache (key {key[:12]})"


def _evict() -> None:
    try:
        entries = sorted(((p.stat(), p) for p in cache_dir().glob("*.pt")), key=lambda e: -e[0].st_mtime)
        total = 0
        for i, (st, p) in enumerate(entries):     # newest (most recently used) first
            total += st.st_size
            if i and (i >= MAX_ENTRIES or total > MAX_BYTES):
                p.unlink()
    except OSError:
        pass


def drop(key: str) -> None:
    try:
        _path(key).unlink()
    except OSError:
        pass


def load(key: str):
    """(plan, prepared, note) of the entry under `key`, or (None, None, note) when there is none or
    it cannot be used (the note says why; None when there simply is no entry)."""
    from .plan import FORCED, SPARSE, Plan
    from .state import Prepared
    from .timing import CACHE_TTL_DAYS

    path = _path(key)
    if not path.exists():
        return None, None, None
    try:
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            raise ValueError(f"not a {FORMAT} entry for this key")
        age = time.time() - float(data["when"])
        if age > CACHE_TTL_DAYS * 86400:
            drop(key)
            return None, None, f"plan cache entry {key[:12]} is older than {CACHE_TTL_DAYS} days: planned again"
        plan = Plan.from_dict(data["plan"])
        prepared = {k: Prepared(dict(v["buffers"]), dict(v["static"])) for k, v in data["prepared"].items()}
        # what a family's rewrite reads for a sparse site (a pruned group's channels are in the plan)
        missing = [k for k, lp in plan.items() if lp.status in (SPARSE, FORCED) and k not in prepared]
        if missing:
            raise ValueError(f"no prepared data for {missing[:3]}")
    except Exception as e:  # noqa: BLE001 - a bad entry is ignored, never an error
        return None, None, (f"plan cache entry {key[:12]} ignored ({type(e).__name__}: {str(e)[:120]}): "
                            f"planned again")
    try:
        os.utime(path)      # used: the last to be evicted
    except OSError:
        pass
    when = datetime.datetime.fromtimestamp(float(data["when"])).strftime("%Y-%m-%d %H:%M")
    note = (f"plan from the plan cache (key {key[:12]}): planned {when} in {float(data.get('seconds', 0)):.1f} s, "
            f"verified then (error {plan.model_error if plan.model_error is not None else float('nan'):.3g}); "
            f"not re-planned, re-timed or rolled back now (plan_cache=False or SPARSIFY_PLAN_CACHE=0 plans afresh)")
    return plan, prepared, note
