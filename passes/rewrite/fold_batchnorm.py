"""fold_batchnorm: fold an inference-mode BatchNorm that follows a conv2d into the conv's weight and bias.

    BN(conv(x, W, b)) = conv(x, W * s, (b - mean) * s + beta),   s = gamma / sqrt(running_var + eps)

per output channel, so the pair becomes one conv. Runs before analysis ("canonicalize"): the layer
that analysis scores, prunes and times is the folded conv, whose weight magnitudes include the BN
scale the model really applies, and the activation / residual that followed the BN now directly
follow the conv, where fuse_epilogues can fold them into a sparse kernel.

The folded weight replaces the conv's parameter on the captured graph's own container module (same
name, so the layer keeps its fqn); the user's modules and tensors are never written. Not folded, and
left as they are: BN in training mode, BN without running statistics, a conv whose output has other
users, a conv weight or bias shared with another op or computed in the graph.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn

from sparsify import ir
from sparsify.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten
PASS = "fold_batchnorm"


def _bn_params(gm: fx.GraphModule, bn: fx.Node):
    """(gamma, beta, mean, var, eps) of an inference-mode BN node, or None if it cannot be folded."""
    if bn.op == "call_function" and bn.target == aten.batch_norm.default:
        a = list(bn.args) + [None] * (9 - len(bn.args))
        training = bn.kwargs.get("training", a[5])
        eps = bn.kwargs.get("eps", a[7])
        tensors = []
        for arg in a[1:5]:
            if arg is None:
                tensors.append(None)
                continue
            target = ir.get_attr_target(arg)
            if target is None:
                return None
            tensors.append(ir.fetch_attr(gm, target))
        gamma, beta, mean, var = tensors
        if training or mean is None or var is None or eps is None:
            return None
        return gamma, beta, mean, var, float(eps)
    if bn.op == "call_module":
        mod = gm.get_submodule(bn.target)
        if (isinstance(mod, nn.BatchNorm2d) and not mod.training and mod.running_mean is not None
                and mod.running_var is not None):
            return mod.weight, mod.bias, mod.running_mean, mod.running_var, float(mod.eps)
    return None


def _own_param(readers: Counter, node) -> str | None:
    """get_attr target of a parameter read by this one node only, else None.
    readers: get_attr nodes per target in the graph."""
    target = ir.get_attr_target(node)
    if target is None or len(node.users) != 1:
        return None
    return target if readers[target] == 1 else None


def _container(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str] | None:
    """The module holding `target` and the attribute name, if the graph module owns that module.

    Capture builds plain nn.Module containers for the parameters it reads (torch.export's unlifting,
    fx's attribute copies); any other module class is the user's own object, shared with their model."""
    parent, _, name = target.rpartition(".")
    mod = gm.get_submodule(parent) if parent else gm
    if mod is not gm and type(mod) is not nn.Module:
        return None
    return mod, name


def _fold_one(gm: fx.GraphModule, conv: fx.Node, bn: fx.Node, readers: Counter) -> str | None:
    """Fold `bn` into `conv`; returns why not (with nothing changed), or None when folded."""
    params = _bn_params(gm, bn)
    if params is None:
        return "batch norm in training mode or without running statistics"
    gamma, beta, mean, var, eps = params
    a = list(conv.args) + [None] * (7 - len(conv.args))
    w_target = _own_param(readers, a[1])
    if w_target is None:
        return "conv weight is shared or computed"
    w_home = _container(gm, w_target)
    if w_home is None:
        return f"the weight's module {w_target.rpartition('.')[0]!r} belongs to the user's model"
    w_mod, w_name = w_home
    if a[2] is not None:
        b_target = _own_param(readers, a[2])
        b_home = _container(gm, b_target) if b_target is not None else None
        if b_home is None:
            return "conv bias is shared, computed or owned by the user's model"
    else:
        b_target, b_home = None, (w_mod, "bias" if not hasattr(w_mod, "bias") else f"{w_name}_bn_bias")
        if hasattr(*b_home):
            return f"no free attribute name for the folded bias next to {w_target!r}"
    w = ir.fetch_attr(gm, w_target)
    if tuple(mean.shape) != (w.shape[0],):
        return f"batch norm over {tuple(mean.shape)} channels after a conv with {w.shape[0]} outputs"

    with torch.no_grad():
        scale = var.detach().double().add(eps).rsqrt()
        if gamma is not None:
            scale = scale * gamma.detach().double()
        b64 = ir.fetch_attr(gm, b_target).detach().double() if b_target else torch.zeros_like(scale)
        new_b = (b64 - mean.detach().double()) * scale
        if beta is not None:
            new_b = new_b + beta.detach().double()
        new_w = w.detach().double() * scale.reshape(-1, *([1] * (w.dim() - 1)))
    # New Parameter objects on the graph's own containers: nothing the user holds is written.
    setattr(w_mod, w_name, nn.Parameter(new_w.to(w.dtype), requires_grad=False))
    setattr(b_home[0], b_home[1], nn.Parameter(new_b.to(w.dtype), requires_grad=False))
    if b_target is None:
        prefix = w_target.rpartition(".")[0]
        with gm.graph.inserting_before(conv):
            bias_node = gm.graph.get_attr(f"{prefix}.{b_home[1]}" if prefix else b_home[1])
        args = list(conv.args)
        if len(args) > 2:
            args[2] = bias_node
        else:
            args.append(bias_node)
        conv.args = tuple(args)

    bn.replace_all_uses_with(conv)
    inputs = [n for n in bn.all_input_nodes if n is not conv]
    gm.graph.erase_node(bn)
    for n in inputs:
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    conv.meta[ir.FROM] = ir.Provenance(PASS, "conv2d+batch_norm->conv2d", bn.name, ir.node_fqn(conv),
                                       f"folded batch norm {ir.node_fqn(bn) or bn.name} into the conv")
    return None


@register_pass(PASS, phase="canonicalize", default=True)
def fold_batchnorm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    folded, skipped = 0, {}
    # Folding only adds fresh bias names and removes BN inputs, so counts of conv weights stay right.
    readers = Counter(n.target for n in gm.graph.nodes if n.op == "get_attr")
    for bn in list(gm.graph.nodes):
        is_bn = (bn.op == "call_function" and bn.target == aten.batch_norm.default) or (
            bn.op == "call_module" and isinstance(gm.get_submodule(bn.target), nn.BatchNorm2d))
        if not is_bn or not bn.args or not isinstance(bn.args[0], fx.Node):
            continue
        conv = bn.args[0]
        if conv.op != "call_function" or conv.target != aten.conv2d.default or len(conv.users) != 1:
            continue
        why = _fold_one(gm, conv, bn, readers)
        if why is None:
            folded += 1
        else:
            skipped[ir.node_fqn(bn) or bn.name] = why
    if folded:
        gm.graph.lint()
        gm.recompile()
    for where, why in skipped.items():
        ctx.state.note(PASS, where, f"not folded: {why}")
    return PassResult(gm, modified=bool(folded), info={"folded": folded, "not_folded": len(skipped)})
