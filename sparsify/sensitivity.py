"""Model-level sensitivity: the output error of the captured graph with some weights changed.

A candidate that can be expressed as a change of parameters (a masked weight) is judged by running
the graph with it substituted (torch.func.functional_call), so neither the graph nor the user's
parameters change. `accept` keeps a chosen substitution in place, so later sites are judged with the
earlier choices applied: the error is accumulated, as the model will run.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.func import functional_call

from .metrics import model_error

MAX_BATCHES = 4


class ModelSensitivity:
    def __init__(self, gm: fx.GraphModule, batches, metric="rel_l2", output=None):
        self.gm, self.metric, self.output = gm, metric, output
        self.batches = list(batches)[:MAX_BATCHES]
        self.chosen: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self.dense = [gm(*a, **k) for a, k in self.batches]

    def error(self, extra: dict[str, torch.Tensor] | None = None) -> float:
        weights = {**self.chosen, **(extra or {})}
        with torch.no_grad():
            outs = [functional_call(self.gm, weights, args=a, kwargs=k, strict=False)
                    for a, k in self.batches]
        return model_error(self.dense, outs, self.metric, self.output)

    def accept(self, substitute: dict[str, torch.Tensor]) -> None:
        self.chosen.update(substitute)
