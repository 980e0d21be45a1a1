"""The kernel registry: every `KernelSpec` the kernel files declare, found by importing them.

Each module in codegen/kernels/ whose name does not start with "_" ends with its spec(s) at module
level; `specs()` imports them all once (which also registers their torch custom ops) and collects
every KernelSpec it finds. A user's own kernel joins with `register_kernel(spec)`.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from .spec import KernelSpec

_SPECS: dict[str, KernelSpec] = {}
_DISCOVERED = [False]


def _discover() -> None:
    from . import kernels

    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, KernelSpec):
                _SPECS.setdefault(value.name, value)
    _DISCOVERED[0] = True


def specs() -> dict[str, KernelSpec]:
    """name -> KernelSpec of every kernel (built-in and registered)."""
    if not _DISCOVERED[0]:
        _discover()
    return dict(_SPECS)


def get(name: str) -> KernelSpec:
    known = specs()
    if name not in known:
        raise KeyError(f"no kernel named {name!r}; known: {sorted(known)}")
    return known[name]


def spec_of(target) -> KernelSpec | None:
    """The spec whose op a graph node calls (its OpOverload), or None."""
    for spec in specs().values():
        if spec.overload == target:
            return spec
    return None


def check_kernel_names(names) -> None:
    """Config.kernels must name registered kernels (a typo must not silently plan nothing)."""
    from sparsify.config import ConfigError

    known = specs()
    unknown = [k for k in names if k not in known]
    if unknown:
        raise ConfigError(f"Config.kernels: unknown kernel(s) {unknown}; known: {sorted(known)}")


def register_kernel(spec: KernelSpec) -> KernelSpec:
    """Add a kernel of your own (its op is defined when the spec is created)."""
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"register_kernel expects a KernelSpec, got {type(spec).__name__}")
    specs()
    _SPECS[spec.name] = spec
    return spec


def unregister_kernel(name: str) -> None:
    _SPECS.pop(name, None)


def kernels_for(pattern, device: torch.device, dtype: torch.dtype, weight_shape: tuple,
                replaces: str = "linear") -> tuple[list[KernelSpec], dict[str, str]]:
    """(usable kernels, {kernel name: why not usable}) for a pattern on a device and layer kind."""
    ok, why_not = [], {}
    for spec in specs().values():
        if spec.replaces != replaces:
            continue
        reason = spec.unsupported_reason(pattern, device, dtype, weight_shape)
        if reason is None:
            ok.append(spec)
        elif isinstance(pattern, spec.patterns):
            why_not[spec.name] = reason
    return ok, why_not
