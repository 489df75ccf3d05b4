"""Pick each kernel's schedule: a deterministic heuristic over the shapes and the target.

The schedule says how wide the lane loop is, how many output channels share each input load
(a register tile), which reduction loops are unrolled and how many GPU threads a block has.
A schedule given by the user (`--schedule FILE`) replaces fields of the one picked here.
"""

from __future__ import annotations

from cnnc.graph import Graph
from cnnc.passes.fuse import groups_of
from cnnc.passes.layout import lanes_of
from cnnc.passes.options import Options

MAX_ACCUMULATORS = 8  # of 32 vector registers, leave room for inputs and addresses


def tile(graph: Graph, options: Options) -> Graph:
    lanes = lanes_of(graph)
    for group in groups_of(graph):
        producer = group.producer
        channels = 1
        if graph.op(producer) in ("conv2d", "dense"):
            out = graph.shape(producer)[0]
            channels = out // graph.attrs(producer).get("groups", 1)
        picked = group.schedule.replace(
            lanes=lanes,
            oc_block=_largest_divisor(channels, MAX_ACCUMULATORS),
            unroll_max=8,
            gpu_threads=128,
        )
        overrides = {**options.schedules.get("*", {}), **options.schedules.get(group.name, {})}
        group.schedule = picked.replace(**overrides)
    return graph


def _largest_divisor(number: int, limit: int) -> int:
    return max(divisor for divisor in range(1, min(number, limit) + 1) if number % divisor == 0)
