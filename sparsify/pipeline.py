"""Pass infrastructure: the registry, PassContext with instruments, and Pipeline.

A pass is a plain function `(gm, ctx) -> PassResult`. Analysis passes only write node.meta; rewrite
passes change the graph and record provenance on the nodes they create. Register with
`@register_pass("name", kind=...)`; give `before=`/`after=` to also place it in the default pipeline.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from . import ir


@dataclasses.dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RegisteredPass:
    name: str
    kind: str            # see KINDS
    fn: Callable

    def __call__(self, gm, ctx) -> PassResult:
        return self.fn(gm, ctx)


class PassError(RuntimeError):
    """A pass failed; the message names the pass and the passes that ran before it."""


# analysis: writes node.meta only. rewrite: changes what the graph computes (sparse ops, pruned
# channels) and records provenance. canonicalize: changes the graph but not its function (up to
# rounding), e.g. folding batch norm into a conv; runs before analysis, is replayed when a new input
# signature is captured, and alone does not count as "the model was rewritten".
KINDS = ("analysis", "rewrite", "canonicalize")

_PASSES: dict[str, RegisteredPass] = {}
_DEFAULT_ORDER: list[str] = []


def register_pass(name: str, kind: str = "analysis", *, before: str | None = None,
                  after: str | None = None, default: bool = False):
    """Decorator: register `fn(gm, ctx) -> PassResult` under `name`.

    default=True appends it to the default pipeline; before=/after= insert it next to a named pass
    of the default pipeline (a user pass joins every later `sparsify.compile`).
    """
    if kind not in KINDS:
        raise ValueError(f"register_pass({name!r}): kind must be one of {KINDS}, got {kind!r}")

    def deco(fn):
        _PASSES[name] = RegisteredPass(name, kind, fn)
        if name in _DEFAULT_ORDER:
            _DEFAULT_ORDER.remove(name)
        if before is not None or after is not None or default:
            add_to_default(name, before=before, after=after)
        return fn

    return deco


def add_to_default(name: str, *, before: str | None = None, after: str | None = None) -> None:
    """Place a registered pass in the default pipeline (at the end, or next to a named pass)."""
    get_pass(name)
    if name in _DEFAULT_ORDER:
        _DEFAULT_ORDER.remove(name)
    if before is None and after is None:
        _DEFAULT_ORDER.append(name)
        return
    anchor = before if before is not None else after
    if anchor not in _DEFAULT_ORDER:
        raise ValueError(f"pass {name!r}: no pass {anchor!r} in the default pipeline ({_DEFAULT_ORDER})")
    i = _DEFAULT_ORDER.index(anchor)
    _DEFAULT_ORDER.insert(i if before is not None else i + 1, name)


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)
    if name in _DEFAULT_ORDER:
        _DEFAULT_ORDER.remove(name)


def get_pass(name: str) -> RegisteredPass:
    if name not in _PASSES:
        raise KeyError(f"no pass named {name!r}; registered: {sorted(_PASSES)}")
    return _PASSES[name]


def registered_passes() -> dict[str, RegisteredPass]:
    return dict(_PASSES)


def default_pass_names() -> list[str]:
    return list(_DEFAULT_ORDER)


# ---- instruments -----------------------------------------------------------------------------
class Instrument:
    def before_pass(self, name: str, gm: fx.GraphModule, ctx: "PassContext") -> None: ...
    def after_pass(self, name: str, gm: fx.GraphModule, ctx: "PassContext", result: PassResult,
                   seconds: float) -> None: ...


class PrintAfter(Instrument):
    """Print the graph code after the named passes (all passes when names is None)."""

    def __init__(self, names=None, printer=print):
        self.names, self.printer = names, printer

    def after_pass(self, name, gm, ctx, result, seconds):
        if self.names is None or name in self.names:
            self.printer(f"# ---- after {name} (modified={result.modified}) ----\n{gm.code}")


class Timing(Instrument):
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def after_pass(self, name, gm, ctx, result, seconds):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


class DumpIR(Instrument):
    """Write NNN_<pass>.py (graph code) and NNN_<pass>.dot (changed nodes filled) after every pass."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self._before: dict[str, str] = {}

    @staticmethod
    def _signature(gm) -> dict[str, str]:
        return {n.name: f"{n.op}|{n.target}|{[str(a) for a in n.args]}" for n in gm.graph.nodes}

    def before_pass(self, name, gm, ctx):
        self._before = self._signature(gm)

    def after_pass(self, name, gm, ctx, result, seconds):
        from .inspect import to_dot  # roof-free helper module; imported late to keep import light

        after = self._signature(gm)
        changed = {n for n, sig in after.items() if self._before.get(n) != sig}
        stem = f"{self.count:03d}_{ctx.part_prefix.replace('.', '_') + '_' if ctx.part_prefix else ''}{name}"
        (self.dir / f"{stem}.py").write_text(f"# after pass {name}; modified={result.modified}\n{gm.code}")
        to_dot(gm, self.dir / f"{stem}.dot", highlight=changed)
        self.count += 1


# ---- context and pipeline --------------------------------------------------------------------
@dataclasses.dataclass
class PassContext:
    """What passes may read besides the graph: config, device, calibration inputs, shared state.

    calibration: list of (args, kwargs) batches for the captured part. state: a dict where passes
    leave results for later passes (e.g. calibration statistics keyed by fqn). part_prefix: the fqn
    of the captured part inside the user's model ("" when the whole model was captured).
    """

    config: Any
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    calibration: list = dataclasses.field(default_factory=list)
    instruments: list = dataclasses.field(default_factory=list)
    debug: bool = False
    part_prefix: str = ""
    state: dict = dataclasses.field(default_factory=dict)
    progress: Callable[[str], None] | None = None
    rule_counts: dict = dataclasses.field(default_factory=dict)
    rule_failures: dict = dataclasses.field(default_factory=dict)

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def full_fqn(self, local_fqn: str) -> str:
        if not self.part_prefix:
            return local_fqn
        return f"{self.part_prefix}.{local_fqn}" if local_fqn else self.part_prefix


def check_invariants(gm: fx.GraphModule, pass_name: str) -> None:
    """graph.lint() plus ours: sparsify ops carry provenance; plans only on layer nodes."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("sparsify.") and ir.FROM not in n.meta:
            raise AssertionError(f"node {n.name} ({n.target}) was created without {ir.FROM} provenance")
        if ir.PLAN in n.meta and ir.LAYER not in n.meta and ir.FROM not in n.meta:
            raise AssertionError(f"node {n.name} has a plan but is not a layer node")


class Pipeline:
    """An ordered list of registered passes; run them inside a PassContext."""

    def __init__(self, passes=None):
        names = default_pass_names() if passes is None else passes
        self.passes: list[RegisteredPass] = [p if isinstance(p, RegisteredPass) else get_pass(p) for p in names]

    @classmethod
    def default(cls) -> "Pipeline":
        return cls(None)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def _index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no pass {name!r} in this pipeline ({self.names})")
        return self.names.index(name)

    def insert_before(self, anchor: str, p) -> "Pipeline":
        self.passes.insert(self._index(anchor), p if isinstance(p, RegisteredPass) else get_pass(p))
        return self

    def insert_after(self, anchor: str, p) -> "Pipeline":
        self.passes.insert(self._index(anchor) + 1, p if isinstance(p, RegisteredPass) else get_pass(p))
        return self

    def remove(self, name: str) -> "Pipeline":
        del self.passes[self._index(name)]
        return self

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        debug = ctx.debug or bool(os.environ.get("SPARSIFY_DEBUG"))
        instruments = list(ctx.instruments)
        dump_dir = os.environ.get("SPARSIFY_DEBUG_DIR")
        if dump_dir and not any(isinstance(i, DumpIR) for i in instruments):
            instruments.append(DumpIR(dump_dir))
            debug = True
        done: list[str] = []
        for p in self.passes:
            ctx.say(f"pass {p.name}")
            for inst in instruments:
                inst.before_pass(p.name, gm, ctx)
            t0 = time.perf_counter()
            try:
                result = p(gm, ctx)
                if not isinstance(result, PassResult):
                    raise TypeError(f"returned {type(result).__name__}, expected PassResult")
                gm = result.gm
                if debug:
                    check_invariants(gm, p.name)
            except Exception as e:
                where = f" in part {ctx.part_prefix!r}" if ctx.part_prefix else ""
                raise PassError(f"pass {p.name!r} failed{where} after {done or 'no passes'}: "
                                f"{type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - t0
            for inst in instruments:
                inst.after_pass(p.name, gm, ctx, result, seconds)
            done.append(p.name)
        return gm


# ---- rewrite rules as data -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatchFailure:
    """Returned by a rule's extra_check to refuse a match, with the reason (shown in the report)."""

    why: str

    def __bool__(self) -> bool:
        return False


@dataclasses.dataclass
class RewriteRule:
    """A search function and a replacement function in plain torch, plus an optional check.

    The search function is traced to ATen level with torch.export on `example_inputs` (default: one
    8x8 tensor per argument) so it matches captured graphs; the replacement is traced with
    fx.symbolic_trace. extra_check(match) receives the InternalMatch (match.nodes_map maps pattern
    nodes to graph nodes) and returns True, or False / MatchFailure("why") to skip that match.
    """

    name: str
    search: Callable
    replace: Callable
    extra_check: Callable | None = None
    example_inputs: tuple | None = None

    def search_graph(self) -> fx.GraphModule:
        import inspect as _inspect

        nargs = len(_inspect.signature(self.search).parameters)
        example = self.example_inputs or tuple(torch.randn(8, 8) for _ in range(nargs))

        class _Search(torch.nn.Module):
            def forward(s, *args):
                return self.search(*args)

        return torch.export.export(_Search(), example, strict=False).graph_module

    def apply(self, gm: fx.GraphModule, ctx: PassContext | None = None, pass_name: str = "") -> int:
        from torch.fx.subgraph_rewriter import replace_pattern_with_filters

        failures: list[str] = []

        def check(match, original_graph, pattern_graph) -> bool:
            if self.extra_check is None:
                return True
            verdict = self.extra_check(match)
            if isinstance(verdict, MatchFailure) or not verdict:
                why = verdict.why if isinstance(verdict, MatchFailure) else "extra_check returned False"
                anchor = next(iter(match.returning_nodes), None)
                failures.append(f"{getattr(anchor, 'name', '?')}: {why}")
                return False
            return True

        before = {n.name for n in gm.graph.nodes}
        replaced = replace_pattern_with_filters(gm, self.search_graph(), fx.symbolic_trace(self.replace),
                                                match_filters=[check])
        for n in gm.graph.nodes:
            if n.name not in before and ir.FROM not in n.meta and n.op == "call_function":
                n.meta[ir.FROM] = ir.Provenance(pass_name or "rewrite_rules", self.name, "", "")
        gm.graph.lint()
        gm.recompile()
        if ctx is not None:
            ctx.rule_counts[self.name] = ctx.rule_counts.get(self.name, 0) + len(replaced)
            ctx.rule_failures.setdefault(self.name, []).extend(failures)
        return len(replaced)


_RULES: list[RewriteRule] = []


def register_rule(rule: RewriteRule) -> RewriteRule:
    """Add a rule to the `apply_rewrite_rules` pass of the default pipeline."""
    _RULES[:] = [r for r in _RULES if r.name != rule.name] + [rule]
    return rule


def unregister_rule(name: str) -> None:
    _RULES[:] = [r for r in _RULES if r.name != name]


def registered_rules() -> list[RewriteRule]:
    return list(_RULES)
