"""Activation-sparse FFN block on GPUs (Triton): the FFN schema of _ffn_common.py, fp16 / bf16 / fp32.

Decode (M <= DECODE_MAX tokens), two kernels with fp32 accumulation:

1. `_hidden_kernel`, one program per BLOCK_F hidden units: the gate (or up) projection of all M
   tokens as one [16, BLOCK_D] x [BLOCK_D, BLOCK_F] product per step, the activation, the threshold
   (and the predictor's logits, computed by the host: two small GEMMs); in a gated block the up
   rows are loaded masked by the units some token keeps, so a dropped unit's up row is not read.
   Writes h [M, F] fp32 (zero where not kept) and keep [F] (the union over the tokens).
2. `_down_kernel`, a grid of (output column blocks, SPLIT slices of F): rows of w_down_t [F, D_out]
   are loaded masked by keep (a dropped unit's row is never fetched: where the bytes are saved),
   accumulated in fp32, and added into an fp32 [M, D_out] buffer (atomics: split-K). The epilogue
   (bias, activation, residual, cast) runs on that buffer.

Every token has its own h row and its own accumulator row, so the result is right at every batch
size, not only at one token. Prefill (M > DECODE_MAX): the gate/up projections and the down
projection of the kept units as torch matmuls (a gathered GEMM), which the chooser times as any
other candidate. Statistical top-k (per-token statistics over all units) is not served here: its
patterns are not candidates for this kernel (the report says why).

Entry points: `ffn_triton_host` (impl "triton", what "auto" runs on CUDA, or "reference") and `SPEC`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from sparsify import patterns as _patterns
from sparsify.codegen.epilogue import activation_reference
from sparsify.codegen.kernels._common import cdiv, resolve_impl
from sparsify.codegen.kernels._ffn_common import (FFN_SCHEMA, GATED_MODES, TOPK_MODES, check_ffn_args,
                                                  ffn_hidden_reference, ffn_out_like, ffn_reference)
from sparsify.codegen.spec import KernelSpec

KERNEL_VERSION = "ffn_triton-1"
DECODE_MAX = 16
BLOCK_F, BLOCK_D, BLOCK_N, SPLIT = 32, 32, 64, 4
_ACTS = {"relu": 0, "relu2": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(z, 0.0)
    elif ACT == 1:
        r = tl.maximum(z, 0.0)
        return r * r
    elif ACT == 2:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        e = tl.exp(-2.0 * tl.abs(u))             # tanh(u) from exp of a non-positive number: no overflow
        t = (1.0 - e) / (1.0 + e)
        return 0.5 * z * (1.0 + tl.where(u >= 0, t, -t))
    else:
        return z / (1.0 + tl.exp(-z))


@triton.jit
def _project(x_ptr, w_ptr, M, D, offs_f, f_mask, row_mask, BM: tl.constexpr, BLOCK_F: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """x [M, D] @ w[offs_f]^T -> [BM, BLOCK_F] fp32; rows of w outside row_mask are not loaded."""
    offs_m = tl.arange(0, BM)
    acc = tl.zeros((BM, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        x = tl.load(x_ptr + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m[:, None] < M) & d_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_f.to(tl.int64)[None, :] * D + offs_d[:, None],
                    mask=(f_mask & row_mask)[None, :] & d_mask[:, None], other=0.0)
        acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _hidden_kernel(x_ptr, wu_ptr, bu_ptr, wg_ptr, bg_ptr, thr_ptr, logit_ptr, h_ptr, keep_ptr, M, D, F,
                   ACT: tl.constexpr, GATED: tl.constexpr, PREDICTED: tl.constexpr, HAS_BU: tl.constexpr,
                   HAS_BG: tl.constexpr, BM: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < F
    offs_m = tl.arange(0, BM)
    m_mask = offs_m < M
    everything = offs_f >= 0
    if GATED:
        z = _project(x_ptr, wg_ptr, M, D, offs_f, f_mask, everything, BM, BLOCK_F, BLOCK_D)
        if HAS_BG:
            z += tl.load(bg_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    else:
        z = _project(x_ptr, wu_ptr, M, D, offs_f, f_mask, everything, BM, BLOCK_F, BLOCK_D)
        if HAS_BU:
            z += tl.load(bu_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    s = _act(z, ACT)
    thr = tl.load(thr_ptr + offs_f, mask=f_mask, other=0.0)
    keep = (tl.abs(s) > thr[None, :]) & m_mask[:, None] & f_mask[None, :]
    if PREDICTED:
        logit = tl.load(logit_ptr + offs_m[:, None] * F + offs_f[None, :], mask=m_mask[:, None] & f_mask[None, :],
                        other=0.0)
        keep = keep & (logit > 0)
    unit = tl.max(keep.to(tl.int32), axis=0) > 0          # some token keeps the unit
    h = tl.where(keep, s, 0.0)
    if GATED:
        u = _project(x_ptr, wu_ptr, M, D, offs_f, f_mask, unit, BM, BLOCK_F, BLOCK_D)
        if HAS_BU:
            u += tl.load(bu_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        h = h * u
    tl.store(h_ptr + offs_m[:, None] * F + offs_f[None, :], h, mask=m_mask[:, None] & f_mask[None, :])
    tl.store(keep_ptr + offs_f, unit.to(tl.int8), mask=f_mask)


@triton.jit
def _down_kernel(h_ptr, keep_ptr, wd_ptr, acc_ptr, M, F, N, F_PER: tl.constexpr, BM: tl.constexpr,
                 BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BM)
    m_mask = offs_m < M
    acc = tl.zeros((BM, BLOCK_N), dtype=tl.float32)
    for f0 in range(pid_s * F_PER, tl.minimum((pid_s + 1) * F_PER, F), BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_mask = offs_f < tl.minimum((pid_s + 1) * F_PER, F)
        kept = tl.load(keep_ptr + offs_f, mask=f_mask, other=0) != 0
        h = tl.load(h_ptr + offs_m[:, None] * F + offs_f[None, :], mask=m_mask[:, None] & kept[None, :], other=0.0)
        w = tl.load(wd_ptr + offs_f.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=kept[:, None] & n_mask[None, :], other=0.0)     # a dropped unit's row is not read
        acc += tl.dot(h, w.to(tl.float32), input_precision="ieee")
    tl.atomic_add(acc_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


def _decode(x2, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, logits):
    m, d = x2.shape
    f, n = w_down_t.shape
    h = torch.empty(m, f, device=x2.device, dtype=torch.float32)
    keep = torch.empty(f, device=x2.device, dtype=torch.int8)
    gated = mode in GATED_MODES
    dummy = threshold
    _hidden_kernel[(cdiv(f, BLOCK_F),)](
        x2, w_up, b_up if b_up is not None else dummy, w_gate if gated else w_up,
        b_gate if b_gate is not None else dummy, threshold, logits if logits is not None else dummy, h, keep,
        m, d, f, ACT=_ACTS[act], GATED=gated, PREDICTED=logits is not None, HAS_BU=b_up is not None,
        HAS_BG=b_gate is not None, BM=16, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D)
    acc = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
    f_per = cdiv(cdiv(f, SPLIT), BLOCK_F) * BLOCK_F
    _down_kernel[(cdiv(n, BLOCK_N), cdiv(f, f_per))](h, keep, w_down_t, acc, m, f, n, F_PER=f_per, BM=16,
                                                     BLOCK_F=BLOCK_F, BLOCK_N=BLOCK_N)
    return acc


def _prefill(x2, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred):
    """Many tokens: the hidden activations in torch, then the kept units' rows as one GEMM."""
    h = ffn_hidden_reference(x2, w_up, b_up, w_gate, b_gate, threshold, act, mode, *pred)
    idx = h.ne(0).any(0).nonzero().squeeze(1)
    return h.index_select(1, idx) @ w_down_t.index_select(0, idx).float()


def ffn_triton_host(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act: str, mode: str, pred_in=None,
                    pred_out=None, pred_bias=None, bias=None, residual=None, activation: str = "none",
                    out_dtype: Optional[torch.dtype] = None, *, impl: str = "auto") -> torch.Tensor:
    """y = the FFN block (see _ffn_common.py) with Triton kernels at decode, torch GEMMs at prefill."""
    impl = resolve_impl(impl, x.device)
    if impl == "reference":
        return ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in, pred_out,
                             pred_bias, bias, residual, activation, out_dtype)
    check_ffn_args(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in, pred_out, pred_bias)
    if mode in TOPK_MODES:
        raise ValueError(f"ffn_triton: mode {mode!r} (statistical top-k) is not served by the Triton kernel")
    d, n = x.shape[-1], w_down_t.shape[1]
    x2 = x.reshape(-1, d).contiguous()
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    w_up, w_gate, w_down_t = c(w_up), c(w_gate), c(w_down_t)
    threshold = threshold.float().contiguous()
    if x2.shape[0] == 0:
        acc = torch.zeros(0, n, device=x.device)
    elif x2.shape[0] <= DECODE_MAX:
        logits = None
        if mode == "predicted":
            logits = torch.addmm(pred_bias.float(), x2.float() @ pred_in.float(), pred_out.float()).contiguous()
        acc = _decode(x2, w_up, c(b_up), w_gate, c(b_gate), w_down_t, threshold, act, mode, logits)
    else:
        acc = _prefill(x2, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, (pred_in, pred_out, pred_bias))
    if bias is not None:
        acc = acc + bias.float()
    acc = activation_reference(acc, activation)
    if residual is not None:
        acc = acc + residual.reshape(acc.shape).float()
    return acc.reshape(*x.shape[:-1], n).to(out_dtype or x.dtype)


ffn_triton = functools.partial(ffn_triton_host, impl="triton")


def _supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> str | None:
    if isinstance(pattern, _patterns.TopK):
        return "statistical top-k needs per-token statistics over all units: no Triton kernel yet"
    if dtype not in _DTYPES:
        return f"ffn_triton takes float16, bfloat16 or float32 weights, the block is {dtype}"
    return None


def _not_packed(*args, **kwargs):
    raise NotImplementedError("FFN kernels are packed by the activation family (passes/families/activation)")


SPEC = KernelSpec(
    name="ffn_triton", op="sparsify::ffn_triton", schema=FFN_SCHEMA,
    patterns=(_patterns.ExactZeros, _patterns.ActivationThreshold, _patterns.TopK, _patterns.PredictedActive),
    replaces="ffn", devices=("cuda",), interpretable=True, supports=_supports, impl=ffn_triton_host,
    pack=_not_packed, out_like=ffn_out_like, version=KERNEL_VERSION)
