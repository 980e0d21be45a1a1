"""A compiled model is inference-only: its graph runs under no_grad, and a backward is refused with a reason.

Running under no_grad also spares the dense ops between the sparse ones their autograd bookkeeping.
When the caller could want gradients (grad mode on, and an input or one of the model's parameters
requires grad, as in the original model), the outputs still carry a node whose backward raises, so
`loss.backward()` says why instead of reporting that nothing requires grad, or silently skipping this
model's part of a larger graph.
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

MESSAGE = ("a sparsify-compiled model is inference-only: it runs in eval mode and its sparse ops have no "
           "backward. Train the original model, then compile it again.")


class NoBackward(torch.autograd.Function):
    """out (computed without autograd) tied to an input that requires grad: its backward raises."""

    @staticmethod
    def forward(ctx, out, anchor, message):
        ctx.message = message
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(ctx.message)


def _grad_anchor(fn, args, kwargs) -> torch.Tensor | None:
    if not torch.is_grad_enabled():
        return None
    for a in pytree.tree_leaves((args, kwargs)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return a
    if isinstance(fn, torch.nn.Module):
        return next((p for p in fn.parameters() if p.requires_grad), None)
    return None


def run(fn, args: tuple, kwargs: dict):
    """fn(*args, **kwargs) under no_grad; outputs marked so that a backward through them raises MESSAGE."""
    anchor = _grad_anchor(fn, args, kwargs)
    with torch.no_grad():
        out = fn(*args, **kwargs)
    if anchor is not None:
        out = pytree.tree_map_only(torch.Tensor,
                                   lambda t: NoBackward.apply(t, anchor, MESSAGE) if t.is_floating_point() else t, out)
    return out
