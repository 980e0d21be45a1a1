"""The weight family: unstructured, N:M and block sparsity of linear and conv2d weights.

layers.py finds the weight layers (sites), views.py scores, masks and runs them densely per layer
kind, family.py is the family itself (candidates, measure, prepare, rewrite).
"""
