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

Whatever the walk does not understand ends the walk there and marks the group not prunable, with
the reason (an op it does not know, a view that merges or splits the channel dim, concatenation
along the channel dim, a grouped conv, the graph output, a graph input).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from sparsify import ir

aten = torch.ops.aten

Slot = tuple  # (fx.Node, int)

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
    """

    channels: int
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

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"NOT prunable: {self.reason}"
        return (f"ChannelGroup({self.channels} channels; producers={self.producer_fqns}; "
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


def _rule(u: fx.Node, slot: Slot) -> tuple[list[Slot], str | None]:
    """The slots of op `u` tied to `slot` (a slot of u's output or of one of its inputs).

    Returns (members, role); raises _Reject(reason) where the channel cannot be followed.
    role tells the walk what u is to the group: producer / consumer / depthwise / norm / view / ...
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

    if name == "flatten":
        x = u.args[0]
        s = shape_of(x)
        if s is None:
            raise _Reject(f"no shape metadata for node {x.name}")
        r = len(s)
        start = _norm_dim(int(_arg(u, 1, "start_dim", 0)), r) if r else 0
        end = _norm_dim(int(_arg(u, 2, "end_dim", -1)), r) if r else 0
        mapping = {}
        for i in range(r):
            mapping[i] = i if i < start else (start if i <= end else i - (end - start))
        if is_out:
            cands = [i for i in range(r) if mapping[i] == d and s[i] != 1]
            if len(cands) != 1:
                raise _Reject(f"channel dim flows into {_where(u)}, which merges it with other dims")
            din = cands[0]
        else:
            din = d
        if start <= din <= end and any(s[i] != 1 for i in range(start, end + 1) if i != din):
            raise _Reject(f"channel dim flows into {_where(u)}, which merges it with other dims "
                          f"{tuple(s)} -> {shape_of(u)}")
        return [(x, din), (u, mapping[din])], None

    if name in _VIEW:
        x = u.args[0]
        sin, sout = shape_of(x), shape_of(u)
        if sin is None or sout is None:
            raise _Reject(f"no shape metadata at {_where(u)}")
        din = d if not is_out else _view_in_dim(sin, sout, d)
        dout = _view_out_dim(sin, sout, din) if din is not None else None
        if din is None or dout is None:
            raise _Reject(f"channel dim flows into {_where(u)}, which merges or splits it "
                          f"{tuple(sin)} -> {tuple(sout)}")
        entry = list(u.args[1])[dout]
        if not isinstance(entry, int):
            raise _Reject(f"{_where(u)}: symbolic size at the channel dim")
        return [(x, din), (u, dout)], "view"

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
        dim = _norm_dim(int(_arg(u, 1, "dim", 0)), _rank(x))
        if m is not x and not is_out:
            raise _Reject(f"channel dim flows into {_where(u)} as a non-data argument")
        if dim == d:
            raise _Reject(f"{_where(u)} slices along the channel dim")
        return [(x, d), (u, d)], None

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
        tensors = list(u.args[0])
        r = _rank(u)
        dim = _norm_dim(int(_arg(u, 1, "dim", 0)), r)
        if dim == d:
            raise _Reject(f"channel dim flows into {_where(u)}, which concatenates along it")
        return [(t, d) for t in tensors if isinstance(t, fx.Node)] + [(u, d)], None

    if name == "_assert_tensor_metadata":
        if _arg(u, 1, "size") is not None or _arg(u, 2, "stride") is not None:
            raise _Reject(f"{_where(u)} asserts the size of a tensor that carries the channel")
        return [], None   # checks dtype / device / layout only

    if name == "sym_size":
        if int(u.args[1]) == d:
            raise _Reject(f"the channel count is read as a value by {_where(u)}")
        return [], None

    raise _Reject(f"channel dim flows into {u.target} at node {u.name}")


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _view_out_dim(sin, sout, din) -> int | None:
    """Output dim of a view/reshape that carries input dim `din` unchanged, else None."""
    before = _prod(sin[:din])
    for j, n in enumerate(sout):
        if n == sin[din] and _prod(sout[:j]) == before:
            return j
    return None


def _view_in_dim(sin, sout, dout) -> int | None:
    return _view_out_dim(sout, sin, dout)


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


def _walk(seed: Slot, nxg) -> ChannelGroup:
    seed_shape = shape_of(seed[0])
    channels = seed_shape[seed[1]] if seed_shape is not None else 0
    group = ChannelGroup(channels=channels)
    dims: dict[fx.Node, int] = {}
    roles: dict[tuple[fx.Node, str], None] = {}
    queue = [seed]
    dims[seed[0]] = seed[1]
    group.slots.append(seed)

    def reject(reason: str) -> None:
        if reason not in group.reasons:
            group.reasons.append(reason)

    def visit(u: fx.Node, slot: Slot) -> None:
        try:
            members, role = _rule(u, slot)
        except _Reject as e:
            reject(str(e))
            return
        if role is not None and role != "param":
            roles.setdefault((u, role), None)
        for n, dn in members:
            if n in dims:
                if dims[n] != dn:
                    reject(f"node {n.name} carries the channel on two dims ({dims[n]} and {dn})")
                continue
            s = shape_of(n)
            if s is not None and (dn >= len(s) or s[dn] != channels):
                reject(f"node {n.name}: size {s[dn] if dn < len(s) else '?'} along dim {dn}, "
                       f"expected {channels} channels")
                continue
            dims[n] = dn
            group.slots.append((n, dn))
            queue.append((n, dn))

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
    return group


def find_channel_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """Every channel group seeded by a weight layer's output channels, in graph order.

    Groups are disjoint: a layer whose output channels were already reached from an earlier seed
    (a residual stream shared by several producers) belongs to that group.
    """
    nxg = ir.to_networkx(gm)
    groups: list[ChannelGroup] = []
    covered: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        seed = _seed(node)
        if seed is None or covered.get(seed[0]) == seed[1]:
            continue
        group = _walk(seed, nxg)
        for n, d in group.slots:
            covered.setdefault(n, d)
        groups.append(group)
    return groups
