"""KernelSpec: what a kernel file declares at its end, so the registry can find it and the planner use it.

A spec says which patterns the kernel serves, for which layer kind, on which devices it is a planning
candidate, how a masked weight is packed for it, and its torch custom op. The op's schema is written
once, in the spec; everything that calls the op (the cost model timing a candidate, the rewrite
emitting graph nodes, the fake implementation) builds the argument list from that schema by name,
so what is timed is what runs and no argument list is written twice.

Naming rule that makes this work: the packed buffers (`Prepared.buffers`) and baked values
(`Prepared.static`) a spec's `pack` returns are named after the op's schema arguments; the input is
`x`; the epilogue arguments are `bias`, `residual`, `activation`, `out_dtype` (see
codegen.epilogue.EPILOGUE_ARGS), in that order at the end of every sparse op's schema.

Implementations: `impl` runs on every device; `device_impls` overrides it per device type (a CPU code
generator's kernel beside a Triton kernel). Both take the schema's arguments in schema order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from sparsify import inference
from sparsify.state import Prepared

from . import runtime


_LIBRARIES: dict[str, torch.library.Library] = {}   # namespace -> the fragment our ops are defined in
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# What a kernel replaces: a weight layer ("linear": linear / addmm / mm; "conv2d"), a whole FFN
# block with its activation sparsity (the activation family's sites), or two consecutive planned
# sparse ops ("linear_pair": never planned, made by passes/rewrite/fuse_pairs.py; see `fuses`), or
# torch's scaled_dot_product_attention ("attention": put in place by passes/rewrite/lower_attention.py).
REPLACES = ("linear", "conv2d", "ffn", "linear_pair", "attention")


def _library(namespace: str) -> torch.library.Library:
    lib = _LIBRARIES.get(namespace)
    if lib is None:
        lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return lib


def _autograd_kernel(op: str) -> Callable:
    """The op's Autograd kernel: runs it below autograd, and ties an output that should have had a
    gradient to a backward that says why it cannot (the ops are inference-only).

    The ops are plain `torch.library` definitions, not `torch.library.custom_op`s: the custom-op
    wrapper cost ~50 us a call (measured: 88 us against 10 us for the same kernel on a 16x48->64
    layer), as much as a whole 90%-sparse BERT-base projection; this kernel costs ~8 us. A compiled
    model runs its graph under no_grad and marks its outputs itself (sparsify/inference.py)."""
    namespace, _, name = op.partition("::")
    overload = getattr(getattr(torch.ops, namespace), name).default   # defined before its kernels
    message = (f"{op} is inference-only (no backward): to train, train the original model, then compile it "
               f"again")

    def kernel(*args, **kwargs):
        with torch._C._AutoDispatchBelowAutograd():
            out = overload(*args, **kwargs)
        if torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    return inference.NoBackward.apply(out, a, message)
        return out
    return kernel


@dataclasses.dataclass(frozen=True, eq=False)
class KernelSpec:
    name: str                     # what plans and Config.kernels call it ("bsr_triton")
    op: str                       # qualified op name, "sparsify::bsr_linear"
    schema: str                   # "(Tensor x, ...) -> Tensor": the op's arguments, written here only
    patterns: tuple               # pattern classes it serves
    replaces: str                 # what it replaces (REPLACES): a layer kind, or "ffn" (a whole FFN block)
    devices: tuple                # device types where it is a planning candidate
    impl: Callable                # the implementation (schema arguments, in order)
    pack: Callable[..., Prepared]  # (masked weight, pattern, layer params or None) -> Prepared
    out_like: Callable[[dict], torch.Tensor]   # the fake: bound arguments -> an empty output
    version: str                  # part of the cost-cache key: bump when the computation changes
    supports: Callable[[Any, torch.dtype, tuple], str | None] | None = None  # why not, or None
    interpretable: bool = False   # a Triton kernel: also a candidate on CPU tensors under force_triton
    device_impls: dict = dataclasses.field(default_factory=dict)
    layouts: tuple = ("row",)     # activation layouts its op takes (schema argument `layout`; _common.LAYOUTS)
    pack_params: tuple = ()       # the pattern's fields its pack reads besides the kept weights ("block")
    # ops of this kernel that read the same x can run as one whose output rows are theirs stacked
    # (passes/rewrite/stack_siblings.py): {argument: tensor} of each, in order -> the stacked arguments
    stack_rows: Callable[[list[dict]], dict] | None = None
    # a "linear_pair" kernel: the kernel names (first, second) of two ops, the first's only use the
    # second's x, that it runs as one; its arguments "a_<name>" are the first op's <name>, x and
    # k_in the first's, the rest the second's (passes/rewrite/fuse_pairs.py)
    fuses: tuple = ()

    def __post_init__(self):
        if self.replaces not in REPLACES:
            raise ValueError(f"KernelSpec {self.name}: replaces must be one of {REPLACES}, got {self.replaces!r}")
        namespace, _, name = self.op.partition("::")
        if not hasattr(getattr(torch.ops, namespace), name):   # a re-imported kernel file keeps its op
            lib = _library(namespace)
            lib.define(name + self.schema)
            lib.impl(name, self.impl, "CompositeExplicitAutograd")
            for device, fn in self.device_impls.items():
                lib.impl(name, fn, _DISPATCH_KEYS[device])
            lib.impl(name, _autograd_kernel(self.op), "Autograd")
            torch.library.register_fake(self.op, lambda *args, **kwargs: self.out_like(self.bind(args, kwargs)),
                                        lib=lib)

    # ---- the op and its arguments ------------------------------------------------------------
    @property
    def overload(self) -> torch._ops.OpOverload:
        lib, _, name = self.op.partition("::")
        return getattr(getattr(torch.ops, lib), name).default

    @property
    def arguments(self) -> list:
        return list(self.overload._schema.arguments)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Schema name -> value of one call (defaults filled in)."""
        out = {}
        for i, a in enumerate(self.arguments):
            if i < len(args):
                out[a.name] = args[i]
            elif a.name in kwargs:
                out[a.name] = kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                raise TypeError(f"{self.op}: missing argument {a.name!r}")
        return out

    def op_args(self, x, buffers: dict, static: dict, bias=None, residual=None, activation: str = "none",
                out_dtype: torch.dtype | None = None) -> tuple:
        """The op's positional arguments, by schema name: tensors or graph nodes alike."""
        values = {**static, **buffers, "x": x, "bias": bias, "residual": residual, "activation": activation,
                  "out_dtype": out_dtype}
        args = []
        for a in self.arguments:
            if a.name in values:
                args.append(values[a.name])
            elif a.has_default_value():
                args.append(a.default_value)
            else:
                raise KeyError(f"kernel {self.name}: its pack gave no value for op argument {a.name!r} "
                               f"(buffers {sorted(buffers)}, static {sorted(static)})")
        return tuple(args)

    def call(self, x, prepared: Prepared, bias=None, residual=None, activation: str = "none",
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.overload(*self.op_args(x, prepared.buffers, prepared.static, bias, residual, activation,
                                           out_dtype))

    # ---- planning ----------------------------------------------------------------------------
    def unsupported_reason(self, pattern, device: torch.device, dtype: torch.dtype,
                           weight_shape: tuple) -> str | None:
        if not isinstance(pattern, self.patterns):
            return f"{self.name} does not serve {type(pattern).__name__}"
        if device.type not in self.devices and not (self.interpretable and runtime.use_triton(device)):
            return f"{self.name} does not run on {device.type}"
        return self.supports(pattern, dtype, weight_shape) if self.supports is not None else None
