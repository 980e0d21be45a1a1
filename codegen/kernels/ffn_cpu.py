"""Activation-sparse FFN block on the CPU through a generated kernel (codegen/cpu_ffn_source.py).

The op is the FFN schema of _ffn_common.py: hidden units no token keeps are skipped, their down rows
(and in gated / predicted mode their up rows) never read. The weights are fp32 or bf16 (computed in
fp32); x of any float dtype is converted to an fp32 [M, D] copy first (small: tokens x D); the
residual and biases are taken in the weights' dtype.

Entry points: `ffn_cpu_host` (impl "generated", what "auto" runs, or "reference": _ffn_common's
torch reference), `kernel_for(...)` (the built ctypes function of a variant), and `SPEC`.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Optional

import torch

from sparsify.codegen import cpu_build, cpu_ffn_source
from sparsify.codegen.kernels._checks import check_out
from sparsify.codegen.kernels._common import resolve_impl
from sparsify.codegen.kernels._ffn_common import FFN_SCHEMA, check_ffn_args, ffn_out_like, ffn_reference
from sparsify.codegen.spec import KernelSpec
from sparsify import patterns as _patterns

KERNEL_VERSION = f"ffn_cpu-1+{cpu_ffn_source.TEMPLATE_VERSION}"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_OUT_DTYPES = {**_DTYPES, torch.float16: "float16"}
_ACC_FLOATS = 4096   # the kernel's ACC_FLOATS: phase 2 accumulators per thread
_FUNCS: dict[tuple, ctypes._CFuncPtr] = {}
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def kernel_for(d: int, f: int, dout: int, mode: str, act: str, dtype: torch.dtype, out_dtype: torch.dtype,
               has_bup: bool, has_bgate: bool, has_bias: bool, has_res: bool, activation: str):
    return cpu_build.function(
        _FUNCS, (d, f, dout, mode, act, dtype, out_dtype, has_bup, has_bgate, has_bias, has_res, activation),
        lambda: cpu_ffn_source.source(d, f, dout, mode, act, _DTYPES[dtype], _OUT_DTYPES[out_dtype], has_bup,
                                      has_bgate, has_bias, has_res, activation),
        [_P] * 11 + [_I64, _I] + [_P] * 8)


def generated_sources() -> dict[str, str]:
    """Variant name -> C source of every FFN kernel built in this process (sm.kernel_sources())."""
    return cpu_build.sources(_FUNCS)


def _ptr(t: Optional[torch.Tensor]):
    return t.data_ptr() if t is not None else None


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """t in dtype, contiguous (itself when it is already: a cast costs ~2 us even when it does nothing)."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


_SCRATCH = threading.local()


def _scratch(f: int, m: int, nth: int) -> tuple[int, list[int]]:
    """(address, byte offsets) of the kernel's scratch arrays (idx, hv, cnt, acc, tmp, kept, stat,
    theta) in one
    buffer kept per thread and grown as needed: seven allocations a call cost more than a small block."""
    sizes = [4 * f, 4 * f * m, 4 * nth, 4 * nth * _ACC_FLOATS, 4 * nth * 2 * m, 4, 8 * nth * 2 * m, 4 * 2 * m]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // 64) * 64
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < total:
        buf = _SCRATCH.buf = torch.empty(total, dtype=torch.uint8)
    return buf.data_ptr(), offsets


def ffn_cpu_host(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act: str, mode: str, pred_in=None,
                 pred_out=None, pred_bias=None, bias=None, residual=None, activation: str = "none",
                 out_dtype: Optional[torch.dtype] = None, *, impl: str = "auto",
                 kept: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = the FFN block (see _ffn_common.py). kept: an int32 [1] tensor that receives the number of
    hidden units the generated kernel kept (read the rows of). out: written and returned, if given."""
    impl = resolve_impl(impl, x.device, ("generated", "reference"))
    if impl == "reference":
        return ffn_reference(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in, pred_out,
                             pred_bias, bias, residual, activation, out_dtype)
    check_ffn_args(x, w_up, b_up, w_gate, b_gate, w_down_t, threshold, act, mode, pred_in, pred_out, pred_bias)
    wdtype = w_up.dtype
    out_dtype = out_dtype or x.dtype
    if wdtype not in _DTYPES or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"ffn_cpu: weights must be float32 or bfloat16 and the output float32, bfloat16 or "
                        f"float16 (weights {wdtype}, out {out_dtype})")
    for name, t in (("w_up", w_up), ("w_gate", w_gate), ("w_down_t", w_down_t)):
        if t is not None and (t.device.type != "cpu" or t.dtype != wdtype or not t.is_contiguous()):
            raise ValueError(f"ffn_cpu: {name} must be a contiguous CPU tensor of w_up's dtype {wdtype}")
    if x.device.type != "cpu":
        raise ValueError(f"ffn_cpu takes CPU tensors, x is on {x.device}")
    f, d = w_up.shape
    dout = w_down_t.shape[1]
    lead = tuple(x.shape[:-1])
    m = x.numel() // d if d else 0
    if out is not None:
        check_out(out, lead + (dout,), out_dtype, x.device)
    y = out if out is not None else torch.empty(lead + (dout,), dtype=out_dtype)
    if m == 0 or dout == 0:
        return y
    if residual is not None and residual.numel() != m * dout:
        raise ValueError(f"ffn_cpu: residual must hold [M={m}, {dout}] values, got {tuple(residual.shape)}")
    x2 = _as(x.reshape(m, d), torch.float32)
    logits = None
    if mode == "predicted":   # tokens x (D r + r F): small next to the weights it lets the kernel skip
        logits = torch.addmm(pred_bias.float(), x2 @ pred_in.float(), pred_out.float()).contiguous()
    res = None if residual is None else _as(residual.reshape(m, dout), wdtype)
    nth = torch.get_num_threads()
    fn = kernel_for(d, f, dout, mode, act, wdtype, out_dtype, b_up is not None, b_gate is not None,
                    bias is not None, residual is not None, activation)
    base, offsets = _scratch(f, m, nth)
    fn(x2.data_ptr(), w_up.data_ptr(), _ptr(_as(b_up, wdtype)), _ptr(w_gate), _ptr(_as(b_gate, wdtype)),
       w_down_t.data_ptr(), _as(threshold, torch.float32).data_ptr(), _ptr(logits), _ptr(_as(bias, wdtype)),
       _ptr(res), y.data_ptr(), m, nth, *(base + o for o in offsets[:5]),
       kept.data_ptr() if kept is not None else base + offsets[5], base + offsets[6], base + offsets[7])
    return y


def sparse_input_linear_cpu(h: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor,
                            bias: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """y = h' @ w_t (+ bias), h' = h where |h| > threshold: a linear layer over the rows of its
    transposed weight w_t [K, N] that its input does not zero (the FFN kernel's second phase alone;
    what a down projection costs given h, and TEAL's thresholded linear input)."""
    k, n = w_t.shape
    if h.shape[-1] != k or threshold.shape != (k,):
        raise ValueError(f"sparse_input_linear_cpu: h [..., {k}] and threshold [{k}] expected for w_t "
                         f"{tuple(w_t.shape)}, got {tuple(h.shape)} and {tuple(threshold.shape)}")
    if w_t.dtype not in _DTYPES or not w_t.is_contiguous():
        raise ValueError(f"sparse_input_linear_cpu: w_t must be contiguous float32 or bfloat16, got {w_t.dtype}")
    out_dtype = out_dtype or h.dtype
    m = h.numel() // k
    y = torch.empty(tuple(h.shape[:-1]) + (n,), dtype=out_dtype)
    if m == 0:
        return y
    h2 = _as(h.reshape(m, k), torch.float32)
    b = _as(bias, w_t.dtype)
    nth = torch.get_num_threads()
    fn = kernel_for(k, k, n, "input", "none", w_t.dtype, out_dtype, False, False, bias is not None, False, "none")
    base, offsets = _scratch(k, m, nth)
    fn(h2.data_ptr(), None, None, None, None, w_t.data_ptr(), _as(threshold, torch.float32).data_ptr(), None,
       _ptr(b), None, y.data_ptr(), m, nth, *(base + o for o in offsets))
    return y


ffn_cpu_generated = functools.partial(ffn_cpu_host, impl="generated")
ffn_cpu_reference = functools.partial(ffn_cpu_host, impl="reference")


def _supports(pattern, dtype: torch.dtype, weight_shape: tuple) -> str | None:
    return cpu_build.unsupported(dtype, _DTYPES, "FFN")


def _not_packed(*args, **kwargs):
    raise NotImplementedError("FFN kernels are packed by the activation family (passes/families/activation)")


ACTIVATION_PATTERNS = tuple(p for p in (getattr(_patterns, n, None) for n in
                                        ("ExactZeros", "ActivationThreshold", "TopK", "PredictedActive"))
                            if p is not None)

SPEC = KernelSpec(
    name="ffn_cpu", op="sparsify::ffn_cpu", schema=FFN_SCHEMA, patterns=ACTIVATION_PATTERNS, replaces="ffn",
    devices=("cpu",), supports=_supports, impl=ffn_cpu_host, pack=_not_packed, out_like=ffn_out_like,
    version=KERNEL_VERSION)
