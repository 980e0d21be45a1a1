"""Kernels and code generation. Imports only the ground floor of `sparsify` (see DESIGN.md)."""
