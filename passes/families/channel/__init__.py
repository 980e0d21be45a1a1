"""The "channel" sparsity family: structured channel pruning that physically shrinks layers.

groups.py          which channels of which tensors must be pruned together: ChannelGroup and the
                   walk that finds the groups (find_channel_groups).
index_map.py       IndexMap: where a group's channels sit along a dim (offset, unit, packed parts).
visit.py           what a per-op rule is given (Visit), how it gives up, what it reads off a node.
op_rules.py        the per-op rules as a table from ATen op name to rule, and the dispatch.
op_rules_shape.py  the rules of ops that move or cut the channel entries (cat, split, slice, views,
                   expand, matmul, scaled_dot_product_attention).
prune.py           slicing a group out of a GraphModule (prune_channel_group, channel_scores).
prune_pass.py      the prune_channels pass (default pipeline; it acts only on Channel patterns).

The modules are imported where they are used; sparsify.passes imports prune_pass to register the pass.
"""
