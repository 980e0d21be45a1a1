"""calibrate: run the calibration batches and record statistics of every site's probes (LayerStats)."""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.pipeline import PassContext, PassResult, register_pass
from sparsify.state import LayerStats, update_stats


def run_calibration(gm: fx.GraphModule, ctx: PassContext, probes) -> dict[str, LayerStats]:
    nodes = {n.name: n for n in gm.graph.nodes}
    stats, dims, rows, watch = {}, {}, {}, []
    for probe in probes:
        if probe.key in stats:
            continue
        stats[probe.key] = LayerStats()
        dims[probe.key], rows[probe.key] = probe.dim, probe.rows
        watch.append((nodes[probe.node], probe.key))

    def record(key, value):
        if isinstance(value, torch.Tensor):
            update_stats(stats[key], value, dims[key], rows[key])

    batches = ctx.calibration
    with ir.probes(gm, watch, record), torch.no_grad():
        for i, (args, kwargs) in enumerate(batches):
            ctx.say(f"calibrate batch {i + 1}/{len(batches)}")
            gm(*args, **kwargs)
    return stats


@register_pass("calibrate", phase="analysis", requires=("sites",), provides=("stats",), default=True)
def calibrate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    probes = [p for site in ctx.state.sites.values() for p in site.probes]
    if not probes or not ctx.calibration:
        return PassResult(gm, False, {"probes": 0})
    stats = run_calibration(gm, ctx, probes)
    for key, earlier in ctx.state.stats.items():   # statistics of batches of other shapes, if any
        if key in stats:
            stats[key].absorb(earlier)
    nodes = {n.name: n for n in gm.graph.nodes}
    for p in probes:
        nodes[p.owner].meta[ir.STATS] = stats[p.key]
    ctx.state.stats.update(stats)
    return PassResult(gm, False, {"probes": len(stats), "batches": len(ctx.calibration)})
