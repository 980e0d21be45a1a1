"""Channel groups: which channels of which tensors must be pruned together (a dependency graph).

Structured channel pruning removes channel c of a producer layer (row c of its weight, bias[c]).
That is only consistent if every tensor that carries channel c is sliced the same way: the norm
after it (weight, bias, running stats), a depthwise conv (its weight rows, bias and `groups`), the
residual add it meets (and so the producer of the other operand), any per-channel parameter it is
multiplied with, and finally the input columns of every consumer layer. This module finds those
sets, in the manner of Torch-Pruning's DepGraph but over our ATen-level fx graphs.

The unit is a *slot*: `(node, dim)`, "dimension `dim` of the value of `node` is this channel".
Every op relates the slots of its operands and its output through small equivalence classes (the
rules of op_rules.py). A group is the connected component of slots reached from a producer's output
slot, walking the networkx view of the graph (`ir.to_networkx`) both ways: from a slot to the op
that defines it and to every user. Every slot also carries an index map (index_map.py): where along
its dim the group's channels sit. Where an op needs a coarser map to be followed (whole attention
heads, the parts of a packed projection: op_rules_shape.py), the walk retries from the same seed.

Whatever the walk does not understand ends the walk there and marks the group not prunable, with
the reason (an op it does not know, a view that mixes the channel dim with the batch dim, a slice
or split that cuts through a layer's channels, pieces that share no common block of channels
(split [3, 7]), unbinding the channel dim, a grouped conv, the graph output, a graph input).
"""
from __future__ import annotations

import dataclasses
import itertools

import torch.fx as fx

from sparsify import ir

from .index_map import _FULL, IndexMap
from .op_rules import _CONV, _conv_spec, _rule
from .visit import Slot, _arg, _Coarser, _rank, _Reject, op_name, shape_of

_MAX_WALKS = 8   # walks per seed: the first, then retries with coarser units or packed parts
_stamps = itertools.count(1)   # orders group discoveries and prunes (prune_channels replays later prunes)


def next_stamp() -> int:
    return next(_stamps)


# ---- the group ------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ChannelGroup:
    """Channel slots that must be pruned together.

    slots: (node, dim) pairs in walk order; every one has `channels` entries along `dim`.
    producers: weight layers whose output channels (weight rows, bias) define the group.
    consumers: weight layers whose input channels (weight columns; rows of an addmm weight) follow.
    others: further op nodes that carry the channel and have parameters or arguments to adjust
      (norms, depthwise convs, views), by role.
    reasons: why the group may not be pruned (empty = prunable).
    unit: entries of the seed's output dim per group channel (head_dim for an attention head group),
      per part of relative size 1.
    weights: relative sizes of the parts the seed's dim is cut into ((1,): one part; (1, 1, 1): a
      packed q|k|v; (2, 1, 1): a grouped-query q|k|v with 2 q heads per k/v head).
    maps: node -> IndexMap of its slot (index_map.py).
    stamp: when the group was found; prunes logged later shift its offsets (prune_channels).
    """

    channels: int
    unit: int = 1
    weights: tuple = (1,)
    maps: dict = dataclasses.field(default_factory=dict, repr=False)
    stamp: int = 0
    slots: list = dataclasses.field(default_factory=list)
    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    others: list = dataclasses.field(default_factory=list)   # (node, role)
    reasons: list = dataclasses.field(default_factory=list)
    names: dict = dataclasses.field(default_factory=dict, repr=False)  # node -> fqn, fixed at discovery

    def fqn_of(self, node: fx.Node) -> str:
        if node not in self.names:
            self.names[node] = layer_fqn(node) if node.op == "call_function" else ir.node_fqn(node)
        return self.names[node]

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.channels > 0

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None

    @property
    def seed(self) -> fx.Node | None:
        """The producer the walk started from (its output channels are the group's, unshifted)."""
        return self.slots[0][0] if self.slots else None

    def map_of(self, node: fx.Node) -> IndexMap:
        return self.maps.get(node, _FULL)

    def dim_of(self, node: fx.Node) -> int | None:
        for n, d in self.slots:
            if n is node:
                return d
        return None

    @property
    def producer_fqns(self) -> list[str]:
        return _unique(self.fqn_of(n) for n in self.producers)

    @property
    def consumer_fqns(self) -> list[str]:
        return _unique(self.fqn_of(n) for n in self.consumers)

    @property
    def layer_fqns(self) -> list[str]:
        """Weight layers (producers, consumers, depthwise convs) whose weights this group slices."""
        dw = [n for n, role in self.others if role == "depthwise"]
        return _unique(self.fqn_of(n) for n in [*self.producers, *dw, *self.consumers])

    @property
    def fqns(self) -> list[str]:
        """All member modules: weight layers plus norms and other ops with sliced parameters."""
        extra = [self.fqn_of(n) for n, role in self.others if role in ("norm", "param_op")]
        return _unique([*self.layer_fqns, *extra])

    @property
    def params(self) -> list[tuple[str, int]]:
        """(get_attr target, dim) of every parameter / buffer the group slices."""
        return _unique((n.target, d) for n, d in self.slots if n.op == "get_attr")

    @property
    def name(self) -> str:
        return ",".join(self.producer_fqns) or (self.slots[0][0].name if self.slots else "?")

    @property
    def extent(self) -> str:
        """What one channel is, for reports: "" (one entry), " of 16 entries" (a head), " of 16
        entries in each of 3 packed parts" (a head of a packed q|k|v), or " of 32+16+16 entries (3
        packed parts)" (2 q heads, a k head and a v head)."""
        if len(self.weights) == 1:
            return f" of {self.unit} entries" if self.unit > 1 else ""
        if len(set(self.weights)) == 1:
            return f" of {self.unit} entr{'y' if self.unit == 1 else 'ies'} in each of {len(self.weights)} packed parts"
        sizes = "+".join(str(self.unit * w) for w in self.weights)
        return f" of {sizes} entries ({len(self.weights)} packed parts)"

    def describe(self) -> str:
        state = "prunable" if self.prunable else f"NOT prunable: {self.reason}"
        return (f"ChannelGroup({self.channels} channels{self.extent}; producers={self.producer_fqns}; "
                f"consumers={self.consumer_fqns}; params={[t for t, _ in self.params]}; {state})")

    __repr__ = describe


def _unique(items) -> list:
    out = []
    for i in items:
        if i not in out:
            out.append(i)
    return out


def layer_fqn(node: fx.Node) -> str:
    """fqn of a weight layer: LayerInfo.fqn where the weight family wrote one, else derived from its weight."""
    info = node.meta.get(ir.LAYER)
    if info is not None:
        return info.fqn
    spec = ir.WEIGHT_OPS.get(node.target)
    w = None
    if spec is not None and len(node.args) > spec[2]:
        w = node.args[spec[2]]
    elif op_name(node) in _CONV:
        w = _arg(node, 1, "weight")
    target = ir.get_attr_target(w)
    if target is not None:
        if w.meta.get(ir.FQN):   # the module that owns the weight (stable when the target is renamed)
            return w.meta[ir.FQN]
        return target[: -len(".weight")] if target.endswith(".weight") else target
    return ir.node_fqn(node)

# ---- the walk -------------------------------------------------------------------------------
def _seed(node: fx.Node) -> Slot | None:
    """The output-channel slot of a weight layer (conv with groups=1, linear, addmm, mm)."""
    if node.op != "call_function":
        return None
    name = op_name(node)
    try:
        if name in _CONV:
            c = _conv_spec(node)
            w = c["w"]
            if c["groups"] != 1 or not isinstance(w, fx.Node) or w.op != "get_attr":
                return None
            return (node, c["cout"])
        if node.target in ir.WEIGHT_OPS:
            _, _, w_i, _ = ir.WEIGHT_OPS[node.target]
            w = node.args[w_i] if len(node.args) > w_i else None
            if not isinstance(w, fx.Node) or w.op != "get_attr":
                return None
            return (node, _rank(node) - 1 if name == "linear" else 1)
    except _Reject:
        return None
    return None


def _walk(seed: Slot, nxg, unit: int = 1, weights: tuple = (1,)) -> tuple[ChannelGroup, list]:
    """The group reached from `seed` with its dim cut into consecutive parts of relative sizes
    `weights`, channel j being `unit * w` entries of each part, and the (factor, weights) requests
    of the ops it could not follow."""
    seed_shape = shape_of(seed[0])
    size = seed_shape[seed[1]] if seed_shape is not None else 0
    per_channel = unit * sum(weights)
    channels = size // per_channel if size % per_channel == 0 else 0
    group = ChannelGroup(channels=channels, unit=unit, weights=tuple(weights), stamp=next_stamp())
    dims: dict[fx.Node, int] = {seed[0]: seed[1]}
    maps = group.maps
    starts = itertools.accumulate((channels * unit * w for w in weights[:-1]), initial=0)
    maps[seed[0]] = IndexMap(tuple((o, unit * w) for o, w in zip(starts, weights)))
    roles: dict[tuple[fx.Node, str], None] = {}
    queue = [seed]
    group.slots.append(seed)
    requests: list[tuple[int, tuple]] = []

    def reject(reason: str) -> None:
        if reason not in group.reasons:
            group.reasons.append(reason)

    def visit(u: fx.Node, slot: Slot) -> None:
        try:
            members, role = _rule(u, slot, maps[slot[0]], channels, maps)
        except _Coarser as e:
            requests.extend(r for r in e.requests if r not in requests)
            reject(str(e))
            return
        except _Reject as e:
            reject(str(e))
            return
        if role is not None and role != "param":
            roles.setdefault((u, role), None)
        for member in members:
            if _admit(member, slot):
                n, dn = member[0], member[1]
                group.slots.append((n, dn))
                queue.append((n, dn))

    def _admit(member, slot) -> bool:
        n, dn = member[0], member[1]
        imap = member[2] if len(member) > 2 else maps[slot[0]]
        if n in dims:
            if dims[n] != dn:
                reject(f"node {n.name} carries the channel on two dims ({dims[n]} and {dn})")
            elif maps[n] != imap:
                reject(f"node {n.name} carries the channel at two places along dim {dn} "
                       f"({maps[n].describe()} and {imap.describe()})")
            return False
        s = shape_of(n)
        # a tie that keeps the map joins dims of one size; a moved map must fit in its dim
        if len(member) > 2:
            need = imap.end(channels)
            ok = s is None or (dn < len(s) and s[dn] >= need)
        else:
            need = shape_of(slot[0])[slot[1]] if shape_of(slot[0]) is not None else None
            ok = s is None or need is None or (dn < len(s) and s[dn] == need)
        if not ok:
            reject(f"node {n.name}: size {s[dn] if dn < len(s) else '?'} along dim {dn}, "
                   f"expected {need} for {channels} channels")
            return False
        dims[n] = dn
        maps[n] = imap
        return True

    while queue:
        slot = queue.pop(0)
        n = slot[0]
        visit(n, slot)  # the op that defines this value
        for user_name in nxg.successors(n.name):  # every op that reads it
            visit(nxg.nodes[user_name]["node"], slot)

    for (u, role) in roles:
        if role == "producer":
            group.producers.append(u)
        elif role == "consumer":
            group.consumers.append(u)
        else:
            group.others.append((u, role))
    if channels <= 0:
        reject(f"unknown channel count at {seed[0].name}")
    for n in [*group.producers, *group.consumers, *(u for u, _ in group.others)]:
        group.fqn_of(n)   # name members now, before a rewrite renames their weights
    return group, requests


def _walk_coarsening(seed: Slot, nxg) -> ChannelGroup:
    """Walk from `seed`; where a split needs a coarser map (whole heads, the parts of a packed
    projection), walk again with it, breadth first over the requests, up to _MAX_WALKS walks.
    Returns the first prunable group, else the last one walked (its reasons are the report's)."""
    queue, tried, deepest = [(1, (1,))], set(), None
    while queue and len(tried) < _MAX_WALKS:
        unit, weights = queue.pop(0)
        if (unit, weights) in tried:
            continue
        tried.add((unit, weights))
        group, requests = _walk(seed, nxg, unit, weights)
        if group.prunable:
            return group
        if deepest is None or len(group.slots) > len(deepest.slots):
            deepest = group   # got furthest: its reasons name the real obstacle
        # plain head blocks first (the largest), then packed parts
        for f, w in sorted(requests, key=lambda q: (len(q[1]), -q[0])):
            parts = _nest(weights, w)
            if parts is not None:
                queue.append((unit * f, parts))
    return deepest


def _nest(weights: tuple, request: tuple) -> tuple | None:
    """The seed's parts after a request to cut them into `request` parts: no change for (1,), the
    request where there was one part, equal parts cut equally; None (not tried) otherwise."""
    if request == (1,):
        return weights
    if weights == (1,):
        return request
    if len(set(weights)) == 1 and len(set(request)) == 1:
        return (1,) * (len(weights) * len(request))
    return None


def find_channel_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """Every channel group seeded by a weight layer's output channels, in graph order.

    Groups are disjoint: a layer whose output channels were already reached from an earlier seed
    (a residual stream shared by several producers, k and v from q through attention) belongs to
    that group.
    """
    nxg = ir.to_networkx(gm)
    groups: list[ChannelGroup] = []
    covered: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        seed = _seed(node)
        if seed is None or covered.get(seed[0]) == seed[1]:
            continue
        group = _walk_coarsening(seed, nxg)
        for n, d in group.slots:
            covered.setdefault(n, d)
        groups.append(group)
    return groups
