"""Capture: nn.Module + example inputs -> ATen-level fx GraphModules that run.

Order of attempts for the whole model: torch.export (non-strict), then fx.symbolic_trace. If both
fail, each child module is captured on the inputs it really receives (recorded with forward hooks),
recursively, and the uncapturable parts stay eager and dense; the report lists them with the reason.
Symbolic-traced graphs are normalised so nn.Linear / nn.Conv2d leaves appear as the same ATen ops
with get_attr weights that export produces: passes see one IR either way.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn

from . import ir


@dataclasses.dataclass
class CapturedPart:
    prefix: str                  # fqn of the captured module in the user's model ("" = whole model)
    gm: fx.GraphModule
    method: str                  # "export" or "symbolic_trace"
    example_args: tuple
    example_kwargs: dict


@dataclasses.dataclass
class CaptureFailure:
    prefix: str
    reason: str                  # shortened exception text


@dataclasses.dataclass
class Capture:
    root: nn.Module              # what to call: the single part's gm, or the model with parts swapped in
    parts: list[CapturedPart]
    failures: list[CaptureFailure]

    @property
    def whole(self) -> bool:
        return len(self.parts) == 1 and self.parts[0].prefix == ""


class CaptureError(RuntimeError):
    pass


def _short(e: BaseException, limit: int = 160) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    first = text[0] if text else type(e).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _export(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    ep = torch.export.export(module, args, kwargs, strict=False)
    gm = ep.module()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            n.meta[ir.FQN] = n.target.rsplit(".", 1)[0] if "." in n.target else ""
        else:
            n.meta[ir.FQN] = ir.node_fqn(n)
    return gm


def _symbolic_trace(module: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    if kwargs:
        raise CaptureError("symbolic_trace path takes positional inputs only")
    gm = fx.symbolic_trace(module)
    _lower_leaf_modules(gm)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*args)
    return gm


def _lower_leaf_modules(gm: fx.GraphModule) -> None:
    """call_module Linear/Conv2d -> aten.linear / aten.conv2d on get_attr params (export's form)."""
    aten = torch.ops.aten
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            n.meta[ir.FQN] = n.meta.get(ir.FQN, "")
            continue
        mod = gm.get_submodule(n.target)
        if type(mod) not in (nn.Linear, nn.Conv2d) or n.kwargs or len(n.args) != 1:
            n.meta[ir.FQN] = n.target
            continue
        if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            n.meta[ir.FQN] = n.target
            continue
        with gm.graph.inserting_before(n):
            w = gm.graph.get_attr(f"{n.target}.weight")
            b = gm.graph.get_attr(f"{n.target}.bias") if mod.bias is not None else None
            for a in (w, b):
                if a is not None:
                    a.meta[ir.FQN] = n.target
            if isinstance(mod, nn.Linear):
                new = gm.graph.call_function(aten.linear.default, (n.args[0], w, b))
            else:
                new = gm.graph.call_function(aten.conv2d.default, (n.args[0], w, b, list(mod.stride),
                                                                   list(mod.padding), list(mod.dilation),
                                                                   mod.groups))
        new.meta[ir.FQN] = n.target
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.recompile()


def _capture_one(module, args, kwargs, methods) -> tuple[fx.GraphModule, str] | tuple[None, str]:
    errors = []
    for method in methods:
        try:
            fn = _export if method == "export" else _symbolic_trace
            gm = fn(module, args, kwargs)
            return gm, method
        except Exception as e:  # any failure falls through to the next method; reasons are kept
            errors.append(f"{method}: {_short(e)}")
    return None, "; ".join(errors)


def _record_child_inputs(model: nn.Module, args, kwargs) -> dict[str, list]:
    calls: dict[str, list] = {}
    hooks = []
    for name, child in model.named_modules():
        if not name:
            continue

        def hook(mod, a, kw, _name=name):
            calls.setdefault(_name, []).append((a, dict(kw)))

        hooks.append(child.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _set_submodule(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None,
            methods=("export", "symbolic_trace")) -> Capture:
    """Capture `model` as called with (args, kwargs). Never raises for an uncapturable model: the
    parts that cannot be captured stay eager (Capture.failures says which and why)."""
    kwargs = dict(kwargs or {})
    gm, why = _capture_one(model, args, kwargs, methods)
    if gm is not None:
        return Capture(gm, [CapturedPart("", gm, why, args, kwargs)], [])
    failures = [CaptureFailure("", why)]
    calls = _record_child_inputs(model, args, kwargs)
    root = copy.copy(model)  # shallow: children are swapped on the copy's own _modules dict
    root._modules = dict(model._modules)
    parts: list[CapturedPart] = []
    _capture_children(root, "", calls, methods, parts, failures)
    return Capture(root, parts, failures)


def _capture_children(root, prefix, calls, methods, parts, failures):
    module = root.get_submodule(prefix) if prefix else root
    for name, child in list(module.named_children()):
        fqn = f"{prefix}.{name}" if prefix else name
        seen = calls.get(fqn, [])
        if not seen and not list(child.named_children()):
            failures.append(CaptureFailure(fqn, "not called in the example forward"))
            continue
        if not seen:   # a container (ModuleList, ModuleDict) is never called itself, but its children are
            reason = "not called itself (a container)"
        elif len(seen) > 1:
            reason = f"called {len(seen)} times per forward (shared module)"
        else:
            a, kw = seen[0]
            gm, how = _capture_one(child, a, kw, methods)
            if gm is not None:
                for n in gm.graph.nodes:  # fqns inside the part are local; passes add the prefix
                    n.meta.setdefault(ir.FQN, ir.node_fqn(n))
                parts.append(CapturedPart(fqn, gm, how, a, kw))
                _set_submodule(root, fqn, gm)
                continue
            reason = how
        if list(child.named_children()):
            # Copy the child shell so swapping its children leaves the user's model untouched.
            shell = copy.copy(child)
            shell._modules = dict(child._modules)
            _set_submodule(root, fqn, shell)
            failures.append(CaptureFailure(fqn, reason + " -> capturing its children"))
            _capture_children(root, fqn, calls, methods, parts, failures)
        else:
            failures.append(CaptureFailure(fqn, reason + " -> kept eager (dense)"))
