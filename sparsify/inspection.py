"""Look at what was done: graph diffs and DOT files (through the networkx view)."""
from __future__ import annotations

import difflib
from pathlib import Path

import networkx as nx
import torch.fx as fx

from . import ir


def _code(x) -> str:
    if isinstance(x, fx.GraphModule):
        return x.code
    if hasattr(x, "graph_module"):
        return x.graph_module.code
    if isinstance(x, str):
        return x
    raise TypeError(f"diff: expected a GraphModule, a SparseModule or code text, got {type(x).__name__}")


def diff(before, after, context: int = 2) -> str:
    """Unified diff of the generated code of two graphs (GraphModule, SparseModule or code text)."""
    a, b = _code(before).splitlines(), _code(after).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "before", "after", lineterm="", n=context))


def _label(n: fx.Node) -> str:
    text = f"{n.name}\\n{n.op}: {str(n.target)[:48]}"
    fqn = ir.node_fqn(n)
    if fqn:
        text += f"\\n[{fqn}]"
    plan = n.meta.get(ir.PLAN)
    if plan is not None:
        text += f"\\n{plan.pattern.describe()} ({plan.status})"
    return text.replace('"', "'")


def to_dot(gm: fx.GraphModule, path=None, highlight=frozenset()) -> str:
    """DOT source of the graph (nodes labelled with op, target, fqn and plan; `highlight` filled).

    Written to `path` when given. Built from `ir.to_networkx` so it shows what analyses see.
    """
    g = ir.to_networkx(gm)
    dot = nx.DiGraph()
    for name, attrs in g.nodes(data=True):
        node = attrs["node"]
        style = {"shape": "box"}
        if name in highlight:
            style.update(style="filled", fillcolor="gold")
        elif ir.FROM in node.meta:
            style.update(style="filled", fillcolor="palegreen")
        dot.add_node(name, label=f'"{_label(node)}"', **style)
    dot.add_edges_from(g.edges())
    lines = ["digraph G {", "  rankdir=TB;"]
    for name, attrs in dot.nodes(data=True):
        opts = ", ".join(f"{k}={v}" for k, v in attrs.items())
        lines.append(f'  "{name}" [{opts}];')
    for u, v in dot.edges():
        lines.append(f'  "{u}" -> "{v}";')
    lines.append("}")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text)
    return text


def why(sm, fqn: str) -> str:
    """Why is this layer sparse (or dense)? The plan's decision and the provenance of its nodes."""
    lp = sm.plan[fqn]
    lines = [f"{fqn}: {lp.status} — {lp.pattern.describe()} via {lp.kernel}; {lp.reason}"]
    for part in sm.parts:
        for n in part.gm.graph.nodes:
            prov = n.meta.get(ir.FROM)
            if prov is not None and prov.fqn == fqn:
                lines.append(f"  node {n.name}: created by pass {prov.pass_name!r}, rule {prov.rule!r}, "
                             f"from {prov.source}; {prov.detail}")
    return "\n".join(lines)
