"""sparsify: a compiler for sparse neural networks."""
