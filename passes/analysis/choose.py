"""choose_patterns: per weight layer, measure candidates (error and time) and write a LayerPlan.

Candidates come from the Config (explicit pattern, Auto's candidate list, or a per-fqn override).
For each, the criterion gives a mask, every kernel that serves the pattern on the device is timed at
the layer's real input, and the layer output error vs dense is measured on the calibration sample.
A layer becomes sparse only when its best candidate is measured faster than dense (Config.force
overrides that for explicit patterns) and, with Auto, its layer error is within the budget. The
model-level budget is enforced afterwards by verification, which rolls back layers.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsify import ir
from sparsify.codegen import weight_kernels
from sparsify.patterns import NM, Auto, Block, Channel, Pattern, Unstructured
from sparsify.pipeline import PassContext, PassResult, register_pass
from sparsify.plan import FORCED, PRUNED, SPARSE, Candidate, LayerPlan

from . import criteria
from sparsify.timing import CostModel
from .sensitivity import ModelSensitivity

DEFAULT_AUTO_CANDIDATES = (NM(2, 4), Block(32, 0.5), Block(64, 0.25), Unstructured(0.9))


from sparsify.metrics import rel_l2 as _rel_l2


def linear_weight(gm: fx.GraphModule, info: ir.LayerInfo) -> torch.Tensor:
    """The layer's weight in linear orientation (N, K); conv weights as stored (O, C, kh, kw)."""
    w = ir.fetch_attr(gm, info.weight_target).detach()
    return w.t() if info.weight_transposed else w


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


# A kernel's output against the dense op on the same pruned weight: rounding (fp16/bf16 storage, tf32
# dots, another summation order) stays far below these; a kernel bug does not. This is what stands
# between a kernel that miscompiles on some GPU and a silently wrong model.
KERNEL_CHECK_TOL = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class KernelMismatch(RuntimeError):
    pass


def _check_kernel_output(kernel: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    tol = KERNEL_CHECK_TOL.get(out.dtype, 1e-2)
    if out.shape != ref.shape:
        raise KernelMismatch(f"{kernel} returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    err = _rel_l2(out.float(), ref.float())
    if not err <= tol:                              # also catches NaN
        raise KernelMismatch(f"{kernel} output differs from the dense op on the same pruned weight: "
                             f"relative L2 {err:.3g} > {tol:g}")


def _candidates(pattern: Pattern, ctx: PassContext, w: torch.Tensor | None = None) -> list[Pattern]:
    if isinstance(pattern, Auto):
        cands = list(ctx.config.candidates or DEFAULT_AUTO_CANDIDATES)
        if w is not None and not ctx.config.candidates:
            cands += [c for c in existing_sparsity_candidates(w) if c not in cands]
        return cands
    return [pattern]


def existing_sparsity_candidates(w: torch.Tensor, min_sparsity: float = 0.5) -> list[Pattern]:
    """Patterns that a weight already has (a pruned checkpoint, a lottery ticket): exact zeros as
    unstructured sparsity, and all-zero blocks as block density. Keeping them costs no accuracy."""
    w2 = w.reshape(w.shape[0], -1) if w.dim() == 4 else w
    zero = (w2 == 0).float().mean().item()
    if zero < min_sparsity:
        return []
    found: list[Pattern] = [Unstructured(round(zero, 4))]
    for block in (32, 64, 128):
        if w2.shape[0] < block or w2.shape[1] < block:
            continue
        n, k = w2.shape
        padded = torch.nn.functional.pad(w2, (0, (-k) % block, 0, (-n) % block))
        nz = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block).ne(0).any(3).any(1)
        density = nz.float().mean().item()
        if 0 < density <= 0.5:
            found.append(Block(block, density))  # round(total * density) is the exact count
    return found


def _dense_call(info, w, bias, x):
    return lambda: F.linear(x, w, bias)


@register_pass("choose_patterns", kind="analysis", default=True)
def choose_patterns(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    cost = ctx.state.get("cost_model") or CostModel(ctx.device, cfg.timing_repeats)
    ctx.state["cost_model"] = cost
    plans = ctx.state.setdefault("plans", {})
    packed_store = ctx.state.setdefault("packed", {})
    unknown = [k for k in cfg.kernels if k not in weight_kernels.KERNELS]
    if unknown:
        raise ValueError(f"Config.kernels: unknown kernel(s) {unknown}; known: {sorted(weight_kernels.KERNELS)}")
    nodes = ir.layer_nodes(gm)
    sens = None
    if cfg.model_sensitivity and ctx.calibration and nodes:
        sens = ModelSensitivity(gm, ctx.calibration)
    ctx.state["sensitivity"] = sens
    for i, node in enumerate(nodes):
        info: ir.LayerInfo = node.meta[ir.LAYER]
        ctx.say(f"plan {i + 1}/{len(nodes)} {info.fqn}")
        lp = LayerPlan(info.fqn, info.op, info.input_shape, info.weight_shape, info.output_shape)
        requested, source = cfg.pattern_for(info.fqn, "weight")
        lp.source = source
        node.meta[ir.PLAN] = lp
        plans[info.fqn] = lp
        if requested.is_dense:
            lp.reason = f"dense by {source}"
            continue
        if isinstance(requested, Channel):
            _plan_channel_layer(lp, requested, ctx)
            continue
        if info.fqn in ctx.state.get("shared_weights", {}):
            lp.reason = "weight shared with another op (tied): kept dense so the tie holds"
            continue
        stats = node.meta.get(ir.STATS)
        if stats is None or stats.sample is None:
            lp.reason = "no calibration input reached this layer: kept dense"
            continue
        _plan_layer(gm, node, info, stats, requested, ctx, cost, lp, packed_store)
    return PassResult(gm, modified=False, info={"layers": len(nodes)})


def _storage_weight(info: ir.LayerInfo, w_view: torch.Tensor) -> torch.Tensor:
    """A weight in the view's orientation back in the parameter's own layout."""
    return w_view.t() if info.weight_transposed else w_view


def _pick(feasible, requested, info, ctx, lp):
    """Fastest feasible candidate whose accumulated model error stays within max_error (Auto);
    an explicit pattern takes its fastest kernel, and verification enforces the budget."""
    sens = ctx.state.get("sensitivity")
    for cand, packed, w_sparse in sorted(feasible, key=lambda f: f[0].time_ms):
        weight = _storage_weight(info, w_sparse)
        if sens is not None:
            cand.model_error = sens.error({info.weight_target: weight})
            if isinstance(requested, Auto) and cand.model_error > ctx.config.max_error:
                continue
            sens.accept(info.weight_target, weight)
        return cand, packed
    return None


def _channel_words(unit: int, weights: tuple) -> str:
    """What a pruned group channel is, in the report's words."""
    if len(weights) > 1 and len(set(weights)) > 1:   # grouped-query q|k|v: a k/v head with its q heads
        return f"blocks of {'+'.join(str(unit * w) for w in weights)} channels ({len(weights)} packed parts)"
    what = f"heads of {unit} channels" if unit > 1 else "output channels"
    return what + (f" in each of {len(weights)} packed parts" if len(weights) > 1 else "")


def _plan_channel_layer(lp: LayerPlan, requested: Channel, ctx: PassContext) -> None:
    """Channel pruning already happened (prune_channels); record its outcome for this layer."""
    lp.pattern = requested
    done = ctx.state.get("channel_groups_pruned", {}).get(lp.fqn)
    skipped = ctx.state.get("channel_groups_skipped", {}).get(lp.fqn)
    if done is not None:
        lp.status, lp.kernel = PRUNED, "dense (shrunk)"
        lp.sparsity = 1 - done["kept"] / done["channels"]
        what = _channel_words(done.get("unit", 1), done.get("weights", (1,)))
        lp.reason = (f"channel pruned: kept {done['kept']}/{done['channels']} {what} together with "
                     f"{', '.join(done['members'][:6])}; shapes above are the pruned ones; speed is checked "
                     f"at model level (verification), not per layer")
        if done.get("consumer_error") is not None:
            # the layer err column: where the pruned channels are read
            lp.layer_error = done["consumer_error"]
            lp.reason += (f"; output error of {done['consumer']}, which reads these channels: "
                          f"{done['consumer_error']:.3g} (calibration batch; this group and those pruned "
                          f"before it)")
        else:
            lp.reason += ("; the output error where these channels are read is not measured (no calibration "
                          "batch, or an earlier prune already changed that layer's output shape)")
    elif skipped is not None:
        lp.reason = f"channel pruning not applied: {skipped}"
    else:
        lp.reason = "Channel: its output channels were not pruned (only input channels may have shrunk)"


def _plan_layer(gm, node, info, stats, requested, ctx, cost, lp, packed_store):
    cfg = ctx.config
    w = linear_weight(gm, info)
    bias = ir.fetch_attr(gm, info.bias_target).detach() if info.bias_target else None
    view = (ConvView if info.op == "conv2d" else LinearView)(w, bias, info.conv_params)
    x = stats.sample.to(ctx.device)
    if x.dim() == 1:
        x = x[None]
    w_dev, b_dev = w.to(ctx.device), bias.to(ctx.device) if bias is not None else None
    x = x.to(w_dev.dtype)
    with torch.no_grad():
        dense_out = view.dense(x, w_dev, b_dev)
        shape_key = (info.op, tuple(x.shape), tuple(w.shape), str(w.dtype), bias is not None,
                     str(info.conv_params))
        lp.dense_ms = cost.time(cost.key("dense", *shape_key), lambda: view.dense(x, w_dev, b_dev))
        channel_norm = stats.channel_norm if stats.channel_sq_sum is not None else None
        feasible = []
        for pattern in _candidates(requested, ctx, w):
            if isinstance(pattern, Channel):
                lp.candidates.append(Candidate(pattern, "-", pattern.sparsity,
                                               note="channel pruning runs as the prune_channels pass"))
                continue
            why = view.unsupported(pattern)
            if why is not None:
                lp.candidates.append(Candidate(pattern, "-", 0.0, note=why))
                continue
            try:
                s = view.scores(pattern.criterion, channel_norm, cfg.seed)
            except ValueError as e:
                lp.candidates.append(Candidate(pattern, "-", 0.0, note=str(e)))
                continue
            w_sparse = view.sparse_weight(pattern, s).to(ctx.device)
            sparsity = 1.0 - (w_sparse != 0).float().mean().item()
            kernels, why_not = weight_kernels.kernels_for(pattern, ctx.device, w.dtype, tuple(w.shape),
                                                          view.layer_op)
            if cfg.kernels:
                kernels = [k for k in kernels if k.name in cfg.kernels]
            for name, why in why_not.items():
                lp.candidates.append(Candidate(pattern, name, sparsity, note=why))
            sparse_ref = (view.dense(x.float(), w_sparse.float(), None if b_dev is None else b_dev.float())
                          if kernels else None)
            for k in kernels:
                try:
                    packed = k.pack(w_sparse, pattern, info.conv_params)
                    out = k.call(x, packed, b_dev)
                    _check_kernel_output(k.name, out, sparse_ref)
                    err = _rel_l2(out, dense_out)
                    ms = cost.time(cost.key(k.name, k.version, pattern.to_dict(), *shape_key,
                                            round(sparsity, 4)), lambda: k.call(x, packed, b_dev))
                except Exception as e:  # a kernel that fails is not a candidate; say why
                    lp.candidates.append(Candidate(pattern, k.name, sparsity,
                                                   note=f"failed: {type(e).__name__}: {str(e)[:120]}"))
                    continue
                cand = Candidate(pattern, k.name, sparsity, layer_error=err, time_ms=ms)
                lp.candidates.append(cand)
                # The budget is on the model output: with model sensitivity on, _pick judges that;
                # without it the layer error is the (stricter) stand-in.
                if isinstance(requested, Auto):
                    layer_cap = cfg.max_layer_error if ctx.state.get("sensitivity") is not None else cfg.max_error
                    acceptable = err <= min(layer_cap, cfg.max_layer_error)
                else:
                    acceptable = True
                faster = lp.dense_ms / ms >= cfg.min_speedup
                if acceptable and (faster or (cfg.force and not isinstance(requested, Auto))):
                    feasible.append((cand, packed, w_sparse))
    best = _pick(feasible, requested, info, ctx, lp)
    if best is None:
        tried = [c for c in lp.candidates if c.time_ms is not None]
        if not tried:
            # One line per distinct reason: several candidates of one kernel fail for the same cause.
            notes = dict.fromkeys(c.note if c.kernel == "-" or c.note.startswith(c.kernel) else f"{c.kernel}: {c.note}"
                                  for c in lp.candidates)
            lp.reason = ("no kernel could run a candidate here: " + "; ".join(notes)) if lp.candidates else "no candidates"
        else:
            fastest = min(tried, key=lambda c: c.time_ms)
            over = [c for c in tried if isinstance(requested, Auto) and
                    (c.layer_error > cfg.max_error or (c.model_error or 0) > cfg.max_error)]
            lp.reason = (f"kept dense (needs >= {cfg.min_speedup}x within max_error {cfg.max_error}): fastest "
                         f"candidate {fastest.pattern.describe()} via {fastest.kernel} {fastest.time_ms:.4f} ms vs "
                         f"dense {lp.dense_ms:.4f} ms"
                         + (f"; {len(over)} candidate(s) over the error budget (layer or accumulated model "
                            f"error)" if over else ""))
        return
    cand, packed = best
    lp.pattern, lp.kernel, lp.sparsity = cand.pattern, cand.kernel, cand.sparsity
    lp.sparse_ms, lp.layer_error, lp.timing = cand.time_ms, cand.layer_error, cand.timing
    lp.model_error = cand.model_error
    lp.status = SPARSE if lp.dense_ms / cand.time_ms >= cfg.min_speedup else FORCED
    lp.reason = (f"{cand.pattern.describe()} via {cand.kernel}: {cand.time_ms:.4f} ms vs dense "
                 f"{lp.dense_ms:.4f} ms ({lp.dense_ms / cand.time_ms:.2f}x), layer error {cand.layer_error:.3g}"
                 + (f", accumulated model error {cand.model_error:.3g}" if cand.model_error is not None else "")
                 + (" — FORCED although slower than dense" if lp.status == FORCED else ""))
    packed_store[lp.fqn] = packed
