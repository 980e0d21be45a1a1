"""Families: the one extension point for a kind of sparsity (weights, channels, activations, ...).

A family is looked up by the type of the pattern the Config gives a site (as torchao dispatches a
config to its handler) and declares five hooks:

  find_sites(gm, ctx)                  -> [Site]      where it can act in the captured graph
  candidates(gm, site, requested, ctx) -> [Pattern]   what to try there, from the Config
  measure(gm, site, patterns, ctx)     -> Measured    each candidate as the graph would run it: its
                                                      error, a runnable to time, what it would install
  prepare(gm, site, plan, ctx)         -> Prepared    what the rewrite installs, from the plan alone
  rewrite(gm, site, plan, prepared, ctx)              replace the site's nodes

The driver is the same for every family: `find_sites` collects the sites, `calibrate` records the
statistics each site's probes ask for, `plan_sites` calls `Family.plan`, whose default chooses per
site among the measured candidates under the one error budget (timing through the cost model, so
every family is timed the same way), and `rewrite_sites` calls `Family.rewrite_all`, whose default
rewrites every planned site. A family whose decisions are joint across sites (channel groups pruned
one after another) overrides `plan` / `rewrite_all` instead.

Register a family with `register_family(MyFamily())`; its patterns with `patterns.register_pattern`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from . import ir
from .patterns import Auto, Pattern
from .pipeline import _ensure_builtins
from .plan import FORCED, SPARSE, Candidate, LayerPlan
from .state import Prepared


class UnsupportedPatternError(ValueError):
    """A Config names a pattern no implemented family serves."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """A value calibration records statistics of: `node` (by name) with its channel dim, stored under
    `key` in CompileState.stats and as `sparsify.stats` on node `owner`; rows: keep its token rows of
    every calibration batch (LayerStats.rows), not only sums."""

    key: str
    node: str
    dim: int
    owner: str
    rows: bool = False


@dataclasses.dataclass
class Site:
    """Where a family can act: a weight layer, a channel group, an FFN subgraph, an attention op.

    key: unique within the captured part, the plan's key (a weight layer's fqn). fqn: the module
    whose Config pattern applies (overrides match it). nodes: the graph nodes it covers by name, the
    anchor first (names stay valid on fresh copies of the analysed graph). info: the family's own
    description (for weight layers, their ir.LayerInfo). members: fqns of the layers it covers.
    """

    key: str
    family: str
    fqn: str
    op: str
    nodes: tuple
    probes: tuple = ()
    input_shape: tuple | None = None
    weight_shape: tuple | None = None
    output_shape: tuple | None = None
    members: tuple = ()
    info: Any = None

    @classmethod
    def at(cls, node, key: str, family: str, op: str, fqn: str | None = None, **kw) -> "Site":
        """A site anchored at one node: its input shape from the node's first argument, its output
        shape from the node's value metadata."""
        first = node.args[0] if node.args else None
        return cls(key, family, key if fqn is None else fqn, op, (node.name,),
                   input_shape=ir.tensor_meta(first)[0], output_shape=ir.tensor_meta(node)[0], **kw)

    def node(self, gm, i: int = 0):
        """The site's i-th node in `gm` (0: the anchor)."""
        name = self.nodes[i]
        for n in gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"site {self.key!r} ({self.family}): node {name!r} is not in this graph")


@dataclasses.dataclass
class Trial:
    """One candidate, measured as far as the family can: the driver times `run` with the cost model.

    run: the candidate as the graph will run it (None: it cannot run; candidate.note says why).
    key: the cost-cache key (kernel name and version, pattern, shapes). prepared: what the rewrite
    installs if it is chosen. substitute: parameter target -> tensor, the candidate as a change of
    weights, for the model-level error (None: only its own error is known). params: JSON-able data
    the plan keeps (so a plan alone can be checked when it is applied again). check: the kernel's
    output against the same computation in torch, () -> (layer error, "") or (None, why it fails);
    the chooser runs it only for a candidate it could pick (faster than dense, or forced), so a slower
    kernel is not called at full size once more (torch's CSR at 2048 tokens: 90 ms a call).
    """

    candidate: Candidate
    run: Callable[[], Any] | None = None
    key: tuple = ()
    prepared: Prepared | None = None
    substitute: dict | None = None
    params: dict = dataclasses.field(default_factory=dict)
    check: Callable[[], tuple] | None = None


@dataclasses.dataclass
class Measured:
    """What `Family.measure` returns for a site: the dense baseline and every candidate tried."""

    dense: Trial
    trials: list


class SiteSkipped(Exception):
    """Raised by `measure` when a site cannot be planned at all (the message is the report's reason)."""


class Family:
    """Base class of a family; see the module docstring. Class attributes:

    name: the family's name (reports, Site.family). field: the Config field its patterns are read
    from ("weight", "activation", "attention", "spatial"). patterns: the pattern types it serves.
    auto: it serves Auto for its field (the weight family also records Dense sites). supported: False
    for a family that is declared but not implemented: a Config naming its patterns is refused at
    compile time.
    """

    name: ClassVar[str] = ""
    field: ClassVar[str] = "weight"
    patterns: ClassVar[tuple] = ()
    auto: ClassVar[bool] = False
    supported: ClassVar[bool] = True

    # ---- the hooks -----------------------------------------------------------------------------
    def find_sites(self, gm, ctx) -> list[Site]:
        raise NotImplementedError(f"family {self.name}: find_sites")

    def candidates(self, gm, site: Site, requested: Pattern, ctx) -> list[Pattern]:
        return [requested]

    def measure(self, gm, site: Site, patterns: list[Pattern], ctx) -> Measured:
        raise NotImplementedError(f"family {self.name}: measure")

    def prepare(self, gm, site: Site, plan: LayerPlan, ctx) -> Prepared:
        raise NotImplementedError(f"family {self.name}: prepare")

    def rewrite(self, gm, site: Site, plan: LayerPlan, prepared: Prepared, ctx) -> None:
        raise NotImplementedError(f"family {self.name}: rewrite")

    # ---- dispatch ------------------------------------------------------------------------------
    def wanted(self, config) -> bool:
        """Whether the Config may ask this family for anything: its sites are looked for only then
        (the field's auto family always, for the report)."""
        if not self.supported:
            return False
        if self.auto:
            return True
        return any(isinstance(p, self.patterns) for p in [getattr(config, self.field)] + [p for _, p in config.overrides])

    def asked(self, fqn: str, ctx) -> bool:
        """Whether the Config gives the module `fqn` one of this family's patterns (the test a
        family's find_sites applies, so that two families never claim one layer)."""
        return isinstance(ctx.config.pattern_for(fqn, self.field)[0], self.patterns)

    def owns(self, pattern: Pattern) -> bool:
        """Whether this family plans a site whose Config pattern is `pattern`."""
        if isinstance(pattern, self.patterns):
            return True
        return self.auto and (isinstance(pattern, Auto) or pattern.is_dense)

    def requested(self, site: Site, ctx) -> tuple[Pattern, str]:
        return ctx.config.pattern_for(site.fqn, self.field)

    # ---- the driver's defaults ------------------------------------------------------------------
    def plan(self, gm, sites: list[Site], ctx) -> None:
        """Plan every site whose Config pattern this family owns, one after another."""
        mine = [(s, *self.requested(s, ctx)) for s in sites]
        mine = [(s, p, src) for s, p, src in mine if self.owns(p)]
        for i, (site, requested, source) in enumerate(mine):
            ctx.say(f"plan {i + 1}/{len(mine)} {site.key}")
            lp = new_plan(self, site, requested, source)
            ctx.state.plans[site.key] = lp
            site.node(gm).meta[ir.PLAN] = lp
            if requested.is_dense:
                lp.reason = f"dense by {source}"
                continue
            try:
                measured = self.measure(gm, site, self.candidates(gm, site, requested, ctx), ctx)
            except SiteSkipped as e:
                lp.reason = str(e)
                continue
            choose(site, requested, measured, lp, ctx)

    def rewrite_all(self, gm, ctx) -> int:
        """Rewrite every site this family planned sparse, from its plan and prepared data (prepared
        again from the plan where missing, as after loading a plan). Returns the number rewritten."""
        done = 0
        for key, lp in ctx.state.plans.items():
            if lp.family != self.name or lp.status not in (SPARSE, FORCED):
                continue
            site = ctx.state.sites.get(key)
            if site is None:
                raise KeyError(f"the plan has {self.name} site {key!r}, which this graph does not have "
                               f"(sites: {sorted(ctx.state.sites)[:8]})")
            prepared = ctx.state.prepared.get(key)
            if prepared is None:
                prepared = ctx.state.prepared[key] = self.prepare(gm, site, lp, ctx)
            self.rewrite(gm, site, lp, prepared, ctx)
            done += 1
        return done


def new_plan(family: Family, site: Site, requested: Pattern, source: str) -> LayerPlan:
    return LayerPlan(site.key, site.op, site.input_shape, site.weight_shape, site.output_shape,
                     family=family.name, source=source, members=list(site.members or (site.fqn,)))


# ---- the chooser: the same for every family ------------------------------------------------------
def choose(site: Site, requested: Pattern, measured: Measured, lp: LayerPlan, ctx) -> None:
    """Time the dense baseline and every runnable candidate, keep those within the error budget and
    faster than dense by Config.min_speedup (or all, for an explicit pattern with Config.force), and
    pick the fastest whose model-level error stays within max_error (Auto)."""
    cfg, cost = ctx.config, ctx.state.costs
    auto = isinstance(requested, Auto)
    runnable = [t for t in measured.trials if t.run is not None]
    lp.candidates.extend(t.candidate for t in measured.trials)
    if not runnable:
        lp.reason = _why_dense(lp, requested, cfg)
        return
    # dense and every candidate in the same rounds, as the graph runs them: the decision is on ratios
    timed = cost.compare([(cost.key("dense", *measured.dense.key), measured.dense.run)]
                         + [(cost.key(*t.key), t.run) for t in runnable], threshold=cfg.min_speedup)
    lp.dense_ms = timed[0].ms
    sens = ctx.state.sensitivity
    feasible = []
    for trial, t in zip(runnable, timed[1:]):
        cand = trial.candidate
        if t.ms is None:   # a kernel that fails to run is not a candidate; say why
            cand.note = f"failed: {t.error}"
            continue
        cand.time_ms, cand.speedup = t.ms, t.ratio
        faster = t.ratio >= cfg.min_speedup
        if faster and not t.stable:
            cand.note = (f"too noisy to decide: {t.ratio:.2f}x with the ratio varying by {100 * t.spread:.0f}% "
                         f"from round to round (machine busy?); kept out")
            faster = False
        if not (faster or (cfg.force and not auto)):
            continue
        if trial.check is not None:   # only what could be picked: its output against torch
            err, why = trial.check()
            if err is None:
                cand.note = why
                continue
            cand.layer_error = err
        # The budget is on the model output: with model sensitivity on, the pick below judges that;
        # without it the layer error is the (stricter) stand-in.
        if auto:
            layer_cap = cfg.max_layer_error if sens is not None else cfg.max_error
            acceptable = cand.layer_error is None or cand.layer_error <= min(layer_cap, cfg.max_layer_error)
        else:
            acceptable = True
        if acceptable:
            feasible.append(trial)
    best = _pick(feasible, auto, ctx)
    if best is None:
        lp.reason = _why_dense(lp, requested, cfg)
        return
    cand = best.candidate
    lp.pattern, lp.kernel, lp.sparsity = cand.pattern, cand.kernel, cand.sparsity
    lp.sparse_ms, lp.layer_error, lp.model_error = cand.time_ms, cand.layer_error, cand.model_error
    lp.ratio = cand.speedup
    lp.params = dict(best.params)
    lp.status = SPARSE if cand.speedup >= cfg.min_speedup and "noisy" not in cand.note else FORCED
    lp.reason = (f"{cand.pattern.describe()} via {cand.kernel}: {cand.time_ms:.4f} ms vs dense "
                 f"{lp.dense_ms:.4f} ms ({cand.speedup:.2f}x, interleaved)"
                 + (f", layer error {cand.layer_error:.3g}" if cand.layer_error is not None else "")
                 + (f", accumulated model error {cand.model_error:.3g}" if cand.model_error is not None else "")
                 + (" — FORCED although slower than dense" if lp.status == FORCED else ""))
    ctx.state.prepared[site.key] = best.prepared


def _pick(feasible: list[Trial], auto: bool, ctx) -> Trial | None:
    """Fastest feasible trial whose accumulated model error stays within max_error (Auto); an explicit
    pattern takes its fastest kernel, and verification enforces the budget."""
    sens = ctx.state.sensitivity
    for trial in _ranked(feasible):
        if sens is not None and trial.substitute is not None:
            trial.candidate.model_error = sens.error(trial.substitute)
            if auto and trial.candidate.model_error > ctx.config.max_error:
                continue
            sens.accept(trial.substitute)
        return trial
    return None


# Times within this fraction of the fastest are a tie (round-to-round noise on a shared CPU is of this
# order): ties go to the smaller layer error, then to the earlier candidate, so the same model plans
# the same way twice.
TIE = 0.10


def _ranked(trials: list[Trial]) -> list[Trial]:
    """Fastest first by each candidate's minimum time over the rounds (the ratio to dense is the
    median of per-round ratios, which decides against dense; among candidates that passed, a
    candidate that left the rounds early as decided faster has a median of two rounds, and that
    ranked csr_cpu above csr_jit_cpu on BERT-base layers where the minima said 1.6x the other way).
    'Fastest' is a tie band above the best time, ordered by error then by candidate order; the same
    again for what is left. Kernels of one pattern compute the same product, so their errors differ
    by rounding only: a pattern's error is its smallest, and that rounding does not decide."""
    pattern_error: dict[str, float] = {}
    for t in trials:
        key = t.candidate.pattern.describe()
        err = t.candidate.layer_error if t.candidate.layer_error is not None else 0.0
        pattern_error[key] = min(err, pattern_error.get(key, err))
    rest, out = list(enumerate(trials)), []
    while rest:
        best = min(_time(t) for _, t in rest)
        band = [(i, t) for i, t in rest if _time(t) <= best * (1 + TIE)]
        band.sort(key=lambda it: (pattern_error[it[1].candidate.pattern.describe()], _time(it[1]), it[0]))
        out += [t for _, t in band]
        taken = {i for i, _ in band}
        rest = [(i, t) for i, t in rest if i not in taken]
    return out


def _time(trial: Trial) -> float:
    return trial.candidate.time_ms   # choose() ranks timed candidates only


def _why_dense(lp: LayerPlan, requested: Pattern, cfg) -> str:
    tried = [c for c in lp.candidates if c.time_ms is not None]
    if not tried:
        # One line per distinct reason: several candidates of one kernel fail for the same cause.
        notes = dict.fromkeys(c.note if c.kernel == "-" or c.note.startswith(c.kernel) else f"{c.kernel}: {c.note}"
                              for c in lp.candidates)
        return ("no kernel could run a candidate here: " + "; ".join(notes)) if lp.candidates else "no candidates"
    fastest = max(tried, key=lambda c: c.speedup or 0.0)
    over = [c for c in tried if isinstance(requested, Auto) and
            ((c.layer_error or 0) > cfg.max_error or (c.model_error or 0) > cfg.max_error)]
    noisy = [c for c in tried if "too noisy" in c.note]
    return (f"kept dense (needs >= {cfg.min_speedup}x within max_error {cfg.max_error}): fastest candidate "
            f"{fastest.pattern.describe()} via {fastest.kernel} {fastest.time_ms:.4f} ms vs dense "
            f"{lp.dense_ms:.4f} ms ({fastest.speedup:.2f}x)"
            + (f"; {len(over)} candidate(s) over the error budget (layer or accumulated model error)" if over else "")
            + (f"; {len(noisy)} candidate(s) too noisy to decide on (ratio unsteady between rounds)" if noisy else ""))


# ---- the registry ------------------------------------------------------------------------------
_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (an instance of a Family subclass). Families plan and rewrite in registration
    order; registering a name again replaces that family in place."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family expects a Family instance, got {type(family).__name__}")
    _ensure_builtins()   # the built-in families first, so registration order is the same in every process
    if not family.name:
        raise ValueError(f"{type(family).__name__}: a family needs a name")
    if family.field not in FIELDS:
        raise ValueError(f"family {family.name}: field must be one of {FIELDS}, got {family.field!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def families() -> list[Family]:
    _ensure_builtins()
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise KeyError(f"no family named {name!r}; registered: {list(_FAMILIES)}")
    return _FAMILIES[name]


FIELDS = ("weight", "activation", "attention", "spatial")


def family_for(pattern: Pattern, field: str) -> Family | None:
    """The family that serves `pattern` in Config field `field` (None for Dense)."""
    _ensure_builtins()
    if pattern.is_dense:
        return None
    for fam in _FAMILIES.values():
        if fam.field == field and isinstance(pattern, fam.patterns):
            return fam
    if isinstance(pattern, Auto):
        for fam in _FAMILIES.values():
            if fam.field == field and fam.auto:
                return fam
    return None


def check_config(config) -> None:
    """Every non-dense pattern of the Config (fields and overrides) must have an implemented family."""
    wanted = [(f"Config.{f}", getattr(config, f), f) for f in FIELDS]
    wanted += [(f"Config.overrides[{glob!r}]", p, p.field if p.field != "any" else "weight")
               for glob, p in config.overrides]
    for where, pattern, field in wanted:
        if pattern.is_dense:
            continue
        fam = family_for(pattern, field)
        if fam is None:
            if isinstance(pattern, Auto):
                raise UnsupportedPatternError(
                    f"{where}={pattern.describe()}: no family chooses {field} patterns automatically yet "
                    f"(registered: {[f.name for f in families()]}); give an explicit pattern or Dense()")
            raise UnsupportedPatternError(f"{where}={pattern.describe()}: no registered family serves "
                                          f"{type(pattern).__name__} in Config.{field}")
        if not fam.supported:
            raise UnsupportedPatternError(
                f"{where}={pattern.describe()}: {fam.name} sparsity is not yet supported (the {fam.name} "
                f"family is declared but has no implementation); use Dense() for Config.{field}")
