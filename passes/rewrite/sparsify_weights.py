"""sparsify_weights: replace each planned dense weight op by its sparse custom op + packed buffers."""
from __future__ import annotations

import re

import torch.fx as fx

from sparsify import ir
from sparsify.codegen import weight_kernels
from sparsify.pipeline import PassContext, PassResult, register_pass
from sparsify.plan import FORCED, SPARSE


def buffer_prefix(fqn: str) -> str:
    return "_sparsify_" + re.sub(r"\W", "_", fqn)


@register_pass("sparsify_weights", kind="rewrite", default=True)
def sparsify_weights(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    weight_kernels.load_ops()
    packed_store = ctx.state.get("packed", {})
    replaced = 0
    for node in list(gm.graph.nodes):
        lp = node.meta.get(ir.PLAN)
        info = node.meta.get(ir.LAYER)
        if lp is None or info is None or lp.status not in (SPARSE, FORCED):
            continue
        packed = packed_store.get(lp.fqn)
        if packed is None:
            raise RuntimeError(f"layer {lp.fqn}: planned {lp.status} but no packed weights were stored")
        kernel = weight_kernels.KERNELS[lp.kernel]
        _, x_i, w_i, b_i = ir.WEIGHT_OPS[node.target]
        prefix = buffer_prefix(lp.fqn)
        buf_nodes = {}
        with gm.graph.inserting_before(node):
            for name, tensor in packed.buffers.items():
                attr = f"{prefix}_{name}"
                gm.register_buffer(attr, tensor, persistent=True)
                buf_nodes[name] = gm.graph.get_attr(attr)
                buf_nodes[name].meta[ir.FQN] = lp.fqn
            bias = node.args[b_i] if b_i is not None and len(node.args) > b_i else None
            args = kernel.op_args(node.args[x_i], buf_nodes, packed.static, bias, None, "none",
                                  packed.static["n_out"], packed.static["k_in"])
            new = gm.graph.call_function(kernel.op, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        new.meta[ir.FQN] = node.meta.get(ir.FQN, lp.fqn)
        new.meta[ir.PLAN] = lp
        new.meta[ir.FROM] = ir.Provenance("sparsify_weights", f"{info.op}->{kernel.op_name}", node.name,
                                          lp.fqn, lp.reason)
        weight = node.args[w_i]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not weight.users:
            gm.graph.erase_node(weight)
        replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(replaced), info={"replaced": replaced})
