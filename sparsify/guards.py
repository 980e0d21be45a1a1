"""What a captured graph specialised on that can still change: the plain attributes its forward read.

A captured graph bakes in every Python value the forward read: `if self.use_gelu:` becomes a graph
with or without the gelu, `self.config.output_hidden_states` a graph with or without those outputs.
Toggle the attribute after compiling and the graph silently computes the old model. So while the
model runs once eagerly, every plain value (bool, int, float, str, None, tuples of them) read from
a module's or a module-held object's own `__dict__` is recorded; `Guards.changed()` compares them
at every call and the compiled module captures again where one differs (sparsify/module.py).

Recording swaps each object's class for a subclass whose __getattribute__ logs the reads, for the
one forward only, then restores it; objects whose class cannot be swapped (slots, C types) are not
watched.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

_PLAIN = (bool, int, float, str, type(None))
_MISSING = object()


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(_plain(x) for x in v))


def _watchable(v) -> bool:
    """An object whose attributes a forward may branch on (a config), not a tensor or a module."""
    return (hasattr(v, "__dict__") and not isinstance(v, (torch.Tensor, torch.nn.Module, type))
            and not callable(v) and type(v).__module__ not in ("builtins", "torch"))


@contextlib.contextmanager
def recording(modules):
    """While inside, reads of plain attributes of `modules` (and of the objects they hold that a read
    returns, like a config) are recorded into the yielded dict {(id, name): (obj, name, value)}."""
    reads: dict = {}
    swapped: list = []

    def watch(obj) -> None:
        if any(o is obj for o, _ in swapped):
            return
        cls = type(obj)

        def getattribute(self, name, _cls=cls):
            value = _cls.__getattribute__(self, name)
            if not name.startswith("__"):
                own = object.__getattribute__(self, "__dict__")
                if name in own and own[name] is value:
                    if _plain(value):
                        reads.setdefault((id(self), name), (self, name, value))
                    elif _watchable(value):
                        watch(value)
            return value

        try:
            obj.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute,
                                                         "__module__": cls.__module__})
        except TypeError:
            return
        swapped.append((obj, cls))

    for m in modules:
        watch(m)
    try:
        yield reads
    finally:
        for obj, cls in reversed(swapped):
            obj.__class__ = cls


@dataclasses.dataclass
class Guards:
    """(object, attribute, value) triples a captured graph depends on."""

    watched: list

    def changed(self) -> list[tuple[object, str, object, object]]:
        """(object, name, value at capture, value now) for every watched attribute that differs."""
        out = []
        for obj, name, value in self.watched:
            now = obj.__dict__.get(name, _MISSING)
            if now is not value and now != value:
                out.append((obj, name, value, now))
        return out

    def describe(self, changes) -> str:
        return ", ".join(f"{type(o).__name__}.{n}: {v!r} -> {'(deleted)' if w is _MISSING else repr(w)}"
                         for o, n, v, w in changes)


def shallow_tree_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """A copy of the module tree (every module its own object and attribute tables) sharing every
    tensor and every non-module attribute: the copy can be put in eval mode, or have an attribute
    set, without touching the user's model and without copying weights. Returns (copy, {id of a
    copied module: the user's module})."""
    from .ir import shallow_module_copy

    originals: dict = {}
    memo: dict = {}

    def copy(m):
        if id(m) in memo:          # a module reachable twice stays one module
            return memo[id(m)]
        new = shallow_module_copy(m)
        memo[id(m)] = new
        originals[id(new)] = m
        for name, child in m._modules.items():
            if child is not None:
                new._modules[name] = copy(child)
        return new

    return copy(model), originals
