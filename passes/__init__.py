"""Analysis and rewrite passes and the families (installed as sparsify.passes).

Importing this package registers the families (channel, activation, weight, and the declared
attention / spatial ones) and the default pipeline, by phase:

  canonicalize  drop_identities -> fold_batchnorm
  analysis      find_sites -> calibrate -> plan_sites
  rewrite       rewrite_sites -> apply_rewrite_rules
  lower         fuse_epilogues -> fuse_pairs -> assign_layouts -> stack_siblings -> lower_attention
"""
from .families.channel import family as _channel  # noqa: F401  (channel first: see families/__init__)
from .families.activation import family as _activation  # noqa: F401  (FFN blocks before their layers)
from .families.weight import family as _weight  # noqa: F401
from .families import attention, spatial  # noqa: F401  (declared families)
from .rewrite import drop_identities, fold_batchnorm  # noqa: F401  (registration order is pipeline order in a phase)
from .analysis import find_sites, calibrate, plan_sites  # noqa: F401
from .rewrite import rewrite_sites, rules, fuse_epilogue, fuse_pairs, assign_layouts, stack_siblings  # noqa: F401
from .rewrite import lower_attention  # noqa: F401
