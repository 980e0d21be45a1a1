"""How a weight layer is scored, masked and run densely, per layer kind (linear-like or conv2d).

Masks are computed in the linear orientation: weight (N, K) = (out, in-reduction); HF Conv1D (addmm)
stores its weight transposed, and `storage_weight` turns a masked weight back for substitution.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsify import ir
from sparsify.patterns import NM, Block, Unstructured

from ...analysis import criteria


def linear_weight(gm: fx.GraphModule, info: ir.LayerInfo) -> torch.Tensor:
    """The layer's weight in linear orientation (N, K); conv weights as stored (O, C, kh, kw)."""
    w = ir.fetch_attr(gm, info.weight_target).detach()
    return w.t() if info.weight_transposed else w


def storage_weight(info: ir.LayerInfo, w_view: torch.Tensor) -> torch.Tensor:
    """A weight in the view's orientation back in the parameter's own layout."""
    return w_view.t() if info.weight_transposed else w_view


class LinearView:
    """How a linear-like layer is scored, masked and run densely."""

    layer_op = "linear"

    def __init__(self, w, bias, conv=None):
        self.w, self.bias = w, bias

    def unsupported(self, pattern) -> str | None:
        return None

    def sparse_weight(self, pattern, s: torch.Tensor) -> torch.Tensor:
        return self.w * criteria.mask_for(pattern, s)

    def scores(self, criterion, channel_norm, seed):
        return criteria.scores(self.w, criterion, channel_norm, seed)

    def dense(self, x, w, b):
        return F.linear(x, w, b)


class ConvView(LinearView):
    """Conv2d: masks are taken over the implicit-GEMM matrix [O, kh*kw*Cp] (columns (kh, kw, C)),
    the layout the sparse conv kernels read, so a kept block is a kept kernel block and an N:M group
    is m consecutive input channels of one (kh, kw) tap."""

    layer_op = "conv2d"

    def __init__(self, w, bias, conv):
        super().__init__(w, bias)
        self.conv = conv

    def unsupported(self, pattern) -> str | None:
        if self.conv["groups"] != 1:
            return f"grouped conv (groups={self.conv['groups']}): no weight-sparse kernel; channel pruning covers it"
        if isinstance(self.conv["padding"], str):
            return f"padding={self.conv['padding']!r} is not supported by the sparse conv kernel"
        if not isinstance(pattern, (Block, NM, Unstructured)):
            return f"{type(pattern).__name__} on conv: only Block, NM and Unstructured have conv kernels"
        return None

    def scores(self, criterion, channel_norm, seed):
        o, c, kh, kw = self.w.shape
        flat = criteria.scores(self.w.permute(0, 2, 3, 1).reshape(o, -1), criterion,
                               None if channel_norm is None else channel_norm.repeat(kh * kw), seed)
        return flat.reshape(o, kh, kw, c).permute(0, 3, 1, 2)        # back to the weight's layout

    def sparse_weight(self, pattern, s):
        from sparsify.codegen.kernels.bsr_conv2d import conv_weight_matrix

        if isinstance(pattern, Unstructured):   # per output channel (Wanda) over all of its C*kh*kw
            return self.w * criteria.mask_for(pattern, s.reshape(s.shape[0], -1)).reshape(s.shape)
        if isinstance(pattern, NM):
            from sparsify.codegen.kernels.nm_conv2d import nm_conv_mask

            return self.w * nm_conv_mask(s, pattern.n, pattern.m)
        o, c, kh, kw = self.w.shape
        mask = criteria.mask_for(pattern, conv_weight_matrix(s, pattern.block))
        cp = mask.shape[1] // (kh * kw)
        mask4 = mask.reshape(o, kh, kw, cp)[..., :c].permute(0, 3, 1, 2)
        return self.w * mask4

    def dense(self, x, w, b):
        return F.conv2d(x, w, b, self.conv["stride"], self.conv["padding"], self.conv["dilation"],
                        self.conv["groups"])


def view_of(gm: fx.GraphModule, info: ir.LayerInfo) -> LinearView:
    w = linear_weight(gm, info)
    bias = ir.fetch_attr(gm, info.bias_target).detach() if info.bias_target else None
    return (ConvView if info.op == "conv2d" else LinearView)(w, bias, info.conv_params)
