"""The weight-sparse kernels the planner can choose from, behind one interface.

Each `WeightKernel` knows which patterns and devices it serves, how to pack a masked (N, K) weight
into its buffers, and the argument list of its torch custom op. The cost model times `call`, the
rewrite pass emits `op_args` with graph nodes in place of tensors: both go through the same list, so
what is timed is what runs.

Every sparse op's schema ends with `(..., activation: str, out_dtype: ScalarType?)`: `arg_order` lists
the arguments up to the activation and `op_args` appends the output dtype, which the epilogue fusion
pass sets when a dtype cast follows the op.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from . import runtime
from sparsify.patterns import NM, Block, Pattern, Unstructured


@dataclasses.dataclass(frozen=True)
class Packed:
    buffers: dict[str, torch.Tensor]   # become get_attr buffers on the GraphModule
    static: dict[str, Any]             # ints / strings baked into the call

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


@dataclasses.dataclass(frozen=True)
class WeightKernel:
    name: str
    module: str                         # codegen.kernels.<module>; its KERNEL_VERSION keys the cost cache
    serves: tuple                       # pattern classes
    devices: tuple                      # "cpu", "cuda"
    op_name: str                        # torch.ops.sparsify.<op_name>
    pack: Callable[..., Packed]          # (masked weight, pattern, layer params) -> Packed
    arg_order: Callable[[Any, dict, dict, Any, Any, str, int, int], tuple]   # up to `activation`
    supports: Callable[[Pattern, torch.dtype, tuple], str | None] = lambda p, dt, wshape: None
    triton: bool = False                # a Triton kernel: also usable on CPU when kernels are forced
    layer_op: str = "linear"            # the layer kind it replaces: "linear" (also addmm/mm) or "conv2d"

    @property
    def version(self) -> str:
        import importlib

        return importlib.import_module(f"{__package__}.kernels.{self.module}").KERNEL_VERSION

    @property
    def op(self):
        return getattr(torch.ops.sparsify, self.op_name).default

    def unsupported_reason(self, pattern: Pattern, device: torch.device, dtype: torch.dtype,
                           weight_shape: tuple) -> str | None:
        if not isinstance(pattern, self.serves):
            return f"{self.name} does not serve {type(pattern).__name__}"
        if device.type not in self.devices and not (self.triton and runtime.use_triton(device)):
            return f"{self.name} does not run on {device.type}"
        return self.supports(pattern, dtype, weight_shape)

    def op_args(self, x, packed_or_nodes: dict, static: dict, bias, residual, activation: str,
                n_out: int, k_in: int, out_dtype: torch.dtype | None = None) -> tuple:
        return self.arg_order(x, packed_or_nodes, static, bias, residual, activation, n_out, k_in) + (out_dtype,)

    def call(self, x, packed: Packed, bias=None, residual=None, activation="none",
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
        n_out, k_in = packed.static["n_out"], packed.static["k_in"]
        return self.op(*self.op_args(x, packed.buffers, packed.static, bias, residual, activation, n_out, k_in,
                                     out_dtype))


# ---- packers ---------------------------------------------------------------------------------
def _pack_bsr(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.bsr_linear import pack_bsr

    b = pack_bsr(w, p.block)
    return Packed({"values": b.values, "row_ptr": b.row_ptr, "col_idx": b.col_idx},
                  {"n_out": w.shape[0], "k_in": w.shape[1], "block": p.block})


def _pack_nm(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.nm_linear import pack_nm

    b = pack_nm(w, p.n, p.m)
    return Packed({"values": b.values, "meta": b.meta},
                  {"n_out": w.shape[0], "k_in": w.shape[1], "n": p.n, "m": p.m})


def _pack_csr(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.csr_linear import csr_parts, pack_csr

    crow, col, values = csr_parts(pack_csr(w))  # owned tensors, not views: they become buffers
    return Packed({"crow": crow, "col": col, "values": values}, {"n_out": w.shape[0], "k_in": w.shape[1]})


def _pack_sell(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.sell_linear import pack_sell

    b = pack_sell(w)
    return Packed({"values": b.values, "cols": b.cols, "slice_ptr": b.slice_ptr, "perm": b.perm},
                  {"n_out": b.n_out, "k_in": b.k_in, "slice_rows": b.slice_rows})


def _pack_cslt(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.cslt_linear import pack_cslt

    return Packed({"compressed": pack_cslt(w)}, {"n_out": w.shape[0], "k_in": w.shape[1]})


def _nm_supports(p, dtype, wshape):
    return None


def _pack_bsr_conv(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.bsr_conv2d import pack_bsr_conv

    b = pack_bsr_conv(w, p.block)
    return Packed({"values": b.values, "row_ptr": b.row_ptr, "col_idx": b.col_idx},
                  {"n_out": b.o, "k_in": b.c, "kh": b.kh, "kw": b.kw, "block": p.block,
                   "stride": list(layer["stride"]), "padding": list(layer["padding"]),
                   "dilation": list(layer["dilation"])})


def _pack_nm_conv(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.nm_conv2d import pack_nm_conv

    b = pack_nm_conv(w, p.n, p.m)
    return Packed({"values": b.values, "meta": b.meta},
                  {"n_out": b.o, "k_in": b.c, "kh": b.kh, "kw": b.kw, "n": p.n, "m": p.m,
                   "stride": list(layer["stride"]), "padding": list(layer["padding"]),
                   "dilation": list(layer["dilation"])})


def _pack_csr_conv(w: torch.Tensor, p: Pattern, layer: dict | None = None) -> Packed:
    from .kernels.csr_conv2d import pack_csr_conv
    from .kernels.csr_linear import csr_parts

    crow, col, values = csr_parts(pack_csr_conv(w))
    o, c, kh, kw = w.shape
    return Packed({"crow": crow, "col": col, "values": values},
                  {"n_out": o, "k_in": c, "kh": kh, "kw": kw, "stride": list(layer["stride"]),
                   "padding": list(layer["padding"]), "dilation": list(layer["dilation"])})


def _cslt_supports(p, dtype, wshape):
    from .kernels.cslt_linear import cslt_supports

    return cslt_supports(p, dtype, wshape)


KERNELS: dict[str, WeightKernel] = {}


def register_kernel(k: WeightKernel) -> WeightKernel:
    KERNELS[k.name] = k
    return k


register_kernel(WeightKernel(
    "bsr_triton", "bsr_linear", (Block,), ("cuda",), "bsr_linear", _pack_bsr,
    lambda x, b, s, bias, res, act, n, k: (x, b["values"], b["row_ptr"], b["col_idx"], n, bias, res, act),
    triton=True))
register_kernel(WeightKernel(
    "nm_triton", "nm_linear", (NM,), ("cuda",), "nm_linear", _pack_nm,
    lambda x, b, s, bias, res, act, n, k: (x, b["values"], b["meta"], n, k, s["n"], s["m"], bias, res, act),
    _nm_supports, triton=True))
register_kernel(WeightKernel(
    "cslt_2to4", "nm_linear", (NM,), ("cuda",), "cslt_linear", _pack_cslt,
    lambda x, b, s, bias, res, act, n, k: (x, b["compressed"], n, bias, res, act),
    _cslt_supports))
register_kernel(WeightKernel(
    "csr_torch", "csr_linear", (Unstructured, NM, Block), ("cpu", "cuda"), "csr_linear", _pack_csr,
    lambda x, b, s, bias, res, act, n, k: (x, b["crow"], b["col"], b["values"], n, k, bias, res, act)))
register_kernel(WeightKernel(
    "sell_triton", "sell_linear", (Unstructured,), ("cuda",), "sell_linear", _pack_sell,
    lambda x, b, s, bias, res, act, n, k: (x, b["values"], b["cols"], b["slice_ptr"], b["perm"], n, k,
                                           s["slice_rows"], bias, res, act),
    triton=True))
register_kernel(WeightKernel(
    "bsr_conv_triton", "bsr_conv2d", (Block,), ("cuda",), "bsr_conv2d", _pack_bsr_conv,
    lambda x, b, s, bias, res, act, n, k: (x, b["values"], b["row_ptr"], b["col_idx"], n, s["kh"], s["kw"],
                                           s["stride"], s["padding"], s["dilation"], bias, res, act),
    triton=True, layer_op="conv2d"))
register_kernel(WeightKernel(   # any zero pattern on conv, through im2col and torch's CSR matmul (MKL on CPU)
    "csr_conv_torch", "csr_conv2d", (Unstructured, NM, Block), ("cpu", "cuda"), "csr_conv2d", _pack_csr_conv,
    lambda x, b, s, bias, res, act, n, k: (x, b["crow"], b["col"], b["values"], n, s["kh"], s["kw"],
                                           s["stride"], s["padding"], s["dilation"], bias, res, act),
    layer_op="conv2d"))
register_kernel(WeightKernel(
    "nm_conv_triton", "nm_conv2d", (NM,), ("cuda",), "nm_conv2d", _pack_nm_conv,
    lambda x, b, s, bias, res, act, n, k: (x, b["values"], b["meta"], n, k, s["kh"], s["kw"], s["n"], s["m"],
                                           s["stride"], s["padding"], s["dilation"], bias, res, act),
    triton=True, layer_op="conv2d"))


def kernels_for(pattern: Pattern, device: torch.device, dtype: torch.dtype, weight_shape: tuple,
                layer_op: str = "linear"):
    """(usable kernels, {kernel name: why not usable}) for a pattern on a device and layer kind."""
    load_ops()
    ok, why_not = [], {}
    for k in KERNELS.values():
        if k.layer_op != layer_op:
            continue
        reason = k.unsupported_reason(pattern, device, dtype, weight_shape)
        if reason is None:
            ok.append(k)
        elif isinstance(pattern, k.serves):
            why_not[k.name] = reason
    return ok, why_not


def load_ops() -> None:
    """Import the kernel modules so their torch.ops.sparsify.* custom ops are registered."""
    import importlib

    for mod in ("bsr_linear", "nm_linear", "cslt_linear", "csr_linear", "bsr_conv2d", "nm_conv2d", "sell_linear",
                "csr_conv2d"):
        try:
            importlib.import_module(f"{__package__}.kernels.{mod}")
        except ImportError as e:
            if f"kernels.{mod}" not in str(e):
                raise
