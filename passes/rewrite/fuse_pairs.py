"""fuse_pairs: two consecutive sparse ops run as one op of a kernel that fuses them, where measured faster.

A BERT FFN is two planned sparse layers with the activation between (fused into the first by
fuse_epilogues): run as two ops, the hidden activation (3072 features) goes to memory and back.
A "linear_pair" kernel (KernelSpec.fuses names the kernels of the two ops it runs as one, e.g.
csr_jit_cpu_pair) keeps it in cache, tile by tile. This pass finds ops a -> b where b's kernel and
a's are such a pair's, a's only use is b's x, both are in the row layout, a has no residual and
no output cast, and the pair kernel supports x's dtype (KernelSpec.supports); it times the pair
against the two ops on the layers' own weights and random activations of the graph's shapes,
interleaved through the cost model (cached by kernels, shapes and epilogues), and replaces a and b
by the pair only where it is faster. Each decision, with both times, is a note in the report.
Runs after fuse_epilogues (the epilogues are the ops' own by then) and before assign_layouts. The
plan is not changed: the sites and their timings are the layers' own, and the end-to-end check
measures what runs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen import registry
from sparsify.pipeline import PassContext, PassResult, register_pass

from ._example_calls import call_args, faster_form, op_signature, substitute

aten = torch.ops.aten
PASS = "fuse_pairs"


def _pair_specs() -> dict[tuple, object]:
    return {s.fuses: s for s in registry.specs().values() if s.replaces == "linear_pair" and s.fuses}


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _pair_of(a: fx.Node, pairs: dict):
    """(b, the pair spec) if a -> b can run as one op, else None."""
    if a.op != "call_function" or ir.FROM not in a.meta:
        return None
    spec_a = registry.spec_of(a.target)
    users = _value_users(a)
    if spec_a is None or len(users) != 1:
        return None
    b = users[0]
    spec_b = registry.spec_of(b.target) if b.op == "call_function" and ir.FROM in b.meta else None
    pair = pairs.get((spec_a.name, spec_b.name)) if spec_b is not None else None
    if pair is None or ir.op_arg(b, "x")[1] is not a or ir.op_arg(b, "residual")[1] is a:
        return None
    if any((ir.op_arg(n, "layout")[1] or "row") != "row" for n in (a, b)):
        return None
    if ir.op_arg(a, "residual")[1] is not None or ir.op_arg(a, "out_dtype")[1] is not None:
        return None
    x_shape, x_dtype = ir.tensor_meta(ir.op_arg(a, "x")[1])
    if x_shape is None or ir.tensor_meta(b)[0] is None:
        return None
    if pair.supports is not None and pair.supports(None, x_dtype, ()) is not None:
        return None
    return b, pair


def _pair_args(pair, a: fx.Node, b: fx.Node) -> tuple:
    """The pair op's arguments by KernelSpec.fuses' naming: a_<name> from a, x and k_in from a, the rest from b."""
    out = []
    for arg in pair.arguments:
        if arg.name.startswith("a_"):
            value = ir.op_arg(a, arg.name[2:])[1]
        elif arg.name in ("x", "k_in"):
            value = ir.op_arg(a, arg.name)[1]
        else:
            value = ir.op_arg(b, arg.name)[1]
        if value is None and arg.has_default_value():
            value = arg.default_value
        out.append(value)
    return tuple(out)


def _runners(gm: fx.GraphModule, a: fx.Node, b: fx.Node, pair, device: torch.device):
    """(two ops, the pair) as calls on the same example inputs."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a_args, a_kwargs = call_args(gm, a, gen, device)
    b_args, b_kwargs = call_args(gm, b, gen, device, given=a)
    x_pos = ir.op_arg(a, "x")[0]
    residual_pos = ir.op_arg(b, "residual")[0]
    pair_args = list(_pair_args(pair, a, b))
    for i, arg in enumerate(pair.arguments):   # the same example x and residual as the two ops get
        if arg.name == "x":
            pair_args[i] = a_args[x_pos]
        elif arg.name == "residual" and residual_pos is not None and residual_pos < len(b_args):
            pair_args[i] = b_args[residual_pos]
        elif isinstance(pair_args[i], fx.Node):
            pair_args[i] = ir.fetch_attr(gm, pair_args[i].target)

    def two():
        h = a.target(*a_args, **a_kwargs)
        return b.target(*substitute(b_args, h), **b_kwargs)

    def one():
        return pair.overload(*pair_args)

    return two, one


def _key(a: fx.Node, b: fx.Node, pair) -> tuple:
    x_shape, x_dtype = ir.tensor_meta(ir.op_arg(a, "x")[1])
    return ("pair", pair.name, pair.version, tuple(x_shape), x_dtype, (op_signature(a), op_signature(b)))


def _faster(gm, a, b, pair, ctx: PassContext) -> tuple[bool, str]:
    return faster_form(ctx, _key(a, b, pair), ("two ops", pair.name), lambda: _runners(gm, a, b, pair, ctx.device),
                       "fused", "kept as two ops")


def _fuse(gm: fx.GraphModule, a: fx.Node, b: fx.Node, pair) -> fx.Node:
    with gm.graph.inserting_before(b):
        new = gm.graph.call_function(pair.overload, _pair_args(pair, a, b))
    new.meta["val"] = b.meta.get("val")
    fqns = [n.meta[ir.FROM].fqn for n in (a, b)]
    new.meta[ir.FQN] = b.meta.get(ir.FQN, fqns[1])
    new.meta[ir.FROM] = ir.Provenance(PASS, "pair", b.name, fqns[1],
                                      f"{a.meta[ir.FROM].detail}; then {b.meta[ir.FROM].detail}; "
                                      f"one op for {' -> '.join(fqns)}")
    ir.replace_node(gm, b, new)
    for user in [u for u in a.users if u.target is aten._assert_tensor_metadata.default]:
        gm.graph.erase_node(user)
    gm.graph.erase_node(a)
    return new


@register_pass(PASS, phase="lower", default=True)
def fuse_pairs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    pairs = _pair_specs()
    found = []
    for a in list(gm.graph.nodes):
        hit = _pair_of(a, pairs) if pairs else None
        if hit is not None:
            found.append((a, *hit))
    fused, gone = 0, set()
    for a, b, pair in found:
        if a in gone or b in gone:   # a -> b -> c: b was fused with a
            continue
        faster, why = _faster(gm, a, b, pair, ctx)
        ctx.state.note(PASS, " -> ".join(n.meta[ir.FROM].fqn for n in (a, b)), why)
        if faster:
            _fuse(gm, a, b, pair)
            gone |= {a, b}
            fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(fused), info={"fused": fused})
