"""Save a compiled model and load it back onto the same model without planning again.

A file holds the plan, the prepared buffers of every planned site, the config, the kernels' versions
and what identifies the model it was made for: its parameters' and buffers' names, shapes and dtypes,
and a digest of their values. `load` refuses a file made for another model (a different name, shape
or value) or with a kernel whose version has changed since (the packed layout may differ), and says
which.
"""
from __future__ import annotations

import hashlib

import torch

FORMAT = "sparsify-compiled-1"


def model_signature(model: torch.nn.Module) -> tuple[list, str]:
    """([(name, shape, dtype)] of the model's parameters and buffers, a sha256 of their values)."""
    h = hashlib.sha256()
    names = []
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        if not isinstance(t, torch.Tensor):
            continue
        names.append([name, list(t.shape), str(t.dtype).replace("torch.", "")])
        h.update(name.encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        if flat.numel():     # the bytes as they are (a .tobytes() copy of BERT-base's 440 MB cost 0.2 s)
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return names, h.hexdigest()


def _kernels(plan) -> dict[str, str]:
    from .codegen import registry

    known = registry.specs()
    return {lp.kernel: known[lp.kernel].version for lp in plan.layers.values() if lp.kernel in known}


def save(sm, path) -> None:
    sm._need_compiled()
    names, digest = model_signature(sm._user_model)
    prepared = {k: {"buffers": dict(p.buffers), "static": dict(p.static)} for k, p in sm.prepared.items()
                if k in sm.plan and sm.plan.layers[k].status in ("sparse", "forced", "pruned")}
    torch.save({"format": FORMAT, "torch": str(torch.__version__), "plan": sm.plan.to_dict(),
                "config": sm.config.to_dict(), "prepared": prepared, "kernels": _kernels(sm.plan),
                "model": {"tensors": names, "digest": digest}}, path)


def load(path, model: torch.nn.Module, example_inputs=None, calibration_data=None, config=None,
         verbose: bool = False, progress: bool = True):
    """The compiled model saved in `path` (SparseModule.save), rebuilt on `model`, which must be the
    model it was made for. config: needed only when the saved one held a callable (metric, output)."""
    from .codegen import registry
    from .config import Config
    from .module import SparseModule
    from .plan import Plan
    from .state import Prepared

    data = torch.load(path, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sparsify compiled-model file (format {FORMAT})")
    names, digest = model_signature(model)
    saved = data["model"]
    if names != saved["tensors"]:
        mine = {n[0]: n for n in names}
        theirs = {n[0]: n for n in saved["tensors"]}
        diff = sorted(set(mine) ^ set(theirs))[:4] or [k for k in mine if mine[k] != theirs.get(k)][:4]
        raise ValueError(f"{path} was made for another model: its parameters differ from this model's "
                         f"(first differences: {diff})")
    if digest != saved["digest"]:
        raise ValueError(f"{path} was made for a model with the same parameter names and shapes but other "
                         f"values (weights digest differs): compile this model instead")
    known = registry.specs()
    for name, version in data["kernels"].items():
        if name not in known:
            raise ValueError(f"{path} uses kernel {name!r}, which this sparsify does not have")
        if known[name].version != version:
            raise ValueError(f"{path} was packed for kernel {name} {version}; this sparsify has {known[name].version} "
                             f"(the packed layout may differ): compile the model again")
    cfg = config if config is not None else Config.from_dict(data["config"])
    prepared = {k: Prepared(v["buffers"], v["static"]) for k, v in data["prepared"].items()}
    return SparseModule(model, cfg, example_inputs, calibration_data, verbose=verbose,
                        plan=Plan.from_dict(data["plan"]), prepared=prepared, progress=progress)
