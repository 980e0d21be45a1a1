"""fuse_epilogues: fold the elementwise ops that follow a rewritten op into its kernel's epilogue.

Graph-level code generation: for each op a rewrite made whose schema ends with the epilogue
arguments (codegen.epilogue.EPILOGUE_ARGS: bias, residual, activation, out_dtype), whatever family
made it, an immediately following activation (relu, gelu,
gelu-tanh, silu), then a residual add of a same-shaped tensor, then a floating dtype cast are absorbed
into the op's `activation` / `residual` / `out_dtype` arguments, so the kernel is specialised (Triton
constexprs, the output buffer's dtype) for exactly that fused subgraph and the intermediate tensors
never reach memory. The order is the epilogue's (codegen/epilogue.py): bias -> activation -> residual
-> cast; an op in another order (a cast before the residual add) ends the chain.

Numerics: the kernel keeps the accumulator in float32 through the whole epilogue and rounds once, at
the store. The eager graph rounds the matmul result to the model dtype before each following op, so a
fused fp16/bf16 layer is at least as accurate as the unfused one, not bit-identical to it.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen.epilogue import EPILOGUE_ARGS
from sparsify.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten

# torch.export checks the dtype of a tensor before a `.to` with these nodes; they describe the graph as
# captured, so they go stale once a cast is fused into the op that produced the tensor.
_METADATA_ASSERTS = (aten._assert_tensor_metadata.default,)


# What every sparse kernel can store (float64 is the references' ground-truth dtype, not a kernel one).
_KERNEL_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value (metadata assertions do not)."""
    return [u for u in node.users if u.target not in _METADATA_ASSERTS]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 and users[0].op == "call_function" else None


def _activation_of(user: fx.Node) -> str | None:
    if user.target == aten.relu.default:
        return "relu"
    if user.target == aten.silu.default:
        return "silu"
    if user.target == aten.gelu.default:
        approx = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    return None


def _cast_dtype(user: fx.Node) -> torch.dtype | None:
    """The floating dtype `user` casts its input to, if it is nothing but a dtype cast on the same device."""
    kw = dict(user.kwargs)
    if user.target == aten.to.dtype:
        dtype = user.args[1] if len(user.args) > 1 else kw.pop("dtype", None)
        extra = {k: v for k, v in kw.items() if k != "dtype"}
        if len(user.args) > 2:
            return None                      # non_blocking / copy / memory_format given positionally
    elif user.target == aten._to_copy.default:
        dtype = kw.pop("dtype", None)
        extra = kw
    else:
        return None
    if any(v not in (None, False, torch.preserve_format) for k, v in extra.items()
           if k not in ("non_blocking", "copy")):
        return None                          # a device, layout or memory-format change is not an epilogue
    if dtype not in _KERNEL_OUT_DTYPES:
        return None
    return dtype


def _absorb(gm: fx.GraphModule, node: fx.Node, user: fx.Node) -> None:
    """`user` becomes part of `node`: node takes its value, uses and metadata."""
    node.meta["val"] = user.meta.get("val", node.meta.get("val"))
    if "tensor_meta" in user.meta:
        node.meta["tensor_meta"] = user.meta["tensor_meta"]
    user.replace_all_uses_with(node)
    gm.graph.erase_node(user)


# ---- what follows a node: each finder returns (the user to absorb, what it adds) or None -------------
def _activation_after(node: fx.Node):
    user = _only_user(node)
    name = _activation_of(user) if user is not None else None
    return None if name is None else (user, name)


def _residual_after(node: fx.Node):
    user = _only_user(node)
    if user is None or user.target != aten.add.Tensor or len(user.args) != 2 or user.kwargs.get("alpha", 1) != 1:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    if not isinstance(other, fx.Node) or other is node or not _same_shape(other, node):
        return None
    return user, other


def _cast_after(node: fx.Node):
    user = _only_user(node)
    dtype = _cast_dtype(user) if user is not None else None
    return None if dtype is None else (user, dtype)


def epilogue_of(node: fx.Node) -> tuple[str, fx.Node | None, torch.dtype | None]:
    """(activation, residual operand, cast dtype) that this pass would fold into an op standing where
    `node` stands: what the planner times a candidate with, so it is timed as the graph will run it."""
    activation, residual, dtype, cur = "none", None, None, node
    found = _activation_after(cur)
    if found is not None:
        cur, activation = found
    found = _residual_after(cur)
    if found is not None:
        cur, residual = found
    found = _cast_after(cur)
    if found is not None:
        dtype = found[1]
    return activation, residual, dtype


def _fuse_activation(gm, node) -> str | None:
    found = _activation_after(node) if ir.op_arg(node, "activation")[1] == "none" else None
    if found is None:
        return None
    ir.set_op_arg(node, "activation", found[1])
    _absorb(gm, node, found[0])
    return found[1]


def _fuse_residual(gm, node) -> str | None:
    found = _residual_after(node) if ir.op_arg(node, "residual")[1] is None else None
    if found is None:
        return None
    ir.set_op_arg(node, "residual", found[1])
    _absorb(gm, node, found[0])
    return "residual"


def _fuse_cast(gm, node) -> str | None:
    found = _cast_after(node) if ir.op_arg(node, "out_dtype")[1] is None else None
    if found is None:
        return None
    for stale in [u for u in node.users if u.target in _METADATA_ASSERTS]:
        gm.graph.erase_node(stale)
    ir.set_op_arg(node, "out_dtype", found[1])
    _absorb(gm, node, found[0])
    return f"cast to {str(found[1]).removeprefix('torch.')}"


def _same_shape(a, b) -> bool:
    sa, da = ir.tensor_meta(a)
    sb, db = ir.tensor_meta(b)
    return sa is not None and sa == sb and da == db


# Tried in this order, each at most once per op: the order of the kernels' epilogue.
_STEPS = (_fuse_activation, _fuse_residual, _fuse_cast)


def fusible(node: fx.Node) -> bool:
    """An op a rewrite made whose schema ends with the epilogue arguments."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or ir.FROM not in node.meta:
        return False
    names = tuple(a.name for a in schema.arguments)
    return names[-len(EPILOGUE_ARGS):] == EPILOGUE_ARGS


@register_pass("fuse_epilogues", phase="lower", default=True)
def fuse_epilogues(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    fused = 0
    for node in list(gm.graph.nodes):
        if not fusible(node):
            continue
        prov = node.meta[ir.FROM]
        steps = [s for s in (step(gm, node) for step in _STEPS) if s]
        if steps:
            fused += len(steps)
            node.meta[ir.FROM] = ir.Provenance(prov.pass_name, prov.rule, prov.source, prov.fqn,
                                               prov.detail + f"; fused epilogue: {'+'.join(steps)}")
    if fused:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(fused), info={"fused": fused})
