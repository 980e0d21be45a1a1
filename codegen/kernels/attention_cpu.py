"""Scaled dot-product attention on the CPU through a generated kernel (codegen/cpu_attention_source.py):
out = softmax(q k^T * scale + mask) v, fp32, q/k/v [B, H, S or L, D] read through their strides.

Not a planning candidate (devices=()): the lower pass passes/rewrite/lower_attention.py puts it in
place of torch's scaled_dot_product_attention where it measured faster on the graph's shapes
(BERT-base, 16 x 12 heads x 128 tokens: torch's CPU flash kernel ~8 ms, this ~5.7 ms). The same
arguments as torch's (dropout 0, no grouped-query heads): an fp32 additive or bool mask
broadcastable to [B, H, S, L], is_causal (top-left aligned), scale (default 1/sqrt(D)). D a
multiple of 32, x86-64 with AVX-512 and a C compiler. The output is [B, H, S, D] over memory laid
out [B, S, H, D] (as torch's CPU kernel returns it): the usual transpose back to tokens is free.

Entry points: `attention_cpu_host`, `SPEC`.
"""
from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch
import torch.nn.functional as F

from sparsify.codegen import cpu_attention_source, cpu_build, cpu_exec
from sparsify.codegen.kernels._common import resolve_impl
from sparsify.codegen.kernels.csr_cpu import _I, _I64, _P, scratch
from sparsify.codegen.spec import KernelSpec

KERNEL_VERSION = f"attention_cpu-1+{cpu_attention_source.TEMPLATE_VERSION}"
_FUNCS: dict[tuple, ctypes._CFuncPtr] = {}
_MASK_TYPES = {torch.float32: "float32", torch.bool: "bool"}


def kernel_for(d: int, mask: Optional[str], causal: bool):
    return cpu_build.function(_FUNCS, (d, mask, causal), lambda: cpu_attention_source.source(d, mask, causal),
                              [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, ctypes.c_float, _I, _P])


def generated_sources() -> dict[str, str]:
    return cpu_build.sources(_FUNCS)


def unsupported() -> Optional[str]:
    """Why the kernel cannot run here, or None."""
    return cpu_exec.unsupported() or cpu_build.compiler()


def check(q, k, v, attn_mask, is_causal, scale) -> None:
    """What the generated kernel takes; a ValueError / TypeError naming the argument otherwise."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention_cpu: {name} must be a 4-D tensor [B, H, tokens, D], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"attention_cpu: {name} must be float32 on the CPU, got {t.dtype} on {t.device}")
    (b, h, s, d), L = q.shape, k.shape[2]
    if tuple(k.shape) != (b, h, L, d) or tuple(v.shape) != (b, h, L, d):
        raise ValueError(f"attention_cpu: k and v must be [B, H, L, D] = [{b}, {h}, L, {d}] like q, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)} (grouped-query heads are not supported)")
    if d % cpu_attention_source.KEY_BLOCK:
        raise ValueError(f"attention_cpu: the head size D must be a multiple of {cpu_attention_source.KEY_BLOCK}, "
                         f"got {d}")
    if attn_mask is not None:
        if attn_mask.dtype not in _MASK_TYPES:
            raise TypeError(f"attention_cpu: attn_mask must be float32 (added) or bool (True: attend), got "
                            f"{attn_mask.dtype}")
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), (b, h, s, L))
        except RuntimeError:
            raise ValueError(f"attention_cpu: attn_mask {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, H, S, L] = {(b, h, s, L)}") from None
        if is_causal:
            raise ValueError("attention_cpu: attn_mask and is_causal together are not supported (as torch's)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention_cpu: scale must be a finite number or None, got {scale!r}")


def attention_cpu_host(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                       is_causal: bool = False, scale: Optional[float] = None, out: Optional[torch.Tensor] = None,
                       *, impl: str = "auto") -> torch.Tensor:
    """torch's scaled_dot_product_attention (dropout 0) by the generated kernel ("generated", what
    "auto" runs) or by torch ("reference"). `out`, if given ([B, H, S, D] fp32, any strides with the
    last contiguous), is written and returned."""
    check(q, k, v, attn_mask, is_causal, scale)
    if out is not None and (tuple(out.shape) != tuple(q.shape) or out.dtype != torch.float32 or out.stride(-1) != 1):
        raise ValueError(f"attention_cpu: out must be float32 {tuple(q.shape)} with a contiguous last dimension, "
                         f"got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    impl = resolve_impl(impl, q.device, ("generated", "reference"))
    if impl == "reference":
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        return out.copy_(y) if out is not None else y
    why = unsupported()
    if why is not None:
        raise RuntimeError(f"attention_cpu cannot run here: {why}")
    (b, h, s, d), L = q.shape, k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty(b, s, h, d).transpose(1, 2)
    if out.numel() == 0:
        return out
    mask = attn_mask
    if mask is not None:
        mask = mask.expand(b, h, s, L)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    strides = torch.tensor([*q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                            *(mask.stride()[:3] if mask is not None else (0, 0, 0)), *out.stride()[:3]],
                           dtype=torch.int64)
    threads = torch.get_num_threads()
    l32 = -(-L // cpu_attention_source.KEY_BLOCK) * cpu_attention_source.KEY_BLOCK
    rows = cpu_attention_source.QUERY_ROWS
    work = scratch(threads * (d * l32 + rows * l32 + rows * d))
    fn = kernel_for(d, _MASK_TYPES[mask.dtype] if mask is not None else None, bool(is_causal))
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else None, out.data_ptr(),
       b, h, s, L, strides.data_ptr(), 1.0 / math.sqrt(d) if scale is None else float(scale), threads,
       work.data_ptr())
    return out


def _out_like(a: dict) -> torch.Tensor:
    q = a["q"]
    b, h, s, d = q.shape
    return q.new_empty((b, s, h, d)).transpose(1, 2)


def _never_packed(*_):
    raise TypeError("attention_cpu replaces torch's scaled_dot_product_attention (passes/rewrite/"
                    "lower_attention.py); it has no weight to pack")


SPEC = KernelSpec(
    name="attention_cpu", op="sparsify::attention_cpu",
    schema="(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool is_causal=False, float? scale=None) -> Tensor",
    patterns=(), replaces="attention", devices=(), impl=attention_cpu_host, pack=_never_packed, out_like=_out_like,
    version=KERNEL_VERSION)
