"""Analysis and rewrite passes (installed as sparsify.passes).

Importing this package registers the default pipeline, in this order:
fold_batchnorm -> find_layers -> prune_channels -> calibrate -> choose_patterns -> sparsify_weights
-> fuse_epilogues -> apply_rewrite_rules. fold_batchnorm (a "canonicalize" pass) runs first so every
later pass sees the conv the model really computes; prune_channels acts only on layers whose pattern
is Channel; it changes shapes, so it runs before calibration and timing see the layers.
"""
from .analysis import find_layers, calibrate, choose  # noqa: F401  (registration order matters)
from .rewrite import sparsify_weights, fuse_epilogue, rules, fold_batchnorm  # noqa: F401
from .families.channel import prune_pass  # noqa: F401  (registers prune_channels)

from sparsify.pipeline import add_to_default, default_pass_names

add_to_default("prune_channels", after="find_layers")
DEFAULT_PASSES = tuple(default_pass_names())
