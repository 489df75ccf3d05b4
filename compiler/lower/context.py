"""The lowering context of one kernel: the graph, the group and the layout it is lowered for,
the buffers it has made so far and its fresh local names. Every lowering rule writes through
it; it decides nothing about what a kernel computes.
"""

from __future__ import annotations

import numpy as np

from cnnc.graph import Graph
from cnnc.kernel import Bin, Buffer, Const, Expr, If, LoopKind, Stmt, less
from cnnc.layouts import Layout
from cnnc.passes.fuse import tensor_of
from cnnc.plan import Group


class KernelContext:
    """Builds the kernel of one group; keeps its buffers and fresh local names."""

    def __init__(self, graph: Graph, group: Group, layout: Layout) -> None:
        self.graph = graph
        self.group = group
        self.layout = layout
        self.schedule = group.schedule
        self.buffers: list[Buffer] = []
        self.bindings: dict[str, str] = {}
        self.counter = 0

    def input_buffer(self, node: str) -> str:
        """The buffer the kernel reads `node`'s tensor from, made on first use."""
        tensor = tensor_of(self.graph, node)
        for name, bound in self.bindings.items():
            if bound == tensor:
                return name
        name = f"in{sum(1 for buffer in self.buffers if buffer.role == 'input')}"
        self.buffers.append(Buffer(name, self.layout.floats(self.graph.shape(tensor)), "input"))
        self.bindings[name] = tensor
        return name

    def param(self, data: np.ndarray, param_of: str = "") -> str:
        """A parameter buffer; `param_of` ("layer.param") when it is that model parameter
        unchanged (not packed, padded or folded), so that a trainer can bind it."""
        name = f"p{sum(1 for buffer in self.buffers if buffer.role == 'param')}"
        flat = np.ascontiguousarray(data, dtype=np.float32).ravel()
        self.buffers.append(Buffer(name, flat.size, "param", flat, param_of=param_of))
        return name

    def channel_param(self, values: np.ndarray, param_of: str = "") -> str:
        """A per-channel parameter, padded with zeros to the stored channel count."""
        count = self.layout.channels(len(values))
        padded = np.zeros(count, np.float32)
        padded[: len(values)] = values
        return self.param(padded, param_of if count == len(values) else "")

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def index(self, node: str, coords: list[Expr]) -> Expr:
        """Where point `coords` of `node`'s stored tensor is, in this kernel's layout."""
        return self.layout.index(self.graph.shape(tensor_of(self.graph, node)), coords)

    def reduce_kind(self, extent: int) -> LoopKind:
        return "unrolled" if extent <= self.schedule.unroll_max else "serial"


def pairs(spots: list[list[Expr]], channels: list[Expr]) -> list[tuple[list[Expr], Expr]]:
    """Every (spot, channel) of a register tile, spot-major: the order of its values."""
    return [(spot, channel) for spot in spots for channel in channels]


def floordiv(expr: Expr, divisor: int) -> Expr:
    return Bin("//", expr, Const(divisor))


def in_range(coord: Expr, size: int) -> Expr:
    """0 <= coord < size."""
    return Bin("and", less(Const(-1), coord), less(coord, size))


def guarded(body: list[Stmt], cond: Expr | None) -> list[Stmt]:
    return body if cond is None else [If(cond, body)]
