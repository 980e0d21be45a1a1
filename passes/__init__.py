"""Analysis and rewrite passes (installed as sparsify.passes)."""
