"""The channel family: structured pruning of coupled channel groups (layers physically shrink).

A site is a channel group (groups.py) with at least one producer whose Config pattern is
`Channel(keep, criterion)`; its key is the group's producers, comma-separated. Planning is joint:
groups are decided one after another on a scratch copy of the graph (a shallow copy: the analysed
graph is never changed), each pruned there so that later groups are scored and measured with the
earlier ones applied. Per group: every member layer must ask for Channel (else it is refused, with
the reason); the most conservative keep among the producers wins; the channels are scored by the
criterion and the best round(keep * C) (at least one) kept; the cost is the largest relative output
error of a layer that reads the pruned channels, on the calibration batch. The plan keeps the kept
channel indices, so the rewrite prunes the same channels from the plan alone (and a rolled-back
group is simply not pruned when the driver rebuilds).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.family import Family, Probe, Site, new_plan, register_family
from sparsify.metrics import rel_l2
from sparsify.patterns import Channel
from sparsify.plan import PRUNED
from sparsify.state import Prepared

from ..weight.layers import layer_info
from .groups import ChannelGroup, find_channel_groups
from .op_rules import _conv_spec
from .prune import _OUT_MARK, PASS, channel_scores, node_values, prune_channel_group


def _key(group: ChannelGroup, ctx) -> str:
    return ",".join(ctx.full_fqn(f) for f in group.producer_fqns)


def _input_of(node: fx.Node):
    """(input node, channel dim) of a weight layer (linear-like or conv)."""
    if node.target in ir.WEIGHT_OPS:
        op, x_i, _, _ = ir.WEIGHT_OPS[node.target]
        return node.args[x_i], (1 if op == "conv2d" else -1)
    spec = _conv_spec(node)
    return spec["x"], spec["cin"]


def _channel_words(unit: int, weights: tuple) -> str:
    """What a pruned group channel is, in the report's words."""
    if len(weights) > 1 and len(set(weights)) > 1:   # grouped-query q|k|v: a k/v head with its q heads
        return f"blocks of {'+'.join(str(unit * w) for w in weights)} channels ({len(weights)} packed parts)"
    what = f"heads of {unit} channels" if unit > 1 else "output channels"
    return what + (f" in each of {len(weights)} packed parts" if len(weights) > 1 else "")


class ChannelFamily(Family):
    name = "channel"
    field = "weight"
    patterns = (Channel,)

    def find_sites(self, gm, ctx) -> list[Site]:
        sites = []
        for g in find_channel_groups(gm):
            producers = [ctx.full_fqn(f) for f in g.producer_fqns]
            if not producers or not any(isinstance(ctx.config.pattern_for(f, "weight")[0], Channel) for f in producers):
                continue
            probes = []
            for n in g.producers:
                info = n.meta.get(ir.LAYER) or layer_info(gm, n, ctx.full_fqn)
                if info is not None:
                    n.meta.setdefault(ir.LAYER, info)
                x, dim = _input_of(n)
                if isinstance(x, fx.Node):
                    probes.append(Probe(ctx.full_fqn(g.fqn_of(n)), x.name, dim, n.name))
            seed = g.seed
            info = seed.meta.get(ir.LAYER)
            sites.append(Site(key=_key(g, ctx), family=self.name, fqn=producers[0], op="channel group",
                              nodes=tuple(n.name for n in g.producers), probes=tuple(probes),
                              input_shape=info.input_shape if info else None,
                              weight_shape=info.weight_shape if info else None,
                              output_shape=info.output_shape if info else None,
                              members=tuple(producers), info=g))
        return sites

    # ---- planning: joint, group after group on a scratch copy --------------------------------
    def plan(self, gm, sites, ctx) -> None:
        scratch = ir.fresh_copy(gm)
        groups = {_key(g, ctx): g for g in find_channel_groups(scratch)}
        dense = None   # consumer outputs before any pruning: taken only once something will be pruned
        for site in sites:
            requested, source = self.requested(site, ctx)
            lp = new_plan(self, site, requested, source)
            ctx.state.plans[site.key] = lp
            site.node(gm).meta[ir.PLAN] = lp
            g = groups[site.key]
            keep = self._decide(scratch, g, lp, ctx)
            if keep is None:
                continue
            ctx.say(f"prune {g.name}: keep {len(keep)}/{g.channels} channels{g.extent}")
            if dense is None and ctx.calibration:
                dense = node_values(scratch, [n for h in groups.values() if h.prunable for n in h.consumers],
                                    *ctx.calibration[0])
            prune_channel_group(scratch, g, keep)
            self._record(g, lp, keep, ctx)
            if dense is not None:
                # now, before a later group shrinks these consumers' own outputs
                self._measure(scratch, g, dense, lp, ctx)

    def _decide(self, scratch, g: ChannelGroup, lp, ctx) -> torch.Tensor | None:
        """The channels to keep, or None with the reason on the plan."""
        if not g.prunable:
            lp.reason = f"channel pruning not applied: {g.reason}"
            return None
        patterns = {}
        for f in g.layer_fqns:
            pattern, source = ctx.config.pattern_for(ctx.full_fqn(f), "weight")
            if not isinstance(pattern, Channel):
                lp.reason = (f"channel pruning not applied: member layer {ctx.full_fqn(f)} has weight pattern "
                             f"{pattern.describe()} ({source}), not Channel")
                return None
            patterns[f] = pattern
        # producers decide; where their Channel patterns differ, the most conservative keep wins
        chosen = max((patterns[f] for f in g.producer_fqns), key=lambda p: p.keep)
        lp.pattern = chosen
        k = max(1, int(round(chosen.keep * g.channels)))
        if k >= g.channels:
            lp.reason = f"{chosen.describe()} keeps all {g.channels} channels: nothing to prune"
            return None
        scores = channel_scores(scratch, g, chosen.criterion, seed=ctx.config.seed)
        return torch.sort(scores.topk(k).indices).values

    def _record(self, g: ChannelGroup, lp, keep: torch.Tensor, ctx) -> None:
        k, members = len(keep), [ctx.full_fqn(x) for x in g.fqns]
        lp.status, lp.kernel, lp.sparsity = PRUNED, "dense (shrunk)", 1 - k / g.channels
        lp.params = {"keep": keep.tolist(), "channels": g.channels}
        lp.reason = (f"channel pruned: kept {k}/{g.channels} {_channel_words(g.unit, g.weights)} together with "
                     f"{', '.join(members[:6])}; speed is checked at model level (end to end), not per site")

    def _measure(self, scratch, g: ChannelGroup, dense: dict, lp, ctx) -> None:
        """The largest relative output error of the group's consumers against the unpruned graph (this
        group and the ones pruned before it), on the calibration batch; the pruned graph must run."""
        try:
            after = node_values(scratch, g.consumers, *ctx.calibration[0])
        except Exception as e:
            raise RuntimeError(f"after pruning channel group {g.name}, the graph no longer runs on the "
                               f"calibration batch: {type(e).__name__}: {e}") from e
        errors = [(rel_l2(after[n.name], dense[n.name]), g.fqn_of(n)) for n in g.consumers
                  if n.name in after and n.name in dense and after[n.name].shape == dense[n.name].shape]
        if errors:
            err, where = max(errors)
            lp.layer_error = err
            lp.reason += (f"; output error of {ctx.full_fqn(where)}, which reads these channels: {err:.3g} "
                          f"(calibration batch; this group and those pruned before it)")
        else:
            lp.reason += ("; the output error where these channels are read is not measured (no calibration "
                          "batch, or an earlier prune already changed that layer's output shape)")

    # ---- rewrite from the plan ---------------------------------------------------------------
    def prepare(self, gm, site, plan, ctx) -> Prepared:
        return Prepared()   # the kept channels are in the plan itself

    def rewrite_all(self, gm, ctx) -> int:
        """Prune, in plan order, every group planned PRUNED, keeping the plan's channels. The groups are
        found once, before the first prune (a prune changes shapes); later prunes translate their
        offsets through what earlier ones removed (prune.py)."""
        plans = [lp for lp in ctx.state.plans.values() if lp.family == self.name and lp.status == PRUNED]
        if not plans:
            return 0
        groups = {_key(g, ctx): g for g in find_channel_groups(gm)}
        done = 0
        for lp in plans:
            g = groups.get(lp.fqn)
            if g is None:
                raise KeyError(f"the plan prunes channel group {lp.fqn!r}, which this graph does not have "
                               f"(groups: {sorted(groups)[:8]})")
            if _already_pruned(g):
                continue
            if g.channels != lp.params.get("channels"):
                raise ValueError(f"channel group {lp.fqn!r} has {g.channels} channels here, the plan was made for "
                                 f"{lp.params.get('channels')}")
            prune_channel_group(gm, g, torch.tensor(lp.params["keep"], dtype=torch.long))
            done += 1
        return done


def _already_pruned(group: ChannelGroup) -> bool:
    # the seed only: another producer may own other channels too (a residual meeting a concat)
    prov = group.seed.meta.get(ir.FROM) if group.seed is not None else None
    return prov is not None and prov.pass_name == PASS and _OUT_MARK in prov.detail


register_family(ChannelFamily())
