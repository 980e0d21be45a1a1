"""Model-level sensitivity: the output error of the captured graph with some weights changed.

A candidate that can be expressed as a change of parameters (a masked weight) is judged by running
the graph with it substituted (torch.func.functional_call), so neither the graph nor the user's
parameters change. `accept` keeps a chosen substitution in place, so later sites are judged with the
earlier choices applied: the error is accumulated, as the model will run.

A candidate that changes what a node computes rather than a weight (an activation made sparse) is a
`NodeEdit` key in the substitution: the graph is run with the edit's function applied to that node's
value (and the values of the nodes it names as inputs) in place of the value, on a copy of the graph.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch.func import functional_call

from . import ir
from .metrics import model_error


@dataclasses.dataclass(frozen=True)
class NodeEdit:
    """A substitution key: node `node`'s value becomes fn(value, *values of `inputs`) (fn is the
    substitution's value)."""

    node: str
    inputs: tuple = ()


def _edited(gm: fx.GraphModule, edits: dict) -> fx.GraphModule:
    """A copy of gm where every NodeEdit's function replaces its node's value for all its users."""
    new = ir.fresh_copy(gm)
    nodes = {n.name: n for n in new.graph.nodes}
    for edit, fn in edits.items():
        node = nodes[edit.node]
        inputs = [nodes[i] for i in edit.inputs]
        last = max([node] + inputs, key=lambda n: list(new.graph.nodes).index(n))
        with new.graph.inserting_after(last):
            call = new.graph.call_function(fn, (node, *inputs))
        node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
    new.recompile()
    return new

MAX_BATCHES = 4


class ModelSensitivity:
    def __init__(self, gm: fx.GraphModule, batches, metric="rel_l2", output=None):
        self.gm, self.metric, self.output = gm, metric, output
        self.batches = list(batches)[:MAX_BATCHES]
        self.chosen: dict[str, torch.Tensor] = {}
        self._chosen_error: float | None = 0.0    # the error with `chosen` applied, when known
        self._last: tuple[dict, float] | None = None   # the last measured substitution and its error
        self._params = dict(gm.named_parameters())
        self._params.update(gm.named_buffers())
        with torch.no_grad():
            self.dense = [gm(*a, **k) for a, k in self.batches]

    def _changes_nothing(self, extra: dict[str, torch.Tensor]) -> bool:
        """Every substituted tensor equals the one in effect: a model pruned before it was compiled
        gets its own weights back from a mask, and its error needs no forward."""
        for name, t in extra.items():
            if isinstance(name, NodeEdit):
                if self.chosen.get(name) is not t:
                    return False
                continue
            current = self.chosen.get(name, self._params.get(name))
            if current is None or current.shape != t.shape or current.dtype != t.dtype or not torch.equal(current, t):
                return False
        return True

    def error(self, extra: dict[str, torch.Tensor] | None = None) -> float:
        extra = extra or {}
        if self._chosen_error is not None and self._changes_nothing(extra):
            return self._chosen_error
        subst = {**self.chosen, **extra}
        weights = {k: v for k, v in subst.items() if not isinstance(k, NodeEdit)}
        edits = {k: v for k, v in subst.items() if isinstance(k, NodeEdit)}
        gm = _edited(self.gm, edits) if edits else self.gm
        with torch.no_grad():
            outs = [functional_call(gm, weights, args=a, kwargs=k, strict=False)
                    for a, k in self.batches]
        err = model_error(self.dense, outs, self.metric, self.output)
        if not extra:
            self._chosen_error = err
        self._last = (extra, err)
        return err

    def accept(self, substitute: dict[str, torch.Tensor]) -> None:
        last = self._last
        if last is not None and last[0].keys() == substitute.keys() and \
                all(last[0][k] is substitute[k] for k in substitute):
            self._chosen_error = last[1]          # measured just now, with this substitution
        elif not self._changes_nothing(substitute):
            self._chosen_error = None
        self.chosen.update(substitute)
