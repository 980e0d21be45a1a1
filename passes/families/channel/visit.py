"""What a per-op rule is given (`Visit`), the two ways it gives up, and what it reads off a node.

A rule (op_rules.py) answers one question for the walk (groups.py): op `u` was reached from slot
`(m, d)`, "dim d of m's value is the channel", where m is u itself (from its output) or one of its
inputs: which slots of u carry the same channels? It returns `(members, role)`: a member
`(node, dim)` has the index map of the slot it was reached from; ops that move the channel entries
(cat, views) give `(node, dim, imap)`. role tells the walk what u is to the group: producer /
consumer / depthwise / norm / view / attention / ... or None. A rule raises `_Reject(reason)`
where the channel cannot be followed (the reason becomes the group's), or `_Coarser` where it could
be followed with a coarser index map at the seed.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from sparsify import ir

from .index_map import IndexMap

Slot = tuple  # (fx.Node, int)


class _Reject(Exception):
    pass


class _Coarser(_Reject):
    """The channel can be followed only with a coarser index map at the seed. `requests`: the
    (factor, weights) pairs that would do: blocks `factor` times larger (a whole attention head per
    channel), and the seed's entries as parts of relative sizes `weights` ((1,): one part; (1, 1, 1):
    a packed q|k|v; (rep, 1, 1): a grouped-query one)."""

    def __init__(self, reason: str, requests):
        super().__init__(reason)
        self.requests = list(requests)


@dataclasses.dataclass(frozen=True)
class Visit:
    """Op `u` reached from slot (m, d) with index map `imap`, in a group of `channels` channels.

    maps: the index maps of the slots found so far (a split reached from one piece needs its
    input's). name: u's ATen op name, an in-place op under its functional name.
    """

    u: fx.Node
    m: fx.Node
    d: int
    imap: IndexMap
    channels: int | None
    maps: dict
    name: str

    @property
    def is_out(self) -> bool:
        return self.m is self.u

    @property
    def slot(self) -> Slot:
        return (self.m, self.d)

    def non_data(self) -> _Reject:
        return _Reject(f"channel dim flows into {_where(self.u)} as a non-data argument")

    def data_only(self, *data: Any) -> None:
        """Reject a slot reached through an input other than `data` (a size, an index, a mask)."""
        if not self.is_out and self.m not in data:
            raise self.non_data()


# ---- reading a node --------------------------------------------------------------------------
_PY_CALLABLES = {operator.add: "add", operator.sub: "sub", operator.mul: "mul",
                 operator.truediv: "div", torch.add: "add", torch.mul: "mul", torch.relu: "relu",
                 torch.sigmoid: "sigmoid", torch.tanh: "tanh", torch.flatten: "flatten",
                 torch.nn.functional.relu: "relu", torch.nn.functional.gelu: "gelu",
                 torch.nn.functional.silu: "silu"}


def op_name(node: fx.Node) -> str | None:
    """The ATen op name of a call_function node ('relu' for aten.relu.default), else None."""
    if node.op != "call_function":
        return None
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    if t is operator.getitem:
        return "getitem"
    return _PY_CALLABLES.get(t)


def shape_of(node: Any) -> tuple | None:
    """Static shape of a node's tensor value from meta (None when unknown or not a tensor)."""
    if not isinstance(node, fx.Node):
        return None
    shape, _ = ir.tensor_meta(node)
    if shape is None:
        return None
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _where(node: fx.Node) -> str:
    return f"{node.target if node.op == 'call_function' else node.op} at node {node.name}"


def _rank(node: fx.Node) -> int:
    s = shape_of(node)
    if s is None:
        raise _Reject(f"no shape metadata for node {node.name} ({_where(node)})")
    return len(s)
