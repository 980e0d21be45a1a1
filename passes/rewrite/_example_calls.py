"""Ops of the graph called outside it, for the lower passes that time one form of a piece of graph
against another (assign_layouts, fuse_pairs, lower_attention): weights are the graph's own
(get_attr), every other tensor input is random of the shape and dtype the graph records; and the
timing of the two forms itself."""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
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



def faster_form(ctx, key: tuple, kept: tuple, other: tuple, switched: str, kept_as: str) -> tuple[bool, str]:
    """(is `other` faster?, what was measured): the graph's form kept = (label, fn) and the other
    (label, fn), interleaved through the compile's cost model (cached under `key` + each label)."""
    costs = ctx.state.costs or CostModel(ctx.device, ctx.config.timing_repeats)
    ctx.state.costs = costs
    (kept_label, kept_fn), (other_label, other_fn) = kept, other
    t_kept, t_other = costs.compare([(costs.key(*key, kept_label), kept_fn), (costs.key(*key, other_label), other_fn)])
    if t_kept.ms is None or t_other.ms is None:
        return False, f"not timed ({t_kept.error or t_other.error}): {kept_as}"
    faster = t_other.ms < t_kept.ms
    return faster, (f"{kept_label} {t_kept.ms:.4f} ms, {other_label} {t_other.ms:.4f} ms: "
                    + (switched if faster else kept_as))
