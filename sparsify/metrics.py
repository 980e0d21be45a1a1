"""Error metrics shared by planning and verification."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


def float_leaves(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # Hugging Face ModelOutput
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


_ROW = 4096   # elements per partial norm


def _sq_norm64(t: torch.Tensor) -> torch.Tensor:
    """||t||^2 in float64: fp32 norms of rows of _ROW elements (accurate to ~1e-7 each), their
    squares summed in float64. A float64 copy of a 2048 x 3072 output took 50 ms; this 10."""
    flat = t.reshape(-1)
    whole = flat.numel() // _ROW * _ROW
    head = torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), dim=1).double().square().sum()
    return head + flat[whole:].double().square().sum()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| accumulated in float64 (b is the reference); a float64 input is computed in
    float64 throughout, others with the difference in float32 (exact where a and b are close)."""
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-30))
    b = b.float()
    return float(_sq_norm64(a.float() - b).sqrt() / _sq_norm64(b).sqrt().clamp_min(1e-30))


def output_error(dense_outs, sparse_outs) -> float:
    """Relative L2 error over all floating output tensors of all batches."""
    num = den = 0.0
    for d, s in zip(dense_outs, sparse_outs):
        dl, sl = float_leaves(d), float_leaves(s)
        if len(dl) != len(sl):
            raise RuntimeError(f"sparse model returned {len(sl)} tensors, dense {len(dl)}")
        for a, b in zip(dl, sl):
            if a.shape != b.shape:
                raise RuntimeError(f"sparse output shape {tuple(b.shape)} != dense {tuple(a.shape)}")
            num += float((b.double() - a.double()).pow(2).sum())
            den += float(a.double().pow(2).sum())
    return (num / max(den, 1e-300)) ** 0.5


METRICS = ("rel_l2", "cosine")


def select(out, output):
    """The part of a model output the error budget is on: everything (None), element `output` of
    the output tuple (int), the field or key `output` (str: a Hugging Face ModelOutput attribute or a
    dict key), or what the callable `output(out)` returns."""
    if output is None:
        return out
    if callable(output):
        return output(out)
    if isinstance(output, int):
        items = out.to_tuple() if hasattr(out, "to_tuple") else out
        return items[output]
    if isinstance(out, dict) or hasattr(out, "keys"):
        return out[output]
    return getattr(out, output)


def cosine_error(dense_outs, sparse_outs) -> float:
    """1 - the mean cosine similarity of matching rows (last dim) over all floating outputs: for a
    pooled embedding [batch, dim], how far the sparse model's embeddings turn from dense."""
    sims = []
    for d, s in zip(dense_outs, sparse_outs):
        for a, b in zip(float_leaves(d), float_leaves(s)):
            a2, b2 = a.double().reshape(-1, a.shape[-1]), b.double().reshape(-1, b.shape[-1])
            sims.append(torch.nn.functional.cosine_similarity(a2, b2, dim=-1))
    return float(1 - torch.cat(sims).mean()) if sims else 0.0


def model_error(dense_outs, sparse_outs, metric="rel_l2", output=None) -> float:
    """The error the budget (Config.max_error) is on: `metric` ("rel_l2", "cosine", or a callable
    (dense, sparse) -> float) of the `output` selected from each batch's outputs."""
    d = [select(o, output) for o in dense_outs]
    s = [select(o, output) for o in sparse_outs]
    if callable(metric):
        return float(metric(d, s))
    if metric == "cosine":
        return cosine_error(d, s)
    return output_error(d, s)
