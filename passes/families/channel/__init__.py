"""The "channel" sparsity family: structured channel pruning that physically shrinks layers.

groups.py  which channels of which tensors must be pruned together (find_channel_groups).
prune.py   slicing the groups out of a GraphModule, and the prune_channels pass.

The modules are imported where they are used; sparsify.passes imports the pass to register it.
"""
