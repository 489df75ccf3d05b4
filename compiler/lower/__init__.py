"""Lowering: every fused group becomes one kernel of the loop IR (`cnnc.kernel`).

`lower` makes the edge kernels (`edges`: from and to the user's NCHW arrays) and, for each
group, a `KernelContext` that the fusion template (`template`) fills: producer ->
elementwise -> window -> elementwise, by the rules of each op family (anchors, standalone
kernels, and the expression and window rules of the op specs). Buffers are in the layout's
form (`cnnc.layouts`). Names in the IR are generated, never taken from layer names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cnnc.graph import INPUT, Graph
from cnnc.kernel import Kernel
from cnnc.layouts import BatchLayout, Layout
from cnnc.lower.context import KernelContext
from cnnc.lower.edges import pack_input, unpack_output
from cnnc.lower.template import build
from cnnc.passes.fuse import tensor_of
from cnnc.passes.layout import layout_of
from cnnc.verify import verify, verifying

USER_INPUT = "@input"  # bindings of the edge kernels to the user's arrays
USER_OUTPUT = "@output"


@dataclass
class LoweredModel:
    """The kernels in launch order and what their buffers are bound to."""

    kernels: list[Kernel]
    bindings: dict[str, dict[str, str]]  # kernel -> buffer -> tensor node (or @input/@output)
    images_per_block: int
    output_offsets: list[int] = field(default_factory=list)  # per output, floats per sample
    layout: Layout = field(default_factory=lambda: BatchLayout(1))


def lower(graph: Graph) -> LoweredModel:
    layout = layout_of(graph)
    model = LoweredModel([], {}, layout.images_per_block, layout=layout)
    pack = pack_input(graph, layout)
    model.kernels.append(pack)
    model.bindings[pack.name] = {"x": USER_INPUT, "packed": INPUT}
    for group in graph.plan.groups:
        context = KernelContext(graph, group, layout)
        kernel = build(context)
        model.kernels.append(kernel)
        model.bindings[kernel.name] = context.bindings
    offset = 0
    for index, output in enumerate(graph.outputs):
        unpack = unpack_output(graph, output, index, offset, layout)
        model.kernels.append(unpack)
        model.bindings[unpack.name] = {"packed": tensor_of(graph, output), "y": USER_OUTPUT}
        model.output_offsets.append(offset)
        offset += math.prod(graph.shape(output))
    if verifying():
        for kernel in model.kernels:
            verify(kernel)
    return model


__all__ = ["USER_INPUT", "USER_OUTPUT", "LoweredModel", "lower"]
