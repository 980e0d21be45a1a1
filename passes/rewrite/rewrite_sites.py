"""rewrite_sites: every family rewrites the sites it planned, from the plan and the prepared data.

Runs on a fresh copy of the analysed graph for every build (the driver re-runs the rewrite phase
when it rolls a site back), and on a new capture of the same model with a plan made before: so a
family reads only CompileState.sites (found on this graph), .plans and .prepared here.
"""
from __future__ import annotations

import torch.fx as fx

from sparsify.family import families
from sparsify.pipeline import PassContext, PassResult, register_pass


@register_pass("rewrite_sites", phase="rewrite", requires=("sites", "plan"), default=True)
def rewrite_sites(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {}
    for fam in families():
        if fam.supported:
            counts[fam.name] = fam.rewrite_all(gm, ctx)
    if any(counts.values()):
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=any(counts.values()), info={"rewritten": counts})
