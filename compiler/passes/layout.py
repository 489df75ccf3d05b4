"""Choose the memory layout of the tensors between kernels.

Two layouts fill the vector lanes whatever the channel counts:
- "batch": `[C][H][W][lanes]`, the images of one batch block side by side, one lane each. Every
  op runs the same instruction stream on all lanes. Best when there are many images.
- "channel": one image per block, `[H][W][C']` with the channels padded to a multiple of the
  lanes, each vector holding `lanes` channels of one pixel. Best for one or a few images.
The GPU maps images and pixels onto threads instead: one lane, plain NCHW per image. The
conversions from and to the user's NCHW arrays happen only at the model's edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnc.graph import Graph
from cnnc.kernel import Expr, Var
from cnnc.ops import Shape
from cnnc.passes.options import Options
from cnnc.util import ceil_div

LANE = Var("lane")
HALF_VECTOR = 8


@dataclass(frozen=True)
class Layout:
    kind: str  # "batch" or "channel"
    lanes: int

    @property
    def images_per_block(self) -> int:
        return self.lanes if self.kind == "batch" else 1

    def vector(self, count: int) -> int:
        """The vector width for a tensor of `count` channels. In the channel layout a few
        channels take half-width vectors: on our CPUs a 16-lane operation costs two 8-lane
        ones, so 6 channels in 8 lanes run twice as fast as in 16."""
        if self.kind == "channel" and count <= HALF_VECTOR < self.lanes:
            return HALF_VECTOR
        return self.lanes

    def channels(self, count: int) -> int:
        """The stored channel count: padded to whole vectors in the channel layout."""
        if self.kind != "channel":
            return count
        width = self.vector(count)
        return ceil_div(count, width) * width

    def floats(self, shape: Shape) -> int:
        """Floats per block of a tensor of per-image `shape`."""
        if self.kind == "channel":
            return self.channels(shape[0]) * math.prod(shape[1:])
        return math.prod(shape) * self.lanes

    def index(self, shape: Shape, coords: list[Expr]) -> Expr:
        """Where point `coords` (channel first) of the current image is stored. In the batch
        layout the current image is the lane; in the channel layout the lane is part of the
        channel coordinate that the caller passes."""
        if self.kind == "channel":
            pixel: Expr | int = 0
            for dim, coord in zip(shape[1:], coords[1:]):
                pixel = pixel * dim + coord
            return pixel * self.channels(shape[0]) + coords[0]
        flat = coords[0]
        for dim, coord in zip(shape[1:], coords[1:]):
            flat = flat * dim + coord
        return flat * self.lanes + LANE if self.lanes > 1 else flat + LANE


def layout(graph: Graph, options: Options) -> Graph:
    if options.target != "llvm":
        graph.nx.graph["layout"] = Layout("batch", 1)
    else:
        graph.nx.graph["layout"] = Layout(options.layout, options.vector_width)
    return graph


def layout_of(graph: Graph) -> Layout:
    """The chosen layout; plain per-image NCHW when the layout pass did not run."""
    chosen: Layout = graph.nx.graph.get("layout", Layout("batch", 1))
    return chosen

