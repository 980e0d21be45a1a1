"""find_sites: every family's sites in the graph, into CompileState.sites and `sparsify.site` meta."""
from __future__ import annotations

import torch.fx as fx

from sparsify import ir
from sparsify.family import families
from sparsify.pipeline import PassContext, PassResult, register_pass


@register_pass("find_sites", phase="analysis", provides=("sites",), default=True)
def find_sites(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    sites = ctx.state.sites
    sites.clear()
    counts = {}
    for fam in families():
        if not fam.wanted(ctx.config):
            continue
        found = fam.find_sites(gm, ctx)
        for site in found:
            if site.key in sites:
                raise ValueError(f"family {fam.name} found a site {site.key!r} that family "
                                 f"{sites[site.key].family} found already: site keys must be unique")
            sites[site.key] = site
            site.node(gm).meta[ir.SITE] = site
        counts[fam.name] = len(found)
    return PassResult(gm, modified=False, info={"sites": counts})
