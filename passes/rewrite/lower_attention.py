"""lower_attention: torch's scaled_dot_product_attention runs as the generated CPU attention kernel
(codegen/kernels/attention_cpu.py) where that measured faster on the graph's shapes.

Once BERT-base's linear layers are 90% sparse, attention is a quarter of its CPU time, and torch's
CPU flash kernel reaches ~47 GFLOP/s of this 2-core machine's ~190 on its 128-token heads. This
pass finds every aten.scaled_dot_product_attention the kernel can run (CPU compile, no dropout, no
grouped-query heads, fp32, head size a multiple of 32, an fp32 or bool mask or none), times it
against torch's on random q, k, v (and mask) of the node's shapes and strides, interleaved through
the cost model (cached by shapes, strides, mask and causality), and puts the kernel in place only
where it is faster. Each decision, with both times, is a note in the report. Attention's math is
unchanged (fp32, the same mask semantics, a row that attends to nothing is zeros); verification and
the end-to-end check measure the model as it runs.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from sparsify import ir
from sparsify.codegen.kernels import attention_cpu
from sparsify.pipeline import PassContext, PassResult, register_pass

from ._example_calls import faster_form

aten = torch.ops.aten
PASS = "lower_attention"


def _arg(node: fx.Node, name: str, default=None):
    value = ir.op_arg(node, name)[1]
    return default if value is None else value


def _example(node) -> torch.Tensor | None:
    """An unfilled tensor with the node's recorded shape, strides and dtype (filled only to be timed)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return torch.empty_strided(tuple(int(s) for s in val.shape), tuple(int(s) for s in val.stride()),
                               dtype=val.dtype)


def _fill(t: torch.Tensor | None, gen: torch.Generator) -> None:
    """Random values in place (bool: mostly True), through the whole storage the strides reach."""
    if t is None:
        return
    flat = torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,))
    if t.dtype == torch.bool:
        flat.copy_(torch.rand(flat.shape, generator=gen) > 0.1)
    else:
        flat.copy_(torch.randn(flat.shape, generator=gen))


def _candidate(node: fx.Node):
    """(q, k, v, mask, is_causal, scale) examples if the kernel can run this node, else (None, why)."""
    if _arg(node, "dropout_p", 0.0) != 0.0:
        return None, "dropout"
    if _arg(node, "enable_gqa", False):
        return None, "grouped-query heads"
    q, k, v = (_example(_arg(node, n)) for n in ("query", "key", "value"))
    mask_node = _arg(node, "attn_mask")
    mask = _example(mask_node) if mask_node is not None else None
    if q is None or k is None or v is None or (mask_node is not None and mask is None):
        return None, "no recorded shapes"
    is_causal, scale = bool(_arg(node, "is_causal", False)), _arg(node, "scale")
    try:
        attention_cpu.check(q, k, v, mask, is_causal, scale)
    except (TypeError, ValueError) as e:
        return None, str(e)
    return (q, k, v, mask, is_causal, scale), ""


def _faster(node: fx.Node, example, ctx: PassContext) -> tuple[bool, str]:
    q, k, v, mask, is_causal, scale = example
    key = ("attention", attention_cpu.KERNEL_VERSION,
           *[(tuple(t.shape), t.stride()) if t is not None else None for t in (q, k, v, mask)],
           None if mask is None else mask.dtype, is_causal, scale)

    def forms():
        gen = torch.Generator().manual_seed(0)
        for t in (q, k, v, mask):
            _fill(t, gen)
        return (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                                         scale=scale),
                lambda: attention_cpu.attention_cpu_host(q, k, v, mask, is_causal, scale))

    return faster_form(ctx, key, ("torch", "attention_cpu"), forms, "replaced", "torch's kept")


def _replace(gm: fx.GraphModule, node: fx.Node, where: str, why: str) -> None:
    args = (_arg(node, "query"), _arg(node, "key"), _arg(node, "value"), _arg(node, "attn_mask"),
            bool(_arg(node, "is_causal", False)), _arg(node, "scale"))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(attention_cpu.SPEC.overload, args)
    q = node.meta["val"]
    new.meta["val"] = q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)
    new.meta[ir.FQN] = where
    new.meta[ir.FROM] = ir.Provenance(PASS, "attention", node.name, where, why)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _where(node: fx.Node) -> str:
    return node.meta.get(ir.FQN) or ir.node_fqn(node) or node.name


@register_pass(PASS, phase="lower", default=True)
def lower_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target is aten.scaled_dot_product_attention.default]
    if not nodes or ctx.device.type != "cpu":
        return PassResult(gm, modified=False, info={"replaced": 0})
    why_not = attention_cpu.unsupported()
    if why_not is not None:
        ctx.state.note(PASS, "attention", f"torch's kept: {why_not}")
        return PassResult(gm, modified=False, info={"replaced": 0})
    replaced = 0
    for node in nodes:
        where = _where(node)
        example, why = _candidate(node)
        if example is None:
            ctx.state.note(PASS, where, f"torch's kept: {why}")
            continue
        faster, why = _faster(node, example, ctx)
        ctx.state.note(PASS, where, why)
        if faster:
            _replace(gm, node, where, why)
            replaced += 1
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified=bool(replaced), info={"replaced": replaced})
