"""Per-op rules: how each ATen op ties the channel slots of its operands and its output.

`RULES` maps an ATen overload packet name to a rule, a function of one `Visit` (visit.py) returning
`(members, role)` or raising `_Reject` / `_Coarser`. `relu` ties (x, d) to (relu, d); `conv2d` with
groups=1 ties (x, 1) to (weight, 1) (its in-space) and (weight, 0), (bias, 0), (out, 1) (its
out-space); `add` ties the channel dim of both operands and the output unless an operand broadcasts
there. The rules of ops that move or cut the channel entries (cat, split, slice, views, expand,
matmul, attention) are in op_rules_shape.py. `_rule` is what the walk calls for every node.
"""
from __future__ import annotations

import torch.fx as fx

from .index_map import IndexMap
from .op_rules_shape import (_SPLIT, _VIEW, _cat, _expand, _getitem, _matmul, _reshape, _sdpa, _slice,
                             _split)
from .visit import Slot, Visit, _arg, _norm_dim, _rank, _Reject, _where, op_name, shape_of

# ---- op families (by ATen overload packet name; op_name maps a few Python callables onto them) ----
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
_BATCH_NORM = {"batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
               "native_batch_norm"}
_LAYER_NORM = {"layer_norm", "native_layer_norm"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}


def _base_name(name: str | None) -> str | None:
    """In-place elementwise ops (add_, relu_, hardtanh_ in pre-dispatch graphs) couple channels
    exactly like their functional forms: the output is the mutated first operand, same shape."""
    if name and name.endswith("_") and not name.startswith("_") and name[:-1] in _UNARY | _BINARY:
        return name[:-1]
    return name


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


# ---- elementwise, normalisation, pooling ---------------------------------------------------------
def _unary(v: Visit):
    x = v.u.args[0]
    v.data_only(x)
    if _rank(x) != _rank(v.u):
        raise _Reject(f"{_where(v.u)} changes the rank")
    return [(x, v.d), (v.u, v.d)], None


def _dim_arg_unary(v: Visit):
    x = v.u.args[0]
    dim = _norm_dim(int(_arg(v.u, 1, "dim")), _rank(x))
    v.data_only(x)
    if dim == v.d:
        raise _Reject(f"{_where(v.u)} normalises over the channel dim")
    return [(x, v.d), (v.u, v.d)], None


def _binary(v: Visit):
    u, m = v.u, v.m
    positions = (0, 1, 2) if v.name == "where" else (0, 1)
    operands = [a for i, a in enumerate(u.args) if i in positions and isinstance(a, fx.Node)]
    v.data_only(*operands)
    R = _rank(u)
    dout = v.d if v.is_out else v.d + (R - _rank(m))
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


def _batch_norm(v: Visit):
    u, d = v.u, v.d
    x = u.args[0]
    params = [a for a in u.args[1:5] if isinstance(a, fx.Node)]
    v.data_only(x, *params)
    if v.is_out or v.m is x:
        if d != 1:
            raise _Reject(f"channel dim {d} enters {_where(u)}, which normalises over dim 1")
    elif d != 0:
        raise _Reject(f"{_where(u)}: parameter sliced along dim {d}")
    return [(x, 1), (u, 1), *[(p, 0) for p in params]], "norm"


def _layer_norm(v: Visit):
    u, d = v.u, v.d
    x, normalized_shape = u.args[0], list(u.args[1])
    params = [a for a in u.args[2:4] if isinstance(a, fx.Node)]
    r = _rank(x)
    if v.m is x or v.is_out:
        if d != r - 1 or len(normalized_shape) != 1:
            raise _Reject(f"channel dim {d} enters {_where(u)} normalised over "
                          f"{normalized_shape} (only a last-dim layer_norm over the channels is supported)")
    elif v.m in params:
        if d != 0 or len(normalized_shape) != 1:
            raise _Reject(f"{_where(u)}: multi-dim layer_norm parameters")
    else:
        raise v.non_data()
    return [(x, r - 1), (u, r - 1), *[(p, 0) for p in params]], "norm"


def _group_norm(v: Visit):
    raise _Reject(f"channel dim flows into {_where(v.u)} (group/instance norm is not supported)")


def _reduce(v: Visit):
    u, d = v.u, v.d
    x = u.args[0]
    r = _rank(x)
    dims = _arg(u, 1, "dim", None)
    keepdim = bool(_arg(u, 2, "keepdim", False))
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise _Reject(f"{_where(u)} reduces over all dims, the channel dim included")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = sorted(_norm_dim(int(x_), r) for x_ in dims)
    din = d if v.m is x else None
    if v.is_out:
        # map the output dim back to the input dim
        kept = [i for i in range(r) if keepdim or i not in dims]
        din = kept[d]
    if din is None:
        raise v.non_data()
    if din in dims:
        raise _Reject(f"channel dim is reduced by {_where(u)}")
    dout = din if keepdim else din - sum(1 for x_ in dims if x_ < din)
    return [(x, din), (u, dout)], None


def _pool(v: Visit):
    x = v.u.args[0]
    r = _rank(x)
    v.data_only(x)
    if v.d >= r - _POOL[v.name]:
        raise _Reject(f"channel dim {v.d} is a pooled (spatial) dim of {_where(v.u)}")
    return [(x, v.d), (v.u, v.d)], None


def _pad(v: Visit):
    x, pad = v.u.args[0], list(v.u.args[1])
    r = _rank(x)
    v.data_only(x)
    if v.d >= r - len(pad) // 2:
        raise _Reject(f"{_where(v.u)} pads the channel dim")
    return [(x, v.d), (v.u, v.d)], None


# ---- weight layers ---------------------------------------------------------------------------------
def _layer(v: Visit, in_space: list, out_space: list):
    if v.slot in in_space:
        return in_space, "consumer"
    if v.slot in out_space:
        return out_space, "producer"
    raise _non_channel(v)


def _non_channel(v: Visit) -> _Reject:
    return _Reject(f"channel dim {v.d} of {v.m.name} enters {_where(v.u)} at a non-channel position")


def _conv(v: Visit):
    c = _conv_spec(v.u)
    x, w, b, groups = c["x"], c["w"], c["b"], c["groups"]
    out_space = [(w, 0), (v.u, c["cout"])] + ([(b, 0)] if isinstance(b, fx.Node) else [])
    if groups == 1:
        return _layer(v, [(x, c["cin"]), (w, 1)], out_space)
    if c["ws"][1] == 1 and c["ws"][0] == groups:
        # depthwise: each output channel reads exactly its own input channel
        dw = [(x, c["cin"]), *out_space]
        if v.slot in dw:
            return dw, "depthwise"
        raise _non_channel(v)
    raise _Reject(f"channel dim flows into grouped conv {_where(v.u)} (groups={groups}, "
                  f"weight {tuple(c['ws'])}): channels are coupled in groups")


def _linear(v: Visit):
    u = v.u
    x, w, b = u.args[0], u.args[1], _arg(u, 2, "bias")
    in_space = [(x, _rank(x) - 1), (w, 1)]
    out_space = [(w, 0), (u, _rank(u) - 1)]
    if isinstance(b, fx.Node):
        out_space.append((b, 0))
    return _layer(v, in_space, out_space)


def _mm(v: Visit):
    """mm, and addmm (HF Conv1D): the weight is (in, out), the bias broadcast over the rows."""
    u = v.u
    b, x, w = (u.args[0], u.args[1], u.args[2]) if v.name == "addmm" else (None, u.args[0], u.args[1])
    out_space = [(w, 1), (u, 1)]
    if isinstance(b, fx.Node):
        sb = shape_of(b)
        if sb is None:
            raise _Reject(f"no shape metadata for the bias of {_where(u)}")
        if len(sb) >= 1 and sb[-1] != 1:
            out_space.append((b, len(sb) - 1))
    return _layer(v, [(x, 1), (w, 0)], out_space)


def _embedding(v: Visit):
    w = v.u.args[0]
    members = [(w, 1), (v.u, _rank(v.u) - 1)]
    if v.slot not in members:
        raise _non_channel(v)
    return members, "param_op"


# ---- dims inserted, removed, moved ------------------------------------------------------------------
def _unsqueeze(v: Visit):
    x, d = v.u.args[0], v.d
    dim = _norm_dim(int(v.u.args[1]), _rank(v.u))
    if v.is_out:
        if d == dim:
            raise _Reject(f"{_where(v.u)}: inserted dim cannot be a channel dim")
        din = d - (1 if dim < d else 0)
    else:
        din = d
    return [(x, din), (v.u, din + (1 if dim <= din else 0))], None


def _squeeze(v: Visit):
    x = v.u.args[0]
    s = shape_of(x)
    if s is None:
        raise _Reject(f"no shape metadata for node {x.name}")
    dims = _arg(v.u, 1, "dim", None)
    if dims is None:
        removed = [i for i, n in enumerate(s) if n == 1]
    else:
        dims = [dims] if isinstance(dims, int) else list(dims)
        removed = [_norm_dim(int(i), len(s)) for i in dims]
        removed = [i for i in removed if s[i] == 1]
    kept = [i for i in range(len(s)) if i not in removed]
    din = kept[v.d] if v.is_out else v.d
    if din in removed:
        raise _Reject(f"{_where(v.u)} squeezes the channel dim")
    return [(x, din), (v.u, kept.index(din))], None


def _permute(v: Visit):
    """permute, transpose and t."""
    u, d = v.u, v.d
    x = u.args[0]
    r = _rank(x)
    if v.name == "permute":
        perm = [_norm_dim(int(i), r) for i in u.args[1]]
    else:
        a, b = ((0, 1) if v.name == "t" else (_norm_dim(int(u.args[1]), r), _norm_dim(int(u.args[2]), r)))
        perm = list(range(r))
        perm[a], perm[b] = perm[b], perm[a]
    if v.is_out:
        return [(x, perm[d]), (u, d)], None
    return [(x, d), (u, perm.index(d))], None


def _select(v: Visit):
    x, d = v.u.args[0], v.d
    dim = _norm_dim(int(v.u.args[1]), _rank(x))
    if v.is_out:
        din = d + (1 if dim <= d else 0)
    else:
        din = d
        if dim == d:
            raise _Reject(f"{_where(v.u)} selects along the channel dim")
    return [(x, din), (v.u, din - (1 if dim < din else 0))], None


# ---- ops that only look at a tensor ----------------------------------------------------------------
def _assert_tensor_metadata(v: Visit):
    if _arg(v.u, 1, "size") is not None or _arg(v.u, 2, "stride") is not None:
        raise _Reject(f"{_where(v.u)} asserts the size of a tensor that carries the channel")
    return [], None   # checks dtype / device / layout only


def _sym_size(v: Visit):
    if int(v.u.args[1]) == v.d:
        raise _Reject(f"the channel count is read as a value by {_where(v.u)}")
    return [], None


# ---- the table ---------------------------------------------------------------------------------------
RULES = {
    "getitem": _getitem,
    **dict.fromkeys(_UNARY, _unary),
    **dict.fromkeys(_DIM_ARG_UNARY, _dim_arg_unary),
    **dict.fromkeys(_BINARY, _binary),
    **dict.fromkeys(_BATCH_NORM, _batch_norm),
    **dict.fromkeys(_LAYER_NORM, _layer_norm),
    **dict.fromkeys(("group_norm", "native_group_norm", "instance_norm"), _group_norm),
    **dict.fromkeys(_CONV, _conv),
    "linear": _linear,
    "addmm": _mm,
    "mm": _mm,
    "embedding": _embedding,
    **dict.fromkeys(_REDUCE, _reduce),
    **dict.fromkeys(_POOL, _pool),
    "constant_pad_nd": _pad,
    "pad": _pad,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    **dict.fromkeys((*_VIEW, "flatten"), _reshape),
    "expand": _expand,
    "matmul": _matmul,
    "bmm": _matmul,
    "scaled_dot_product_attention": _sdpa,
    **dict.fromkeys(("permute", "transpose", "t"), _permute),
    "slice": _slice,
    "select": _select,
    "cat": _cat,
    **dict.fromkeys(_SPLIT, _split),
    "_assert_tensor_metadata": _assert_tensor_metadata,
    "sym_size": _sym_size,
}


def _rule(u: fx.Node, slot: Slot, imap: IndexMap, channels: int | None,
          maps: dict | None) -> tuple[list, str | None]:
    """The slots of op `u` tied to `slot` (a slot of u's output or of one of its inputs), and u's
    role in the group (visit.py): the node kinds here, call_functions by `RULES`."""
    m, d = slot
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
    rule = RULES.get(name)
    if rule is None:
        raise _Reject(f"channel dim flows into {u.target} at node {u.name}")
    return rule(Visit(u, m, d, imap, channels, maps or {}, name))
