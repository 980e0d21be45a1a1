"""sparsify: a compiler for sparse neural networks.

    sm = sparsify.compile(model, example_inputs, sparsify.Config())
    y = sm(x); print(sm.report()); sm.plan; sm.graph_module
"""
import warnings as _warnings

from . import inspection, ir, passes_loader, pipeline as _pipeline
from .api import compile
from .config import Config, ConfigError
from .family import (Family, Measured, Probe, Site, SiteSkipped, Trial, UnsupportedPatternError, families,
                     register_family, unregister_family)
from .module import SparseModule
from .persist import load
from .patterns import (NM, ActivationThreshold, Auto, Block, BlockMask, Causal, Channel, Dense, ExactZeros, Pattern,
                       PatternError, PredictedActive, SlidingWindow, Strided, Submanifold, TopK, Unstructured,
                       pattern_from_dict, register_pattern)
from .pipeline import (PHASES, MatchFailure, PassContext, PassResult, Pipeline, RewriteRule, register_pass,
                       register_rule)
from .plan import Candidate, LayerPlan, Plan
from .state import CompileState, Prepared

# The ground floor never imports sparsify.passes; it asks the roof to load the built-in passes and
# families when the default pipeline or the family registry is first used.
_pipeline.set_builtin_loader(passes_loader.load)

__all__ = ["compile", "load", "Config", "ConfigError", "SparseModule", "Plan", "LayerPlan", "Candidate", "Dense", "Auto",
           "Unstructured", "NM", "Block", "Channel", "ActivationThreshold", "ExactZeros", "PredictedActive", "TopK", "Causal",
           "SlidingWindow", "Strided", "BlockMask", "Submanifold", "Pattern", "PatternError", "pattern_from_dict",
           "register_pattern", "Family", "Site", "Probe", "Trial", "Measured", "SiteSkipped", "register_family",
           "unregister_family", "families", "UnsupportedPatternError", "CompileState", "Prepared",
           "Pipeline", "PHASES", "PassContext", "PassResult", "register_pass", "RewriteRule", "register_rule",
           "MatchFailure", "inspection", "ir"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "inspect":   # the module's old name, which read like the standard library's
        _warnings.warn("sparsify.inspect is now sparsify.inspection", DeprecationWarning, stacklevel=2)
        return inspection
    raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
