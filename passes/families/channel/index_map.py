"""Index maps: where a channel group's channels sit along the dim of a slot.

A slot (`(node, dim)`, see groups.py) also carries an *index map* (`IndexMap`): a list of parts
(offset, unit), group channel j being the `unit` consecutive entries from `offset + j * unit` along
`dim` in every part. Most ops pass the map through unchanged; the few that move the channel entries
(cat, views, split, slice: op_rules_shape.py) shift, scale or re-cut it. Several parts are a packed
projection (GPT-2's q|k|v, a gate|up FFN): channel j is then entries j of each part. The parts need
not be equal: a grouped-query q|k|v of sizes [4D, D, D] becomes parts of units 4u, u, u, so that once
coarsened to heads one channel is a k/v head with the 4 q heads it serves.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class IndexMap(NamedTuple):
    """Where a group's channels sit along a dim, as parts of (offset, unit): channel j is the `unit`
    entries from offset + j*unit in every part. One part is the common case; several parts are a
    packed projection (q|k|v or gate|up in one weight): one head is an entry range in each part.
    The parts of a grouped-query q|k|v have different units (a kv group is `rep` q heads but one
    k head and one v head)."""

    parts: tuple = ((0, 1),)

    @staticmethod
    def block(offset: int = 0, unit: int = 1) -> "IndexMap":
        return IndexMap(((offset, unit),))

    @staticmethod
    def repeated(offset: int, unit: int, reps: int, stride: int) -> "IndexMap":
        return IndexMap(tuple((offset + r * stride, unit) for r in range(reps)))

    @property
    def start(self) -> int:
        """The first entry of the group's channels."""
        return min(o for o, _ in self.parts)

    @property
    def single(self) -> bool:
        return len(self.parts) == 1

    def end(self, channels: int) -> int:
        """One past the last entry of the group's channels."""
        return max(o + channels * u for o, u in self.parts)

    def covers(self, channels: int, size: int) -> bool:
        """The group is the whole dim of `size` entries, in one part: it may be re-cut into parts."""
        return self.single and self.parts[0][0] == 0 and channels * self.parts[0][1] == size

    def shifted(self, by: int) -> "IndexMap":
        return IndexMap(tuple((o + by, u) for o, u in self.parts))

    def scaled(self, by: int) -> "IndexMap":
        """The map after every entry became `by` entries (the dims after it merged in)."""
        return IndexMap(tuple((o * by, u * by) for o, u in self.parts))

    def aligned(self, block: int) -> bool:
        """Every part starts and ends channels on multiples of `block` entries."""
        return all(o % block == 0 and u % block == 0 for o, u in self.parts)

    def divided(self, by: int) -> "IndexMap":
        return IndexMap(tuple((o // by, u // by) for o, u in self.parts))

    def equal_parts(self) -> tuple[int, int] | None:
        """(unit, stride) where the parts have one unit and are evenly spaced (stride 0 for one)."""
        units = {u for _, u in self.parts}
        offs = [o for o, _ in self.parts]
        gaps = {b - a for a, b in zip(offs, offs[1:])}
        if len(units) != 1 or len(gaps) > 1:
            return None
        return units.pop(), gaps.pop() if gaps else 0

    def entries(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices of the given channels' entries, channel-major (a channel's entries are adjacent)."""
        c = channels.long()[:, None]
        return torch.cat([o + c * u + torch.arange(u)[None, :] for o, u in self.parts], dim=1).flatten()

    def describe(self) -> str:
        if self.single:
            return f"offset {self.parts[0][0]}, unit {self.parts[0][1]}"
        return "parts " + ", ".join(f"(offset {o}, unit {u})" for o, u in self.parts)


_FULL = IndexMap()
