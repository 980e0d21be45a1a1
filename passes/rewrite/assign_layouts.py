"""assign_layouts: consecutive sparse linear layers hand each other feature-major activations.

A kernel that multiplies a sparse weight by dense activations computes y^T = W @ x^T: it wants x^T
(features first, [K, M]) and gives y^T. Between two such layers the token-major graph would
transpose y^T back and the next layer would transpose it again (each a copy of the activation).
This pass finds chains of ops whose kernel takes the "feature" layout (KernelSpec.layouts) where
each op's only user is the next op's input, switches every op of a chain of two or more to
layout="feature", and puts one transposed copy before the chain and one after it; those are the
only transposes left, visible in the debug dumps as this pass's nodes. Where the first op's kernel
reads token-major x itself (layout "row_to_feature" in its KernelSpec.layouts: csr_cpu packs x
into its tiles anyway) there is no copy before the chain, and where the last one stores token-major
itself ("feature_to_row") none after it. A residual stays token-major (the kernels read it
transposed in place). A lone op keeps the row layout: it would pay both
transposes itself, and the planner timed it as the graph gives it its input, token-major.

Whether a chain switches is measured, not assumed: the chain's ops on their own weights and random
activations of the graph's shapes, all token-major against the feature-major handoff (with its
copies), interleaved through the cost model (cached like the planner's timings, keyed by the
kernels, shapes and epilogues). It switches only where the handoff is faster: csr_jit_cpu's
FFN at 2048 tokens ran 8% slower feature-major (its token-major pack is a register transpose in
L2), at 128 tokens 6% faster.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen import registry
from sparsify.pipeline import PassContext, PassResult, register_pass

from ._example_calls import call_args, faster_form, op_signature, substitute

aten = torch.ops.aten
PASS = "assign_layouts"


def _feature_capable(node: fx.Node) -> bool:
    if node.op != "call_function" or ir.FROM not in node.meta:
        return False
    spec = registry.spec_of(node.target)
    return spec is not None and "feature" in spec.layouts and ir.op_arg(node, "layout")[1] in (None, "row")


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _next_in_chain(node: fx.Node) -> fx.Node | None:
    users = _value_users(node)
    if len(users) != 1 or not _feature_capable(users[0]):
        return None
    nxt = users[0]
    return nxt if ir.op_arg(nxt, "x")[1] is node and ir.op_arg(nxt, "residual")[1] is not node else None


def _chains(gm: fx.GraphModule) -> list[list[fx.Node]]:
    starts_of = {}
    for n in gm.graph.nodes:
        if _feature_capable(n):
            nxt = _next_in_chain(n)
            if nxt is not None:
                starts_of[nxt] = n
    chains = []
    for n in gm.graph.nodes:
        if _feature_capable(n) and n not in starts_of:
            chain = [n]
            while (nxt := _next_in_chain(chain[-1])) is not None:
                chain.append(nxt)
            if len(chain) >= 2:
                chains.append(chain)
    return chains


def _mark(node: fx.Node, fqn: str, detail: str) -> None:
    node.meta[ir.FQN] = fqn
    node.meta[ir.FROM] = ir.Provenance(PASS, "feature-major chain", node.name, fqn, detail)


def _meta(node: fx.Node, shape, like) -> None:
    node.meta["val"] = torch.empty(shape, dtype=like.dtype, device="meta")


def _switch(gm: fx.GraphModule, chain: list[fx.Node]) -> None:
    first, last = chain[0], chain[-1]
    x = ir.op_arg(first, "x")[1]
    x_shape, _ = ir.tensor_meta(x)
    k = x_shape[-1]
    lead = list(x_shape[:-1])
    m = math.prod(lead)
    names = " -> ".join(n.meta[ir.FROM].fqn for n in chain)
    layouts = _layouts(chain)
    for n, layout in zip(chain, layouts):
        ir.set_op_arg(n, "layout", layout)
    if layouts[0] == "feature":
        _transpose_in(gm, first, x, m, k, lead, names)
    for n in chain:
        shape, _ = ir.tensor_meta(n)
        if shape is not None and n.meta.get("val") is not None:
            _meta(n, (shape[-1], m), n.meta["val"])
        prov = n.meta[ir.FROM]
        n.meta[ir.FROM] = ir.Provenance(prov.pass_name, prov.rule, prov.source, prov.fqn,
                                        prov.detail + f"; layout {ir.op_arg(n, 'layout')[1]} ({names})")
    if layouts[-1] == "feature_to_row":
        _reshape_out(gm, last, m, lead, names)
    else:
        _transpose_out(gm, last, m, lead, names)


def _takes(node: fx.Node, layout: str) -> bool:
    return layout in registry.spec_of(node.target).layouts


def _transpose_in(gm, first, x, m, k, lead, names) -> None:
    with gm.graph.inserting_before(first):
        flat = gm.graph.call_function(aten.reshape.default, (x, [m, k]))
        xt = gm.graph.call_function(aten.t.default, (flat,))
        xt = gm.graph.call_function(aten.clone.default, (xt,), {"memory_format": torch.contiguous_format})
    for n, what in ((flat, "flatten the tokens"), (xt.args[0], "features first"), (xt, "one copy into the chain")):
        _mark(n, first.meta[ir.FROM].fqn, f"{what}: {names}")
    x_val = x.meta.get("val")
    if x_val is not None:
        _meta(flat, (m, k), x_val)
        _meta(xt.args[0], (k, m), x_val)
        _meta(xt, (k, m), x_val)
    ir.set_op_arg(first, "x", xt)


def _reshape_out(gm, last, m, lead, names) -> None:
    """The last op stores token-major [M, N]: only the tokens' shape is given back."""
    n_out = ir.op_arg(last, "n_out")[1]
    if last.meta.get("val") is not None:
        _meta(last, (m, n_out), last.meta["val"])
    if len(lead) == 1:
        return
    users = list(last.users)
    with gm.graph.inserting_after(last):
        out = gm.graph.call_function(aten.reshape.default, (last, lead + [n_out]))
    for u in users:
        u.replace_input_with(last, out)
    _mark(out, last.meta[ir.FROM].fqn, f"the tokens' shape: {names}")
    if last.meta.get("val") is not None:
        _meta(out, tuple(lead) + (n_out,), last.meta["val"])


def _transpose_out(gm, last, m, lead, names) -> None:
    n_out = ir.op_arg(last, "n_out")[1]
    users = list(last.users)
    with gm.graph.inserting_after(last):
        back = gm.graph.call_function(aten.t.default, (last,))
    with gm.graph.inserting_after(back):
        cont = gm.graph.call_function(aten.clone.default, (back,), {"memory_format": torch.contiguous_format})
    with gm.graph.inserting_after(cont):
        out = gm.graph.call_function(aten.reshape.default, (cont, lead + [n_out]))
    for u in users:
        u.replace_input_with(last, out)
    for n, what in ((back, "tokens first again"), (cont, "one copy out of the chain"), (out, "the tokens' shape")):
        _mark(n, last.meta[ir.FROM].fqn, f"{what}: {names}")
    if last.meta.get("val") is not None:
        _meta(back, (m, n_out), last.meta["val"])
        _meta(cont, (m, n_out), last.meta["val"])
        _meta(out, tuple(lead) + (n_out,), last.meta["val"])


def _layouts(chain: list[fx.Node]) -> list[str]:
    """The layout of each op of a switched chain (what _switch sets)."""
    out = ["feature"] * len(chain)
    if _takes(chain[0], "row_to_feature"):
        out[0] = "row_to_feature"
    if _takes(chain[-1], "feature_to_row"):
        out[-1] = "feature_to_row"
    return out


def _runner(gm: fx.GraphModule, chain: list[fx.Node], feature: bool, device: torch.device):
    """() -> the chain's output: its ops in sequence on their weights and on random tensors for every
    other input (x, residuals), token-major or as a switched chain with the copies _switch inserts."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    calls = []
    for i, n in enumerate(chain):
        args, kwargs = call_args(gm, n, gen, device, given=chain[i - 1] if i else None)
        calls.append((n.target, args, kwargs, ir.op_arg(n, "layout")[0]))
    layouts = _layouts(chain) if feature else ["row"] * len(chain)
    x_shape = ir.tensor_meta(ir.op_arg(chain[0], "x")[1])[0]
    m, k = math.prod(x_shape[:-1]), x_shape[-1]
    x_pos = ir.op_arg(chain[0], "x")[0]

    def run():
        out = None
        for i, ((target, args, kwargs, layout_pos), layout) in enumerate(zip(calls, layouts)):
            args, kwargs = substitute(args, out), dict(kwargs)
            while len(args) <= layout_pos:
                schema_arg = target._schema.arguments[len(args)]
                args.append(kwargs.pop(schema_arg.name, schema_arg.default_value))
            args[layout_pos] = layout
            if i == 0 and layout == "feature":
                args[x_pos] = args[x_pos].reshape(m, k).t().contiguous()
            out = target(*args, **kwargs)
        if layouts[-1] == "feature":
            out = out.t().contiguous()
        return out

    return run


def _handoff_faster(gm: fx.GraphModule, chain: list[fx.Node], ctx: PassContext) -> tuple[bool, str]:
    """(switch?, what was measured): the chain token-major against feature-major, interleaved."""
    x_shape, x_dtype = ir.tensor_meta(ir.op_arg(chain[0], "x")[1])
    key = ("layout-chain", tuple(x_shape), x_dtype, tuple(op_signature(n) for n in chain))
    return faster_form(ctx, key, ("token-major", "feature-major handoff"),
                       lambda: (_runner(gm, chain, False, ctx.device), _runner(gm, chain, True, ctx.device)),
                       "switched", "kept token-major")


@register_pass(PASS, phase="lower", default=True)
def assign_layouts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    chains = [c for c in _chains(gm) if ir.tensor_meta(ir.op_arg(c[0], "x")[1])[0] is not None]
    switched = []
    for chain in chains:
        faster, why = _handoff_faster(gm, chain, ctx)
        ctx.state.note(PASS, " -> ".join(n.meta[ir.FROM].fqn for n in chain), why)
        if faster:
            _switch(gm, chain)
            switched.append(chain)
    if switched:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(switched), info={"chains": [len(c) for c in switched]})
