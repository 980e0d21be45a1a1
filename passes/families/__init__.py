"""The families: one home per kind of sparsity (see sparsify/family.py for the hooks).

weight/ (unstructured, N:M, block on linear and conv weights), channel/ (structured channel
pruning of coupled groups), activation/ (FFN blocks that skip the hidden units their activation
zeroes), and attention, spatial: declared, not yet implemented (a Config naming their patterns is
refused with a clear error). Importing sparsify.passes registers them in this order: channel,
activation, weight. Sites are claimed in that order (find_sites): a node that an earlier family's
site covers is not another family's, so a channel group is re-found on the graph before any weight
layer in it could have become a sparse op, and an FFN block planned for activation sparsity keeps
its layers from the weight family.
"""
