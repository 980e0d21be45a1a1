"""fuse_epilogues: fold the elementwise ops that follow a sparse matmul into its kernel's epilogue.

Graph-level code generation: for each sparse op, an immediately following activation (relu, gelu,
gelu-tanh, silu) and then a residual add of a same-shaped tensor are absorbed into the op's
`activation` / `residual` arguments, so the kernel is specialised (Triton constexprs) for exactly
that fused subgraph and the intermediate tensors never reach memory.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten


def _arg_index(node: fx.Node, name: str) -> int | None:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            return i
    return None


def _get(node, name):
    i = _arg_index(node, name)
    if i is None:
        return None, None
    if i < len(node.args):
        return i, node.args[i]
    return i, node.kwargs.get(name)


def _set(node, i, name, value):
    args = list(node.args)
    while len(args) <= i:
        args.append(None)
    args[i] = value
    node.args = tuple(args)


def _activation_of(user: fx.Node) -> str | None:
    if user.op != "call_function":
        return None
    if user.target == aten.relu.default:
        return "relu"
    if user.target == aten.silu.default:
        return "silu"
    if user.target == aten.gelu.default:
        approx = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return None


def _same_shape(a, b) -> bool:
    sa, da = ir.tensor_meta(a)
    sb, db = ir.tensor_meta(b)
    return sa is not None and sa == sb and da == db


@register_pass("fuse_epilogues", kind="rewrite", default=True)
def fuse_epilogues(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    fused = 0
    for node in list(gm.graph.nodes):
        prov = node.meta.get(ir.FROM)
        if prov is None or prov.pass_name != "sparsify_weights":
            continue
        ai, act = _get(node, "activation")
        ri, res = _get(node, "residual")
        if ai is None or ri is None:
            continue
        steps = []
        users = list(node.users)
        if act == "none" and len(users) == 1 and _activation_of(users[0]) is not None:
            user = users[0]
            _set(node, ai, "activation", _activation_of(user))
            node.meta["val"] = user.meta.get("val", node.meta.get("val"))
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
            steps.append(_get(node, "activation")[1])
            fused += 1
        users = list(node.users)
        if res is None and len(users) == 1:
            user = users[0]
            if (user.op == "call_function" and user.target == aten.add.Tensor and len(user.args) == 2
                    and user.kwargs.get("alpha", 1) == 1):
                other = user.args[1] if user.args[0] is node else user.args[0]
                if isinstance(other, fx.Node) and other is not node and _same_shape(other, node):
                    _set(node, ri, "residual", other)
                    user.replace_all_uses_with(node)
                    gm.graph.erase_node(user)
                    steps.append("residual")
                    fused += 1
        if steps:
            node.meta[ir.FROM] = ir.Provenance(prov.pass_name, prov.rule, prov.source, prov.fqn,
                                               prov.detail + f"; fused epilogue: {'+'.join(steps)}")
    if fused:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(fused), info={"fused": fused})
