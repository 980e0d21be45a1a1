"""What analysis hands to rewrite: a typed compile state, instead of a dict of string keys.

One `CompileState` per captured part. Analysis passes fill it (sites, statistics, plans, prepared
buffers, costs, notes); the rewrite phase reads only `sites`, `plans` and `prepared`, so a saved
plan plus the model rebuilds the compiled module (prepared data that is missing, as after loading a
plan from JSON, is prepared again from the plan by the site's family).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What the rewrite installs for one site: tensors that become GraphModule buffers, and plain
    values (ints, strings, lists) baked into the op call. Both are named after the op's schema
    arguments, so the op call is built from the schema (see codegen.spec.KernelSpec.op_args)."""

    buffers: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    static: dict[str, Any] = dataclasses.field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


@dataclasses.dataclass
class LayerStats:
    """Statistics of a site's probed input over the calibration data.

    channel_sq_sum: per input feature (the channel dim), the sum of squares over all tokens / pixels;
      its square root is the ||x_j||_2 that Wanda multiplies with |W_ij|.
    sample: the first batch's input (at most MAX_SAMPLE_ROWS token rows) for timing and error.
    rows: for a probe that asks for them (Probe.rows), token rows [n, C] of every batch, up to
      MAX_SAMPLE_ROWS in all: what a threshold is calibrated on.
    """

    channel_sq_sum: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    @property
    def channel_norm(self) -> torch.Tensor:
        return self.channel_sq_sum.sqrt()

    def absorb(self, other: "LayerStats") -> None:
        """Add the sums of statistics taken on other batches (other shapes: another capture); this
        one's sample stays, it is the input as this graph sees it."""
        if other.channel_sq_sum is not None:
            self.channel_sq_sum = (other.channel_sq_sum if self.channel_sq_sum is None
                                   else self.channel_sq_sum + other.channel_sq_sum)
        if self.sample is None:
            self.sample = other.sample
        if other.rows is not None:
            self._add_rows(other.rows)

    def _add_rows(self, rows: torch.Tensor) -> None:
        have = 0 if self.rows is None else self.rows.shape[0]
        rows = rows[: max(0, MAX_SAMPLE_ROWS - have)]
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows])


MAX_SAMPLE_ROWS = 4096


def update_stats(stats: LayerStats, x: torch.Tensor, channel_dim: int, rows: bool = False) -> None:
    """Fold one batch of a probed value into its statistics (and its token rows, if asked)."""
    x = x.detach()
    moved = x.float().movedim(channel_dim, -1)
    if rows:
        stats._add_rows(moved.reshape(-1, moved.shape[-1]).clone())
    sq = moved.reshape(-1, moved.shape[-1]).pow(2).sum(0)
    stats.channel_sq_sum = sq if stats.channel_sq_sum is None else stats.channel_sq_sum + sq
    if stats.sample is None:
        if channel_dim == -1 and x.dim() > 1 and x.shape[:-1].numel() > MAX_SAMPLE_ROWS:
            x = x.reshape(-1, x.shape[-1])[:MAX_SAMPLE_ROWS]
        stats.sample = x.clone()


@dataclasses.dataclass(frozen=True)
class Note:
    """Something a pass left alone or decided, for the report: which pass, where (an fqn), why."""

    pass_name: str
    where: str
    text: str

    def __str__(self) -> str:
        return f"{self.pass_name}: {self.where}: {self.text}" if self.where else f"{self.pass_name}: {self.text}"


@dataclasses.dataclass
class CompileState:
    """Everything the passes of one captured part share.

    sites: site key -> `family.Site` (found by find_sites; node names, valid on this graph and on
      fresh copies of it). stats: probe key -> LayerStats (calibrate). plans: site key -> LayerPlan
      (plan_sites). prepared: site key -> Prepared (what rewrite installs for a planned site).
      costs: the CostModel timings come from. sensitivity: the model-level error tracker of planning
      (analysis only). notes: what passes left alone or decided, for the report.
    """

    sites: dict = dataclasses.field(default_factory=dict)
    stats: dict = dataclasses.field(default_factory=dict)
    plans: dict = dataclasses.field(default_factory=dict)
    prepared: dict = dataclasses.field(default_factory=dict)
    costs: Any = None
    sensitivity: Any = None
    notes: list = dataclasses.field(default_factory=list)

    def note(self, pass_name: str, where: str, text: str) -> None:
        n = Note(pass_name, where, text)
        if n not in self.notes:
            self.notes.append(n)

    def notes_of(self, pass_name: str) -> dict[str, str]:
        """where -> text of the notes one pass left."""
        return {n.where: n.text for n in self.notes if n.pass_name == pass_name}

    def for_rebuild(self) -> "CompileState":
        """The part of this state the rewrite phase may read (sites, plans, prepared), sharing them:
        what a new capture of the same model, or a build from a saved plan, starts from."""
        return CompileState(sites={}, plans=dict(self.plans), prepared=self.prepared)
