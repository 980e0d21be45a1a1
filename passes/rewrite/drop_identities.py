"""drop_identities: remove ops that return their input unchanged in inference, such as an eval-mode
dropout (`aten.dropout(x, p, train=False)`), which torch.export keeps in the graph.

Runs before analysis ("canonicalize"): a dropout between a layer and the residual add that follows
it (BERT's `dropout(dense(h)) + h`) would otherwise stop fuse_epilogues from folding the add into the
sparse kernel, and cost a pass over memory of its own. A dropout in training mode (train=True, or not
a constant) is left as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten
PASS = "drop_identities"
_DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default)


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input `node` returns unchanged in inference, or None."""
    if node.op != "call_function" or node.target not in _DROPOUTS:
        return None
    train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None)
    x = node.args[0] if node.args else node.kwargs.get("input")
    return x if train is False and isinstance(x, fx.Node) else None


@register_pass(PASS, phase="canonicalize", default=True)
def drop_identities(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    dropped = 0
    for node in list(gm.graph.nodes):
        x = _identity_input(node)
        if x is not None:
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(dropped), info={"dropped": dropped})
