"""Analysis and rewrite passes (installed as sparsify.passes).

Importing this package registers the default pipeline, in this order:
find_layers -> calibrate -> choose_patterns -> sparsify_weights -> fuse_epilogues -> apply_rewrite_rules
"""
from .analysis import find_layers, calibrate, choose  # noqa: F401  (registration order matters)
from .rewrite import sparsify_weights, fuse_epilogue, rules  # noqa: F401

from sparsify.pipeline import default_pass_names

DEFAULT_PASSES = tuple(default_pass_names())
