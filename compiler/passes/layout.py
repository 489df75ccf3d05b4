"""Choose the memory layout of the tensors between kernels (the layouts themselves, one class
each, are in `cnnc.layouts`).

Two layouts fill the vector lanes whatever the channel counts: "batch" puts the images of one
block side by side, one lane each (best for many images); "channel" puts a vector of one
image's channels in the lanes (best for one or a few). The GPU maps images and pixels onto
threads instead: one lane, plain NCHW per image. The conversions from and to the user's NCHW
arrays happen only at the model's edges.
"""

from __future__ import annotations

from cnnc.graph import Graph
from cnnc.layouts import LANE, LAYOUTS, BatchLayout, ChannelLayout, Layout
from cnnc.passes.options import Options

__all__ = ["LANE", "BatchLayout", "ChannelLayout", "Layout", "layout", "layout_of"]


def layout(graph: Graph, options: Options) -> Graph:
    if options.target != "llvm":
        graph.plan.layout = BatchLayout(1)
    else:
        graph.plan.layout = LAYOUTS[options.layout](options.vector_width)
    return graph


def layout_of(graph: Graph) -> Layout:
    """The chosen layout; plain per-image NCHW when the layout pass did not run."""
    return graph.plan.layout or BatchLayout(1)

