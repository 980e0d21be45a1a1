"""The activation family: FFN blocks whose hidden units are skipped where the activation is zero.

Sites are FFN blocks (sites.py); a site's pattern comes from Config.activation (or an override on
the block's module fqn, e.g. "model.layers.*.mlp"). Candidates: ExactZeros (lossless, ReLU-like
activations), ActivationThreshold (per unit or per block, calibrated to a target sparsity), TopK
(statistical top-k: a cut per token from the mean and std of its activations, its coefficient
calibrated to keep the wanted fraction), PredictedActive (a low-rank predictor of the active units,
ungated ReLU-like FFNs), or for Auto all that apply but TopK. Each is measured as the graph will
run it: the FFN kernel (`replaces="ffn"` in the
registry: the generated CPU kernel, Triton on GPUs) against the dense block, interleaved, with the
residual / cast the rewrite will fuse; its error at the model output through a NodeEdit of the
activation (sensitivity.py), accumulated over the sites chosen before it. The plan keeps the pattern,
the achieved sparsity on the calibration sample and a digest of the thresholds, so `prepare` can
rebuild the same kernel arguments from the model and the calibration data.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from sparsify import ir
from sparsify.codegen import registry
from sparsify.codegen.epilogue import activation_reference
from sparsify.codegen.kernel_check import checked_error
from sparsify.codegen.kernels._ffn_common import ffn_reference
from sparsify.family import Family, Measured, Probe, Site, SiteSkipped, Trial, register_family
from sparsify.patterns import ActivationThreshold, Auto, Dense, ExactZeros, PredictedActive, TopK
from sparsify.plan import Candidate
from sparsify.sensitivity import NodeEdit
from sparsify.state import Prepared

from ...rewrite.fuse_epilogue import epilogue_of
from ..weight.layers import find_weight_layers
from ..weight.views import linear_weight
from . import calibration as C
from .sites import block_fqn, match_ffn

AUTO_THRESHOLDS = (0.5, 0.7, 0.9)
OPTIONAL = ("b_up", "w_gate", "b_gate", "pred_in", "pred_out", "pred_bias")


def _weights(gm, info):
    """The block's weights in linear orientation: w_up, b_up, w_gate, b_gate [F, D] / [F]; the down
    weight transposed, w_down_t [F, D_out] (contiguous: a kept unit's row), and the down bias."""
    def lin(li):
        if li is None:
            return None, None
        w = linear_weight(gm, li).detach()
        b = ir.fetch_attr(gm, li.bias_target).detach() if li.bias_target else None
        return w, b

    w_up, b_up = lin(info.up)
    w_gate, b_gate = lin(info.gate)
    w_down, b_down = lin(info.down)
    return w_up, b_up, w_gate, b_gate, w_down.t().contiguous(), b_down


def _dense_layer(gm, li, device):
    """The layer as the captured graph runs it (addmm on HF Conv1D's stored weight, linear else)."""
    w = ir.fetch_attr(gm, li.weight_target).detach().to(device)
    b = ir.fetch_attr(gm, li.bias_target).detach().to(device) if li.bias_target else None
    if li.op == "addmm":
        return lambda x: torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])
    if li.op == "mm":
        return lambda x: torch.mm(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])
    return lambda x: F.linear(x, w, b)


def _prefix(key: str) -> str:
    return "_sparsify_ffn_" + re.sub(r"\W", "_", key)


class ActivationFamily(Family):
    name = "activation"
    field = "activation"
    patterns = (ExactZeros, ActivationThreshold, PredictedActive, TopK)
    auto = True

    def wanted(self, config) -> bool:
        """Only when the Config asks for activation sparsity somewhere (Dense is the default)."""
        asked = [config.activation] + [p for _, p in config.overrides if p.field in ("activation", "any")]
        return any(isinstance(p, self.patterns) for p in asked) or isinstance(config.activation, Auto)

    def owns(self, pattern) -> bool:
        return isinstance(pattern, self.patterns) or isinstance(pattern, Auto)

    # ---- sites -----------------------------------------------------------------------------
    def find_sites(self, gm, ctx):
        layer_sites = find_weight_layers(gm, ctx, self.name)
        layers = {s.nodes[0]: s.info for s in layer_sites}
        nodes = {n.name: n for n in gm.graph.nodes}
        sites = []
        for name in layers:
            info = match_ffn(nodes[name], layers)
            if info is None:
                continue
            fqn = block_fqn(info)
            requested, source = ctx.config.pattern_for(fqn, self.field)
            if requested.is_dense or not self.owns(requested):
                continue
            x_node, down = nodes[info.x], nodes[name]
            x_shape, out_shape = ir.tensor_meta(x_node)[0], ir.tensor_meta(down)[0]
            h_shape = ir.tensor_meta(down.args[ir.WEIGHT_OPS[down.target][1]])[0]
            if x_shape is None or h_shape is None or tuple(x_shape[:-1]) != tuple(h_shape[:-1]):
                continue    # the block reshapes its tokens: the op would give another output shape
            key = fqn or "ffn"
            members = tuple(i.fqn for i in (info.gate, info.up, info.down) if i is not None)
            up_node = next(n for n in info.nodes if n in layers and layers[n] is info.up)
            sites.append(Site(key=key, family=self.name, fqn=fqn, op=f"ffn:{info.mode}:{info.act}", nodes=info.nodes,
                              probes=(Probe(f"{key}:x", info.x, -1, up_node, rows=True),), input_shape=tuple(x_shape),
                              weight_shape=(info.hidden, x_shape[-1]), output_shape=tuple(out_shape or ()),
                              members=members, info=info))
        return sites

    def candidates(self, gm, site, requested, ctx):
        if not isinstance(requested, Auto):
            return [requested]
        return [ExactZeros(), PredictedActive()] + [ActivationThreshold(s) for s in AUTO_THRESHOLDS]

    # ---- measure -----------------------------------------------------------------------------
    def measure(self, gm, site, patterns, ctx) -> Measured:
        info = site.info
        stats = ctx.state.stats.get(f"{site.key}:x")
        if stats is None or stats.sample is None:
            raise SiteSkipped("no calibration input reached this FFN: kept dense")
        dev = ctx.device
        w_up, b_up, w_gate, b_gate, w_down_t, b_down = (None if t is None else t.to(dev) for t in _weights(gm, info))
        x = stats.sample.to(dev).to(w_up.dtype)                  # the block's input as the graph gets it
        x2 = _calibration_rows(stats).to(dev).to(w_up.dtype)   # every batch's tokens: what thresholds see
        up_l, down_l = _dense_layer(gm, info.up, dev), _dense_layer(gm, info.down, dev)
        gate_l = _dense_layer(gm, info.gate, dev) if info.gate is not None else None
        act_name = info.act
        epi_act, res_node, cast = epilogue_of(site.node(gm))

        def dense_block(xx, residual=None, epilogue=True):
            if gate_l is None:
                h = C.ffn_activation(up_l(xx), act_name)
            else:
                h = C.ffn_activation(gate_l(xx), act_name) * up_l(xx)
            y = down_l(h)
            if not epilogue:
                return y
            y = activation_reference(y, epi_act)
            if residual is not None:
                y = y + residual
            return y if cast is None else y.to(cast)

        with torch.no_grad():
            dense_out = dense_block(x, epilogue=False)
            s, z_up = C.hidden(x2, w_up, b_up, w_gate, b_gate, act_name)
        residual = torch.randn_like(dense_out) if res_node is not None else None
        shape_key = (site.op, tuple(x.shape), tuple(w_up.shape), tuple(w_down_t.shape), str(w_up.dtype),
                     f"epilogue={epi_act}+{'residual' if residual is not None else '-'}+{cast}")
        dense = Trial(Candidate(Dense(), "dense", 0.0), run=lambda: dense_block(x, residual), key=shape_key)
        trials, seen = [], {}
        with torch.no_grad():
            for pattern in patterns:
                for t in self._trials(site, pattern, x, x2, s, z_up, (w_up, b_up, w_gate, b_gate, w_down_t),
                                      b_down, dense_out, residual, (epi_act, cast), shape_key, ctx):
                    if t.run is not None:   # a pattern that keeps exactly the units of an earlier one: timed once
                        same = seen.setdefault((t.candidate.kernel, _identity(t.prepared)), t.candidate.pattern)
                        if same != t.candidate.pattern:
                            t.candidate.note, t.run = f"keeps the same units as {same.describe()}", None
                    trials.append(t)
        return Measured(dense, trials)

    def _trials(self, site, pattern, x, x2, s, z_up, weights, b_down, dense_out, residual, epi, shape_key, ctx):
        info = site.info

        def note(text, kernel="-"):
            return [Trial(Candidate(pattern, kernel, 0.0, note=text))]

        why = C.unsupported(pattern, info.act, info.gate is not None) or C.too_few_tokens(pattern, x2.shape[0])
        if why is not None:
            return note(why)
        prepared, keep = self._prepared(pattern, info, x2, s, z_up, weights)
        sparsity = 1.0 - keep.float().mean().item()
        if sparsity <= 0.0:
            return note("no hidden unit is ever inactive on the calibration sample: nothing to skip")
        kernels, why_not = registry.kernels_for(pattern, ctx.device, weights[0].dtype, tuple(weights[0].shape), "ffn")
        if ctx.config.kernels:
            kernels = [k for k in kernels if k.name in ctx.config.kernels]
        trials = [Trial(Candidate(pattern, name, sparsity, note=w)) for name, w in why_not.items()]
        ref = ffn_reference(x.float(), **_reference_args(prepared), bias=None if b_down is None else b_down.float())
        edit = {NodeEdit(info.act_out, (info.x,)): _activation_edit(prepared, prepared.static["mode"])}
        params = {"threshold_digest": C.digest(prepared.buffers["threshold"]), "sparsity": round(sparsity, 4)}
        for k in kernels:
            err, why = checked_error(k.name, lambda: k.call(x, prepared, b_down), ref, dense_out)
            if err is None:
                trials.append(Trial(Candidate(pattern, k.name, sparsity, note=why)))
                continue
            trials.append(Trial(Candidate(pattern, k.name, sparsity, layer_error=err),
                                run=lambda k=k: k.call(x, prepared, b_down, residual, epi[0], epi[1]),
                                key=(k.name, k.version, pattern.to_dict(), *shape_key, round(sparsity, 4),
                                     params["threshold_digest"]),
                                prepared=prepared, substitute=edit, params=params))
        return trials

    def _prepared(self, pattern, info, x2, s, z_up, weights) -> tuple[Prepared, torch.Tensor]:
        """The kernel arguments of a pattern, and the sample's kept entries [tokens, F]."""
        w_up, b_up, w_gate, b_gate, w_down_t = weights
        thr = C.thresholds(pattern, s).to(w_up.device)
        predictor = None
        if isinstance(pattern, PredictedActive):
            predictor = C.fit_predictor(x2, w_up, b_up, z_up, thr, pattern.rank, pattern.recall)
        topk = isinstance(pattern, TopK)
        keep = C.active_mask(s, thr, x2, predictor, topk)
        mode = "predicted" if predictor is not None else info.mode
        if topk:
            mode = "gated_topk" if info.gate is not None else "topk"
        tensors = {"w_up": w_up.contiguous(), "b_up": b_up, "w_gate": None if w_gate is None else w_gate.contiguous(),
                   "b_gate": b_gate, "w_down_t": w_down_t, "threshold": thr.float().contiguous()}
        if predictor is not None:
            tensors.update(pred_in=predictor[0], pred_out=predictor[1], pred_bias=predictor[2])
        buffers = {k: v for k, v in tensors.items() if v is not None}
        static = {"act": info.act, "mode": mode, **{k: None for k in OPTIONAL if k not in buffers}}
        return Prepared(buffers, static), keep

    # ---- from the plan alone -----------------------------------------------------------------
    def prepare(self, gm, site, plan, ctx) -> Prepared:
        stats = ctx.state.stats.get(f"{site.key}:x")
        if stats is None or stats.sample is None:
            raise ValueError(f"FFN {plan.fqn}: the plan's {plan.pattern.describe()} is calibrated on the calibration "
                             f"data; pass the calibration_data it was planned with")
        weights = _weights(gm, site.info)
        x2 = _calibration_rows(stats).to(weights[0].dtype)
        with torch.no_grad():
            s, z_up = C.hidden(x2, *weights[:4], site.info.act)
            prepared, _ = self._prepared(plan.pattern, site.info, x2, s, z_up, weights[:5])
        want = plan.params.get("threshold_digest")
        if want is not None and C.digest(prepared.buffers["threshold"]) != want:
            raise ValueError(f"FFN {plan.fqn}: the thresholds rebuilt from the plan differ from the planned ones: "
                             f"the model's weights or the calibration data are not those the plan was made for")
        return prepared

    def rewrite(self, gm, site, plan, prepared, ctx) -> None:
        info = site.info
        nodes = {n.name: n for n in gm.graph.nodes}
        down = nodes[info.nodes[0]]
        spec = registry.get(plan.kernel)
        buffers = ir.add_buffers(gm, _prefix(site.key), prepared.buffers, down, plan.fqn)
        _, _, _, b_i = ir.WEIGHT_OPS[down.target]
        bias = down.args[b_i] if b_i is not None and len(down.args) > b_i else None
        args = spec.op_args(nodes[info.x], buffers, prepared.static, bias)
        ir.replace_with_call(gm, down, spec.overload, args, plan=plan,
                             provenance=ir.Provenance("rewrite_sites", f"ffn->{spec.op}", down.name, plan.fqn,
                                                      plan.reason))
        for name in info.nodes[1:]:          # the rest of the block, last to first: each unused by now
            node = nodes[name]
            inputs = node.all_input_nodes
            gm.graph.erase_node(node)
            for n in inputs:
                if n.op == "get_attr" and not n.users:
                    gm.graph.erase_node(n)


def _identity(prepared: Prepared) -> tuple:
    """What decides which units a candidate keeps: its mode and its thresholds / predictor."""
    return (prepared.static["mode"],) + tuple(C.digest(prepared.buffers[k]) for k in
                                              ("threshold", "pred_in", "pred_out", "pred_bias") if k in prepared.buffers)


def _calibration_rows(stats) -> torch.Tensor:
    """The block input's token rows over the calibration batches (the sample's, if none were kept)."""
    if stats.rows is not None:
        return stats.rows
    return stats.sample.reshape(-1, stats.sample.shape[-1])


def _reference_args(prepared: Prepared) -> dict:
    """The op's arguments of a Prepared, for ffn_reference (in fp32)."""
    args = {**prepared.static, **prepared.buffers}
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}


def _activation_edit(prepared: Prepared, mode: str):
    """What the candidate does to the activation's value s (given the block's x): entries of units
    it drops become zero. In a gated block s multiplies the up projection, so that drops them too."""
    thr = prepared.buffers["threshold"]
    pred = tuple(prepared.buffers[k] for k in ("pred_in", "pred_out", "pred_bias")) if mode == "predicted" else None
    topk = mode in ("topk", "gated_topk")

    def edit(s, x):
        x2 = x.reshape(-1, x.shape[-1])
        keep = C.active_mask(s.reshape(-1, s.shape[-1]).float(), thr, x2, pred, topk)
        return torch.where(keep.reshape(s.shape), s, torch.zeros((), dtype=s.dtype))
    return edit


register_family(ActivationFamily())
