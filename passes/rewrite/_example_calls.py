"""Ops of the graph called outside it, for the lower passes that time one form of a piece of graph
against another (assign_layouts, fuse_pairs, lower_attention): weights are the graph's own
(get_attr), every other tensor input is random of the shape and dtype the graph records; and the
timing of the two forms itself."""
from __future__ import annotations

import functools

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen import registry
from sparsify.timing import CostModel

GIVEN = object()   # an argument supplied at call time (the previous op's output)


def call_args(gm: fx.GraphModule, node: fx.Node, gen: torch.Generator, device: torch.device,
              given: fx.Node | None = None) -> tuple[list, dict]:
    """(args, kwargs) of `node` as values; the input `given` reads as GIVEN."""
    def value(a):
        if not isinstance(a, fx.Node):
            return a
        if a is given:
            return GIVEN
        if a.op == "get_attr":
            return ir.fetch_attr(gm, a.target)
        shape, dtype = ir.tensor_meta(a)
        if shape is None:
            raise ValueError(f"{node.name}: input {a.name} has no recorded shape to make an example of")
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    return [value(a) for a in node.args], {k: value(v) for k, v in node.kwargs.items()}


def substitute(values, out):
    """values with GIVEN replaced by `out`."""
    return [out if v is GIVEN else v for v in values]


def op_signature(node: fx.Node) -> tuple:
    """What a sparse op's time depends on besides its input's shape: kernel and version, N, K, epilogue."""
    spec = registry.spec_of(node.target)
    return (spec.name, spec.version, ir.op_arg(node, "n_out")[1], ir.op_arg(node, "k_in")[1],
            ir.op_arg(node, "activation")[1], ir.op_arg(node, "bias")[1] is not None,
            ir.op_arg(node, "residual")[1] is not None, ir.op_arg(node, "out_dtype")[1])


def faster_form(ctx, key: tuple, labels: tuple[str, str], make, switched: str, kept_as: str) -> tuple[bool, str]:
    """(is the other form faster?, what was measured): the graph's form and the other, labels[0] and
    labels[1], interleaved through the compile's cost model (cached under `key` + each label).
    make() -> (the kept form's fn, the other's) builds their example inputs; it runs only when the
    cost cache has no answer (a warm compile builds none)."""
    costs = ctx.state.costs or CostModel(ctx.device, ctx.config.timing_repeats)
    ctx.state.costs = costs
    kept_label, other_label = labels
    forms = functools.cache(make)
    t_kept, t_other = costs.compare([(costs.key(*key, kept_label), lambda: forms()[0]()),
                                     (costs.key(*key, other_label), lambda: forms()[1]())])
    if t_kept.ms is None or t_other.ms is None:
        return False, f"not timed ({t_kept.error or t_other.error}): {kept_as}"
    faster = t_other.ms < t_kept.ms
    return faster, (f"{kept_label} {t_kept.ms:.4f} ms, {other_label} {t_other.ms:.4f} ms: "
                    + (switched if faster else kept_as))
