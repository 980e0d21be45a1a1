"""Sparsity patterns: frozen, validated, serialisable descriptions of what to make sparse and how.

A pattern says *what* sparsity a layer gets; which kernel runs it is the planner's business. Every
pattern round-trips through `to_dict` / `pattern_from_dict` (the plan and the CLI store them as JSON).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class PatternError(ValueError):
    """An invalid pattern parameter; the message names the pattern and the argument."""


def _check_fraction(owner: str, name: str, value: float, *, low_open=False, high_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternError(f"{owner}: {name} must be a number, got {value!r}")
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        raise PatternError(f"{owner}: {name}={value} is outside {lo}, {hi}")


def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PatternError(f"{owner}: {name} must be a positive int, got {value!r}")


_REGISTRY: dict[str, type] = {}


def register_pattern(cls):
    """Class decorator: make a Pattern subclass known to `pattern_from_dict` (plans and configs store
    patterns as {"kind": class name, **fields}). A family of your own registers its patterns so."""
    if not (isinstance(cls, type) and issubclass(cls, Pattern)):
        raise TypeError(f"register_pattern expects a Pattern subclass, got {cls!r}")
    known = _REGISTRY.get(cls.__name__)
    if known is not None and known.__module__ != cls.__module__:
        raise ValueError(f"a pattern named {cls.__name__} is already registered (from {known.__module__})")
    _REGISTRY[cls.__name__] = cls
    return cls


_register = register_pattern


@dataclasses.dataclass(frozen=True)
class Pattern:
    # The Config field the pattern goes in ("weight", "activation", "attention", "spatial"; "any":
    # Dense and Auto fit every field). Which family serves it is looked up by its type.
    field: ClassVar[str] = "any"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **dataclasses.asdict(self)}

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())
        return f"{type(self).__name__}({fields})"

    @property
    def is_dense(self) -> bool:
        return False


def pattern_from_dict(d: dict[str, Any]) -> Pattern:
    if not isinstance(d, dict) or "kind" not in d:
        raise PatternError(f"pattern dict needs a 'kind' key, got {d!r}")
    fields = dict(d)
    kind = fields.pop("kind")
    if kind not in _REGISTRY:
        raise PatternError(f"unknown pattern kind {kind!r}; known: {sorted(_REGISTRY)}")
    cls = _REGISTRY[kind]
    for name, value in fields.items():
        if isinstance(value, list):  # JSON turns tuples into lists
            fields[name] = tuple(value)
    return cls(**fields)


@_register
@dataclasses.dataclass(frozen=True)
class Dense(Pattern):
    @property
    def is_dense(self) -> bool:
        return True


@_register
@dataclasses.dataclass(frozen=True)
class Auto(Pattern):
    """Let the planner choose per layer among the family's candidates within the error budget."""


# ---- weight sparsity -------------------------------------------------------------------------
@_register
@dataclasses.dataclass(frozen=True)
class Unstructured(Pattern):
    field: ClassVar[str] = "weight"
    sparsity: float = 0.5
    criterion: str = "magnitude"

    def __post_init__(self):
        _check_fraction("Unstructured", "sparsity", self.sparsity, high_open=True)
        _check_criterion("Unstructured", self.criterion)


@_register
@dataclasses.dataclass(frozen=True)
class NM(Pattern):
    """At most n nonzeros in every group of m consecutive weights along the reduction dimension."""

    field: ClassVar[str] = "weight"
    n: int = 2
    m: int = 4
    criterion: str = "magnitude"

    def __post_init__(self):
        for name in ("n", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise PatternError(f"NM: {name} must be an int, got {v!r}")
        if not (0 < self.n < self.m):
            raise PatternError(f"NM({self.n}, {self.m}): need 0 < n < m")
        if self.m > 16:
            raise PatternError(f"NM({self.n}, {self.m}): m must be <= 16")
        _check_criterion("NM", self.criterion)

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m


@_register
@dataclasses.dataclass(frozen=True)
class Block(Pattern):
    """Square blocks of `block` x `block` weights kept or dropped together; `density` = kept fraction."""

    field: ClassVar[str] = "weight"
    block: int = 32
    density: float = 0.25
    criterion: str = "magnitude"

    def __post_init__(self):
        _check_positive_int("Block", "block", self.block)
        if self.block & (self.block - 1) or not 16 <= self.block <= 128:
            raise PatternError(f"Block: block={self.block} must be a power of two in [16, 128]")
        _check_fraction("Block", "density", self.density, low_open=True)
        _check_criterion("Block", self.criterion)

    @property
    def sparsity(self) -> float:
        return 1 - self.density


@_register
@dataclasses.dataclass(frozen=True)
class Channel(Pattern):
    """Structured pruning: keep a `keep` fraction of output channels (layers physically shrink)."""

    field: ClassVar[str] = "weight"
    keep: float = 0.5
    criterion: str = "magnitude"

    def __post_init__(self):
        _check_fraction("Channel", "keep", self.keep, low_open=True)
        _check_criterion("Channel", self.criterion)

    @property
    def sparsity(self) -> float:
        return 1 - self.keep


CRITERIA = ("magnitude", "wanda", "random")


def _check_criterion(owner: str, criterion: str) -> None:
    if criterion not in CRITERIA:
        raise PatternError(f"{owner}: criterion={criterion!r}; known: {CRITERIA}")


# ---- activation sparsity ---------------------------------------------------------------------
# Served by the activation family (passes/families/activation): FFN blocks whose hidden units are
# skipped where the activation is zero (or made zero), their weight rows never read.
@_register
@dataclasses.dataclass(frozen=True)
class ExactZeros(Pattern):
    """The exact zeros a ReLU (or ReLU^2) FFN already has: skipped, lossless."""

    field: ClassVar[str] = "activation"


@_register
@dataclasses.dataclass(frozen=True)
class ActivationThreshold(Pattern):
    """Zero hidden activations of magnitude below a threshold calibrated on the calibration data to
    reach `sparsity`: per hidden unit (per_channel, as CHESS) or one per FFN (as TEAL). In a gated
    FFN the threshold is on the gate's activation, so the up row of a dropped unit is not read either."""

    field: ClassVar[str] = "activation"
    sparsity: float = 0.5
    per_channel: bool = True

    def __post_init__(self):
        _check_fraction("ActivationThreshold", "sparsity", self.sparsity, high_open=True)


@_register
@dataclasses.dataclass(frozen=True)
class TopK(Pattern):
    """Keep about the k (or `fraction`) largest-magnitude hidden activations of each token, by
    statistical top-k (as Spark Transformer): a cut per token at mean + c * std of its activations'
    magnitudes, no sort; c is calibrated on the calibration data to keep that many on average."""

    field: ClassVar[str] = "activation"
    k: int | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.k is None) == (self.fraction is None):
            raise PatternError("TopK: give exactly one of k or fraction")
        if self.k is not None:
            _check_positive_int("TopK", "k", self.k)
        if self.fraction is not None:
            _check_fraction("TopK", "fraction", self.fraction, low_open=True)


@_register
@dataclasses.dataclass(frozen=True)
class PredictedActive(Pattern):
    """A low-rank predictor (rank `rank`, as Deja Vu) decides per token which hidden units of an
    ungated FFN to compute, so the up rows of the others are not read either. It is calibrated on
    the calibration data (no training): the top-`rank` directions of the up projection's output
    there, and a per-unit margin that keeps at least `recall` of the units that are really active.
    Units it misses are dropped (its error, counted in the error budget)."""

    field: ClassVar[str] = "activation"
    rank: int = 64
    recall: float = 0.99

    def __post_init__(self):
        _check_positive_int("PredictedActive", "rank", self.rank)
        _check_fraction("PredictedActive", "recall", self.recall, low_open=True)


# ---- attention masks -------------------------------------------------------------------------
@_register
@dataclasses.dataclass(frozen=True)
class Causal(Pattern):
    field: ClassVar[str] = "attention"


@_register
@dataclasses.dataclass(frozen=True)
class SlidingWindow(Pattern):
    field: ClassVar[str] = "attention"
    window: int = 256
    causal: bool = True

    def __post_init__(self):
        _check_positive_int("SlidingWindow", "window", self.window)


@_register
@dataclasses.dataclass(frozen=True)
class Strided(Pattern):
    """Sparse-Transformer strided attention: a local band of `local` plus every `stride`-th key."""

    field: ClassVar[str] = "attention"
    stride: int = 64
    local: int = 64
    causal: bool = True

    def __post_init__(self):
        for name in ("stride", "local"):
            _check_positive_int("Strided", name, getattr(self, name))


@_register
@dataclasses.dataclass(frozen=True)
class BlockMask(Pattern):
    """Block-level attention mask: fixed (`mask` of rows of 0/1) or top-k blocks per query block."""

    field: ClassVar[str] = "attention"
    block: int = 64
    mask: tuple | None = None
    topk: int | None = None

    def __post_init__(self):
        _check_positive_int("BlockMask", "block", self.block)
        if (self.mask is None) == (self.topk is None):
            raise PatternError("BlockMask: give exactly one of mask or topk")
        if self.topk is not None:
            _check_positive_int("BlockMask", "topk", self.topk)


# ---- spatial sparsity ------------------------------------------------------------------------
@_register
@dataclasses.dataclass(frozen=True)
class Submanifold(Pattern):
    """Spatially sparse conv: compute only at active sites (mask from the input or a given input)."""

    field: ClassVar[str] = "spatial"
    mask_input: str | None = None
    threshold: float = 0.0

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise PatternError(f"Submanifold: threshold must be >= 0, got {self.threshold!r}")


def all_pattern_kinds() -> list[str]:
    return sorted(_REGISTRY)


def registered_patterns() -> dict[str, type]:
    """kind -> Pattern class, built-in and registered with `register_pattern`."""
    return dict(_REGISTRY)
