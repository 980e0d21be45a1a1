"""`sparsify.compile`: the one entry point."""
from __future__ import annotations

import torch.nn as nn

from .config import Config
from .module import SparseModule
from .pipeline import Pipeline


def compile(model: nn.Module, example_inputs=None, config: Config | None = None, *,
            calibration_data=None, pipeline: Pipeline | None = None, verbose: bool = False,
            plan=None, progress: bool = True, plan_cache: bool = True) -> SparseModule:
    """Make `model` sparse where that is measured faster than dense and within the error budget.

    example_inputs: a tensor, a tuple of positional args, or a dict of keyword args. When None,
      capture and planning happen at the first call (like torch.compile).
    calibration_data: an iterable of such batches to calibrate and verify on (default: the example).
    pipeline: a custom `Pipeline` (default: the registered default passes).
    plan: a Plan made before (or its JSON text, or a path to it): applied as it is, without planning,
      timing or rollback; the sites it names must be this model's (same weights for its masks).
    progress: stage lines on stderr (the site being planned, verification, the end-to-end check);
      verbose=True adds every pass and batch; progress=False is silent.
    plan_cache: store the final plan (and its packed buffers) on disk after planning, and apply a
      stored one when the same model (same weights), config, inputs, kernels, torch and machine
      compile again: no planning, timing or rollback (sparsify/plan_cache.py; also off with
      SPARSIFY_PLAN_CACHE=0). `.plan_cache_info` says what happened.
    Returns a SparseModule with the model's call signature; see .report(), .plan, .graph_module.
    """
    return SparseModule(model, config, example_inputs, calibration_data, pipeline, verbose, plan,
                        progress=progress, plan_cache=plan_cache)
