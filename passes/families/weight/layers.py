"""Weight layers: every linear / addmm / mm / conv2d whose weight is a parameter, as an ir.LayerInfo.

The channel family reads these too (its groups are made of weight layers).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.family import Probe, Site


def _is_param(gm: fx.GraphModule, node) -> bool:
    target = ir.get_attr_target(node)
    if target is None:
        return False
    try:
        return isinstance(ir.fetch_attr(gm, target), torch.nn.Parameter)
    except AttributeError:
        return False


def layer_info(gm: fx.GraphModule, node: fx.Node, full_fqn) -> ir.LayerInfo | None:
    """The LayerInfo of a weight-layer node, else None. full_fqn: local fqn -> fqn in the user's model."""
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
    named = weight.meta.get(ir.ORIGINAL_TARGET, w_target)   # a pruned weight keeps its layer's name
    if named == "weight":  # the captured module is itself the layer (a part, or a bare Linear)
        local = ""
    else:
        local = named[: -len(".weight")] if named.endswith(".weight") else named
    in_shape, dtype = ir.tensor_meta(node.args[x_i])
    out_shape, _ = ir.tensor_meta(node)
    w = ir.fetch_attr(gm, w_target)
    conv = None
    if op == "conv2d":
        a = list(node.args) + [None] * (7 - len(node.args))
        conv = {"stride": list(a[3] or [1, 1]), "padding": list(a[4] or [0, 0]) if not isinstance(a[4], str) else a[4],
                "dilation": list(a[5] or [1, 1]), "groups": int(a[6] or 1)}
    return ir.LayerInfo(fqn=full_fqn(local), op=op, weight_target=w_target,
                        bias_target=bias.target if bias is not None else None,
                        weight_shape=tuple(w.shape), input_shape=in_shape, output_shape=out_shape,
                        dtype=str(dtype or w.dtype).replace("torch.", ""),
                        weight_transposed=op in ("addmm", "mm"), conv_params=conv)


def find_weight_layers(gm: fx.GraphModule, ctx, family: str) -> list[Site]:
    """A site per weight layer, with `sparsify.layer` on its node. A weight read by several ops (tied
    embeddings, shared layers) is one site, at its first use, with LayerInfo.uses > 1: a packed copy
    would no longer be tied to the parameter, so the family keeps it dense."""
    found: list[tuple[fx.Node, ir.LayerInfo]] = []
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        info = layer_info(gm, node, ctx.full_fqn)
        if info is not None:
            found.append((node, info))
            uses[info.weight_target] = uses.get(info.weight_target, 0) + 1
    sites, seen = [], set()
    for node, info in found:
        if info.weight_target in seen:
            continue
        seen.add(info.weight_target)
        info.uses = uses[info.weight_target]
        node.meta[ir.LAYER] = info
        x = node.args[ir.WEIGHT_OPS[node.target][1]]
        dim = 1 if info.op == "conv2d" else -1
        probes = (Probe(info.fqn, x.name, dim, node.name),) if isinstance(x, fx.Node) else ()
        sites.append(Site(key=info.fqn, family=family, fqn=info.fqn, op=info.op, nodes=(node.name,), probes=probes,
                          input_shape=info.input_shape, weight_shape=info.weight_shape,
                          output_shape=info.output_shape, members=(info.fqn,), info=info))
    return sites
