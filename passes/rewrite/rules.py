"""apply_rewrite_rules: run every rule registered with `sparsify.pipeline.register_rule`."""
from __future__ import annotations

import torch.fx as fx

from sparsify.pipeline import PassContext, PassResult, register_pass, registered_rules


@register_pass("apply_rewrite_rules", phase="rewrite", default=True)
def apply_rewrite_rules(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    counts = {rule.name: rule.apply(gm, ctx, "apply_rewrite_rules") for rule in registered_rules()}
    return PassResult(gm, modified=any(counts.values()), info={"matches": counts})
