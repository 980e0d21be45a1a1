"""The plan: for each site (a layer by its fqn, a channel group, ...) the chosen pattern, kernel, the
numbers behind it and the reason. With the model it is enough to rebuild the compiled module."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from .patterns import Dense, Pattern, pattern_from_dict

# Decision status of a layer in the plan.
SPARSE = "sparse"            # rewritten to a sparse op, measured faster than dense
DENSE = "dense"              # kept dense (config, no candidate faster, or over budget)
ROLLED_BACK = "rolled_back"  # was sparse, verification found the model over budget
FORCED = "forced"            # sparse although slower than dense, because Config.force
PRUNED = "pruned"            # physically shrunk by channel pruning (a dense op on fewer channels)
CHANGED = (SPARSE, FORCED, PRUNED)   # the statuses under which a site is rewritten

# Version 2: plans name their family, members and params (version 1 plans were weight layers only).
PLAN_VERSION = 2


@dataclasses.dataclass
class Candidate:
    """One pattern tried for a layer, with what was measured for it."""

    pattern: Pattern
    kernel: str
    sparsity: float
    layer_error: float | None = None       # relative L2 of the layer output vs dense
    model_error: float | None = None       # model output error with this and earlier chosen layers sparse
    time_ms: float | None = None
    speedup: float | None = None           # dense / this, measured interleaved with dense (median of rounds)
    note: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pattern"] = self.pattern.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        d = dict(d)
        d["pattern"] = pattern_from_dict(d["pattern"])
        return cls(**d)


@dataclasses.dataclass
class LayerPlan:
    """The decision for one site. fqn: the site's key (a weight layer's fqn; a channel group's
    producers, comma-separated). family: the family that planned it. members: fqns of the layers it
    covers. params: JSON-able data of the family that the rewrite (or a check of it) needs beyond the
    pattern and kernel, e.g. the kept channels of a group or the digest of a weight mask."""

    fqn: str
    op: str
    input_shape: tuple | None
    weight_shape: tuple | None
    output_shape: tuple | None
    pattern: Pattern = dataclasses.field(default_factory=Dense)
    kernel: str = "dense"
    status: str = DENSE
    sparsity: float = 0.0
    reason: str = ""
    source: str = ""                         # where the requested pattern came from (config/override)
    dense_ms: float | None = None
    sparse_ms: float | None = None
    ratio: float | None = None               # dense / sparse measured interleaved (median of the rounds)
    layer_error: float | None = None
    model_error: float | None = None         # model output error with this layer (and earlier ones) sparse
    candidates: list = dataclasses.field(default_factory=list)
    family: str = "weight"
    members: list = dataclasses.field(default_factory=list)
    params: dict = dataclasses.field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.ratio is not None:
            return self.ratio
        if self.dense_ms and self.sparse_ms:
            return self.dense_ms / self.sparse_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = self.pattern.to_dict()
        d["candidates"] = [c.to_dict() for c in self.candidates]
        for k in ("input_shape", "weight_shape", "output_shape"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPlan":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"layer plan {d.get('fqn')!r}: unknown fields {sorted(unknown)}")
        d["pattern"] = pattern_from_dict(d["pattern"])
        d["candidates"] = [Candidate.from_dict(c) for c in d.get("candidates", [])]
        for k in ("input_shape", "weight_shape", "output_shape"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


class Plan:
    """fqn -> LayerPlan, in graph order, plus model-level results. Serialisable to/from dict/JSON."""

    def __init__(self, layers: dict[str, LayerPlan] | None = None, model_error: float | None = None,
                 notes: list[str] | None = None):
        self.layers: dict[str, LayerPlan] = dict(layers or {})
        self.model_error = model_error
        self.notes: list[str] = list(notes or [])
        self.model_dense_ms: float | None = None    # end-to-end times from the model-level check
        self.model_sparse_ms: float | None = None
        self.model_speedup: float | None = None     # dense / compiled, median of interleaved rounds
        self.error_measure = "relative L2 of every floating output"   # what model_error and max_error measure

    def __getitem__(self, fqn: str) -> LayerPlan:
        """The site planned under this key, or the site that covers layer `fqn` (a channel group)."""
        if fqn in self.layers:
            return self.layers[fqn]
        for lp in self.layers.values():
            if fqn in lp.members:
                return lp
        raise KeyError(f"no layer {fqn!r} in the plan; layers: {list(self.layers)[:8]}")

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.layers

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    def sparse_layers(self) -> list[LayerPlan]:
        """The sites the compiled model runs differently from dense (sparse, forced or pruned)."""
        return [lp for lp in self.layers.values() if lp.status in CHANGED]

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "model_error": self.model_error, "notes": list(self.notes),
                "model_dense_ms": self.model_dense_ms, "model_sparse_ms": self.model_sparse_ms,
                "model_speedup": self.model_speedup, "error_measure": self.error_measure,
                "layers": [lp.to_dict() for lp in self.layers.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if not isinstance(d, dict):
            raise ValueError(f"a plan is a JSON object with 'version' and 'layers', got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {d.get('version')!r} is not supported (expected {PLAN_VERSION})")
        if not isinstance(d.get("layers"), list):
            raise ValueError("a plan needs a 'layers' list")
        layers = [LayerPlan.from_dict(x) for x in d["layers"]]
        plan = cls({lp.fqn: lp for lp in layers}, d.get("model_error"), d.get("notes"))
        plan.model_dense_ms, plan.model_sparse_ms = d.get("model_dense_ms"), d.get("model_sparse_ms")
        plan.model_speedup = d.get("model_speedup")
        plan.error_measure = d.get("error_measure", plan.error_measure)
        return plan

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "Plan":
        """A plan from JSON text or from the path (str or os.PathLike) of a JSON file."""
        if isinstance(text_or_path, str) and text_or_path.lstrip().startswith(("{", "[")):
            text = text_or_path
        else:
            with open(os.fspath(text_or_path)) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Plan({len(self.layers)} layers, {len(self.sparse_layers())} sparse)"
