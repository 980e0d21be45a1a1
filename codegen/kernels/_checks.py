"""Argument checks shared by the kernel host wrappers: one wording for one mistake everywhere."""
from __future__ import annotations

import math

import torch

from sparsify.codegen.epilogue import ACTIVATIONS
from sparsify.codegen.kernels._common import INPUT_PRECISIONS, conv_empty


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def describe(t) -> str:
    """Shape of a tensor, or the type of anything else, for error messages."""
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_tensors(**named) -> None:
    """Every argument named here is a torch.Tensor."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_devices(x, **named) -> None:
    """Every tensor named here is on x's device."""
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_input_dtypes(x, values, allowed_dtypes) -> None:
    """x of an allowed dtype, the packed values in x's dtype."""
    if x.dtype not in allowed_dtypes:
        raise TypeError(f"x dtype must be one of {allowed_dtypes}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} does not match x dtype {x.dtype}")


def check_input_precision(input_precision) -> None:
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")


def check_tiles(**tiles) -> None:
    """Tile sizes of a tl.dot launch: powers of two >= 16 (tl.dot's minimum)."""
    for name, b in tiles.items():
        if not is_int(b) or b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")


def check_dense_weight(weight, dims: int, layout: str) -> None:
    """A weight to pack: a dense (strided) floating tensor of `dims` dimensions (layout: their names)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != dims:
        raise ValueError(f"weight must be a {dims}-D {layout} tensor, got {describe(weight)}")
    if weight.layout != torch.strided:
        raise ValueError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")


def check_linear_input(x, values, n_out, k_in, allowed_dtypes) -> None:
    """x [..., k_in] of an allowed dtype, packed values in x's dtype, non-negative int sizes."""
    if not is_int(n_out) or n_out < 0:
        raise ValueError(f"n_out must be a non-negative int, got {n_out!r}")
    if not is_int(k_in) or k_in < 0:
        raise ValueError(f"k_in must be a non-negative int, got {k_in!r}")
    if x.dim() < 1 or x.shape[-1] != k_in:
        raise ValueError(f"x must be [..., k_in={k_in}], got {tuple(x.shape)}")
    check_input_dtypes(x, values, allowed_dtypes)


# ---- conv ---------------------------------------------------------------------------------------
def check_groups(groups) -> None:
    if groups != 1:
        raise ValueError(f"groups must be 1 (block-sparse conv2d supports dense channel mixing only; "
                         f"grouped/depthwise convs are handled by channel pruning), got groups={groups!r}")


def check_conv_weight(weight, groups) -> None:
    """A 4-D [O, C, kh, kw] conv weight of an ungrouped conv."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D [O, C, kh, kw] tensor, got {describe(weight)}")
    check_groups(groups)


def check_conv_input(x, **sizes) -> None:
    """x a 4-D [N, C, H, W] tensor; the sizes o (and c) non-negative ints, kh and kw positive ones."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got {tuple(x.shape)}")
    for name, v in sizes.items():
        lowest = 0 if name in ("o", "c") else 1
        if not is_int(v) or v < lowest:
            raise ValueError(f"{name} must be a {'non-negative' if lowest == 0 else 'positive'} int, "
                             f"got {v!r}")


def conv_output(x, out_shape: tuple, out_dtype, out):
    """A conv launch's output [N, O, Hout, Wout]: the caller's checked buffer (contiguous or
    channels-last) or a new one in x's memory format."""
    check_out(out, out_shape, out_dtype, x.device, channels_last_ok=True)
    return conv_empty(x, out_shape, out_dtype) if out is None else out


def resolve_out_dtype(x, out_dtype):
    """The output dtype: x's unless given; must be a floating torch.dtype."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    return out_dtype


def check_out(out, shape, dtype, device, *, channels_last_ok: bool = False, contiguous: bool = True) -> None:
    """An optional caller-provided output buffer must match exactly (tests poison it with NaN)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {describe(out)}")
    if out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {dtype} on {device}, got {out.dtype} on {out.device}")
    if not contiguous:
        return
    if channels_last_ok:
        if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
            raise ValueError("out must be contiguous (NCHW) or channels-last contiguous")
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")


def linear_output(x, n_out: int, out_dtype, out):
    """(output [..., n_out], rows) for a linear launch: the caller's checked buffer or a new one, and
    the number of token rows (x's leading dims flattened)."""
    lead = tuple(x.shape[:-1])
    check_out(out, lead + (n_out,), out_dtype, x.device)
    if out is None:
        out = torch.empty(lead + (n_out,), dtype=out_dtype, device=x.device)
    return out, math.prod(lead)


def check_linear_epilogue(x, n_out: int, bias, residual, activation: str) -> None:
    """bias [n_out], residual x.shape[:-1] + (n_out,), both floating and on x's device; a known activation."""
    check_epilogue(x, n_out, tuple(x.shape[:-1]) + (n_out,), "x.shape[:-1] + (n_out,)", bias, residual, activation)


def check_epilogue(x, n_out: int, out_shape: tuple, out_shape_means: str, bias, residual, activation: str) -> None:
    """bias [n_out], residual of the output's shape, both floating and on x's device; a known activation.
    out_shape_means: how the output shape is derived, for the residual's error message."""
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must have shape ({n_out},), got {describe(bias)}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != tuple(out_shape):
            raise ValueError(f"residual must have shape {tuple(out_shape)} ({out_shape_means}), "
                             f"got {describe(residual)}")
        if not residual.dtype.is_floating_point:
            raise TypeError(f"residual must be a floating tensor, got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
