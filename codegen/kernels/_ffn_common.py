"""What the activation-sparse FFN kernels share: the op schema, the modes, and the torch reference.

One op computes a whole FFN block with its activation sparsity fused (every device's kernel has this
schema, so the activation family rewrites to whichever the chooser measured faster):

    s = act(x @ w_gate^T + b_gate)            gated ("gated": SwiGLU, GeGLU)
    s = act(x @ w_up^T + b_up)                ungated ("ungated": ReLU / GELU MLPs)
    active[m, f] = |s[m, f]| > threshold[f]   (threshold 0 with relu: the exact zeros, lossless)
    h = s * (x @ w_up^T + b_up) (gated) or s (ungated), zero where not active
    y = h @ w_down^T + bias (+ residual, cast: the shared epilogue)

"topk" / "gated_topk" (statistical top-k, as Spark Transformer: no sort): per token, from the mean
and standard deviation of |s| over the F units, active[m, f] = |s[m, f]| > mean_m + threshold[f] * std_m
(threshold holds the coefficient, calibrated so that the wanted fraction is kept).

"predicted" (ungated, Deja Vu): the active set comes from a low-rank predictor instead,
    active[m, f] = ((x @ pred_in) @ pred_out)[m, f] + pred_bias[f] > 0
and the up-projection is computed for the predicted rows only; where the predictor misses a row
whose |s| > threshold that row is dropped (the predictor's error, counted in the error budget); a
predicted row whose |s| <= threshold is zeroed as in "ungated".

w_down_t is the down weight transposed, [F, D]: row f is what one active hidden unit adds to the
output, contiguous, so a kernel that reads only active rows streams whole rows.
"""
from __future__ import annotations

import torch

from sparsify.codegen.epilogue import activation_reference

MODES = ("ungated", "gated", "predicted", "topk", "gated_topk")
GATED_MODES = ("gated", "gated_topk")
TOPK_MODES = ("topk", "gated_topk")
# FFN activations: the epilogue's, plus relu^2 (Primer, ReLU-fied LLMs).
FFN_ACTIVATIONS = ("relu", "relu2", "gelu", "gelu_tanh", "silu")

FFN_SCHEMA = ("(Tensor x, Tensor w_up, Tensor? b_up, Tensor? w_gate, Tensor? b_gate, Tensor w_down_t, "
              "Tensor threshold, str act, str mode, Tensor? pred_in=None, Tensor? pred_out=None, "
              "Tensor? pred_bias=None, Tensor? bias=None, Tensor? residual=None, str activation='none', "
              "ScalarType? out_dtype=None) -> Tensor")


def ffn_activation(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "relu2":
        return torch.relu(z).square()
    if act not in FFN_ACTIVATIONS:
        raise ValueError(f"FFN activation must be one of {FFN_ACTIVATIONS}, got {act!r}")
    return activation_reference(z, act)


def check_ffn_args(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in, pred_out,
                   pred_bias) -> None:
    """Shapes and modes of one FFN call; the message names the argument."""
    if mode not in MODES:
        raise ValueError(f"ffn: mode must be one of {MODES}, got {mode!r}")
    if act not in FFN_ACTIVATIONS:
        raise ValueError(f"ffn: act must be one of {FFN_ACTIVATIONS}, got {act!r}")
    if w_up.dim() != 2 or w_down_t.dim() != 2:
        raise ValueError(f"ffn: w_up and w_down_t must be 2-D, got {tuple(w_up.shape)} and {tuple(w_down_t.shape)}")
    f, d = w_up.shape
    if x.shape[-1] != d:
        raise ValueError(f"ffn: x has {x.shape[-1]} features, w_up expects {d}")
    if w_down_t.shape[0] != f:
        raise ValueError(f"ffn: w_down_t must be [F={f}, D_out], got {tuple(w_down_t.shape)}")
    if threshold.shape != (f,):
        raise ValueError(f"ffn: threshold must be [F={f}], got {tuple(threshold.shape)}")
    if (mode in GATED_MODES) != (w_gate is not None):
        raise ValueError(f"ffn: mode {mode!r} {'needs' if mode in GATED_MODES else 'takes no'} w_gate")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"ffn: w_gate must have w_up's shape {tuple(w_up.shape)}, got {tuple(w_gate.shape)}")
    for name, b in (("b_up", b_up), ("b_gate", b_gate), ("pred_bias", pred_bias)):
        if b is not None and b.shape != (f,):
            raise ValueError(f"ffn: {name} must be [F={f}], got {tuple(b.shape)}")
    if mode == "predicted":
        if pred_in is None or pred_out is None or pred_bias is None:
            raise ValueError("ffn: mode 'predicted' needs pred_in, pred_out and pred_bias")
        if pred_in.dim() != 2 or pred_in.shape[0] != d or pred_out.shape != (pred_in.shape[1], f):
            raise ValueError(f"ffn: predictor must be pred_in [D={d}, r] and pred_out [r, F={f}], got "
                             f"{tuple(pred_in.shape)} and {tuple(pred_out.shape)}")


def ffn_hidden_reference(x, w_up, b_up, w_gate, b_gate, threshold, act, mode, pred_in=None, pred_out=None,
                         pred_bias=None) -> torch.Tensor:
    """h [M, F] in x's dtype promoted to at least float32 (float64 stays float64), inactive entries zero."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    up = x2 @ w_up.to(acc).T + (b_up.to(acc) if b_up is not None else 0)
    if mode in GATED_MODES:
        s = ffn_activation(x2 @ w_gate.to(acc).T + (b_gate.to(acc) if b_gate is not None else 0), act)
        h = s * up
    else:
        s = ffn_activation(up, act)
        h = s
    if mode in TOPK_MODES:
        a = s.abs()
        active = a > a.mean(-1, keepdim=True) + threshold.to(acc) * a.std(-1, unbiased=False, keepdim=True)
    else:
        active = s.abs() > threshold.to(acc)
    if mode == "predicted":
        active &= (x2 @ pred_in.to(acc)) @ pred_out.to(acc) + pred_bias.to(acc) > 0
    return torch.where(active, h, torch.zeros((), dtype=acc))


def ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in=None, pred_out=None,
                  pred_bias=None, bias=None, residual=None, activation="none", out_dtype=None) -> torch.Tensor:
    """The op's meaning, in torch (float64 inputs give the tests' float64 ground truth)."""
    check_ffn_args(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in, pred_out, pred_bias)
    h = ffn_hidden_reference(x, w_up, b_up, w_gate, b_gate, threshold, act, mode, pred_in, pred_out, pred_bias)
    y = h @ w_down_t.to(h.dtype)
    if bias is not None:
        y = y + bias.to(h.dtype)
    if activation != "none":
        y = activation_reference(y, activation)
    if residual is not None:
        y = y + residual.reshape(y.shape).to(h.dtype)
    y = y.reshape(*x.shape[:-1], w_down_t.shape[1])
    return y.to(out_dtype if out_dtype is not None else x.dtype)


def ffn_out_like(bound: dict) -> torch.Tensor:
    """The fake output of an FFN op: x's leading dims, D_out features, out_dtype or x's dtype."""
    x, wd = bound["x"], bound["w_down_t"]
    dtype = bound.get("out_dtype") or x.dtype
    return x.new_empty((*x.shape[:-1], wd.shape[1]), dtype=dtype)
