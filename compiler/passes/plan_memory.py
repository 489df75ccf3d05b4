"""Place the tensors between kernels in one arena, reusing memory whose value is dead.

Offsets count floats within one batch block's arena; each thread has an arena of its own.
A tensor lives from the kernel that writes it to the last kernel that reads it; the model's
outputs live to the end; a kernel's scratch (`Group.scratch`) lives while it runs. First fit
over lifetimes, each tensor aligned to 64 bytes.
"""

from __future__ import annotations

from cnnc.graph import INPUT, Graph
from cnnc.passes.fuse import tensor_of
from cnnc.passes.layout import layout_of
from cnnc.passes.options import Options
from cnnc.plan import MemoryPlan
from cnnc.util import ceil_div

ALIGN = 16  # floats: 64 bytes, one cache line and one AVX-512 vector
__all__ = ["plan_memory", "tensor_lifetimes", "unplanned"]


def tensor_lifetimes(graph: Graph) -> dict[str, tuple[int, int]]:
    """tensor -> (first kernel that writes it, last kernel that reads it); the input is
    written by the packing step (-1), the outputs read by the unpacking one (len(groups))."""
    groups = graph.plan.groups
    lifetimes = {INPUT: (-1, -1)}
    for index, group in enumerate(groups):
        lifetimes[group.output] = (index, index)
        for node in group.nodes:
            for operand in graph.operands(node):
                tensor = tensor_of(graph, operand)
                if tensor not in group.nodes:
                    born, _ = lifetimes[tensor]
                    lifetimes[tensor] = (born, index)
    for output in graph.outputs:
        tensor = tensor_of(graph, output)
        lifetimes[tensor] = (lifetimes[tensor][0], len(groups))
    return lifetimes


def plan_memory(graph: Graph, options: Options, reuse: bool = True) -> Graph:
    layout = layout_of(graph)
    lifetimes = tensor_lifetimes(graph)
    sizes = {tensor: layout.floats(graph.shape(tensor)) for tensor in lifetimes}
    for index, group in enumerate(graph.plan.groups):
        if group.scratch:  # memory that only this kernel uses, while it runs
            lifetimes[group.scratch_tensor] = (index, index)
            sizes[group.scratch_tensor] = group.scratch
    offsets: dict[str, int] = {}
    for tensor in sorted(lifetimes, key=lambda name: (lifetimes[name][0], name)):
        born, dies = lifetimes[tensor]
        busy = sorted(
            (offsets[other], offsets[other] + sizes[other])
            for other in offsets
            if not reuse or not (lifetimes[other][1] < born or dies < lifetimes[other][0])
        )
        offset = 0
        for start, stop in busy:
            if offset + sizes[tensor] <= start:
                break
            offset = max(offset, _aligned(stop))
        offsets[tensor] = offset
    floats = max((offsets[name] + sizes[name] for name in offsets), default=0)
    graph.plan.memory = MemoryPlan(offsets, sizes, _aligned(floats))
    return graph


def unplanned(graph: Graph, options: Options) -> Graph:
    """The plain choice, a buffer of its own for every tensor: what stands in for
    `plan_memory` when it is off."""
    return plan_memory(graph, options, reuse=False)


def _aligned(floats: int) -> int:
    return ceil_div(floats, ALIGN) * ALIGN
