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
    scratch: int = 0  # floats per block that only this kernel uses (`cnnc.scratch`)

    @property
    def producer(self) -> str:
        return self.nodes[0]

    @property
    def output(self) -> str:
        return self.nodes[-1]

    @property
    def scratch_tensor(self) -> str:
        """The memory plan's name of the group's scratch (not a node's name)."""
        return f"{self.name}.scratch"


@dataclass
class MemoryPlan:
    """Where each tensor between kernels lives in one batch block's arena."""

    offsets: dict[str, int]  # tensor node -> float offset in the arena
    sizes: dict[str, int]  # tensor node -> floats per block
    floats: int  # arena size in floats, per block

    def bytes_per_block(self) -> int:
        return self.floats * 4


@dataclass
class Plan:
    """The products of the passes so far. `layout` is None until the layout pass ran; reading
    `groups` or `memory` before the pass that makes it ran is an error that names the pass."""

    layout: Layout | None = None
    _groups: list[Group] | None = None  # in launch order; their schedules are tile's
    _memory: MemoryPlan | None = None

    @property
    def has_groups(self) -> bool:
        return self._groups is not None

    @property
    def groups(self) -> list[Group]:
        """The fuse pass's groups, or one per op where it was switched off (`unfused`)."""
        if self._groups is None:
            raise ValueError("the graph has no kernel groups yet: run the fuse pass "
                             "(cnnc.passes.run_pipeline) first")
        return self._groups

    @groups.setter
    def groups(self, groups: list[Group]) -> None:
        self._groups = groups

    @property
    def has_memory(self) -> bool:
        return self._memory is not None

    @property
    def memory(self) -> MemoryPlan:
        """The plan_memory pass's plan, or one without reuse where it was switched off
        (`unplanned`)."""
        if self._memory is None:
            raise ValueError("the graph has no memory plan yet: run the plan_memory pass "
                             "(cnnc.passes.run_pipeline) first")
        return self._memory

    @memory.setter
    def memory(self, memory: MemoryPlan) -> None:
        self._memory = memory
