"""The compiled plan: what the passes decide about a graph, as typed values.

Each field is set by the one pass that makes it and read by the passes and lowering after it:
the layout (layout pass), the fusion groups with their schedules (fuse, then tile) and the
memory plan (plan_memory). Reading a field never computes or stores anything. This module
knows nothing of how the passes decide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cnnc.kernel import Schedule

if TYPE_CHECKING:
    from cnnc.layouts import Layout


@dataclass
class Group:
    """The ops of one kernel: `nodes[0]` produces, the rest apply to its result in order."""

    nodes: list[str]
    window: str | None = None  # the pooling node, if the group has one
    name: str = ""
    schedule: Schedule = field(default_factory=Schedule)

    @property
    def producer(self) -> str:
        return self.nodes[0]

    @property
    def output(self) -> str:
        return self.nodes[-1]


@dataclass
class MemoryPlan:
    offsets: dict[str, int]  # tensor node -> float offset in the arena
    sizes: dict[str, int]  # tensor node -> floats per block
    floats: int  # arena size in floats, per block

    def bytes_per_block(self) -> int:
        return self.floats * 4


@dataclass
class Plan:
    """The products of the passes so far; None where the pass that makes one has not run."""

    layout: Layout | None = None
    groups: list[Group] | None = None  # in launch order; their schedules are tile's
    memory: MemoryPlan | None = None
