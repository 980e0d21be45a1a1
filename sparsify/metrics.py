"""Error metrics shared by planning and verification."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


def float_leaves(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def output_error(dense_outs, sparse_outs) -> float:
    """Relative L2 error over all floating output tensors of all batches."""
    num = den = 0.0
    for d, s in zip(dense_outs, sparse_outs):
        dl, sl = float_leaves(d), float_leaves(s)
        if len(dl) != len(sl):
            raise RuntimeError(f"sparse model returned {len(sl)} tensors, dense {len(dl)}")
        for a, b in zip(dl, sl):
            if a.shape != b.shape:
                raise RuntimeError(f"sparse output shape {tuple(b.shape)} != dense {tuple(a.shape)}")
            num += float((b.double() - a.double()).pow(2).sum())
            den += float(a.double().pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5
