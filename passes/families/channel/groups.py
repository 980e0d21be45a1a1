"""Channel groups: which channels of which tensors must be pruned together (a dependency graph).

Structured channel pruning removes channel c of a producer layer (row c of its weight, bias[c]).
That is only consistent if every tensor that carries channel c is sliced the same way: the norm
after it (weight, bias, running stats), a depthwise conv (its weight rows, bias and `groups`), the
residual add it meets (and so the producer of the other operand), any per-channel parameter it is
multiplied with, and finally the input columns of every consumer layer. This module finds those
sets, in the manner of Torch-Pruning's DepGraph but over our ATen-level fx graphs.

The unit is a *slot*: `(node, dim)`, "dimension `dim` of the value of `node` is this channel".
Every op relates the slots of its operands and its output through small equivalence classes
(`_rule` below): `relu` ties (x, d) to (relu, d); `conv2d` with groups=1 ties (x, 1) to
(weight, 1) (its in-space) and (weight, 0), (bias, 0), (out, 1) (its out-space); `add` ties the
channel dim of both operands and the output unless an operand broadcasts there. A group is the
connected component of slots reached from a producer's output slot, walking the networkx view of
the graph (`ir.to_networkx`) both ways: from a slot to the op that defines it and to every user.

A slot also carries an *index map* (`IndexMap`): a list of parts (offset, unit), group channel j
being the `unit` consecutive entries from `offset + j * unit` along `dim` in every part. Most ops pass
the map through unchanged; four change it. Concatenation along the channel dim shifts it (input i
of `cat([a, b], 1)` sits at offset `a.size(1)` of the output, so the consumer's input columns of
b's group start there; every cat input stays its own group). A view that merges the channel dim
with inner dims scales the unit ([B, C, H, W] -> [B, C*H*W] puts channel c at columns c*H*W ..
c*H*W+H*W-1 of a following Linear); one that splits it rescales it back. A split the map cannot
follow with one channel per entry, such as the attention head split [B, T, H*D] -> [B, T, H, D],
makes the walk retry from the same seed with a coarser unit (D: one group channel is one head),
which couples q, k and v by head through scaled_dot_product_attention or matmul / softmax / matmul
and the output projection's input features in blocks of D. A split (split, chunk, unbind) or a
slice along the channel dim hands each piece the channels inside it (a concat split apart at other
boundaries); where a producer's channels span all of its equal pieces, it is a packed projection
(GPT-2's q|k|v, a gate|up FFN), and the walk retries with the seed's entries as that many parts:
channel j is then entries j of each part, and each piece carries one part. The parts need not be
equal: a grouped-query q|k|v of sizes [4D, D, D] becomes parts of units 4u, u, u, so that once
coarsened to heads one channel is a k/v head with the 4 q heads it serves. A view into
[.., 3, H, D] (timm's qkv) does the same through the map (equal parts only).

Whatever the walk does not understand ends the walk there and marks the group not prunable, with
the reason (an op it does not know, a view that mixes the channel dim with the batch dim, a slice
or split that cuts through a layer's channels, pieces that share no common block of channels
(split [3, 7]), unbinding the channel dim, a grouped conv, the graph output, a graph input).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from sparsify import ir

aten = torch.ops.aten

Slot = tuple  # (fx.Node, int)


class IndexMap(NamedTuple):
    """Where a group's channels sit along a dim, as parts of (offset, unit): channel j is the `unit`
    entries from offset + j*unit in every part. One part is the common case; several parts are a
    packed projection (q|k|v or gate|up in one weight): one head is an entry range in each part.
    The parts of a grouped-query q|k|v have different units (a kv group is `rep` q heads but one
    k head and one v head)."""

    parts: tuple = ((0, 1),)

    @staticmethod
    def block(offset: int = 0, unit: int = 1) -> "IndexMap":
        return IndexMap(((offset, unit),))

    @staticmethod
    def repeated(offset: int, unit: int, reps: int, stride: int) -> "IndexMap":
        return IndexMap(tuple((offset + r * stride, unit) for r in range(reps)))

    @property
    def start(self) -> int:
        """The first entry of the group's channels."""
        return min(o for o, _ in self.parts)

    @property
    def single(self) -> bool:
        return len(self.parts) == 1

    def end(self, channels: int) -> int:
        """One past the last entry of the group's channels."""
        return max(o + channels * u for o, u in self.parts)

    def covers(self, channels: int, size: int) -> bool:
        """The group is the whole dim of `size` entries, in one part: it may be re-cut into parts."""
        return self.single and self.parts[0][0] == 0 and channels * self.parts[0][1] == size

    def shifted(self, by: int) -> "IndexMap":
        return IndexMap(tuple((o + by, u) for o, u in self.parts))

    def scaled(self, by: int) -> "IndexMap":
        """The map after every entry became `by` entries (the dims after it merged in)."""
        return IndexMap(tuple((o * by, u * by) for o, u in self.parts))

    def aligned(self, block: int) -> bool:
        """Every part starts and ends channels on multiples of `block` entries."""
        return all(o % block == 0 and u % block == 0 for o, u in self.parts)

    def divided(self, by: int) -> "IndexMap":
        return IndexMap(tuple((o // by, u // by) for o, u in self.parts))

    def equal_parts(self) -> tuple[int, int] | None:
        """(unit, stride) where the parts have one unit and are evenly spaced (stride 0 for one)."""
        units = {u for _, u in self.parts}
        offs = [o for o, _ in self.parts]
        gaps = {b - a for a, b in zip(offs, offs[1:])}
        if len(units) != 1 or len(gaps) > 1:
            return None
        return units.pop(), gaps.pop() if gaps else 0

    def entries(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices of the given channels' entries, channel-major (a channel's entries are adjacent)."""
        c = channels.long()[:, None]
        return torch.cat([o + c * u + torch.arange(u)[None, :] for o, u in self.parts], dim=1).flatten()

    def describe(self) -> str:
        if self.single:
            return f"offset {self.parts[0][0]}, unit {self.parts[0][1]}"
        return "parts " + ", ".join(f"(offset {o}, unit {u})" for o, u in self.parts)


_FULL = IndexMap()
_MAX_WALKS = 8   # walks per seed: the first, then retries with coarser units or packed parts
_stamps = itertools.count(1)   # orders group discoveries and prunes (prune_channels replays later prunes)


def next_stamp() -> int:
    return next(_stamps)

# ---- op tables (by ATen overload packet name; a few Python-level callables map onto them) ---------
_UNARY = {
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "neg", "abs", "exp", "log", "sqrt",
    "rsqrt", "erf", "sin", "cos", "square", "reciprocal", "clone", "contiguous", "detach", "alias",
    "dropout", "feature_dropout", "alpha_dropout", "_to_copy", "to", "clamp", "clamp_min",
    "clamp_max", "lift_fresh_copy", "pow", "identity",
}
_BINARY = {"add", "sub", "rsub", "mul", "div", "maximum", "minimum", "where", "true_divide",
           "floor_divide", "fmod", "remainder"}
_DIM_ARG_UNARY = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum"}  # dim at args[1]
_REDUCE = {"mean", "sum", "amax", "amin", "nansum"}
_POOL = {"max_pool2d": 2, "avg_pool2d": 2, "adaptive_avg_pool2d": 2, "adaptive_max_pool2d": 2,
         "_adaptive_avg_pool2d": 2, "max_pool2d_with_indices": 2, "max_pool1d": 1, "avg_pool1d": 1,
         "adaptive_avg_pool1d": 1, "upsample_nearest2d": 2, "upsample_bilinear2d": 2,
         "max_pool3d": 3, "avg_pool3d": 3, "adaptive_avg_pool3d": 3}
_VIEW = {"view", "reshape", "_unsafe_view"}
_SPLIT = {"split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "chunk", "unbind"}
_BATCH_NORM = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
               "native_batch_norm"}
_LAYER_NORM = {"layer_norm", "native_layer_norm"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
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


def _base_name(name: str | None) -> str | None:
    """In-place elementwise ops (add_, relu_, hardtanh_ in pre-dispatch graphs) couple channels
    exactly like their functional forms: the output is the mutated first operand, same shape."""
    if name and name.endswith("_") and not name.startswith("_") and name[:-1] in _UNARY | _BINARY:
        return name[:-1]
    return name


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


# ---- the group ------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ChannelGroup:
    """Channel slots that must be pruned together.

    slots: (node, dim) pairs in walk order; every one has `channels` entries along `dim`.
    producers: weight layers whose output channels (weight rows, bias) define the group.
    consumers: weight layers whose input channels (weight columns; rows of an addmm weight) follow.
    others: further op nodes that carry the channel and have parameters or arguments to adjust
      (norms, depthwise convs, views), by role.
    reasons: why the group may not be pruned (empty = prunable).
    unit: entries of the seed's output dim per group channel (head_dim for an attention head group),
      per part of relative size 1.
    weights: relative sizes of the parts the seed's dim is cut into ((1,): one part; (1, 1, 1): a
      packed q|k|v; (2, 1, 1): a grouped-query q|k|v with 2 q heads per k/v head).
    maps: node -> IndexMap of its slot (see the module docstring).
    stamp: when the group was found; prunes logged later shift its offsets (prune_channels).
    """

    channels: int
    unit: int = 1
    weights: tuple = (1,)
    maps: dict = dataclasses.field(default_factory=dict, repr=False)
    stamp: int = 0
    slots: list = dataclasses.field(default_factory=list)
    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    others: list = dataclasses.field(default_factory=list)   # (node, role)
    reasons: list = dataclasses.field(default_factory=list)
    names: dict = dataclasses.field(default_factory=dict, repr=False)  # node -> fqn, fixed at discovery

    def fqn_of(self, node: fx.Node) -> str:
        if node not in self.names:
            self.names[node] = layer_fqn(node) if node.op == "call_function" else ir.node_fqn(node)
        return self.names[node]

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.channels > 0

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None

    @property
    def seed(self) -> fx.Node | None:
        """The producer the walk started from (its output channels are the group's, unshifted)."""
        return self.slots[0][0] if self.slots else None

    def map_of(self, node: fx.Node) -> IndexMap:
        return self.maps.get(node, _FULL)

    def dim_of(self, node: fx.Node) -> int | None:
        for n, d in self.slots:
            if n is node:
                return d
        return None

    @property
    def producer_fqns(self) -> list[str]:
        return _unique(self.fqn_of(n) for n in self.producers)

    @property
    def consumer_fqns(self) -> list[str]:
        return _unique(self.fqn_of(n) for n in self.consumers)

    @property
    def layer_fqns(self) -> list[str]:
        """Weight layers (producers, consumers, depthwise convs) whose weights this group slices."""
        dw = [n for n, role in self.others if role == "depthwise"]
        return _unique(self.fqn_of(n) for n in [*self.producers, *dw, *self.consumers])

    @property
    def fqns(self) -> list[str]:
        """All member modules: weight layers plus norms and other ops with sliced parameters."""
        extra = [self.fqn_of(n) for n, role in self.others if role in ("norm", "param_op")]
        return _unique([*self.layer_fqns, *extra])

    @property
    def params(self) -> list[tuple[str, int]]:
        """(get_attr target, dim) of every parameter / buffer the group slices."""
        return _unique((n.target, d) for n, d in self.slots if n.op == "get_attr")

    @property
    def name(self) -> str:
        return ",".join(self.producer_fqns) or (self.slots[0][0].name if self.slots else "?")

    @property
    def extent(self) -> str:
        """What one channel is, for reports: "" (one entry), " of 16 entries" (a head), " of 16
        entries in each of 3 packed parts" (a head of a packed q|k|v), or " of 32+16+16 entries (3
        packed parts)" (2 q heads, a k head and a v head)."""
        if len(self.weights) == 1:
            return f" of {self.unit} entries" if self.unit > 1 else ""
        if len(set(self.weights)) == 1:
            return f" of {self.unit} entr{'y' if self.unit == 1 else 'ies'} in each of {len(self.weights)} packed parts"
        sizes = "+".join(str(self.unit * w) for w in self.weights)
        return f" of {sizes} entries ({len(self.weights)} packed parts)"

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"NOT prunable: {self.reason}"
        return (f"ChannelGroup({self.channels} channels{self.extent}; producers={self.producer_fqns}; "
                f"consumers={self.consumer_fqns}; params={[t for t, _ in self.params]}; {state})")

    __repr__ = describe


def _unique(items) -> list:
    out = []
    for i in items:
        if i not in out:
            out.append(i)
    return out


def layer_fqn(node: fx.Node) -> str:
    """fqn of a weight layer: LayerInfo.fqn when find_layers ran, else derived from its weight."""
    info = node.meta.get(ir.LAYER)
    if info is not None:
        return info.fqn
    spec = ir.WEIGHT_OPS.get(node.target)
    w = None
    if spec is not None and len(node.args) > spec[2]:
        w = node.args[spec[2]]
    elif op_name(node) in _CONV:
        w = _arg(node, 1, "weight")
    target = ir.get_attr_target(w)
    if target is not None:
        if w.meta.get(ir.FQN):   # the module that owns the weight (stable when the target is renamed)
            return w.meta[ir.FQN]
        return target[: -len(".weight")] if target.endswith(".weight") else target
    return ir.node_fqn(node)


# ---- per-op rules ---------------------------------------------------------------------------
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


def _where(node: fx.Node) -> str:
    return f"{node.target if node.op == 'call_function' else node.op} at node {node.name}"


def _tensor_args(node: fx.Node, positions) -> list[fx.Node]:
    return [a for i, a in enumerate(node.args) if i in positions and isinstance(a, fx.Node)]


def _rank(node: fx.Node) -> int:
    s = shape_of(node)
    if s is None:
        raise _Reject(f"no shape metadata for node {node.name} ({_where(node)})")
    return len(s)


def _conv_spec(u: fx.Node) -> dict:
    name = op_name(u)
    x, w = _arg(u, 0, "input"), _arg(u, 1, "weight")
    b = _arg(u, 2, "bias")
    if name in ("convolution", "_convolution"):
        if _arg(u, 6, "transposed", False):
            raise _Reject(f"transposed convolution ({_where(u)}) is not supported")
        groups, g_index = _arg(u, 8, "groups", 1), 8
    else:
        groups, g_index = _arg(u, 6, "groups", 1), 6
    ws = shape_of(w)
    if ws is None:
        raise _Reject(f"no shape metadata for the weight of {_where(u)}")
    spatial = len(ws) - 2
    xr, outr = _rank(x), _rank(u)
    return dict(x=x, w=w, b=b, groups=int(groups), g_index=g_index, ws=ws,
                cin=xr - spatial - 1, cout=outr - spatial - 1)


def _rule(u: fx.Node, slot: Slot, imap: IndexMap = _FULL, channels: int | None = None,
          maps: dict | None = None) -> tuple[list, str | None]:
    """The slots of op `u` tied to `slot` (a slot of u's output or of one of its inputs).

    `imap` is the index map of `slot`, `channels` the group's channel count, `maps` the index maps
    of the slots found so far (a split reached from one piece needs its input's). Returns (members,
    role): a member `(node, dim)` has the same index map as `slot`; ops that move the channel
    entries (cat, views) return `(node, dim, imap)`. Raises _Reject(reason) where the channel
    cannot be followed. role tells the walk what u is to the group: producer / consumer /
    depthwise / norm / view / attention / ...
    """
    m, d = slot
    is_out = m is u
    if u.op == "output":
        raise _Reject(f"channel dim reaches the graph output (via node {m.name})")
    if u.op == "placeholder":
        raise _Reject(f"channel slot reached from graph input placeholder {u.name}")
    if u.op == "get_attr":
        # every get_attr of the same attribute is the same tensor
        return [(n, d) for n in u.graph.nodes if n.op == "get_attr" and n.target == u.target], "param"
    if u.op != "call_function":
        raise _Reject(f"channel dim flows into {u.op} {u.target} at node {u.name}")
    name = _base_name(op_name(u))
    if name is None:
        raise _Reject(f"channel dim flows into {u.target} at node {u.name} (unknown op)")

    if name == "getitem":
        src, index = u.args[0], u.args[1]
        if is_out and _base_name(op_name(src)) in _SPLIT:
            members, _ = _split_rule(src, d, imap, channels, maps or {}, piece=int(index))
            return members, None   # the split's role is taken when the walk reaches its input
        if is_out:
            return [(src, d), (u, d)], None
        # u selects an element of a tuple-valued op whose main output carries the channel
        if not u.users:
            return [], None
        s = shape_of(u)
        if s is None or len(s) <= d:
            raise _Reject(f"channel dim flows into element {index} of {_where(src)}, which does not carry it")
        return [(src, d), (u, d)], None

    if name in _UNARY:
        x = u.args[0]
        if not is_out and m is not x:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if _rank(x) != _rank(u):
            raise _Reject(f"{_where(u)} changes the rank")
        return [(x, d), (u, d)], None

    if name in _DIM_ARG_UNARY:
        x = u.args[0]
        dim = _norm_dim(int(_arg(u, 1, "dim")), _rank(x))
        if m is not x and not is_out:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if dim == d:
            raise _Reject(f"{_where(u)} normalises over the channel dim")
        return [(x, d), (u, d)], None

    if name in _BINARY:
        positions = (0, 1, 2) if name == "where" else (0, 1)
        operands = _tensor_args(u, positions)
        if not is_out and m not in operands:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        R = _rank(u)
        dout = d if is_out else d + (R - _rank(m))
        members = [(u, dout)]
        out_shape = shape_of(u)
        for a in operands:
            sa = shape_of(a)
            if sa is None:
                raise _Reject(f"no shape metadata for node {a.name} ({_where(u)})")
            da = dout - (R - len(sa))
            if da >= 0 and sa[da] != 1:
                members.append((a, da))   # same channels: couples a's producer (residual)
            elif a is m:
                raise _Reject(f"{_where(u)} broadcasts the channel dim of {m.name}")
        if out_shape is not None and out_shape[dout] == 1:
            raise _Reject(f"{_where(u)}: channel dim has size 1 in the output")
        return members, ("param_op" if any(a.op == "get_attr" for a, _ in members) else None)

    if name in _BATCH_NORM:
        x = u.args[0]
        params = [a for a in u.args[1:5] if isinstance(a, fx.Node)]
        if m is not x and not is_out and m not in params:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if is_out or m is x:
            if d != 1:
                raise _Reject(f"channel dim {d} enters {_where(u)}, which normalises over dim 1")
            pd = 0
        else:
            pd = d
            if pd != 0:
                raise _Reject(f"{_where(u)}: parameter sliced along dim {pd}")
        return [(x, 1), (u, 1), *[(p, 0) for p in params]], "norm"

    if name in _LAYER_NORM:
        x, normalized_shape = u.args[0], list(u.args[1])
        params = [a for a in u.args[2:4] if isinstance(a, fx.Node)]
        r = _rank(x)
        if m is x or is_out:
            if d != r - 1 or len(normalized_shape) != 1:
                raise _Reject(f"channel dim {d} enters {_where(u)} normalised over "
                              f"{normalized_shape} (only a last-dim layer_norm over the channels is supported)")
        elif m in params:
            if d != 0 or len(normalized_shape) != 1:
                raise _Reject(f"{_where(u)}: multi-dim layer_norm parameters")
        else:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        return [(x, r - 1), (u, r - 1), *[(p, 0) for p in params]], "norm"

    if name in ("group_norm", "native_group_norm", "instance_norm"):
        raise _Reject(f"channel dim flows into {_where(u)} (group/instance norm is not supported)")

    if name in _CONV:
        c = _conv_spec(u)
        x, w, b, groups = c["x"], c["w"], c["b"], c["groups"]
        in_space = [(x, c["cin"]), (w, 1)]
        out_space = [(w, 0), (u, c["cout"])] + ([(b, 0)] if isinstance(b, fx.Node) else [])
        if groups == 1:
            if slot in in_space:
                return in_space, "consumer"
            if slot in out_space:
                return out_space, "producer"
        elif c["ws"][1] == 1 and c["ws"][0] == groups:
            # depthwise: each output channel reads exactly its own input channel
            dw = [(x, c["cin"]), *out_space]
            if slot in dw:
                return dw, "depthwise"
        else:
            raise _Reject(f"channel dim flows into grouped conv {_where(u)} (groups={groups}, "
                          f"weight {tuple(c['ws'])}): channels are coupled in groups")
        raise _Reject(f"channel dim {d} of {m.name} enters {_where(u)} at a non-channel position")

    if name in ("linear", "addmm", "mm"):
        if name == "linear":
            x, w, b = u.args[0], u.args[1], _arg(u, 2, "bias")
            in_space = [(x, _rank(x) - 1), (w, 1)]
            out_space = [(w, 0), (u, _rank(u) - 1)]
            if isinstance(b, fx.Node):
                out_space.append((b, 0))
        else:
            if name == "addmm":
                b, x, w = u.args[0], u.args[1], u.args[2]
            else:
                b, x, w = None, u.args[0], u.args[1]
            in_space = [(x, 1), (w, 0)]
            out_space = [(w, 1), (u, 1)]
            if isinstance(b, fx.Node):
                sb = shape_of(b)
                if sb is None:
                    raise _Reject(f"no shape metadata for the bias of {_where(u)}")
                if len(sb) >= 1 and sb[-1] != 1:
                    out_space.append((b, len(sb) - 1))
        if slot in in_space:
            return in_space, "consumer"
        if slot in out_space:
            return out_space, "producer"
        raise _Reject(f"channel dim {d} of {m.name} enters {_where(u)} at a non-channel position")

    if name == "embedding":
        w = u.args[0]
        members = [(w, 1), (u, _rank(u) - 1)]
        if slot not in members:
            raise _Reject(f"channel dim {d} of {m.name} enters {_where(u)} at a non-channel position")
        return members, "param_op"

    if name in _REDUCE:
        x = u.args[0]
        r = _rank(x)
        dims = _arg(u, 1, "dim", None)
        keepdim = bool(_arg(u, 2, "keepdim", False))
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise _Reject(f"{_where(u)} reduces over all dims, the channel dim included")
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(_norm_dim(int(x_), r) for x_ in dims)
        din = d if m is x else None
        if is_out:
            # map the output dim back to the input dim
            kept = [i for i in range(r) if keepdim or i not in dims]
            din = kept[d]
        if din is None:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if din in dims:
            raise _Reject(f"channel dim is reduced by {_where(u)}")
        dout = din if keepdim else din - sum(1 for x_ in dims if x_ < din)
        return [(x, din), (u, dout)], None

    if name in _POOL:
        x = u.args[0]
        r = _rank(x)
        if m is not x and not is_out:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if d >= r - _POOL[name]:
            raise _Reject(f"channel dim {d} is a pooled (spatial) dim of {_where(u)}")
        return [(x, d), (u, d)], None

    if name in ("constant_pad_nd", "pad"):
        x, pad = u.args[0], list(u.args[1])
        r = _rank(x)
        if m is not x and not is_out:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if d >= r - len(pad) // 2:
            raise _Reject(f"{_where(u)} pads the channel dim")
        return [(x, d), (u, d)], None

    if name == "unsqueeze":
        x = u.args[0]
        dim = _norm_dim(int(u.args[1]), _rank(u))
        if is_out:
            if d == dim:
                raise _Reject(f"{_where(u)}: inserted dim cannot be a channel dim")
            din = d - (1 if dim < d else 0)
        else:
            din = d
        return [(x, din), (u, din + (1 if dim <= din else 0))], None

    if name == "squeeze":
        x = u.args[0]
        s = shape_of(x)
        if s is None:
            raise _Reject(f"no shape metadata for node {x.name}")
        dims = _arg(u, 1, "dim", None)
        if dims is None:
            removed = [i for i, n in enumerate(s) if n == 1]
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            removed = [_norm_dim(int(i), len(s)) for i in dims]
            removed = [i for i in removed if s[i] == 1]
        kept = [i for i in range(len(s)) if i not in removed]
        din = kept[d] if is_out else d
        if din in removed:
            raise _Reject(f"{_where(u)} squeezes the channel dim")
        return [(x, din), (u, kept.index(din))], None

    if name in _VIEW or name == "flatten":
        return _reshape_rule(u, m, d, is_out, imap, channels)

    if name == "expand":
        return _expand_rule(u, m, d, is_out)

    if name in ("matmul", "bmm"):
        return _matmul_rule(u, m, d, is_out)

    if name == "scaled_dot_product_attention":
        return _sdpa_rule(u, m, d, is_out, imap)

    if name in ("permute", "transpose", "t"):
        x = u.args[0]
        r = _rank(x)
        if name == "permute":
            perm = [_norm_dim(int(i), r) for i in u.args[1]]
        else:
            a, b = ((0, 1) if name == "t" else (_norm_dim(int(u.args[1]), r), _norm_dim(int(u.args[2]), r)))
            perm = list(range(r))
            perm[a], perm[b] = perm[b], perm[a]
        if is_out:
            return [(x, perm[d]), (u, d)], None
        return [(x, d), (u, perm.index(d))], None

    if name == "slice":
        x = u.args[0]
        if m is not x and not is_out:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        dim, start, end, step = slice_bounds(u)
        if dim != d:
            return [(x, d), (u, d)], None
        if step != 1:
            raise _Reject(f"{_where(u)} slices the channel dim with step {step}")
        xmap = imap if not is_out else (maps or {}).get(x)
        if xmap is None:   # reached from the slice first: the group lies within it
            return [(x, d, imap.shifted(start))], None
        members = [(x, d, xmap)]
        try:
            inside = _inside(xmap, channels, start, end)
        except _Reject:
            weights = _packing(xmap, channels, _slice_pieces(x, d))
            if weights is not None:
                raise _packed(f"the slices of {x.name} ({_where(u)} and its siblings)", weights) from None
            raise _Reject(f"{_where(u)} slices {start}..{end - 1} out of channels {xmap.start}.."
                          f"{xmap.end(channels) - 1}, cutting through them") from None
        if inside is not None:
            members.append((u, d, inside))
        return members, "slice"   # prune_channels moves the bounds past the removed entries

    if name == "select":
        x = u.args[0]
        dim = _norm_dim(int(u.args[1]), _rank(x))
        if is_out:
            din = d + (1 if dim <= d else 0)
        else:
            din = d
            if dim == d:
                raise _Reject(f"{_where(u)} selects along the channel dim")
        return [(x, din), (u, din - (1 if dim < din else 0))], None

    if name == "cat":
        return _cat_rule(u, m, d, is_out, imap, channels)

    if name in _SPLIT:
        if m is not u.args[0]:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        return _split_rule(u, d, imap, channels, maps or {})

    if name == "_assert_tensor_metadata":
        if _arg(u, 1, "size") is not None or _arg(u, 2, "stride") is not None:
            raise _Reject(f"{_where(u)} asserts the size of a tensor that carries the channel")
        return [], None   # checks dtype / device / layout only

    if name == "sym_size":
        if int(u.args[1]) == d:
            raise _Reject(f"the channel count is read as a value by {_where(u)}")
        return [], None

    raise _Reject(f"channel dim flows into {u.target} at node {u.name}")


def _cat_rule(u, m, d, is_out, imap, channels):
    tensors = list(u.args[0])
    dim = _norm_dim(int(_arg(u, 1, "dim", 0)), _rank(u))
    if dim != d:   # along batch / spatial / tokens: every input carries the same channels (like add)
        return [(t, d) for t in tensors if isinstance(t, fx.Node)] + [(u, d)], None
    sizes = []
    for t in tensors:
        st = shape_of(t)
        if st is None or len(st) <= dim:
            raise _Reject(f"no shape metadata for input {getattr(t, 'name', t)} of {_where(u)}")
        sizes.append(st[dim])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if is_out:
        # the group's entries must come from one input: that input's group continues backwards
        lo, hi = imap.start, imap.end(channels or 0)
        for t, start, size in zip(tensors, starts, sizes):
            if start <= lo and hi <= start + size:
                return [(t, dim, imap.shifted(-start)), (u, dim, imap)], None
        raise _Reject(f"channels {lo}..{hi - 1} of {_where(u)} span several of its inputs "
                      f"(a layer's channels would be split across groups)")
    hits = [i for i, t in enumerate(tensors) if t is m]
    if len(hits) != 1:
        raise _Reject(f"{m.name} is concatenated {len(hits)} times by {_where(u)}")
    return [(m, dim, imap), (u, dim, imap.shifted(starts[hits[0]]))], None


def split_pieces(s: fx.Node) -> tuple[int, list[int]]:
    """(dim, piece sizes) of a split / split_with_sizes / chunk / unbind node."""
    name = _base_name(op_name(s))
    sx = shape_of(s.args[0])
    if sx is None:
        raise _Reject(f"no shape metadata for the input of {_where(s)}")
    dim = _norm_dim(int(_arg(s, 2 if name != "unbind" else 1, "dim", 0)), len(sx))
    size = sx[dim]
    if name == "unbind":
        return dim, [1] * size
    arg = s.args[1]
    if name == "chunk":
        step = -(-size // int(arg)) if size else 1
        return dim, [min(step, size - i) for i in range(0, size, step)]
    if isinstance(arg, (list, tuple)):
        if not all(isinstance(z, int) for z in arg):
            raise _Reject(f"{_where(s)}: symbolic piece sizes")
        return dim, list(arg)
    if not isinstance(arg, int) or arg <= 0:
        raise _Reject(f"{_where(s)}: symbolic piece size")
    return dim, [min(arg, size - i) for i in range(0, size, arg)]


def slice_bounds(u: fx.Node) -> tuple[int, int, int, int]:
    """(dim, start, end, step) of an aten.slice node, clamped to its input's size like Python."""
    sx = shape_of(u.args[0])
    if sx is None:
        raise _Reject(f"no shape metadata for the input of {_where(u)}")
    dim = _norm_dim(int(_arg(u, 1, "dim", 0)), len(sx))
    start, end, step = _arg(u, 2, "start", None), _arg(u, 3, "end", None), _arg(u, 4, "step", 1)
    if not all(isinstance(v, int) or v is None for v in (start, end, step)):
        raise _Reject(f"{_where(u)}: symbolic slice bounds")
    start, end, _ = slice(start, end, step).indices(sx[dim])
    return dim, start, max(start, end), step


def _inside(xmap: IndexMap, channels: int, a: int, b: int) -> IndexMap | None:
    """The map, within the piece [a, b) of a dim, of the group `xmap` describes on the whole dim:
    None where no entry of the group lies in the piece. Raises _Reject where a part of the group
    lies partly in it (the caller may know a coarser map that would not)."""
    inside = [(o, u) for o, u in xmap.parts if a <= o and o + channels * u <= b]
    if any(o < b and o + channels * u > a for o, u in xmap.parts if (o, u) not in inside):
        raise _Reject(f"entries {xmap.start}..{xmap.end(channels) - 1} lie partly in {a}..{b - 1}")
    if not inside:
        return None
    return IndexMap(tuple(inside)).shifted(-a)


def _slice_pieces(x: fx.Node, d: int) -> list[int]:
    """The pieces that the step-1 slices of `x` along dim `d` cut it into, as sizes: every slice
    bound is a cut (Phi-3's qkv[..., :q], qkv[..., q:q+kv], qkv[..., q+kv:] give [q, kv, kv]).
    Empty where some piece is read by no slice (that is a layer's channels cut through, not a
    packed projection taken apart)."""
    size = shape_of(x)[d]
    bounds = []
    for user in x.users:
        if _base_name(op_name(user)) == "slice" and user.args[0] is x:
            dim, start, end, step = slice_bounds(user)
            if dim == d and step == 1 and end > start:
                bounds.append((start, end))
    cuts = sorted({0, size, *(c for b in bounds for c in b)})
    pieces = list(zip(cuts, cuts[1:]))
    if not all(any(s <= a and b <= e for s, e in bounds) for a, b in pieces):
        return []
    return [b - a for a, b in pieces]


def _packing(xmap: IndexMap, channels: int, sizes: list[int]) -> tuple[int, ...] | None:
    """Where a group that is its whole dim is cut into pieces of `sizes` (a packed q|k|v, gate|up),
    the relative part sizes to walk again with: channel j is then entries j of each part, one part
    per piece (a grouped-query q|k|v gives (rep, 1, 1)). None where the pieces cannot share the
    channels out evenly."""
    if len(sizes) < 2 or 0 in sizes or not xmap.covers(channels, sum(sizes)):
        return None
    g = math.gcd(*sizes)
    if g % xmap.parts[0][1] or g // xmap.parts[0][1] < 2:   # one channel in all: nothing to choose
        return None
    return tuple(z // g for z in sizes)


def _packed(where: str, weights: tuple[int, ...]) -> _Coarser:
    shape = (f"{len(weights)} equal parts" if len(set(weights)) == 1
             else f"{len(weights)} parts of relative sizes {list(weights)}")
    return _Coarser(f"{where} cuts the channels into {shape} (a packed projection; followed as parts)",
                    [(1, weights)])


def _split_rule(s, d, imap, channels, maps, piece=None):
    """split / chunk / unbind, reached from its input (piece None; d is the input's dim) or back
    from the getitem of piece `piece` (d is the piece's dim). A split along the channel dim hands
    each piece the channels inside it; a packed projection's parts go one to a piece.
    Role "split": prune_channels rewrites the piece sizes."""
    x = s.args[0]
    unbind = _base_name(op_name(s)) == "unbind"
    dim, sizes = split_pieces(s)
    pieces = [(int(g.args[1]), g) for g in s.users if op_name(g) == "getitem"]
    dx = d + (1 if unbind and piece is not None and dim <= d else 0)
    if dx != dim:   # along another dim: every piece carries the channels at the same place
        dp = dx - (1 if unbind and dim < dx else 0)
        return [(x, dx)] + [(g, dp) for _, g in pieces], "split"
    if unbind:
        raise _Reject(f"{_where(s)} unbinds the channel dim")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    xmap = imap if piece is None else maps.get(x)
    if xmap is None:   # reached from one piece first: the group lies within that piece
        return [(x, dx, imap.shifted(starts[piece]))], None
    members = [(x, dx, xmap)]
    try:
        for i, g in pieces:
            inside = _inside(xmap, channels, starts[i], starts[i] + sizes[i])
            if inside is not None:
                members.append((g, dx, inside))
        return members, "split"
    except _Reject:
        pass
    weights = _packing(xmap, channels, sizes)
    if weights is not None:
        raise _packed(_where(s), weights)
    raise _Reject(f"channels {xmap.start}..{xmap.end(channels) - 1} of {x.name} span several of the "
                  f"pieces {sizes} {_where(s)} splits them into")


def _reshape_rule(u, m, d, is_out, imap, channels):
    x = u.args[0]
    if m is not x and not is_out:
        raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
    sin, sout = shape_of(x), shape_of(u)
    if sin is None or sout is None:
        raise _Reject(f"no shape metadata at {_where(u)}")
    src, dst = (sout, sin) if is_out else (sin, sout)
    what = f"channel dim flows into {_where(u)}, which merges or splits it {tuple(sin)} -> {tuple(sout)}"
    try:
        j, jmap = _follow_reshape(src, dst, d, imap, channels)
    except _Coarser as e:
        ways = ", ".join(f"blocks of {f}" if len(w) == 1 else f"{len(w)} parts" + (f" in blocks of {f}" if f > 1 else "")
                         for f, w in e.requests)
        raise _Coarser(f"{what} (it can be followed as {ways})", e.requests) from None
    except _Reject:
        raise _Reject(what) from None
    (din, map_in), (dout, map_out) = ((j, jmap), (d, imap)) if is_out else ((d, imap), (j, jmap))
    if op_name(u) != "flatten":
        entry = list(u.args[1])[dout]
        if not isinstance(entry, int):
            raise _Reject(f"{_where(u)}: symbolic size at the channel dim")
    return [(x, din, map_in), (u, dout, map_out)], "view"


def _segments(sin, sout) -> list[tuple[range, range]] | None:
    """Aligned runs of dims with equal products: (B, T, 768) vs (B, T, 12, 64) gives B|B, T|T and
    768|12,64. Size-1 dims join a neighbouring run. None where the shapes do not align."""
    if 0 in sin or 0 in sout:
        return None
    segs, i, j = [], 0, 0
    while i < len(sin) and j < len(sout):
        i0, j0 = i, j
        pi, pj = sin[i], sout[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(sin):
                pi, i = pi * sin[i], i + 1
            elif pj < pi and j < len(sout):
                pj, j = pj * sout[j], j + 1
            else:
                return None
        segs.append((range(i0, i), range(j0, j)))
    if _prod(sin[i:]) != 1 or _prod(sout[j:]) != 1:
        return None
    if not segs:
        return [(range(len(sin)), range(len(sout)))]
    last_in, last_out = segs[-1]
    segs[-1] = (range(last_in.start, len(sin)), range(last_out.start, len(sout)))
    return segs


def _follow_reshape(sin, sout, din, imap, channels) -> tuple[int, IndexMap]:
    """(dim, index map) in `sout` of the entries `imap` describes along dim `din` of `sin`.

    Within the aligned run of dims that holds din, the group's entries are, in row-major order, the
    blocks [offset + j*unit, + unit) * inner of dim din in each part (offset, unit) of the map,
    repeated once per index of the dims before din (period sin[din] * inner). An output dim
    carries them
      - with the same map (scaled by inner) when it, with the dims after it, spans one period and
        the dims after it span whole blocks;
      - as one part when the map has equal, evenly spaced parts (a packed q|k|v) and it spans
        exactly one part: the parts move to the dims before it (view [B, T, 3E] -> [B, T, 3, H, D]);
      - as parts when it spans several periods: the dims before din that it takes in become the
        parts (the reverse view). Never the batch dim 0: that would tie channels to the batch size.
    Raises _Coarser with the maps that would get through (larger blocks: a split into heads; the
    whole channel dim as 2-4 parts: a packed projection), else _Reject.
    """
    segs = _segments(sin, sout)
    if segs is None:
        raise _Reject("shapes do not align")
    run_in, run_out = next(seg for seg in segs if din in seg[0])
    inner_in = _prod(sin[din + 1: run_in.stop])
    scaled, period = imap.scaled(inner_in), sin[din] * inner_in
    equal = scaled.equal_parts()   # (width, distance) of evenly spaced parts of one width
    no_batch = _prod(sin[max(run_in.start, 1): run_in.stop])   # the run without a leading dim 0
    whole = imap.covers(channels, sin[din])
    requests = []
    for j in run_out:
        inner = _prod(sout[j + 1: run_out.stop])
        span = sout[j] * inner
        if sout[j] == 1:
            continue
        aligned = scaled.aligned(inner)
        width = scaled.parts[0][1]
        f = math.lcm(width, inner) // width
        if span == period:
            if aligned:
                return j, scaled.divided(inner)
            if imap.single and scaled.start == 0 and channels % f == 0:
                requests.append((f, (1,)))
        elif not imap.single and equal is not None and span == equal[1] \
                and len(scaled.parts) * equal[1] == period:
            if aligned and scaled.start + channels * width <= equal[1]:
                return j, IndexMap.block(scaled.start // inner, width // inner)
        elif imap.single and span > period and span % period == 0 and span <= no_batch:
            if aligned:
                return j, IndexMap.repeated(scaled.start // inner, width // inner, span // period,
                                            period // inner)
        elif whole and span < period and period % span == 0 and 2 <= period // span <= 4:
            parts = period // span
            g = f if width % inner else 1
            if channels % (g * parts) == 0:
                requests.append((g, (1,) * parts))
    if requests:
        raise _Coarser("needs a coarser map", requests)
    raise _Reject("not followed")


def _expand_rule(u, m, d, is_out):
    x = u.args[0]
    if m is not x and not is_out:
        raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
    sx, so = shape_of(x), shape_of(u)
    if sx is None or so is None:
        raise _Reject(f"no shape metadata at {_where(u)}")
    lead = len(so) - len(sx)
    din = d - lead if is_out else d
    if din < 0 or sx[din] != so[din + lead]:
        raise _Reject(f"{_where(u)} broadcasts into the channel dim")
    if not isinstance(list(u.args[1])[din + lead], int):
        raise _Reject(f"{_where(u)}: symbolic size at the channel dim")
    return [(x, din), (u, din + lead)], "view"


def _matmul_rule(u, m, d, is_out):
    a, b = u.args[0], u.args[1]
    ra, rb, r = _rank(a), _rank(b), _rank(u)
    if min(ra, rb) < 2:
        raise _Reject(f"channel dim flows into {_where(u)}, a matrix-vector product")
    if not is_out and a is b:
        raise _Reject(f"{_where(u)} multiplies {m.name} with itself")
    if is_out:
        dout = d
    elif m is a:
        if d == ra - 1:
            raise _Reject(f"channel dim of {m.name} is contracted by {_where(u)}")
        dout = r - 2 if d == ra - 2 else d + r - ra
    elif m is b:
        if d == rb - 2:
            raise _Reject(f"channel dim of {m.name} is contracted by {_where(u)}")
        dout = r - 1 if d == rb - 1 else d + r - rb
    else:
        raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
    if dout == r - 2:
        return [(u, dout), (a, ra - 2)], None
    if dout == r - 1:
        return [(u, dout), (b, rb - 1)], None
    members = [(u, dout)]   # a batch dim (attention heads): both operands, unless broadcast
    for t, rt in ((a, ra), (b, rb)):
        dt = dout - (r - rt)
        if dt >= 0 and shape_of(t)[dt] != 1:
            members.append((t, dt))
        elif t is m:
            raise _Reject(f"{_where(u)} broadcasts the channel dim of {m.name}")
    return members, None


def _sdpa_rule(u, m, d, is_out, imap):
    """Heads of q, k, v and the output are one dim; sequence and per-head feature dims are not."""
    q, k, v = u.args[:3]
    mask = _arg(u, 3, "attn_mask")
    if not is_out and m not in (q, k, v):
        raise _Reject(f"channel dim flows into the attention mask of {_where(u)}")
    r = _rank(u)
    if any(_rank(t) != r for t in (q, k, v)):
        raise _Reject(f"{_where(u)}: q, k, v of different ranks")
    if d >= r - 2:
        raise _Reject(f"channel dim {d} of {m.name} enters {_where(u)} as a sequence or per-head "
                      f"feature dim (only whole heads are pruned)")
    hq, hkv = shape_of(q)[d], shape_of(k)[d]
    q_map, kv_map = imap, imap
    if hq != hkv:
        rep = _gqa_repeat(u, hq, hkv)
        if not imap.single:
            raise _Reject(f"grouped-query attention {_where(u)} on heads in several parts")
        (offset, unit), = imap.parts
        if m in (k, v) and m is not q:
            q_map = IndexMap.block(offset * rep, unit * rep)
        elif offset % rep or unit % rep:
            # one kv head serves `rep` q heads: prune q heads in whole kv groups
            f = rep // math.gcd(unit, rep)
            raise _Coarser(f"grouped-query attention {_where(u)}: {hq} q heads share {hkv} k/v heads, "
                           f"q heads are pruned in groups of {rep}", [(f, (1,))])
        else:
            kv_map = IndexMap.block(offset // rep, unit // rep)
    members = [(q, d, q_map), (u, d, q_map), (k, d, kv_map), (v, d, kv_map)]
    sm = shape_of(mask) if isinstance(mask, fx.Node) else None
    if sm is not None and d - (r - len(sm)) >= 0 and sm[d - (r - len(sm))] != 1:
        members.append((mask, d - (r - len(sm)), q_map))
    return members, "attention"


def _gqa_repeat(u, hq, hkv) -> int:
    if not _arg(u, 7, "enable_gqa", False) or hkv == 0 or hq % hkv:
        raise _Reject(f"{_where(u)}: {hq} q heads and {hkv} k/v heads without enable_gqa")
    return hq // hkv


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


# ---- the walk -------------------------------------------------------------------------------
def _seed(node: fx.Node) -> Slot | None:
    """The output-channel slot of a weight layer (conv with groups=1, linear, addmm, mm)."""
    if node.op != "call_function":
        return None
    name = op_name(node)
    try:
        if name in _CONV:
            c = _conv_spec(node)
            w = c["w"]
            if c["groups"] != 1 or not isinstance(w, fx.Node) or w.op != "get_attr":
                return None
            return (node, c["cout"])
        if node.target in ir.WEIGHT_OPS:
            _, _, w_i, _ = ir.WEIGHT_OPS[node.target]
            w = node.args[w_i] if len(node.args) > w_i else None
            if not isinstance(w, fx.Node) or w.op != "get_attr":
                return None
            return (node, _rank(node) - 1 if name == "linear" else 1)
    except _Reject:
        return None
    return None


def _walk(seed: Slot, nxg, unit: int = 1, weights: tuple = (1,)) -> tuple[ChannelGroup, list]:
    """The group reached from `seed` with its dim cut into consecutive parts of relative sizes
    `weights`, channel j being `unit * w` entries of each part, and the (factor, weights) requests
    of the ops it could not follow."""
    seed_shape = shape_of(seed[0])
    size = seed_shape[seed[1]] if seed_shape is not None else 0
    per_channel = unit * sum(weights)
    channels = size // per_channel if size % per_channel == 0 else 0
    group = ChannelGroup(channels=channels, unit=unit, weights=tuple(weights), stamp=next_stamp())
    dims: dict[fx.Node, int] = {seed[0]: seed[1]}
    maps = group.maps
    starts = itertools.accumulate((channels * unit * w for w in weights[:-1]), initial=0)
    maps[seed[0]] = IndexMap(tuple((o, unit * w) for o, w in zip(starts, weights)))
    roles: dict[tuple[fx.Node, str], None] = {}
    queue = [seed]
    group.slots.append(seed)
    requests: list[tuple[int, tuple]] = []

    def reject(reason: str) -> None:
        if reason not in group.reasons:
            group.reasons.append(reason)

    def visit(u: fx.Node, slot: Slot) -> None:
        try:
            members, role = _rule(u, slot, maps[slot[0]], channels, maps)
        except _Coarser as e:
            requests.extend(r for r in e.requests if r not in requests)
            reject(str(e))
            return
        except _Reject as e:
            reject(str(e))
            return
        if role is not None and role != "param":
            roles.setdefault((u, role), None)
        for member in members:
            if _admit(member, slot):
                n, dn = member[0], member[1]
                group.slots.append((n, dn))
                queue.append((n, dn))

    def _admit(member, slot) -> bool:
        n, dn = member[0], member[1]
        imap = member[2] if len(member) > 2 else maps[slot[0]]
        if n in dims:
            if dims[n] != dn:
                reject(f"node {n.name} carries the channel on two dims ({dims[n]} and {dn})")
            elif maps[n] != imap:
                reject(f"node {n.name} carries the channel at two places along dim {dn} "
                       f"({maps[n].describe()} and {imap.describe()})")
            return False
        s = shape_of(n)
        # a tie that keeps the map joins dims of one size; a moved map must fit in its dim
        if len(member) > 2:
            need = imap.end(channels)
            ok = s is None or (dn < len(s) and s[dn] >= need)
        else:
            need = shape_of(slot[0])[slot[1]] if shape_of(slot[0]) is not None else None
            ok = s is None or need is None or (dn < len(s) and s[dn] == need)
        if not ok:
            reject(f"node {n.name}: size {s[dn] if dn < len(s) else '?'} along dim {dn}, "
                   f"expected {need} for {channels} channels")
            return False
        dims[n] = dn
        maps[n] = imap
        return True

    while queue:
        slot = queue.pop(0)
        n = slot[0]
        visit(n, slot)  # the op that defines this value
        for user_name in nxg.successors(n.name):  # every op that reads it
            visit(nxg.nodes[user_name]["node"], slot)

    for (u, role) in roles:
        if role == "producer":
            group.producers.append(u)
        elif role == "consumer":
            group.consumers.append(u)
        else:
            group.others.append((u, role))
    if channels <= 0:
        reject(f"unknown channel count at {seed[0].name}")
    for n in [*group.producers, *group.consumers, *(u for u, _ in group.others)]:
        group.fqn_of(n)   # name members now, before a rewrite renames their weights
    return group, requests


def _walk_coarsening(seed: Slot, nxg) -> ChannelGroup:
    """Walk from `seed`; where a split needs a coarser map (whole heads, the parts of a packed
    projection), walk again with it, breadth first over the requests, up to _MAX_WALKS walks.
    Returns the first prunable group, else the last one walked (its reasons are the report's)."""
    queue, tried, deepest = [(1, (1,))], set(), None
    while queue and len(tried) < _MAX_WALKS:
        unit, weights = queue.pop(0)
        if (unit, weights) in tried:
            continue
        tried.add((unit, weights))
        group, requests = _walk(seed, nxg, unit, weights)
        if group.prunable:
            return group
        if deepest is None or len(group.slots) > len(deepest.slots):
            deepest = group   # got furthest: its reasons name the real obstacle
        # plain head blocks first (the largest), then packed parts
        for f, w in sorted(requests, key=lambda q: (len(q[1]), -q[0])):
            parts = _nest(weights, w)
            if parts is not None:
                queue.append((unit * f, parts))
    return deepest


def _nest(weights: tuple, request: tuple) -> tuple | None:
    """The seed's parts after a request to cut them into `request` parts: no change for (1,), the
    request where there was one part, equal parts cut equally; None (not tried) otherwise."""
    if request == (1,):
        return weights
    if weights == (1,):
        return request
    if len(set(weights)) == 1 and len(set(request)) == 1:
        return (1,) * (len(weights) * len(request))
    return None


def find_channel_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """Every channel group seeded by a weight layer's output channels, in graph order.

    Groups are disjoint: a layer whose output channels were already reached from an earlier seed
    (a residual stream shared by several producers, k and v from q through attention) belongs to
    that group.
    """
    nxg = ir.to_networkx(gm)
    groups: list[ChannelGroup] = []
    covered: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        seed = _seed(node)
        if seed is None or covered.get(seed[0]) == seed[1]:
            continue
        group = _walk_coarsening(seed, nxg)
        for n, d in group.slots:
            covered.setdefault(n, d)
        groups.append(group)
    return groups
