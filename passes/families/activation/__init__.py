"""The activation family: FFN blocks with activation sparsity (sites.py finds the blocks,
calibration.py turns a pattern into thresholds and a predictor, family.py measures, prepares and
rewrites). Its kernels are the registry's `replaces="ffn"` specs (codegen/kernels/ffn_*.py)."""
