"""stack_siblings: sparse ops that read the same activation run as one op over their stacked rows.

Attention's query, key and value projections all read the same hidden states: three ops pack that
x three times (csr_cpu moves it into its token tiles; a Triton kernel reads it from memory) and pay
three calls. When the ops' kernel says how its weights stack (KernelSpec.stack_rows), the ops of
one kernel on the same x with the same layout ("row"), epilogue (activation, output dtype, no
residual) and K become one op whose weight is theirs one under the other; each former output is a
slice of the new one's last dimension (a view, no copy). Runs after assign_layouts, on what it left
in the row layout. The plan is not changed: the sites and their timings are the layers' own, and
the end-to-end check measures what runs.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen import registry
from sparsify.pipeline import PassContext, PassResult, register_pass

aten = torch.ops.aten
PASS = "stack_siblings"
_WEIGHT_ARGS = ("crow", "col", "values", "bias")


def _key(node: fx.Node):
    """What siblings share, or None if the node is not a candidate."""
    if node.op != "call_function" or ir.FROM not in node.meta:
        return None
    spec = registry.spec_of(node.target)
    if spec is None or spec.stack_rows is None:
        return None
    layout = ir.op_arg(node, "layout")[1] or "row"
    if layout != "row" or ir.op_arg(node, "residual")[1] is not None or ir.tensor_meta(node)[0] is None:
        return None
    if any(not (isinstance(a, fx.Node) and a.op == "get_attr") for a in
           (ir.op_arg(node, n)[1] for n in ("crow", "col", "values"))):
        return None
    bias = ir.op_arg(node, "bias")[1]
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return None
    return (node.target, ir.op_arg(node, "x")[1], ir.op_arg(node, "k_in")[1], ir.op_arg(node, "activation")[1],
            ir.op_arg(node, "out_dtype")[1])


def _groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    by_key = defaultdict(list)
    for n in gm.graph.nodes:
        key = _key(n)
        if key is not None:
            by_key[key].append(n)
    return [g for g in by_key.values() if len(g) >= 2]


def _stack(gm: fx.GraphModule, group: list[fx.Node]) -> fx.Node:
    first = group[0]
    spec = registry.spec_of(first.target)
    parts = []
    for n in group:
        part = {a: (ir.fetch_attr(gm, ir.op_arg(n, a)[1].target) if ir.op_arg(n, a)[1] is not None else None)
                for a in _WEIGHT_ARGS}
        part["n_out"] = ir.op_arg(n, "n_out")[1]
        parts.append(part)
    stacked = spec.stack_rows(parts)
    fqns = [n.meta[ir.FROM].fqn for n in group]
    tensors = {a: stacked[a] for a in _WEIGHT_ARGS if stacked.get(a) is not None}
    attrs = ir.add_buffers(gm, f"_sparsify_stacked_{first.name}", tensors, first, fqns[0])
    with gm.graph.inserting_before(first):
        new = gm.graph.call_function(first.target, tuple(first.args), dict(first.kwargs))
    for a in _WEIGHT_ARGS:
        ir.set_op_arg(new, a, attrs.get(a))
    ir.set_op_arg(new, "n_out", stacked["n_out"])
    shape, dtype = ir.tensor_meta(first)
    new.meta["val"] = torch.empty(tuple(shape[:-1]) + (stacked["n_out"],), dtype=dtype, device="meta")
    new.meta[ir.FQN] = first.meta.get(ir.FQN, fqns[0])
    prov = first.meta[ir.FROM]
    new.meta[ir.FROM] = ir.Provenance(PASS, "stacked rows", first.name, fqns[0],
                                      f"{prov.detail}; one op for {' + '.join(fqns)} (same x)")
    start, slices = 0, []
    for n in group:   # every slice before any member is erased (`first` is the insertion point)
        width = ir.op_arg(n, "n_out")[1]
        with gm.graph.inserting_before(first):
            part = gm.graph.call_function(aten.slice.Tensor, (new, -1, start, start + width))
        part.meta["val"] = n.meta["val"]
        part.meta[ir.FQN] = n.meta.get(ir.FQN, n.meta[ir.FROM].fqn)
        part.meta[ir.FROM] = ir.Provenance(PASS, "stacked rows: a layer's slice", n.name, n.meta[ir.FROM].fqn,
                                           f"output rows {start}:{start + width} of {new.name}")
        slices.append(part)
        start += width
    for n, part in zip(group, slices):
        for target in ir.replace_node(gm, n, part):
            _drop_buffer(gm, target)
    return new


def _drop_buffer(gm: fx.GraphModule, target: str) -> None:
    """A layer's own packed buffer, now unread: not kept twice (the stacked copy is what runs)."""
    if target.startswith("_sparsify_") and target in gm._buffers and \
            not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        del gm._buffers[target]


@register_pass(PASS, phase="lower", default=True)
def stack_siblings(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    groups = _groups(gm)
    for group in groups:
        _stack(gm, group)
    if groups:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(groups), info={"stacked": [len(g) for g in groups]})
