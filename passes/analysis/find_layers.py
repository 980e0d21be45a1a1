"""find_layers: mark every weight layer (linear / addmm / mm / conv2d on a parameter) with LayerInfo."""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.pipeline import PassContext, PassResult, register_pass


def _is_param(gm: fx.GraphModule, node) -> bool:
    target = ir.get_attr_target(node)
    if target is None:
        return False
    try:
        return isinstance(ir.fetch_attr(gm, target), torch.nn.Parameter)
    except AttributeError:
        return False


def layer_info(gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> ir.LayerInfo | None:
    spec = ir.WEIGHT_OPS.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    op, x_i, w_i, b_i = spec
    if len(node.args) <= w_i or not _is_param(gm, node.args[w_i]):
        return None
    if op == "addmm" and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return None
    weight = node.args[w_i]
    bias = node.args[b_i] if b_i is not None and len(node.args) > b_i else None
    if bias is not None and not _is_param(gm, bias):
        return None  # a computed bias is legal torch but not something we pack
    w_target = weight.target
    if w_target == "weight":  # the captured module is itself the layer (a part, or a bare Linear)
        local = ""
    else:
        local = w_target[: -len(".weight")] if w_target.endswith(".weight") else w_target
    in_shape, dtype = ir.tensor_meta(node.args[x_i])
    out_shape, _ = ir.tensor_meta(node)
    w = ir.fetch_attr(gm, w_target)
    conv = None
    if op == "conv2d":
        a = list(node.args) + [None] * (7 - len(node.args))
        conv = {"stride": list(a[3] or [1, 1]), "padding": list(a[4] or [0, 0]) if not isinstance(a[4], str) else a[4],
                "dilation": list(a[5] or [1, 1]), "groups": int(a[6] or 1)}
    return ir.LayerInfo(fqn=ctx.full_fqn(local), op=op, weight_target=w_target,
                        bias_target=bias.target if bias is not None else None,
                        weight_shape=tuple(w.shape), input_shape=in_shape, output_shape=out_shape,
                        dtype=str(dtype or w.dtype).replace("torch.", ""),
                        weight_transposed=op in ("addmm", "mm"), conv_params=conv)


@register_pass("find_layers", kind="analysis", default=True)
def find_layers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    count = 0
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        info = layer_info(gm, node, ctx)
        if info is not None:
            node.meta[ir.LAYER] = info
            uses[info.weight_target] = uses.get(info.weight_target, 0) + 1
            count += 1
    # A weight used by several ops (tied embeddings, shared layers) is planned once, as its first use;
    # the others stay dense, since a packed copy would no longer be tied to the parameter.
    seen: set[str] = set()
    for node in gm.graph.nodes:
        info = node.meta.get(ir.LAYER)
        if info is None:
            continue
        if uses[info.weight_target] > 1:
            ctx.state.setdefault("shared_weights", {})[info.fqn] = uses[info.weight_target]
            if info.weight_target in seen:
                del node.meta[ir.LAYER]
                count -= 1
        seen.add(info.weight_target)
    return PassResult(gm, modified=False, info={"layers": count})
