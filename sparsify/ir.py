"""The IR: a torch.fx GraphModule plus typed, namespaced `node.meta` records, and a networkx view.

Meta keys (documented with their invariants in passes/README.md):
  sparsify.fqn    str         fully qualified name of the module a node came from ("" = root)
  sparsify.site   Site        on the anchor node of every site a family found (find_sites)
  sparsify.layer  LayerInfo   on weight-layer nodes (linear / addmm / mm / conv2d on a parameter)
  sparsify.stats  LayerStats  calibration statistics of a site's probed input (on the probe's owner)
  sparsify.plan   LayerPlan   the decision for a site (written by analysis passes only)
  sparsify.from   Provenance  on every node a rewrite pass creates
  sparsify.original_target  str  on a get_attr node a rewrite repointed: the attribute it read at capture
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterable

import networkx as nx
import torch
import torch.fx as fx

FQN = "sparsify.fqn"
SITE = "sparsify.site"
LAYER = "sparsify.layer"
STATS = "sparsify.stats"
PLAN = "sparsify.plan"
FROM = "sparsify.from"
ORIGINAL_TARGET = "sparsify.original_target"

aten = torch.ops.aten

# The ATen ops that are weight layers (a matmul with a parameter), with the argument positions of
# input, weight, bias; read by the families that act on weight layers (weight, channel).
# addmm(bias, x, w) is HF's Conv1D (GPT-2): weight stored transposed, (in, out).
WEIGHT_OPS: dict[Any, tuple[str, int, int, int | None]] = {
    aten.linear.default: ("linear", 0, 1, 2),
    aten.addmm.default: ("addmm", 1, 2, 0),
    aten.mm.default: ("mm", 0, 1, None),
    aten.conv2d.default: ("conv2d", 0, 1, 2),
}


@dataclasses.dataclass
class LayerInfo:
    """A weight layer as seen in the graph (written by the weight family when it looks for sites)."""

    fqn: str
    op: str                      # "linear", "addmm", "mm", "conv2d"
    weight_target: str           # get_attr target of the weight parameter
    bias_target: str | None
    weight_shape: tuple
    input_shape: tuple | None
    output_shape: tuple | None
    dtype: str
    weight_transposed: bool = False   # addmm / mm: weight stored (in, out)
    conv_params: dict | None = None   # stride, padding, dilation, groups
    uses: int = 1                     # ops reading the weight (> 1: tied, e.g. embeddings and LM head)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Why a node exists: the pass and rule that created it, from which node and layer, with what."""

    pass_name: str
    rule: str
    source: str            # name of the node it replaced
    fqn: str
    detail: str = ""


def node_fqn(node: fx.Node) -> str:
    """Fully qualified module name of the module that produced a node, '' for the root."""
    if FQN in node.meta:
        return node.meta[FQN]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return _clean_fqn(path)
    return ""


def _clean_fqn(path: str) -> str:
    # export names modules like "L['self'].encoder.layer[0]" in some versions; normalise to dotted.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part and part not in ("self",):
            out.append(part.strip("'\""))
    return ".".join(out)


def get_attr_target(node: Any) -> str | None:
    return node.target if isinstance(node, fx.Node) and node.op == "get_attr" else None


def fetch_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_meta(node: Any):
    """(shape, dtype) of a node's value as recorded by export / ShapeProp, else (None, None)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None and isinstance(node, fx.Node):
        tm = node.meta.get("tensor_meta")
        if tm is not None:
            return tuple(tm.shape), tm.dtype
    if isinstance(val, torch.Tensor):
        return tuple(int(s) if isinstance(s, int) else s for s in val.shape), val.dtype
    return None, None


def op_arg(node: fx.Node, name: str) -> tuple[int | None, Any]:
    """(position, value) of the schema argument `name` of an op node, or (None, None) if the op has none.

    Positional or keyword, missing trailing arguments read as None: custom ops are emitted with
    positional arguments, which makes `node.args[i]` depend on the schema's order; this does not."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None, None
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if i < len(node.args):
                return i, node.args[i]
            return i, node.kwargs.get(name)
    return None, None


def set_op_arg(node: fx.Node, name: str, value: Any) -> None:
    """Set schema argument `name` of an op node positionally (skipped arguments take their defaults)."""
    i, _ = op_arg(node, name)
    if i is None:
        raise KeyError(f"{node.target} has no argument {name!r}")
    schema_args = node.target._schema.arguments
    args = list(node.args)
    while len(args) <= i:
        a = schema_args[len(args)]
        args.append(node.kwargs.get(a.name, a.default_value if a.has_default_value() else None))
    args[i] = value
    positional = {a.name for a in schema_args[:len(args)]}
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in positional}


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if LAYER in n.meta]


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """A directed data-flow graph: one vertex per fx node (by name), edges producer -> user.

    Vertex attributes: op, target (str), fqn, and the fx node itself under "node" so analyses can go
    back to the IR. Use it for reachability, dominators and subgraph search; change the fx graph only.
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        g.add_node(n.name, op=n.op, target=str(n.target), fqn=node_fqn(n), node=n)
    for n in gm.graph.nodes:
        for inp in n.all_input_nodes:
            g.add_edge(inp.name, n.name)
    return g


@contextlib.contextmanager
def probes(gm: fx.GraphModule, watch: Iterable[tuple[fx.Node, Any]], callback: Callable[[Any, Any], None]):
    """Temporarily make `gm` call `callback(key, value)` with each watched node's runtime value.

    Used by calibration: the model runs as itself (same call signature, pytree in/out), and every
    probe sees real tensors. The probes are removed on exit, leaving the graph as it was.
    """
    inserted = []
    for node, key in watch:
        with gm.graph.inserting_after(node):
            inserted.append(gm.graph.call_function(callback, (key, node)))
    gm.recompile()
    try:
        yield gm
    finally:
        for p in inserted:
            gm.graph.erase_node(p)
        gm.recompile()


def shallow_module_copy(mod: torch.nn.Module) -> torch.nn.Module:
    """A module with its own attribute, parameter, buffer and child tables, sharing every tensor and
    child: setting an attribute on the copy leaves the original untouched, without copying weights.

    Not copy.copy: GraphModule.__copy__ builds a new GraphModule on the same Graph object, which makes
    the copy the graph's owning module, so the original's graph.lint() checks the copy's attributes."""
    new = type(mod).__new__(type(mod))
    new.__dict__ = dict(mod.__dict__)
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._modules = dict(mod._modules)
    new._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
    return new


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and attribute tables but the same parameter tensors.

    Rewrites register buffers and edit the graph; doing that on a fresh copy leaves the original
    (e.g. the analysed snapshot kept for rollback) intact without duplicating weights in memory.
    Node meta is copied shallowly, so LayerPlan objects stay shared with the snapshot.
    """
    import copy

    new = shallow_module_copy(gm)
    new.graph = copy.deepcopy(gm.graph)
    return new


# ---- what a rewrite does to a graph: the two steps every family's rewrite shares ----------------
def add_buffers(gm: fx.GraphModule, prefix: str, tensors: dict, before: fx.Node, fqn: str) -> dict:
    """Register `tensors` as persistent buffers `<prefix>_<name>` of `gm` and read them with get_attr
    nodes placed before `before`; returns name -> get_attr node."""
    nodes = {}
    with gm.graph.inserting_before(before):
        for name, tensor in tensors.items():
            attr = f"{prefix}_{name}"
            gm.register_buffer(attr, tensor, persistent=True)
            nodes[name] = gm.graph.get_attr(attr)
            nodes[name].meta[FQN] = fqn
    return nodes


def replace_with_call(gm: fx.GraphModule, node: fx.Node, target, args: tuple, provenance: Provenance,
                      plan=None) -> fx.Node:
    """Replace `node` by `target(*args)`: the new node takes its uses, value metadata and fqn, and
    records `provenance` (and the plan, when given); inputs nothing reads any more are removed."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
    new.meta[FQN] = node.meta.get(FQN, provenance.fqn)
    new.meta[FROM] = provenance
    if plan is not None:
        new.meta[PLAN] = plan
    replace_node(gm, node, new)
    return new


def replace_node(gm: fx.GraphModule, node: fx.Node, new: fx.Node) -> list[str]:
    """`new` takes `node`'s uses, `node` goes, and so do the get_attr inputs nothing reads any more;
    returns the targets of those get_attrs."""
    inputs = node.all_input_nodes
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    dropped = []
    for n in inputs:
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
            dropped.append(n.target)
    return dropped
