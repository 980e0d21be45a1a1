"""prune_channels: the pass that prunes channel groups where the Config asks for it.

It is in the default pipeline, right after find_layers (sparsify.passes puts it there), and acts
only on layers whose weight pattern is `Channel(keep, criterion)`: for every channel group
(groups.py) that is prunable and whose member layers all have a Channel pattern, it scores the
channels, keeps the best round(keep * C) (at least one) and slices every member of the group
(prune.py). Where no layer asks for Channel it changes nothing and runs no forward. With a
calibration batch it states what each prune costs: the largest relative output error of a layer
that reads the pruned channels. It writes `ctx.state["channel_groups_pruned"]` and
`ctx.state["channel_groups_skipped"]` (producer fqn -> why not). It is idempotent: a group whose
producers' output channels were already pruned by this pass is left alone on a second run.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.metrics import rel_l2
from sparsify.patterns import Channel
from sparsify.pipeline import PassContext, PassResult, register_pass

from .groups import ChannelGroup, find_channel_groups
from .prune import _OUT_MARK, PASS, channel_scores, node_values, prune_channel_group


def _measure(gm: fx.GraphModule, group: ChannelGroup, dense: dict, ctx: PassContext, records: list) -> None:
    """Run the calibration batch on the graph just pruned (it must still run) and record the largest
    relative output error of the group's consumers against the unpruned graph (this group and the
    ones pruned before it)."""
    try:
        after = node_values(gm, group.consumers, *ctx.calibration[0])
    except Exception as e:
        raise RuntimeError(f"after pruning channel group {group.name}, the graph no longer runs on the "
                           f"calibration batch: {type(e).__name__}: {e}") from e
    errors = [(rel_l2(after[n.name], dense[n.name]), group.fqn_of(n)) for n in group.consumers
              if n.name in after and n.name in dense and after[n.name].shape == dense[n.name].shape]
    if errors:
        err, where = max(errors)
        for record in records:
            record.update(consumer_error=err, consumer=ctx.full_fqn(where))


# ---- the pass -------------------------------------------------------------------------------
def _already_pruned(group: ChannelGroup) -> bool:
    # the seed only: another producer may own other channels too (a residual meeting a concat)
    prov = group.seed.meta.get(ir.FROM) if group.seed is not None else None
    return prov is not None and prov.pass_name == PASS and _OUT_MARK in prov.detail


@register_pass(PASS, kind="rewrite")
def prune_channels(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Prune every prunable channel group whose member layers all ask for Channel(keep)."""
    groups = find_channel_groups(gm)
    skipped = ctx.state.setdefault("channel_groups_skipped", {})
    done = ctx.state.setdefault("channel_groups_pruned", {})
    pruned, removed = 0, 0
    dense = None   # consumer outputs before any pruning: taken only once something will be pruned
    for g in groups:
        producers = [ctx.full_fqn(f) for f in g.producer_fqns]
        if not g.prunable:
            for f in producers:
                skipped[f] = g.reason
            continue
        patterns, refusal = {}, None
        for f in g.layer_fqns:
            pattern, source = ctx.config.pattern_for(ctx.full_fqn(f), "weight")
            if not isinstance(pattern, Channel):
                refusal = (f"member layer {ctx.full_fqn(f)} has weight pattern {pattern.describe()} "
                           f"({source}), not Channel")
                break
            patterns[f] = pattern
        if refusal is not None:
            for f in producers:
                skipped[f] = refusal
            continue
        if _already_pruned(g):
            continue
        # producers decide; where their Channel patterns differ, the most conservative keep wins
        chosen = max((patterns[f] for f in g.producer_fqns), key=lambda p: p.keep)
        k = max(1, int(round(chosen.keep * g.channels)))
        if k >= g.channels:
            continue
        ctx.say(f"prune {g.name}: keep {k}/{g.channels} channels{g.extent}")
        if dense is None and ctx.calibration:
            # to state what each pruned group costs where it is read
            dense = node_values(gm, [n for h in groups if h.prunable for n in h.consumers], *ctx.calibration[0])
        s = channel_scores(gm, g, chosen.criterion, seed=ctx.config.seed)
        keep_idx = torch.sort(s.topk(k).indices).values
        summary = prune_channel_group(gm, g, keep_idx)
        removed += summary["params_removed"]
        for f in producers:
            done[f] = {"kept": k, "channels": g.channels, "unit": g.unit, "weights": g.weights,
                       "members": [ctx.full_fqn(x) for x in g.fqns], "pattern": chosen.describe()}
        for n in [*g.consumers, *(u for u, role in g.others if role == "depthwise")]:
            info = n.meta.get(ir.LAYER)
            if info is not None and ir.STATS in n.meta and "stats" in ctx.state:
                ctx.state["stats"][info.fqn] = n.meta[ir.STATS]
        pruned += 1
        if dense is not None:
            # now, before a later group shrinks these consumers' own outputs
            _measure(gm, g, dense, ctx, [done[f] for f in producers])
    return PassResult(gm, modified=bool(pruned),
                      info={"groups": len(groups), "pruned": pruned, "params_removed": removed,
                            "skipped": sum(not g.prunable for g in groups)})
