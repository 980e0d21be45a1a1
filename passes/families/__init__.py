"""Sparsity families: each subpackage holds the analysis and rewrite passes of one family."""
