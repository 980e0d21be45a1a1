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
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen import registry
from sparsify.pipeline import PassContext, PassResult, register_pass

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
    for n in chain:
        ir.set_op_arg(n, "layout", "feature")
    if _takes(first, "row_to_feature"):
        ir.set_op_arg(first, "layout", "row_to_feature")
    else:
        _transpose_in(gm, first, x, m, k, lead, names)
    for n in chain:
        shape, _ = ir.tensor_meta(n)
        if shape is not None and n.meta.get("val") is not None:
            _meta(n, (shape[-1], m), n.meta["val"])
        prov = n.meta[ir.FROM]
        n.meta[ir.FROM] = ir.Provenance(prov.pass_name, prov.rule, prov.source, prov.fqn,
                                        prov.detail + f"; layout {ir.op_arg(n, 'layout')[1]} ({names})")
    if _takes(last, "feature_to_row"):
        ir.set_op_arg(last, "layout", "feature_to_row")
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


@register_pass(PASS, phase="lower", default=True)
def assign_layouts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    chains = [c for c in _chains(gm) if ir.tensor_meta(ir.op_arg(c[0], "x")[1])[0] is not None]
    for chain in chains:
        _switch(gm, chain)
    if chains:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(chains), info={"chains": [len(c) for c in chains]})
