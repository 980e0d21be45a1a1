"""SparseModule: what `sparsify.compile` returns. Captures and plans at the first call (or eagerly)."""
from __future__ import annotations

import copy
import time

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from . import inference, ir
from .capture import Capture, CapturedPart, capture, _record_child_inputs
from .config import Config, ConfigError
from .family import check_config
from .guards import _MISSING as _GUARD_MISSING
from .guards import Guards, recording, shallow_tree_copy
from .progress import Progress
from .metrics import model_error
from .pipeline import PassContext, Pipeline, Timing, registered_passes
from .plan import ROLLED_BACK, Plan
from .state import CompileState


def _signature(args, kwargs) -> tuple:
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # the hot path: no pytree walk
        return tuple((a.shape, a.dtype, a.device) for a in args)
    leaves, spec = pytree.tree_flatten((args, kwargs))
    sig = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            sig.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device.type))
        else:
            sig.append(("V", type(leaf).__name__, repr(leaf)[:64]))
    return (str(spec), tuple(sig))


def _same_call(a, b) -> bool:
    """The same arguments: the same tensors (by identity) and equal plain values, in the same structure."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    return all(x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y
               for x, y in zip(la, lb))


def normalize_batches(example_inputs, calibration_data) -> list[tuple[tuple, dict]]:
    """Every calibration batch as (args, kwargs): a tensor, a tuple/list of args, or a dict of kwargs."""
    def one(b):
        if isinstance(b, torch.Tensor):
            return (b,), {}
        if isinstance(b, dict):
            return (), dict(b)
        if isinstance(b, (tuple, list)):
            if len(b) == 2 and isinstance(b[0], (tuple, list)) and isinstance(b[1], dict):
                return tuple(b[0]), dict(b[1])
            return tuple(b), {}
        raise TypeError(f"calibration batch must be a Tensor, tuple of args or dict of kwargs, "
                        f"got {type(b).__name__}")

    if calibration_data is not None:
        batches = [one(b) for b in calibration_data]
        if not batches:
            raise ValueError("calibration_data is empty")
        return batches
    return [one(example_inputs)] if example_inputs is not None else []


def _saved_ms(lp) -> float:
    """Per-call time a sparse layer saved in its per-layer measurement (0 where not measured)."""
    if lp.dense_ms is None or lp.sparse_ms is None:
        return 0.0
    return lp.dense_ms - lp.sparse_ms


def _changes_function(prov) -> bool:
    """A node made by a pass that changes what the model computes (not a canonicalization)."""
    if prov is None:
        return False
    registered = registered_passes().get(prov.pass_name)
    return registered is None or registered.phase != "canonicalize"


def _as_plan(plan) -> Plan | None:
    """A Plan, a JSON text or the path of a JSON file, as a Plan of our own (the driver records the
    model error on it; the caller's object stays as it was)."""
    if plan is None:
        return None
    if not isinstance(plan, Plan):
        plan = Plan.from_json(plan)
    return Plan.from_dict(plan.to_dict())


def _measure_words(config: Config) -> str:
    metric = {"rel_l2": "relative L2", "cosine": "1 - cosine similarity"}.get(config.metric, config.metric)
    what = "every floating output" if config.output is None else f"output {config.output!r}"
    if callable(config.output):
        what = f"output {getattr(config.output, '__qualname__', 'selected')}"
    return f"{metric if isinstance(metric, str) else getattr(metric, '__qualname__', 'metric')} of {what}"


def _check_device(config: Config) -> None:
    if config.device is None:
        return
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Config.device={config.device!r}, but this torch sees no CUDA device "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"Config.device={config.device!r}: sparsify compiles for 'cpu' or 'cuda'")


class _CacheEntryOff(RuntimeError):
    """A plan from the plan cache measured over the budget here: compiled afresh instead."""


class SparseModule(nn.Module):
    def __init__(self, model: nn.Module, config: Config | None = None, example_inputs=None,
                 calibration_data=None, pipeline: Pipeline | None = None, verbose: bool = False,
                 plan=None, prepared: dict | None = None, progress: bool = True, plan_cache: bool = True):
        super().__init__()
        from . import passes_loader  # registers the default passes (roof imports passes)

        passes_loader.load()
        self.config = config or Config()
        if not isinstance(self.config, Config):
            raise TypeError(f"config must be a sparsify.Config, got {type(self.config).__name__}")
        check_config(self.config)
        if self.config.kernels:
            from .codegen import registry

            registry.check_kernel_names(self.config.kernels)
        _check_device(self.config)
        self._given_plan = _as_plan(plan)
        self._given_prepared = dict(prepared or {})
        self.verbose = verbose
        self._progress = Progress(progress, verbose)
        # not a registered submodule: state_dict / to() / load_state_dict act on what runs (`compiled`)
        object.__setattr__(self, "_model", self._prepare(model))
        self._calibration_data = calibration_data
        self._pipeline = pipeline or Pipeline.default()
        # the plan cache (plan_cache.py): only for a compile that plans, with the default pipeline
        self._plan_cache_on = plan_cache and plan is None and pipeline is None
        self._plan_from_cache = self._plan_cache_refused = False
        self._plan_cache_key: str | None = None
        self._pending_notes: list[str] = []     # plan cache notes for the plan the compile makes
        self.plan_cache_info: str = "off" if not plan_cache else "not used: a plan was given" if plan is not None \
            else "not used: a custom pipeline" if pipeline is not None else "not compiled yet"
        self._compiled: dict[tuple, Capture] = {}
        self._guards: Guards | None = None
        self._state: dict[str, CompileState] = {}   # per part prefix: the compile state of the first compile
        self.plan: Plan | None = self._given_plan
        self.capture_info: Capture | None = None
        self.pass_seconds: dict[str, float] = {}
        self.compile_seconds: float | None = None
        self.rule_counts: dict[str, int] = {}
        if example_inputs is not None:
            args, kwargs = normalize_batches(example_inputs, None)[0]
            self._compile_first(args, kwargs)

    # ---- set-up -----------------------------------------------------------------------------
    def _prepare(self, model: nn.Module) -> nn.Module:
        """Our own copy of the model in eval mode: the user's model (its training flags, attributes and
        tensors) is never changed. A copy of the module tree shares the weights; with Config.device /
        dtype the weights are converted, so the copy is deep."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"sparsify.compile expects an nn.Module, got {type(model).__name__}")
        cfg = self.config
        self._user_model = model
        if cfg.device is not None or cfg.dtype is not None:
            copied = copy.deepcopy(model).to(device=cfg.device, dtype=cfg.torch_dtype)
            self._originals = {id(c): o for c, o in zip(copied.modules(), model.modules())}
        else:
            copied, self._originals = shallow_tree_copy(model)
        return copied.eval()

    def save(self, path) -> None:
        """Write what rebuilds this compiled model on the same model without planning again: the plan,
        the prepared (packed) buffers, the config, and what `sparsify.load` checks (the model's
        parameter names, shapes and a digest of their values; the kernels' versions)."""
        from .persist import save

        save(self, path)

    def to(self, *args, **kwargs):
        """A compiled model is built for one device and dtype (its buffers are packed for them): a
        conversion that changes either is refused, saying how to get it (compile for it)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        params = [t for t in self.compiled.parameters()] if self.capture_info is not None else []
        cur_dtype = params[0].dtype if params else None
        if (device is None or torch.device(device).type == self.device.type) and (dtype is None or dtype == cur_dtype):
            return self
        raise RuntimeError(f"a compiled model is specialised to {self.device} / {cur_dtype} (its sparse buffers are "
                           f"packed for them): compile the model again with Config(device=..., dtype=...) for "
                           f"{device or self.device} / {dtype or cur_dtype}")

    def _apply(self, fn, recurse=True):
        raise RuntimeError("a compiled model is specialised to its device and dtype (cuda(), half(), ... would leave "
                           "its packed buffers behind): compile the model again with Config(device=..., dtype=...)")

    def train(self, mode: bool = True):
        """A compiled model is inference-only (eval mode; the sparse ops have no backward)."""
        if mode:
            raise RuntimeError(inference.MESSAGE)
        self.training = False     # what runs was captured in eval mode (an exported module refuses train())
        return self

    def _record_guards(self, args, kwargs) -> None:
        """Run the model once eagerly, recording the plain attributes its forward reads (guards.py);
        on the user's own modules, since that is where a flag is toggled."""
        with recording(list(self._model.modules())) as reads, torch.no_grad():
            out = self._model(*args, **kwargs)
        self._example_out = (args, kwargs, out)   # the dense output of the example: computed once
        watched = []
        for obj, name, value in reads.values():
            if name == "training":       # always eval here: the compiled model is inference-only
                continue
            watched.append((self._originals.get(id(obj), obj), name, value))
        self._guards = Guards(watched)

    def _check_guards(self) -> None:
        """A watched attribute changed since capture: mirror it into our copy and capture again (the
        plan still applies: sites are found by name)."""
        changes = self._guards.changed()
        if not changes:
            return
        copies = {id(o): c for c, o in ((c, self._originals.get(id(c))) for c in self._model.modules()) if o is not None}
        for obj, name, _, now in changes:
            target = copies.get(id(obj))
            if target is not None:        # a module attribute: our copy has its own __dict__
                if now is _GUARD_MISSING:
                    target.__dict__.pop(name, None)
                else:
                    target.__dict__[name] = now
        note = f"captured again: {self._guards.describe(changes)} changed after compiling"
        self._say(note)
        if note not in self.plan.notes:
            self.plan.notes.append(note)
        self._guards = Guards([(o, n, o.__dict__.get(n, _GUARD_MISSING)) for o, n, _ in self._guards.watched])
        self._compiled.clear()

    @property
    def device(self) -> torch.device:
        if self.config.device is not None:
            return torch.device(self.config.device)
        p = next(self._model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _say(self, msg: str) -> None:
        self._progress(msg)

    def _cast_inputs(self, args, kwargs):
        dev, dt = self.config.device, self.config.torch_dtype
        if dev is None and dt is None:
            return args, kwargs

        def move(t):
            if isinstance(t, torch.Tensor):
                return t.to(device=dev or t.device, dtype=dt if (dt and t.is_floating_point()) else t.dtype)
            return t

        return pytree.tree_map(move, (args, kwargs))

    # ---- compile ----------------------------------------------------------------------------
    def _part_batches(self, cap: Capture, batches) -> dict[str, list]:
        if cap.whole:
            return {"": batches}
        per_part: dict[str, list] = {p.prefix: [] for p in cap.parts}
        for args, kwargs in batches:
            calls = _record_child_inputs(self._model, args, kwargs)
            for p in cap.parts:
                per_part[p.prefix].extend(calls.get(p.prefix, [])[:1])
        return per_part

    def _compile_first(self, args, kwargs) -> None:
        t0 = time.perf_counter()
        cast = self._cast_inputs(args, kwargs)
        # read once: an iterable of calibration data may be a generator
        batches = [self._cast_inputs(a, k) for a, k in normalize_batches(cast, self._calibration_data)]
        try:
            self._compile_once(args, kwargs, batches, t0)
        except Exception as e:  # noqa: BLE001 - a plan cache entry that does not apply is never an error
            if not self._plan_from_cache:
                raise
            self._plan_cache_mismatch(str(e) if isinstance(e, _CacheEntryOff) else
                                      f"it failed to apply ({type(e).__name__}: {str(e)[:160]})")
            self._compile_once(args, kwargs, batches, t0)

    def _compile_once(self, args, kwargs, batches, t0: float) -> None:
        args, kwargs = self._cast_inputs(args, kwargs)
        self._say("capture")
        cap = capture(self._model, args, kwargs)
        for f in cap.failures:
            self._say(f"capture: {f.prefix or '<model>'}: {f.reason}")
        self._record_guards(args, kwargs)
        cache_key, cached = self._plan_cache_lookup(cap, args, kwargs, batches)
        # The graph was captured for the example's shapes: batches of other shapes are calibrated on
        # captures of their own (statistics only); errors and times are taken on the example's shapes.
        sig = _signature(args, kwargs)
        others = [b for b in batches if _signature(*b) != sig]
        batches = [b for b in batches if _signature(*b) == sig] or [(args, kwargs)]
        # a plan from the cache comes with the prepared data of every changed site: no statistics needed
        pre_stats = {} if cached else self._stats_of_other_shapes(others)
        per_part = self._part_batches(cap, batches)
        pipe = self._pipeline
        back = pipe.phase("rewrite", "lower")
        if self._given_plan is None:
            front = pipe.phase("canonicalize", "analysis")
        elif cached:   # find the sites and apply the plan with its prepared data
            front = pipe.providers(back.requirements() - {"plan", "prepared"})
        else:   # a plan made before: find the sites (and statistics, for wanda masks) and apply it
            front = pipe.providers(back.requirements() - {"plan", "prepared"} | {"stats"})
        timing = Timing()
        snapshots, contexts = {}, {}
        for part in cap.parts:
            ctx = PassContext(self.config, self.device, per_part[part.prefix], [timing],
                              part_prefix=part.prefix, progress=self._say,
                              state=CompileState(stats=pre_stats.get(part.prefix, {})))
            contexts[part.prefix] = ctx
            snapshots[part.prefix] = front.run(part.gm, ctx)
        if self._given_plan is not None:
            self._take_plan(contexts, snapshots)
        plans = {}
        for ctx in contexts.values():
            plans.update(ctx.state.plans)
        # every layer and site an override could mean (a depthwise conv is a layer but no family's site)
        named = {n.meta[ir.LAYER].fqn for gm in snapshots.values() for n in ir.layer_nodes(gm)}
        named |= {f for ctx in contexts.values() for site in ctx.state.sites.values() for f in (site.fqn, *site.members)}
        self.config.check_overrides_match(sorted(named))
        if self._given_plan is None:
            self.plan = Plan(plans)
            self.plan.notes.extend(self._pending_notes)
        self.plan.error_measure = _measure_words(self.config)
        if others:
            note = (f"{len(others)} calibration batch(es) of other shapes than the example gave statistics "
                    f"only; errors and times are measured on the {len(batches)} shaped like the example")
            if note not in self.plan.notes:
                self.plan.notes.append(note)
        self._state = {prefix: ctx.state for prefix, ctx in contexts.items()}
        available = {"sites", "stats", "plan", "prepared"}

        def build():
            for part in cap.parts:
                gm = back.run(ir.fresh_copy(snapshots[part.prefix]), contexts[part.prefix], available)
                self._install(cap, part, gm)

        build()
        dense = self._dense_outputs(batches)   # the reference outputs, for every error below
        if self._given_plan is None:
            self._verify_and_roll_back(cap, batches, dense, build)
            self._check_model_speed(cap, batches, dense, build)
        else:
            cached_error = self.plan.model_error
            err = self._error(dense, self._run_all(cap.root, batches))
            self._record_error(err)
            if cached and self.plan.sparse_layers() and \
                    err > max(self.config.max_error, cached_error or 0.0) * 1.05 + 1e-7:
                raise _CacheEntryOff(f"it measured model error {err:.3g} now, "
                                     f"{cached_error if cached_error is not None else float('nan'):.3g} "
                                     f"when planned (max_error {self.config.max_error})")
        self._pass_through_if_dense(cap)
        self._compiled[_signature(args, kwargs)] = cap
        self.capture_info = cap
        self.compiled = cap.root      # registered: state_dict() holds the packed buffers of the sparse sites
        self.pass_seconds = timing.seconds
        for ctx in contexts.values():
            for k, v in ctx.rule_counts.items():
                self.rule_counts[k] = self.rule_counts.get(k, 0) + v
        self.compile_seconds = time.perf_counter() - t0
        self._example_out = None     # not held past the compile
        if cache_key is not None and not cached:
            from . import plan_cache

            self.plan_cache_info = plan_cache.store(cache_key, self.plan, self.prepared, self.compile_seconds)
            self._say(self.plan_cache_info)
        self._say(f"compiled in {self.compile_seconds:.1f} s: {len(self.plan.sparse_layers())}/"
                  f"{len(self.plan)} sites changed, model error {self.plan.model_error:.3g}"
                  + (" (plan from the plan cache)" if cached else ""))

    def _plan_cache_lookup(self, cap: Capture, args, kwargs, batches) -> tuple[str | None, bool]:
        """(the plan cache key of this compile, or None when it is not cached; whether an entry was
        found and taken as the given plan)."""
        from . import plan_cache

        if not self._plan_cache_on:
            return None, False
        if not plan_cache.enabled():
            self.plan_cache_info = "off (SPARSIFY_PLAN_CACHE=0 or SPARSIFY_NO_COST_CACHE set)"
            return None, False
        why = plan_cache.uncacheable(self.config)
        if why is not None:
            self.plan_cache_info = f"not used: {why}"
            return None, False
        key, _ = plan_cache.key_of(model=self._user_model, config=self.config, device=self.device, cap=cap,
                                   pipeline_names=self._pipeline.names, example=(args, kwargs), batches=batches)
        self._plan_cache_key = key
        plan, prepared, note = plan_cache.load(key) if not self._plan_cache_refused else (None, None, None)
        if plan is None:
            self.plan_cache_info = f"miss (key {key[:12]})"
            if note:
                self._pending_notes.append(note)
            return key, False
        self._say(f"plan cache hit (key {key[:12]}): apply the plan, no planning")
        plan.notes = [n for n in plan.notes if not n.startswith("plan from the plan cache")] + [note]
        self._given_plan, self._given_prepared, self.plan = plan, prepared, plan
        self._plan_from_cache = True
        self.plan_cache_info = f"hit (key {key[:12]})"
        return key, True

    def _plan_cache_mismatch(self, why: str) -> None:
        """A cached plan that does not apply here (or measured over the budget): the entry is dropped
        and the caller compiles afresh; the new plan's notes say why."""
        from . import plan_cache

        key = self._plan_cache_key
        plan_cache.drop(key)
        note = f"plan cache entry {key[:12]} dropped: {why}: planned again"
        self._say(note)
        self._given_plan, self._given_prepared, self._plan_from_cache = None, {}, False
        self._plan_cache_refused = True
        self.plan, self._state, self.rule_counts = None, {}, {}
        self._pending_notes.append(note)

    def _stats_of_other_shapes(self, batches) -> dict[str, dict]:
        """Calibration statistics of batches whose shapes differ from the example's, per part prefix:
        each shape is captured on its own and only the passes that provide statistics run on it."""
        out: dict[str, dict] = {}
        groups: dict = {}
        for b in batches:
            groups.setdefault(_signature(*b), []).append(b)
        stats_pipe = self._pipeline.providers({"stats"})
        for group in groups.values():
            self._say(f"calibrate {len(group)} batch(es) of another shape on a capture of their own")
            cap = capture(self._model, *group[0])
            per_part = self._part_batches(cap, group)
            for part in cap.parts:
                ctx = PassContext(self.config, self.device, per_part[part.prefix], part_prefix=part.prefix)
                stats_pipe.run(part.gm, ctx)
                mine = out.setdefault(part.prefix, {})
                for key, st in ctx.state.stats.items():
                    if key in mine:
                        mine[key].absorb(st)
                    else:
                        mine[key] = st
        return out

    def _take_plan(self, contexts, snapshots) -> None:
        """Hand each part the entries of the given plan for its sites; an entry no part has is an
        error (a plan made for another model)."""
        plan, taken = self._given_plan, set()
        for prefix, ctx in contexts.items():
            for key, site in ctx.state.sites.items():
                if key in plan:
                    lp = plan[key]
                    if lp.family != site.family or (lp.weight_shape is not None and site.weight_shape is not None
                                                    and tuple(lp.weight_shape) != tuple(site.weight_shape)):
                        raise ValueError(f"plan entry {key!r} ({lp.family}, weight {lp.weight_shape}) does not "
                                         f"match this model's site ({site.family}, weight {site.weight_shape})")
                    ctx.state.plans[key] = lp
                    if key in self._given_prepared:
                        ctx.state.prepared[key] = self._given_prepared[key]
                    site.node(snapshots[prefix]).meta[ir.PLAN] = lp
                    taken.add(key)
        missing = [k for k in plan if k not in taken]
        if missing:
            raise ValueError(f"the plan names site(s) {missing[:6]} that this model does not have: it was made "
                             f"for another model (or another capture of it)")
        if not self._plan_from_cache and "plan applied as given" not in " ".join(plan.notes):
            plan.notes.append("plan applied as given: not re-planned, re-timed or rolled back")

    def _install(self, cap: Capture, part: CapturedPart, gm: fx.GraphModule) -> None:
        part.gm = gm
        if cap.whole:
            cap.root = gm
        else:
            parent, _, child = part.prefix.rpartition(".")
            setattr(cap.root.get_submodule(parent) if parent else cap.root, child, gm)

    def _dense_outputs(self, batches) -> list:
        """The dense model's outputs on the batches; the example's, if it is one of them, from the
        forward that recorded the guards (at batch 16 a BERT-base forward is 2 s of a compile)."""
        ex = getattr(self, "_example_out", None)
        outs = []
        for a, k in batches:
            if ex is not None and _same_call((a, k), ex[:2]):
                outs.append(ex[2])
            else:
                with torch.no_grad():
                    outs.append(self._model(*a, **k))
        return outs

    def _run_all(self, root, batches):
        with torch.no_grad():
            return [root(*a, **k) for a, k in batches]

    def _verify_and_roll_back(self, cap: Capture, batches, dense, build) -> None:
        """Model output error vs dense on the calibration data; roll back layers until in budget."""
        budget = self.config.max_error
        self._say("verify against dense")
        while True:
            err = self._error(dense, self._run_all(cap.root, batches))
            self._record_error(err)
            # Config.force skips the speed check, not the error budget: forced layers roll back too.
            sparse = self.plan.sparse_layers()
            if err <= budget or not sparse:
                return
            worst = max(sparse, key=lambda lp: lp.layer_error or 0.0)
            worst.status = ROLLED_BACK
            worst.reason = (f"rolled back to dense: model error {err:.3g} > max_error {budget} with it "
                            f"sparse (layer error {worst.layer_error:.3g}, the largest); was: {worst.reason}")
            self._say(f"roll back {worst.fqn} (model error {err:.3g} > {budget})")
            build()

    def _error(self, dense, outs) -> float:
        return model_error(dense, outs, self.config.metric, self.config.output)

    def _record_error(self, err: float) -> None:
        self.plan.model_error = err
        for lp in self.plan.sparse_layers():
            lp.model_error = err

    def _check_model_speed(self, cap: Capture, batches, dense, build) -> None:
        """Per-layer timings miss what only shows end to end (launch gaps, layout copies): time the
        compiled model against dense on the first calibration batch. While it is slower, the half
        of the sparse sites that save the least per call (measured per site) goes dense and the
        model is timed again, so a few clear wins survive a crowd of marginal ones. Sites planned
        without a per-site time (pruned channel groups: smaller dense layers) are not rolled back
        for speed, only for the error budget."""
        if not self.config.check_model_speed or self.config.force or not self.plan.sparse_layers() or not batches:
            return  # force means "sparse even where slower": the user asked for it
        from . import timing

        args, kwargs = batches[0]
        self._say("time the compiled model against dense end to end")
        while True:
            # interleaved rounds until the ratio is steady, measured again (twice at most) while it is
            # not: one noisy moment on a shared machine must not roll a plan back
            for _ in range(3):
                base, compiled = timing.compare_rounds([lambda: self._model(*args, **kwargs),
                                                        lambda: cap.root(*args, **kwargs)],
                                                       self.device, max(1, self.config.timing_repeats // 4),
                                                       threshold=1.0)
                if compiled.stable:
                    break
            dense_ms, sparse_ms = base.ms, compiled.ms
            self.plan.model_dense_ms, self.plan.model_sparse_ms = dense_ms, sparse_ms
            self.plan.model_speedup = compiled.ratio
            sparse = [lp for lp in self.plan.sparse_layers() if lp.sparse_ms is not None]
            if compiled.ratio >= 1.0 or not sparse:
                return
            ranked = sorted(sparse, key=_saved_ms)
            drop = ranked[:(len(ranked) + 1) // 2]
            why = (f"rolled back: with {len(sparse)} layer(s) sparse the compiled model measured {sparse_ms:.4f} ms "
                   f"vs dense {dense_ms:.4f} ms end to end (per-layer gains lost to launch overhead or layout "
                   f"copies); {'all go' if len(drop) == len(sparse) else f'the {len(drop)} that save the least go'} "
                   f"dense")
            for lp in drop:
                lp.status, lp.reason = ROLLED_BACK, f"{why}; was: {lp.reason}"
            self.plan.notes.append(why)
            self._say(why)
            build()
            # fewer sparse layers, another model error (pruned channels, if any, still count)
            self._record_error(self._error(dense, self._run_all(cap.root, batches)))
            if len(drop) == len(sparse):
                return

    def _pass_through_if_dense(self, cap: Capture) -> None:
        """No rewrite changed anything: run the user's module itself, so the compiled model is never
        slower (the exported graph adds guard and pytree overhead). The graphs stay inspectable."""
        rewritten = any(_changes_function(n.meta.get(ir.FROM)) for p in cap.parts for n in p.gm.graph.nodes)
        if not rewritten:
            cap.root = self._model
            self.plan.model_error = 0.0     # what runs is the original module itself
            note = "no layer is sparse and no rewrite applied: runs the original module (no graph overhead)"
            if note not in self.plan.notes:
                self.plan.notes.append(note)

    def _compile_again(self, args, kwargs) -> Capture:
        """A new input signature: capture again and apply the existing plan (no re-planning). Only the
        passes that provide what the rewrite needs besides the plan run again (canonicalize, sites);
        the prepared data is reused (it was made from the same, canonicalized, weights)."""
        self._say("new input shapes: capture again, reuse the plan")
        cap = capture(self._model, args, kwargs)
        back = self._pipeline.phase("rewrite", "lower")
        front = self._pipeline.providers(back.requirements() - {"plan", "prepared"})
        for part in cap.parts:
            old = self._state.get(part.prefix)
            if old is None:
                raise RuntimeError(f"new input shapes captured the model in other parts ({part.prefix!r} is new): "
                                   f"compile again for these inputs")
            ctx = PassContext(self.config, self.device, [], part_prefix=part.prefix, state=old.for_rebuild())
            gm = front.run(part.gm, ctx)
            # a site this capture no longer has (a branch a changed flag switched off) stays unplanned
            ctx.state.plans = {k: lp for k, lp in ctx.state.plans.items() if k in ctx.state.sites}
            for key, lp in ctx.state.plans.items():
                ctx.state.sites[key].node(gm).meta[ir.PLAN] = lp
            gm = back.run(gm, ctx, {"sites", "plan", "prepared"})
            self._install(cap, part, gm)
        self._pass_through_if_dense(cap)
        return cap

    # ---- run --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        args, kwargs = self._cast_inputs(args, kwargs)
        if self._guards is not None:
            self._check_guards()
        sig = _signature(args, kwargs)
        cap = self._compiled.get(sig)
        if cap is None:
            if self.capture_info is None:
                self._compile_first(args, kwargs)
            else:
                self._compiled[sig] = self._compile_again(args, kwargs)
            cap = self._compiled[sig]
        return inference.run(cap.root, args, kwargs)

    # ---- inspection -------------------------------------------------------------------------
    def _need_compiled(self):
        if self.capture_info is None:
            raise RuntimeError("not compiled yet: call the module once or pass example_inputs to compile")
        return self.capture_info

    @property
    def parts(self) -> list[CapturedPart]:
        return self._need_compiled().parts

    @property
    def graph_module(self) -> fx.GraphModule:
        cap = self._need_compiled()
        if len(cap.parts) == 1:  # cap.root may be the user's module itself (dense pass-through)
            return cap.parts[0].gm
        raise RuntimeError(f"the model was captured in {len(cap.parts)} parts "
                           f"({[p.prefix for p in cap.parts]}); use .parts[i].gm")

    def report(self) -> str:
        from .report import format_report

        return format_report(self)

    @property
    def prepared(self) -> dict:
        """site key -> Prepared: what the rewrite installed (or would install) for each planned site."""
        self._need_compiled()
        return {k: v for state in self._state.values() for k, v in state.prepared.items()}

    def kernel_sources(self) -> dict[str, str]:
        """Source of each kernel the compiled graphs call, by kernel name: a Triton kernel's @jit
        functions; a generated CPU kernel's C variants built in this process (and, for csr_jit_cpu,
        a line per emitted program), from its module's generated_sources()."""
        import inspect

        from sparsify.codegen import registry

        out = {}
        for part in self.parts:
            for n in part.gm.graph.nodes:
                spec = registry.spec_of(n.target) if n.op == "call_function" else None
                if spec is None or spec.name in out:
                    continue
                mods = {inspect.getmodule(getattr(f, "func", f)) for f in (spec.impl, *spec.device_impls.values())}
                texts = []
                for mod in sorted(mods - {None}, key=lambda m: m.__name__):
                    texts += [obj.src for obj in vars(mod).values() if type(obj).__name__ == "JITFunction"]
                    gen = getattr(mod, "generated_sources", None)
                    if gen is not None:
                        texts += [f"/* {name} */\n{src}" for name, src in gen().items()]
                out[spec.name] = "\n\n".join(texts)
        return out
