"""Pass infrastructure: the registry, phases, PassContext with instruments, and Pipeline.

A pass is a plain function `(gm, ctx) -> PassResult` registered in a phase (PHASES: canonicalize,
analysis, rewrite, lower) with the compile state it requires and provides. The driver works on
phases: it runs canonicalize + analysis once, snapshots the graph, and runs rewrite + lower on a fresh
copy of the snapshot for every build (a rollback), so rewrite passes read only the plan and the
prepared data. Register with `@register_pass("name", phase=..., default=True)`; `before=`/`after=`
place a pass next to a named one in the default pipeline instead.
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
from .state import CompileState


@dataclasses.dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    info: dict = dataclasses.field(default_factory=dict)


# The phases, in the order they run. canonicalize: changes the graph but not its function (up to
# rounding), e.g. folding batch norm into a conv; replayed when a new input signature is captured,
# and alone does not count as "the model was rewritten". analysis: writes node.meta and the compile
# state only (sites, statistics, plans). rewrite: changes what the graph computes (sparse ops, pruned
# channels) from the plan and the prepared data alone, recording provenance; re-run on a fresh copy
# of the analysed graph whenever the driver rolls a site back. lower: maps what the rewrite made onto
# its kernels (epilogue fusion), re-run with the rewrite.
PHASES = ("canonicalize", "analysis", "rewrite", "lower")
KINDS = PHASES   # the old name of the phases


@dataclasses.dataclass(frozen=True)
class RegisteredPass:
    """A pass with its phase and the state it requires from, and provides to, later passes
    ("sites", "stats", "plan", "prepared", or a name of your own)."""

    name: str
    phase: str
    fn: Callable
    requires: tuple = ()
    provides: tuple = ()

    @property
    def kind(self) -> str:
        return self.phase

    def __call__(self, gm, ctx) -> PassResult:
        return self.fn(gm, ctx)


class PassError(RuntimeError):
    """A pass failed; the message names the pass and the passes that ran before it."""


_PASSES: dict[str, RegisteredPass] = {}
_DEFAULT_ORDER: list[str] = []
_PLACEMENTS: list[tuple[str, str | None, str | None]] = []   # user passes placed by name, applied lazily
_BUILTINS: dict[str, Callable[[], None] | None] = {"load": None}


def set_builtin_loader(load: Callable[[], None]) -> None:
    """The roof tells the ground floor how to load the built-in passes (the ground floor never
    imports sparsify.passes itself); the default pipeline loads them before it is first used."""
    _BUILTINS["load"] = load


def _ensure_builtins() -> None:
    load = _BUILTINS["load"]
    if load is not None:
        _BUILTINS["load"] = None
        load()


def register_pass(name: str, phase: str | None = None, *, kind: str | None = None, requires=(), provides=(),
                  before: str | None = None, after: str | None = None, default: bool = False):
    """Decorator: register `fn(gm, ctx) -> PassResult` under `name` in a phase (see PHASES).

    default=True adds it to the default pipeline at the end of its phase; before=/after= put it next
    to a named pass of the default pipeline instead (a user pass then joins every later
    `sparsify.compile`). requires / provides: names of compile state the pass reads / writes; the
    pipeline checks that something earlier provides what a pass requires. `kind` is the old name of
    `phase`.
    """
    phase = phase or kind or "analysis"
    if phase not in PHASES:
        raise ValueError(f"register_pass({name!r}): phase must be one of {PHASES}, got {phase!r}")

    def deco(fn):
        _PASSES[name] = RegisteredPass(name, phase, fn, tuple(requires), tuple(provides))
        if name in _DEFAULT_ORDER:
            _DEFAULT_ORDER.remove(name)
        if before is not None or after is not None:
            _PLACEMENTS.append((name, before, after))
        elif default:
            add_to_default(name)
        return fn

    return deco


def add_to_default(name: str, *, before: str | None = None, after: str | None = None) -> None:
    """Place a registered pass in the default pipeline: at the end of its phase, or next to a named pass."""
    p = get_pass(name)
    if name in _DEFAULT_ORDER:
        _DEFAULT_ORDER.remove(name)
    if before is None and after is None:
        rank = PHASES.index(p.phase)
        i = next((i for i, n in enumerate(_DEFAULT_ORDER) if PHASES.index(_PASSES[n].phase) > rank),
                 len(_DEFAULT_ORDER))
        _DEFAULT_ORDER.insert(i, name)
        return
    anchor = before if before is not None else after
    if anchor not in _DEFAULT_ORDER:
        raise ValueError(f"pass {name!r}: no pass {anchor!r} in the default pipeline ({_DEFAULT_ORDER})")
    i = _DEFAULT_ORDER.index(anchor)
    _DEFAULT_ORDER.insert(i if before is not None else i + 1, name)
    try:
        _check_order([_PASSES[n] for n in _DEFAULT_ORDER])
    except ValueError:
        _DEFAULT_ORDER.remove(name)
        raise


def unregister_pass(name: str) -> None:
    _PASSES.pop(name, None)
    _PLACEMENTS[:] = [pl for pl in _PLACEMENTS if pl[0] != name]
    if name in _DEFAULT_ORDER:
        _DEFAULT_ORDER.remove(name)


def get_pass(name: str) -> RegisteredPass:
    if name not in _PASSES:
        _ensure_builtins()
    if name not in _PASSES:
        raise KeyError(f"no pass named {name!r}; registered: {sorted(_PASSES)}")
    return _PASSES[name]


def registered_passes() -> dict[str, RegisteredPass]:
    _ensure_builtins()
    return dict(_PASSES)


def default_pass_names() -> list[str]:
    """The default pipeline: the built-in passes, then the user's passes placed by name."""
    _ensure_builtins()
    while _PLACEMENTS:
        name, before, after = _PLACEMENTS.pop(0)
        if name in _PASSES:
            add_to_default(name, before=before, after=after)
    return list(_DEFAULT_ORDER)


def _check_order(passes) -> None:
    """Phases must not go backwards (an analysis pass after a rewrite would read a rewritten graph)."""
    for a, b in zip(passes, passes[1:]):
        if PHASES.index(b.phase) < PHASES.index(a.phase):
            raise ValueError(f"pass {b.name!r} ({b.phase}) cannot run after {a.name!r} ({a.phase}): "
                             f"phases run in the order {PHASES}")


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
        from .inspection import to_dot  # imported late to keep import light

        after = self._signature(gm)
        changed = {n for n, sig in after.items() if self._before.get(n) != sig}
        stem = f"{self.count:03d}_{ctx.part_prefix.replace('.', '_') + '_' if ctx.part_prefix else ''}{name}"
        (self.dir / f"{stem}.py").write_text(f"# after pass {name}; modified={result.modified}\n{gm.code}")
        to_dot(gm, self.dir / f"{stem}.dot", highlight=changed)
        self.count += 1


# ---- context and pipeline --------------------------------------------------------------------
@dataclasses.dataclass
class PassContext:
    """What passes may read besides the graph: config, device, calibration inputs, the compile state.

    calibration: list of (args, kwargs) batches for the captured part. state: the typed CompileState
    passes share (sites, statistics, plans, prepared buffers, costs, notes). part_prefix: the fqn of
    the captured part inside the user's model ("" when the whole model was captured).
    """

    config: Any
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    calibration: list = dataclasses.field(default_factory=list)
    instruments: list = dataclasses.field(default_factory=list)
    debug: bool = False
    part_prefix: str = ""
    state: CompileState = dataclasses.field(default_factory=CompileState)
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
    """graph.lint() plus ours: sparsify ops carry provenance; plans only on site anchors or on the
    nodes a rewrite made."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target).startswith("sparsify.") and ir.FROM not in n.meta:
            raise AssertionError(f"node {n.name} ({n.target}) was created without {ir.FROM} provenance")
        if ir.PLAN in n.meta and ir.SITE not in n.meta and ir.FROM not in n.meta:
            raise AssertionError(f"node {n.name} has a plan but is not a site's anchor")


class Pipeline:
    """An ordered list of registered passes, phases in order; run them inside a PassContext."""

    def __init__(self, passes=None):
        names = default_pass_names() if passes is None else passes
        self.passes: list[RegisteredPass] = [self._resolve(p) for p in names]
        _check_order(self.passes)

    @staticmethod
    def _resolve(p) -> RegisteredPass:
        return p if isinstance(p, RegisteredPass) else get_pass(p)

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

    def _insert(self, i: int, p) -> "Pipeline":
        passes = self.passes[:i] + [self._resolve(p)] + self.passes[i:]
        _check_order(passes)
        self.passes = passes
        return self

    def insert_before(self, anchor: str, p) -> "Pipeline":
        return self._insert(self._index(anchor), p)

    def insert_after(self, anchor: str, p) -> "Pipeline":
        return self._insert(self._index(anchor) + 1, p)

    def add(self, p) -> "Pipeline":
        """Insert a pass at the end of its phase."""
        rank = PHASES.index(self._resolve(p).phase)
        i = next((i for i, q in enumerate(self.passes) if PHASES.index(q.phase) > rank), len(self.passes))
        return self._insert(i, p)

    def remove(self, name: str) -> "Pipeline":
        del self.passes[self._index(name)]
        return self

    def phase(self, *phases: str) -> "Pipeline":
        """The passes of the given phases, in order."""
        unknown = [ph for ph in phases if ph not in PHASES]
        if unknown:
            raise ValueError(f"unknown phase(s) {unknown}; phases: {PHASES}")
        return Pipeline([p for p in self.passes if p.phase in phases])

    def providers(self, needs, phases=("canonicalize", "analysis")) -> "Pipeline":
        """The passes of `phases` needed to provide `needs` (with what they require in turn): what
        must run again before the rewrite phase on a new capture, where the plan is already known.
        Canonicalize passes always run (the prepared data was made from the canonical graph)."""
        pool = [p for p in self.passes if p.phase in phases]
        wanted, chosen = set(needs), set()
        for p in reversed(pool):
            if p.phase == "canonicalize" or wanted & set(p.provides):
                chosen.add(p.name)
                wanted |= set(p.requires)
        return Pipeline([p for p in pool if p.name in chosen])

    def requirements(self) -> set[str]:
        """What these passes require that none of them provides (the driver must supply it)."""
        provided, missing = set(), set()
        for p in self.passes:
            missing |= set(p.requires) - provided
            provided |= set(p.provides)
        return missing

    def run(self, gm: fx.GraphModule, ctx: PassContext, available=()) -> fx.GraphModule:
        """Run the passes in order. `available`: compile state the caller supplies (e.g. "plan" when
        a plan is re-applied); anything else a pass requires must be provided by an earlier pass."""
        debug = ctx.debug or bool(os.environ.get("SPARSIFY_DEBUG"))
        instruments = list(ctx.instruments)
        dump_dir = os.environ.get("SPARSIFY_DEBUG_DIR")
        if dump_dir and not any(isinstance(i, DumpIR) for i in instruments):
            instruments.append(DumpIR(dump_dir))
            debug = True
        done: list[str] = []
        have = set(available)
        for p in self.passes:
            missing = [r for r in p.requires if r not in have]
            if missing:
                raise PassError(f"pass {p.name!r} ({p.phase}) requires {missing}, which no earlier pass of this "
                                f"pipeline provides (ran: {done or 'no passes'})")
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
            have |= set(p.provides)
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
