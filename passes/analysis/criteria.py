"""Pruning criteria (importance scores) and the masks each weight pattern derives from them.

All functions work in the linear orientation: weight (N, K) = (out, in-reduction). Conv weights
(O, I/g, kh, kw) are viewed as (O, I/g*kh*kw) by the caller.
"""
from __future__ import annotations

import torch

from sparsify.patterns import NM, Block, Channel, Pattern, Unstructured


def scores(weight: torch.Tensor, criterion: str, channel_norm: torch.Tensor | None = None,
           seed: int = 0) -> torch.Tensor:
    """Importance of each weight: magnitude |W|, Wanda |W| * ||x_j|| (per input feature), or random."""
    w = weight.detach().float().abs()
    if criterion == "magnitude":
        return w
    if criterion == "wanda":
        if channel_norm is None:
            raise ValueError("criterion 'wanda' needs calibration statistics (input channel norms)")
        norm = channel_norm.float().to(w.device)
        if norm.numel() != w.shape[1]:
            if w.shape[1] % norm.numel():
                raise ValueError(f"wanda: {norm.numel()} input-channel norms do not divide the "
                                 f"reduction dim {w.shape[1]}")
            # conv: each input channel covers kh*kw consecutive columns
            norm = norm.repeat_interleave(w.shape[1] // norm.numel())
        return w * norm[None, :]
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(w.shape, generator=g).to(w.device)
    raise ValueError(f"unknown criterion {criterion!r}")


def unstructured_mask(s: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Drop the `sparsity` fraction with the lowest score, per output row (Wanda) or over the layer."""
    if per_row:
        k = int(round(s.shape[1] * sparsity))
        if k == 0:
            return torch.ones_like(s, dtype=torch.bool)
        idx = s.topk(k, dim=1, largest=False).indices
        mask = torch.ones_like(s, dtype=torch.bool)
        mask.scatter_(1, idx, False)
        return mask
    k = int(round(s.numel() * sparsity))
    if k == 0:
        return torch.ones_like(s, dtype=torch.bool)
    flat = s.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    mask[flat.topk(k, largest=False).indices] = False
    return mask.view_as(s)


def nm_mask(s: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive entries along K (last group padded)."""
    N, K = s.shape
    pad = (-K) % m
    sp = torch.nn.functional.pad(s, (0, pad), value=-1.0)
    groups = sp.view(N, -1, m)
    idx = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.view(N, -1)[:, :K]


def block_mask(s: torch.Tensor, block: int, density: float) -> torch.Tensor:
    """Keep the `density` fraction of block x block tiles with the largest summed score."""
    N, K = s.shape
    sp = torch.nn.functional.pad(s, (0, (-K) % block, 0, (-N) % block))
    tiles = sp.view(sp.shape[0] // block, block, sp.shape[1] // block, block).sum(dim=(1, 3))
    keep = max(1, int(round(tiles.numel() * density)))
    flat = torch.zeros(tiles.numel(), dtype=torch.bool)
    flat[tiles.flatten().topk(keep).indices.cpu()] = True
    tmask = flat.view_as(tiles).to(s.device)
    full = tmask.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return full[:N, :K]


def channel_mask(s: torch.Tensor, keep: float) -> torch.Tensor:
    """Rows (output channels) to keep, by summed score."""
    k = max(1, int(round(s.shape[0] * keep)))
    rows = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    rows[s.sum(1).topk(k).indices] = True
    return rows


def mask_for(pattern: Pattern, s: torch.Tensor) -> torch.Tensor:
    """The (N, K) keep-mask a weight pattern implies for scores `s`."""
    if isinstance(pattern, Unstructured):
        return unstructured_mask(s, pattern.sparsity, per_row=pattern.criterion == "wanda")
    if isinstance(pattern, NM):
        return nm_mask(s, pattern.n, pattern.m)
    if isinstance(pattern, Block):
        return block_mask(s, pattern.block, pattern.density)
    if isinstance(pattern, Channel):
        return channel_mask(s, pattern.keep)[:, None].expand_as(s)
    raise ValueError(f"no weight mask for pattern {pattern.describe()}")
