"""calibrate: run the calibration batches and record per-layer input statistics (LayerStats)."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.pipeline import PassContext, PassResult, register_pass

HIST_BINS = 64
MAX_SAMPLE_ROWS = 4096  # rows of layer input kept for timing and error measurement


@dataclasses.dataclass
class LayerStats:
    """Statistics of a layer's input over the calibration data.

    channel_sq_sum: per input feature (reduction dim), the sum of squares over all tokens / pixels;
      sqrt of it is the ||x_j||_2 that Wanda multiplies with |W_ij|.
    abs_hist / hist_edges: histogram of |x| (for activation-sparsity thresholds).
    sample: the first batch's layer input (truncated to MAX_SAMPLE_ROWS rows) for timing and error.
    zero_fraction: share of exact zeros in the input (ReLU sparsity).
    """

    rows: int = 0
    channel_sq_sum: torch.Tensor | None = None
    abs_hist: torch.Tensor | None = None
    hist_edges: torch.Tensor | None = None
    zero_fraction: float = 0.0
    sample: torch.Tensor | None = None
    _zeros: int = 0
    _elems: int = 0

    @property
    def channel_norm(self) -> torch.Tensor:
        return self.channel_sq_sum.sqrt()

    def update(self, x: torch.Tensor, channel_dim: int) -> None:
        x = x.detach()
        xf = x.float()
        moved = xf.movedim(channel_dim, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        sq = flat.pow(2).sum(0)
        self.channel_sq_sum = sq if self.channel_sq_sum is None else self.channel_sq_sum + sq
        self.rows += flat.shape[0]
        a = flat.abs()
        if self.hist_edges is None:
            top = float(a.max()) if a.numel() else 1.0
            self.hist_edges = torch.linspace(0, max(top, 1e-12) * 1.5, HIST_BINS + 1)
        h = torch.histc(a.clamp(max=float(self.hist_edges[-1])), bins=HIST_BINS, min=0.0,
                        max=float(self.hist_edges[-1]))
        self.abs_hist = h if self.abs_hist is None else self.abs_hist + h
        self._zeros += int((flat == 0).sum())
        self._elems += flat.numel()
        self.zero_fraction = self._zeros / max(self._elems, 1)
        if self.sample is None:
            if channel_dim == -1 and x.dim() > 1 and x.shape[:-1].numel() > MAX_SAMPLE_ROWS:
                x = x.reshape(-1, x.shape[-1])[:MAX_SAMPLE_ROWS]
            self.sample = x.clone()


def _input_node_and_dim(node: fx.Node, info: ir.LayerInfo):
    x_index = ir.WEIGHT_OPS[node.target][1]
    return node.args[x_index], (1 if info.op == "conv2d" else -1)


def run_calibration(gm: fx.GraphModule, ctx: PassContext, nodes) -> dict[str, LayerStats]:
    stats: dict[str, LayerStats] = {}
    dims = {}
    watch = []
    for node in nodes:
        info = node.meta[ir.LAYER]
        x_node, dim = _input_node_and_dim(node, info)
        stats[info.fqn] = LayerStats()
        dims[info.fqn] = dim
        watch.append((x_node, info.fqn))

    def record(fqn, value):
        if isinstance(value, torch.Tensor):
            stats[fqn].update(value, dims[fqn])

    batches = ctx.calibration
    with ir.probes(gm, watch, record), torch.no_grad():
        for i, (args, kwargs) in enumerate(batches):
            ctx.say(f"calibrate batch {i + 1}/{len(batches)}")
            gm(*args, **kwargs)
    return stats


@register_pass("calibrate", kind="analysis", default=True)
def calibrate(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    nodes = ir.layer_nodes(gm)
    if not nodes or not ctx.calibration:
        return PassResult(gm, False, {"layers": 0})
    stats = run_calibration(gm, ctx, nodes)
    for node in nodes:
        node.meta[ir.STATS] = stats[node.meta[ir.LAYER].fqn]
    ctx.state.setdefault("stats", {}).update(stats)
    return PassResult(gm, False, {"layers": len(nodes), "batches": len(ctx.calibration)})
