"""find_sites: every family's sites in the graph, into CompileState.sites and `sparsify.site` meta.

Families are asked in registration order; a site covering a node that an earlier family's site
covers is dropped (a note says which), so two families never rewrite the same node."""
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
    claimed: dict[str, str] = {}     # node name -> key of the site that covers it
    for fam in families():
        if not fam.wanted(ctx.config):
            continue
        found = []
        for site in fam.find_sites(gm, ctx):
            taken = [claimed[n] for n in site.nodes if n in claimed]
            if taken:
                ctx.state.note("find_sites", site.fqn, f"not a {fam.name} site: {sites[taken[0]].family} site "
                                                       f"{taken[0]!r} covers its nodes")
                continue
            found.append(site)
        for site in found:
            if site.key in sites:
                raise ValueError(f"family {fam.name} found a site {site.key!r} that family "
                                 f"{sites[site.key].family} found already: site keys must be unique")
            sites[site.key] = site
            claimed.update(dict.fromkeys(site.nodes, site.key))
            site.node(gm).meta[ir.SITE] = site
        counts[fam.name] = len(found)
    return PassResult(gm, modified=False, info={"sites": counts})
