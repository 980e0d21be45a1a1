"""Ops of the graph called outside it, for the lower passes that time one form of a piece of graph
against another (assign_layouts, fuse_pairs): weights are the graph's own (get_attr), every other
tensor input is random of the shape and dtype the graph records."""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir

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

