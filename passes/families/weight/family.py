"""The weight family: a masked weight, packed for a registered kernel, replaces a dense weight layer.

Candidates come from the Config (an explicit pattern, or for Auto the default list plus the
sparsity the weight already has). For each, the criterion gives a mask, every kernel that serves the
pattern on the device is packed, checked against the dense op on the same masked weight, and handed
to the driver to time at the layer's real input; the layer output error vs dense is measured on the
calibration sample. The plan keeps the pattern, the kernel and a digest of the mask, so `prepare`
can rebuild exactly the packed weight from the plan and the model.
"""
from __future__ import annotations

import functools
import hashlib
import re

import numpy as np
import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen import registry
from sparsify.codegen.epilogue import activation_reference
from sparsify.codegen.kernel_check import checked_error
from sparsify.family import Family, Measured, SiteSkipped, Trial, register_family
from sparsify.patterns import NM, Auto, Block, Channel, Dense, Unstructured
from sparsify.plan import Candidate
from sparsify.state import Prepared

from ...rewrite.fuse_epilogue import epilogue_of
from .layers import find_weight_layers
from .views import storage_weight, view_of

DEFAULT_AUTO_CANDIDATES = (NM(2, 4), Block(32, 0.5), Block(64, 0.25), Unstructured(0.9))

def existing_sparsity_candidates(w: torch.Tensor, min_sparsity: float = 0.5) -> list:
    """Patterns that a weight already has (a pruned checkpoint, a lottery ticket): exact zeros as
    unstructured sparsity, and all-zero blocks as block density. Keeping them costs no accuracy."""
    w2 = w.reshape(w.shape[0], -1) if w.dim() == 4 else w
    zero = (w2 == 0).float().mean().item()
    if zero < min_sparsity:
        return []
    found: list = [Unstructured(round(zero, 4))]
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


def _dense_as_graph(view, x, w, b, epi, residual):
    """The dense layer and the ops after it that a sparse kernel would fuse, run one after another."""
    activation, _, cast = epi
    y = activation_reference(view.dense(x, w, b), activation)
    if residual is not None:
        y = y + residual
    return y if cast is None else y.to(cast)


def mask_digest(w_sparse: torch.Tensor) -> str:
    """A short digest of which weights are kept: a plan applied to other weights (or, for wanda,
    other calibration data) rebuilds another mask, and `prepare` refuses it."""
    bits = np.packbits((w_sparse != 0).flatten().cpu().numpy())
    return hashlib.sha256(bits.tobytes()).hexdigest()[:16]


def buffer_prefix(fqn: str) -> str:
    return "_sparsify_" + re.sub(r"\W", "_", fqn)


class WeightFamily(Family):
    name = "weight"
    field = "weight"
    patterns = (Unstructured, NM, Block)
    auto = True

    def find_sites(self, gm, ctx):
        """Every weight layer whose Config pattern this family owns (the others, Channel say, are
        another family's sites; their `sparsify.layer` meta is written all the same)."""
        return [s for s in find_weight_layers(gm, ctx, self.name) if self.owns(self.requested(s, ctx)[0])]

    def candidates(self, gm, site, requested, ctx):
        if not isinstance(requested, Auto):
            return [requested]
        cands = list(ctx.config.candidates or DEFAULT_AUTO_CANDIDATES)
        if not ctx.config.candidates:
            w = ir.fetch_attr(gm, site.info.weight_target).detach()
            cands += [c for c in existing_sparsity_candidates(w) if c not in cands]
        return cands

    # ---- measure -----------------------------------------------------------------------------
    def measure(self, gm, site, patterns, ctx) -> Measured:
        info: ir.LayerInfo = site.info
        if info.uses > 1:
            raise SiteSkipped("weight shared with another op (tied): kept dense so the tie holds")
        stats = ctx.state.stats.get(site.key)
        if stats is None or stats.sample is None:
            raise SiteSkipped("no calibration input reached this layer: kept dense")
        view = view_of(gm, info)
        w_dev = view.w.to(ctx.device)
        b_dev = view.bias.to(ctx.device) if view.bias is not None else None
        x = stats.sample.to(ctx.device)
        x = (x[None] if x.dim() == 1 else x).to(w_dev.dtype)
        with torch.no_grad():
            dense_out = view.dense(x, w_dev, b_dev)
        # Timed as the graph will run it: with the epilogue the rewrite will fuse (and, for dense, the
        # same ops run separately after it, as the dense graph runs them).
        act, res_node, cast = epilogue_of(site.node(gm))
        residual = torch.randn_like(dense_out) if res_node is not None else None
        epi = (act, residual is not None, cast)
        shape_key = (info.op, tuple(x.shape), tuple(view.w.shape), str(view.w.dtype), view.bias is not None,
                     str(info.conv_params), f"epilogue={act}+{'residual' if residual is not None else '-'}+{cast}")
        dense = Trial(Candidate(Dense(), "dense", 0.0), run=lambda: _dense_as_graph(view, x, w_dev, b_dev, epi, residual),
                      key=shape_key)
        norm = stats.channel_norm if stats.channel_sq_sum is not None else None
        trials, seen = [], {}
        with torch.no_grad():
            for pattern in patterns:
                for t in self._trials(view, info, pattern, x, b_dev, dense_out, norm, shape_key, epi, residual, ctx):
                    pat = t.candidate.pattern   # and what the kernel's packing reads of the pattern
                    spec = registry.specs().get(t.candidate.kernel)
                    packing = tuple(getattr(pat, f, None) for f in (spec.pack_params if spec else ()))
                    same = seen.setdefault((t.candidate.kernel, t.params.get("mask_digest"), packing), pat)
                    if t.run is not None and same != t.candidate.pattern:
                        # another pattern that keeps exactly these weights: time it once
                        t.candidate.note, t.run = f"keeps the same weights as {same.describe()}", None
                    trials.append(t)
        return Measured(dense, trials)

    def _trials(self, view, info, pattern, x, b_dev, dense_out, norm, shape_key, epi, residual, ctx) -> list[Trial]:
        def note(kernel, sparsity, text):
            return [Trial(Candidate(pattern, kernel, sparsity, note=text))]

        if isinstance(pattern, Channel):
            return note("-", pattern.sparsity, "Channel is planned by the channel family")
        if not isinstance(pattern, self.patterns):
            return note("-", 0.0, f"{type(pattern).__name__} is not a weight-sparsity pattern")
        why = view.unsupported(pattern)
        if why is not None:
            return note("-", 0.0, why)
        try:
            s = view.scores(pattern.criterion, norm, ctx.config.seed)
        except ValueError as e:
            return note("-", 0.0, str(e))
        w_sparse = view.sparse_weight(pattern, s).to(ctx.device)
        sparsity = 1.0 - (w_sparse != 0).float().mean().item()
        if sparsity <= 0.0:
            return note("-", 0.0, "the mask keeps every weight (the layer would not change): not a candidate")
        kernels, why_not = registry.kernels_for(pattern, ctx.device, view.w.dtype, tuple(view.w.shape),
                                                view.layer_op)
        if ctx.config.kernels:
            kernels = [k for k in kernels if k.name in ctx.config.kernels]
        trials = [Trial(Candidate(pattern, name, sparsity, note=why)) for name, why in why_not.items()]
        if not kernels:
            return trials
        # the same product in torch, computed once, for the candidates that get checked
        sparse_ref = functools.cache(lambda: view.dense(x.float(), w_sparse.float(),
                                                        None if b_dev is None else b_dev.float()))

        substitute = {info.weight_target: storage_weight(info, w_sparse)}
        params = {"mask_digest": mask_digest(w_sparse)}
        for k in kernels:
            try:
                prepared = k.pack(w_sparse, pattern, info.conv_params)
            except Exception as e:  # a kernel that cannot pack is not a candidate; say why
                trials.append(Trial(Candidate(pattern, k.name, sparsity,
                                              note=f"failed: {type(e).__name__}: {str(e)[:120]}")))
                continue
            trials.append(Trial(Candidate(pattern, k.name, sparsity),
                                run=lambda k=k, prepared=prepared: k.call(x, prepared, b_dev, residual, epi[0], epi[2]),
                                key=(k.name, k.version, pattern.to_dict(), *shape_key, round(sparsity, 4)),
                                prepared=prepared, substitute=substitute, params=params,
                                check=lambda k=k, prepared=prepared: checked_error(
                                    k.name, lambda: k.call(x, prepared, b_dev), sparse_ref(), dense_out)))
        return trials

    # ---- from the plan alone -----------------------------------------------------------------
    def prepare(self, gm, site, plan, ctx) -> Prepared:
        """The packed weight of a planned layer, rebuilt from the plan: the same criterion on the
        same weights (and statistics, for wanda) gives the same mask, which the digest confirms."""
        info: ir.LayerInfo = site.info
        view = view_of(gm, info)
        stats = ctx.state.stats.get(site.key)
        norm = stats.channel_norm if stats is not None and stats.channel_sq_sum is not None else None
        pattern = plan.pattern
        if pattern.criterion == "wanda" and norm is None:
            raise ValueError(f"layer {plan.fqn}: the plan's {pattern.describe()} needs calibration statistics "
                             f"to rebuild its mask; pass the calibration_data it was planned with")
        with torch.no_grad():
            w_sparse = view.sparse_weight(pattern, view.scores(pattern.criterion, norm, ctx.config.seed))
        want = plan.params.get("mask_digest")
        if want is not None and mask_digest(w_sparse) != want:
            raise ValueError(f"layer {plan.fqn}: the {pattern.describe()} mask rebuilt from the plan differs "
                             f"from the planned one: the model's weights (or, for wanda, the calibration "
                             f"data) are not those the plan was made for")
        return registry.get(plan.kernel).pack(w_sparse.to(ctx.device), pattern, info.conv_params)

    def rewrite(self, gm: fx.GraphModule, site, plan, prepared, ctx) -> None:
        node = site.node(gm)
        spec = registry.get(plan.kernel)
        _, x_i, _, b_i = ir.WEIGHT_OPS[node.target]
        buffers = ir.add_buffers(gm, buffer_prefix(plan.fqn), prepared.buffers, node, plan.fqn)
        bias = node.args[b_i] if b_i is not None and len(node.args) > b_i else None
        args = spec.op_args(node.args[x_i], buffers, prepared.static, bias)
        ir.replace_with_call(gm, node, spec.overload, args, plan=plan,
                             provenance=ir.Provenance("rewrite_sites", f"{site.info.op}->{spec.op}", node.name,
                                                      plan.fqn, plan.reason))


register_family(WeightFamily())
