"""FFN sites: up -> act -> down and gated act(gate(x)) * up(x) -> down, as captured graphs have them.

A site is found from its down projection back: the down layer's input, through shape-only ops
(views and reshapes that keep the last dimension: HF's Conv1D runs on 2-D views), is either the
activation of an up layer's output (ungated: ReLU / GELU MLPs, BERT, ViT, GPT-2) or a product of
the activation of a gate layer's output and an up layer's output that read the same x (gated:
SwiGLU, GeGLU as in Llama and Mistral). Every node in between must have that one use, and no weight
may be tied: the block is replaced as a whole. Activations are recognised as aten ops (relu, gelu,
silu), relu followed by a square (relu^2), and the tanh GELU written out in elementwise ops
(GPT-2's NewGELU).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.fx as fx

from sparsify import ir

aten = torch.ops.aten
_SHAPE_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


@dataclasses.dataclass
class FFNInfo:
    """One FFN block: its layers (ir.LayerInfo), activation, mode, and graph nodes by name."""

    up: ir.LayerInfo
    down: ir.LayerInfo
    gate: ir.LayerInfo | None
    act: str
    x: str               # the node the up layer reads (gate and up read the same, up to views)
    act_out: str         # the activation's output node (s): what thresholds are calibrated on
    nodes: tuple         # every node the rewrite removes: the down layer, then the rest last to first

    @property
    def mode(self) -> str:
        return "gated" if self.gate is not None else "ungated"

    @property
    def hidden(self) -> int:
        return self.up.weight_shape[1] if self.up.weight_transposed else self.up.weight_shape[0]


def _used_only_by(node, inside: set) -> bool:
    """Every use of `node` is a node of the block (so removing the block removes all its uses)."""
    return isinstance(node, fx.Node) and bool(node.users) and all(u in inside for u in node.users)


def _through_shapes(node, inside: set):
    """The node behind shape-only ops that keep the last dim and are used only inside the block
    (each joins `inside`)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SHAPE_OPS \
            and _used_only_by(node, inside) and _same_last_dim(node, node.args[0]):
        inside.add(node)
        node = node.args[0]
    return node


def _same_last_dim(a, b) -> bool:
    sa, sb = ir.tensor_meta(a)[0], ir.tensor_meta(b)[0]
    return sa is not None and sb is not None and len(sa) > 0 and len(sb) > 0 and sa[-1] == sb[-1]


def _scalar_arg(node, i):
    return node.args[i] if len(node.args) > i and isinstance(node.args[i], (int, float)) else None


def _mul_parts(node):
    """(tensor, scalar) of a tensor-times-scalar mul, else None."""
    if node.op != "call_function" or node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None


def match_activation(out: fx.Node):
    """(activation name, its input node, the nodes it consists of) if `out` is the output of an
    activation of one tensor, else None."""
    if not isinstance(out, fx.Node) or out.op != "call_function":
        return None
    t = out.target
    if t == aten.relu.default:
        return "relu", out.args[0], [out]
    if t == aten.silu.default:
        return "silu", out.args[0], [out]
    if t == aten.gelu.default:
        approx = out.kwargs.get("approximate", out.args[1] if len(out.args) > 1 else "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
        return (name, out.args[0], [out]) if name else None
    # relu^2: pow(relu(z), 2), square(relu(z)), or relu(z) * relu(z)
    inner = None
    if t == aten.pow.Tensor_Scalar and _scalar_arg(out, 1) == 2:
        inner = out.args[0]
    elif t == aten.square.default:
        inner = out.args[0]
    elif t == aten.mul.Tensor and len(out.args) == 2 and out.args[0] is out.args[1]:
        inner = out.args[0]
    if isinstance(inner, fx.Node) and inner.target == aten.relu.default and len(inner.users) == 1:
        return "relu2", inner.args[0], [out, inner]
    return _match_gelu_tanh_written_out(out)


def _match_gelu_tanh_written_out(out: fx.Node):
    """0.5 * z * (1 + tanh(sqrt(2/pi) * (z + 0.044715 * z^3))), as GPT-2's NewGELU is captured:
    mul(mul(z, 0.5), add(tanh(mul(add(z, mul(pow(z, 3), 0.044715)), c)), 1))."""
    if out.target != aten.mul.Tensor or len(out.args) != 2 or not all(isinstance(a, fx.Node) for a in out.args):
        return None
    for half, plus in (out.args, out.args[::-1]):
        hp = _mul_parts(half)
        if hp is None or abs(hp[1] - 0.5) > 1e-6:
            continue
        z = hp[0]
        if plus.target != aten.add.Tensor or _scalar_arg(plus, 1) != 1.0:
            continue
        tanh = plus.args[0]
        if not isinstance(tanh, fx.Node) or tanh.target != aten.tanh.default:
            continue
        sc = _mul_parts(tanh.args[0])
        if sc is None or abs(sc[1] - 0.7978845608028654) > 1e-6:
            continue
        inner = sc[0]
        if inner.target != aten.add.Tensor or len(inner.args) != 2:
            continue
        a, b = inner.args
        cube = b if a is z else a if b is z else None
        cp = _mul_parts(cube) if isinstance(cube, fx.Node) else None
        if cp is None or abs(cp[1] - 0.044715) > 1e-6:
            continue
        pw = cp[0]
        if pw.target != aten.pow.Tensor_Scalar or pw.args[0] is not z or _scalar_arg(pw, 1) != 3:
            continue
        nodes = [out, half, plus, tanh, tanh.args[0], inner, cube, pw]
        inside = set(nodes)
        if any(any(u not in inside for u in n.users) for n in nodes[1:]):
            continue     # a part is used outside the activation: not ours to remove
        return "gelu_tanh", z, nodes
    return None


def _layer_behind(node, layers: dict, inside: set):
    """The weight layer whose output `node` is (through shape ops), else None; it joins `inside`."""
    src = _through_shapes(node, inside)
    if isinstance(src, fx.Node) and src.name in layers and _used_only_by(src, inside):
        inside.add(src)
        return src
    return None


def _input_of(node: fx.Node) -> fx.Node:
    """A layer's input, behind shape ops (gate and up of one block read the same x)."""
    x = node.args[ir.WEIGHT_OPS[node.target][1]]
    while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _SHAPE_OPS:
        x = x.args[0]
    return x


def match_ffn(down: fx.Node, layers: dict) -> FFNInfo | None:
    """The FFN block whose down projection is `down` (a weight-layer node), else None.
    layers: node name -> ir.LayerInfo of every weight layer in the graph."""
    if down.target == aten.conv2d.default:
        return None
    inside = {down}
    h = _through_shapes(down.args[ir.WEIGHT_OPS[down.target][1]], inside)
    if not _used_only_by(h, inside):
        return None
    gate = None
    found = match_activation(h)
    if found is not None:                      # ungated: act(up(x))
        act, pre, act_nodes = found
        inside |= set(act_nodes)
        up = _layer_behind(pre, layers, inside)
        if up is None:
            return None
        act_out = h
    else:                                      # gated: act(gate(x)) * up(x)
        if h.target != aten.mul.Tensor or len(h.args) != 2 or not all(isinstance(a, fx.Node) for a in h.args):
            return None
        inside.add(h)
        for s_side, u_side in (h.args, h.args[::-1]):
            trial = set(inside)
            s_node = _through_shapes(s_side, trial)
            found = match_activation(s_node) if _used_only_by(s_node, trial) else None
            if found is None:
                continue
            act, pre, act_nodes = found
            trial |= set(act_nodes)
            g = _layer_behind(pre, layers, trial)
            u = _layer_behind(u_side, layers, trial)
            if g is None or u is None or g is u or _input_of(g) is not _input_of(u):
                continue
            gate, up, act_out, inside = g, u, s_node, trial
            break
        else:
            return None
    infos = [layers[n.name] for n in (up, down, gate) if n is not None]
    if any(i.uses > 1 or i.op == "conv2d" for i in infos):
        return None
    order = {n: i for i, n in enumerate(down.graph.nodes)}
    nodes = [down] + sorted(inside - {down}, key=order.__getitem__, reverse=True)
    return FFNInfo(up=layers[up.name], down=layers[down.name], gate=layers[gate.name] if gate is not None else None,
                   act=act, x=up.args[ir.WEIGHT_OPS[up.target][1]].name, act_out=act_out.name, nodes=tuple(n.name for n in nodes))


def block_fqn(info: FFNInfo) -> str:
    """The FFN's module: the longest common module prefix of its layers ("model.layers.0.mlp")."""
    parts = [i.fqn.split(".") for i in (info.up, info.down, info.gate) if i is not None]
    common = os.path.commonprefix(parts)
    return ".".join(common)
