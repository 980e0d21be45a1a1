"""sparsify: a compiler for sparse neural networks.

    sm = sparsify.compile(model, example_inputs, sparsify.Config())
    y = sm(x); print(sm.report()); sm.plan; sm.graph_module
"""
from . import inspect, ir
from .api import compile
from .config import Config, ConfigError
from .module import SparseModule
from .patterns import (NM, ActivationThreshold, Auto, Block, BlockMask, Causal, Channel, Dense,
                       PatternError, SlidingWindow, Strided, Submanifold, TopK, Unstructured,
                       pattern_from_dict)
from .pipeline import (MatchFailure, PassContext, PassResult, Pipeline, RewriteRule, register_pass,
                       register_rule)
from .plan import LayerPlan, Plan

__all__ = ["compile", "Config", "ConfigError", "SparseModule", "Plan", "LayerPlan", "Dense", "Auto",
           "Unstructured", "NM", "Block", "Channel", "ActivationThreshold", "TopK", "Causal",
           "SlidingWindow", "Strided", "BlockMask", "Submanifold", "PatternError", "pattern_from_dict",
           "Pipeline", "PassContext", "PassResult", "register_pass", "RewriteRule", "register_rule",
           "MatchFailure", "inspect", "ir"]
__version__ = "0.1.0"
