"""The check every family applies to a candidate kernel's output before it is timed."""
from __future__ import annotations

import torch

from sparsify.metrics import rel_l2

# A kernel's output against the dense op on the same weights (masked, or
# the block a sparse activation skips units of): rounding (fp16/bf16 storage, tf32
# dots, another summation order) stays far below these; a kernel bug does not. This is what stands
# between a kernel that miscompiles on some GPU and a silently wrong model.
KERNEL_CHECK_TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class KernelMismatch(RuntimeError):
    pass


def check_kernel_output(kernel: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = KERNEL_CHECK_TOL.get(out.dtype, 1e-2)
    if out.shape != ref.shape:
        raise KernelMismatch(f"{kernel} returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    err = rel_l2(out.float(), ref.float())
    if not err <= tol:                              # also catches NaN
        raise KernelMismatch(f"{kernel} output differs from the dense op on the same pruned weight: "
                             f"relative L2 {err:.3g} > {tol:g}")


def checked_error(kernel: str, run, ref: torch.Tensor, dense: torch.Tensor) -> tuple[float | None, str]:
    """A candidate kernel's output (`run()`) checked against `ref`, the same computation in torch:
    (its error vs the dense output, "") or (None, why it is not a candidate). A kernel that fails
    is not a candidate; the note says why."""
    try:
        out = run()
        check_kernel_output(kernel, out, ref)
        return rel_l2(out, dense), ""
    except Exception as e:  # noqa: BLE001
        return None, f"failed: {type(e).__name__}: {str(e)[:120]}"
