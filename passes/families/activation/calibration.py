"""What an activation pattern becomes for one FFN, from the calibration sample of its input x:
the per-unit thresholds (and for PredictedActive the low-rank predictor), and the active set.

Everything is computed from x: the hidden pre-activations z = x W^T + b are recomputed from it (a
ReLU's output has lost z where it is zero), so one probe per FFN is enough. The sample is the first
calibration batch's input to the block (at most state.MAX_SAMPLE_ROWS tokens).
"""
from __future__ import annotations

import hashlib
import math

import torch

from sparsify.codegen.kernels._ffn_common import ffn_activation
from sparsify.patterns import ActivationThreshold, ExactZeros, PredictedActive, TopK

# activations whose output is exactly zero wherever the pre-activation is <= 0, and grows with it above
ZERO_ACTIVATIONS = ("relu", "relu2")


def hidden(x2, w_up, b_up, w_gate, b_gate, act):
    """(s, z_up): the activation the threshold reads (of the gate in a gated FFN) and the up
    projection's pre-activation, fp32, [tokens, F]."""
    x2 = x2.float()
    z_up = x2 @ w_up.float().T + (b_up.float() if b_up is not None else 0)
    if w_gate is None:
        return ffn_activation(z_up, act), z_up
    z_g = x2 @ w_gate.float().T + (b_gate.float() if b_gate is not None else 0)
    return ffn_activation(z_g, act), z_up


def unsupported(pattern, act: str, gated: bool) -> str | None:
    if isinstance(pattern, ExactZeros) and act not in ZERO_ACTIVATIONS:
        return f"ExactZeros needs an activation with exact zeros ({ZERO_ACTIVATIONS}); this FFN's is {act}"
    if isinstance(pattern, PredictedActive):
        if gated:
            return "PredictedActive serves ungated FFNs (a gated FFN's gate already decides cheaply)"
        if act not in ZERO_ACTIVATIONS:
            return f"PredictedActive predicts where a {ZERO_ACTIVATIONS} activation is zero; this FFN's is {act}"
    return None


# per-unit thresholds at sparsity s need this many tokens a unit keeps on the sample, or a quantile
# of a handful of values decides
MIN_KEPT_TOKENS = 4


def _between(sorted_vals: torch.Tensor, k: int) -> torch.Tensor:
    """A threshold that drops the k smallest values: midway to the next, so no value sits on it (a
    kernel's rounding would otherwise decide the tie)."""
    lo = sorted_vals[k - 1]
    if k < sorted_vals.shape[0]:
        return (lo + sorted_vals[k]) / 2
    return lo * (1 + 1e-3) + 1e-6


def thresholds(pattern, s: torch.Tensor) -> torch.Tensor:
    """The per-unit thresholds [F] (a unit is kept where |s| > its threshold); for TopK the
    coefficient c of the per-token cut mean + c * std of |s| (the same for every unit)."""
    f = s.shape[1]
    if isinstance(pattern, (ExactZeros, PredictedActive)):
        return torch.zeros(f)
    if isinstance(pattern, TopK):
        return torch.full((f,), topk_coefficient(pattern, s))
    if not isinstance(pattern, ActivationThreshold):
        raise TypeError(f"no thresholds for {type(pattern).__name__}")
    a = s.abs().float()
    if pattern.per_channel:
        k = max(1, math.ceil(pattern.sparsity * a.shape[0]))
        return _between(a.sort(dim=0).values, k).contiguous()
    flat = a.flatten()
    if flat.numel() > 1 << 24:    # a uniform subsample: the quantile of 16M values is exact enough
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
    k = max(1, math.ceil(pattern.sparsity * flat.numel()))
    return torch.full((f,), _between(flat.sort().values, k).item())


def topk_keep(pattern, f: int) -> float:
    """The fraction of units a TopK keeps per token."""
    return min(1.0, pattern.k / f) if pattern.k is not None else pattern.fraction


def topk_coefficient(pattern, s: torch.Tensor) -> float:
    """c such that |s| > mean + c * std (per token, over the units) keeps TopK's fraction of the
    calibration tokens' entries: the statistical top-k's cut, calibrated instead of assuming a
    Gaussian."""
    a = s.abs().float()
    z = ((a - a.mean(1, keepdim=True)) / a.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)).flatten()
    if z.numel() > 1 << 24:
        z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
    drop = 1.0 - topk_keep(pattern, s.shape[1])
    k = min(z.numel(), max(1, math.ceil(drop * z.numel())))
    return _between(z.sort().values, k).item()


def too_few_tokens(pattern, tokens: int) -> str | None:
    if isinstance(pattern, ActivationThreshold) and pattern.per_channel \
            and tokens * (1 - pattern.sparsity) < MIN_KEPT_TOKENS:
        need = math.ceil(MIN_KEPT_TOKENS / (1 - pattern.sparsity))
        return (f"per-unit thresholds at sparsity {pattern.sparsity} need >= {need} calibration tokens, the sample "
                f"has {tokens}: give more calibration data, or per_channel=False")
    return None


def fit_predictor(x2, w_up, b_up, z_up, threshold, rank: int, recall: float):
    """(pred_in [D, r], pred_out [r, F], pred_bias [F]): the top-`rank` directions of x W^T on the
    sample (its SVD), and a margin per unit, k standard deviations of the unit's prediction error,
    with one k for all units: the smallest that keeps `recall` of the sample's active entries.
    Active means z > threshold (relu), the zero-activation's kept set."""
    x2 = x2.float()
    z0 = z_up - (b_up.float() if b_up is not None else 0)
    r = min(rank, min(z0.shape))
    _, _, vh = torch.linalg.svd(z0, full_matrices=False)
    v = vh[:r].T.contiguous()                                  # [F, r]
    pred_in = (w_up.float().T @ v).contiguous()                # [D, r]
    pred_out = v.T.contiguous()                                # [r, F]
    zhat = x2 @ pred_in @ pred_out + (b_up.float() if b_up is not None else 0)
    sigma = (z_up - zhat).std(dim=0).clamp_min(1e-6)
    active = z_up > threshold
    if active.any():
        need = ((threshold - zhat) / sigma)[active]            # the k at which each active entry is predicted
        k = torch.quantile(need[: 1 << 24].float(), recall).item() if need.numel() > 1 else need.item()
        k = max(k, 0.0) + 1e-6
    else:
        k = 0.0
    pred_bias = ((b_up.float() if b_up is not None else 0) + k * sigma - threshold).contiguous()
    return pred_in, pred_out, pred_bias


def active_mask(s, threshold, x2=None, predictor=None, topk: bool = False) -> torch.Tensor:
    a = s.abs()
    if topk:
        keep = a > a.mean(-1, keepdim=True) + threshold * a.std(-1, unbiased=False, keepdim=True)
    else:
        keep = a > threshold
    if predictor is not None:
        pred_in, pred_out, pred_bias = predictor
        keep &= x2.float() @ pred_in @ pred_out + pred_bias > 0
    return keep


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]
