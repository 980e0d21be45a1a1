"""Config: the pattern per kind of sparsity (field), error budget, per-fqn overrides, dtype and device."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import torch

from .metrics import METRICS
from .patterns import Auto, Dense, Pattern, PatternError, pattern_from_dict

_CALLABLE = "callable:"


def _named(v):
    """A Config value as JSON: a callable by its name (it cannot be restored)."""
    return f"{_CALLABLE}{getattr(v, '__qualname__', repr(v))}" if callable(v) else v


class ConfigError(ValueError):
    """An invalid Config value; the message names the field."""


_FIELDS = ("weight", "activation", "attention", "spatial")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Config:
    """What sparsify may do to a model.

    weight / activation / attention / spatial: the pattern for each kind of sparsity (Dense turns it
      off, Auto lets the planner choose). The family that serves a pattern is found by its type
      (sparsify.family); a pattern whose family is not implemented is refused at compile time.
    max_error: budget for the relative L2 error of the model output vs dense on calibration data.
    overrides: ordered (glob, Pattern) pairs matched against layer fqns; the first match wins. A glob
      that matches no layer is an error at compile time (a typo must not silently do nothing).
    force: keep explicit patterns even where the measured sparse time is slower than dense.
    dtype: compute dtype of the compiled model (None keeps the model's). device: None keeps it.
    candidates: the patterns `Auto` tries for weight layers.
    model_sensitivity: measure each candidate's model-output error (accumulated over the layers chosen
      before it) and let Auto pick only candidates within max_error; off = layer error only.
    max_layer_error: with Auto, a candidate whose own layer output error exceeds this is not taken even
      if the model output hides it (random or redundant layers can wash an error out downstream).
    check_model_speed: after verification, time the compiled model against dense end to end; while it
      is slower, the half of the sparse sites that saved the least goes dense (the report says why).
    min_speedup: a layer is sparse only if dense_ms / sparse_ms >= this (a margin over timing noise).
    metric / output: what max_error is measured on, for every family alike: `output` selects part of
      the model's output (None: every floating tensor; an int: that element of the output tuple; a
      str: that field or key, e.g. "last_hidden_state"; a callable: e.g. a pooling), `metric` is
      "rel_l2" (relative L2 vs dense), "cosine" (1 - mean cosine similarity of the rows, for
      embeddings) or a callable (dense outputs, sparse outputs) -> float. Callables are not saved by
      to_dict (their name is, and from_dict refuses it: pass them again).
    kernels: when non-empty, only these kernels (registry names, e.g. "bsr_triton") are considered.
    """

    weight: Pattern = dataclasses.field(default_factory=Auto)
    activation: Pattern = dataclasses.field(default_factory=Dense)
    attention: Pattern = dataclasses.field(default_factory=Dense)
    spatial: Pattern = dataclasses.field(default_factory=Dense)
    max_error: float = 0.05
    overrides: tuple = ()
    force: bool = False
    dtype: str | None = None
    device: str | None = None
    candidates: tuple = ()
    seed: int = 0
    timing_repeats: int = 20
    kernels: tuple = ()
    min_speedup: float = 1.05
    model_sensitivity: bool = True
    max_layer_error: float = 0.5
    check_model_speed: bool = True
    metric: Any = "rel_l2"
    output: Any = None

    def __post_init__(self):
        for field in _FIELDS:
            p = getattr(self, field)
            if not isinstance(p, Pattern):
                raise ConfigError(f"Config.{field} must be a Pattern (e.g. Dense(), Auto()), got {p!r}")
            if p.field not in (field, "any"):
                raise ConfigError(f"Config.{field}={p.describe()} is a {p.field} pattern")
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) or self.max_error < 0:
            raise ConfigError(f"Config.max_error must be a number >= 0, got {self.max_error!r}")
        if isinstance(self.overrides, dict):
            object.__setattr__(self, "overrides", tuple(self.overrides.items()))
        for item in self.overrides:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], Pattern)):
                raise ConfigError(f"Config.overrides entries must be (glob, Pattern), got {item!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ConfigError(f"Config.dtype={self.dtype!r}; expected one of {sorted(_DTYPES)} or None")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ConfigError(f"Config.device={self.device!r}: {e}") from None
        for c in self.candidates:
            if not isinstance(c, Pattern) or c.field != "weight":
                raise ConfigError(f"Config.candidates must be weight patterns, got {c!r}")
        if isinstance(self.kernels, (list, str)):
            object.__setattr__(self, "kernels", tuple([self.kernels] if isinstance(self.kernels, str)
                                                      else self.kernels))
        if not all(isinstance(k, str) for k in self.kernels):
            raise ConfigError(f"Config.kernels must be kernel names, got {self.kernels!r}")
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, (int, float)) \
                or self.min_speedup <= 0:
            raise ConfigError(f"Config.min_speedup must be a number > 0, got {self.min_speedup!r}")
        if not isinstance(self.timing_repeats, int) or self.timing_repeats < 1:
            raise ConfigError(f"Config.timing_repeats must be an int >= 1, got {self.timing_repeats!r}")
        if not (callable(self.metric) or self.metric in METRICS):
            raise ConfigError(f"Config.metric must be one of {METRICS} or a callable, got {self.metric!r}")
        if not (self.output is None or callable(self.output) or isinstance(self.output, (str, int))
                and not isinstance(self.output, bool)):
            raise ConfigError(f"Config.output must be None, an int, a str or a callable, got {self.output!r}")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def pattern_for(self, fqn: str, field: str) -> tuple[Pattern, str]:
        """The pattern for a site and where it came from ("override 'glob'" or "config.<field>")."""
        for glob, pattern in self.overrides:
            if fnmatch.fnmatchcase(fqn, glob) and pattern.field in (field, "any"):
                return pattern, f"override {glob!r}"
        return getattr(self, field), f"config.{field}"

    def check_overrides_match(self, fqns) -> None:
        fqns = list(fqns)
        for glob, _ in self.overrides:
            if not any(fnmatch.fnmatchcase(f, glob) for f in fqns):
                sample = ", ".join(fqns[:6]) + (" ..." if len(fqns) > 6 else "")
                raise ConfigError(f"Config.overrides: {glob!r} matches no layer (layers: {sample})")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f: getattr(self, f).to_dict() for f in _FIELDS}
        d.update(max_error=self.max_error, force=self.force, dtype=self.dtype, device=self.device,
                 seed=self.seed, timing_repeats=self.timing_repeats, kernels=list(self.kernels),
                 min_speedup=self.min_speedup, model_sensitivity=self.model_sensitivity,
                 max_layer_error=self.max_layer_error, check_model_speed=self.check_model_speed,
                 metric=_named(self.metric), output=_named(self.output),
                 overrides=[[g, p.to_dict()] for g, p in self.overrides],
                 candidates=[c.to_dict() for c in self.candidates])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        d = dict(d)
        try:
            for f in _FIELDS:
                if f in d:
                    d[f] = pattern_from_dict(d[f])
            d["overrides"] = tuple((g, pattern_from_dict(p)) for g, p in d.get("overrides", ()))
            d["candidates"] = tuple(pattern_from_dict(p) for p in d.get("candidates", ()))
            d["kernels"] = tuple(d.get("kernels", ()))
        except PatternError as e:
            raise ConfigError(f"Config.from_dict: {e}") from None
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"Config.from_dict: unknown fields {sorted(unknown)}")
        for f in ("metric", "output"):
            if isinstance(d.get(f), str) and d[f].startswith(_CALLABLE):
                raise ConfigError(f"Config.from_dict: {f} was the callable {d[f][len(_CALLABLE):]}; a saved "
                                  f"config cannot restore it: pass Config(..., {f}=...) again")
        return cls(**d)
