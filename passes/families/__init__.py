"""The families: one home per kind of sparsity (see sparsify/family.py for the hooks).

weight/ (unstructured, N:M, block on linear and conv weights), channel/ (structured channel
pruning of coupled groups), and activation, attention, spatial: declared, not yet implemented (a
Config naming their patterns is refused with a clear error). Importing sparsify.passes registers
them, channel before weight: a channel group is re-found on the graph before any weight layer in it
could have become a sparse op.
"""
