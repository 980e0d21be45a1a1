"""plan_sites: every family plans its sites (a LayerPlan each, in graph order) under the one budget.

The families' `plan` hooks do the work (sparsify/family.py: the default measures each candidate,
times it against dense through the cost model and picks within the error budget). This pass sets up
what they share: the cost model and, with Config.model_sensitivity, the model-level error tracker
that accumulates earlier choices. The model-level budget is enforced afterwards by verification,
which rolls sites back.
"""
from __future__ import annotations

import torch.fx as fx

from sparsify.codegen import registry
from sparsify.family import families
from sparsify.pipeline import PassContext, PassResult, register_pass
from sparsify.sensitivity import ModelSensitivity
from sparsify.timing import CostModel


@register_pass("plan_sites", phase="analysis", requires=("sites",), provides=("plan", "prepared"), default=True)
def plan_sites(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    state, cfg = ctx.state, ctx.config
    registry.check_kernel_names(cfg.kernels)
    state.costs = state.costs or CostModel(ctx.device, cfg.timing_repeats)
    state.plans.clear()
    state.prepared.clear()
    sites = list(state.sites.values())
    if cfg.model_sensitivity and ctx.calibration and sites:
        # Config.output selects from the model's output; a part captured alone (ctx.part_prefix) has
        # its own outputs, all of which it is judged on here (verification judges the model's)
        output = cfg.output if not ctx.part_prefix else None
        state.sensitivity = ModelSensitivity(gm, ctx.calibration, cfg.metric, output)
    for fam in families():
        mine = [s for s in sites if s.family == fam.name]
        if mine:
            fam.plan(gm, mine, ctx)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ranked = sorted(state.plans.items(), key=lambda kv: order.get(state.sites[kv[0]].nodes[0], len(order)))
    state.plans.clear()
    state.plans.update(ranked)
    state.sensitivity = None    # holds the dense outputs of every batch: not needed past planning
    return PassResult(gm, modified=False, info={"sites": len(state.plans)})
