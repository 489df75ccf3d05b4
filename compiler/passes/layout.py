"""Choose the memory layout of the tensors between kernels.

On the CPU every intermediate tensor is batch-blocked, `[C][H][W][lanes]`: the images of one
batch block sit side by side, so every op, whatever its channel counts, fills all vector lanes
with the same instruction stream. The conversions from and to the user's NCHW arrays happen
only at the model's edges. The GPU maps images and pixels onto threads instead: one lane.
"""

from __future__ import annotations

from cnnc.graph import Graph
from cnnc.passes.options import Options


def layout(graph: Graph, options: Options) -> Graph:
    graph.nx.graph["lanes"] = options.vector_width if options.target == "llvm" else 1
    return graph


def lanes_of(graph: Graph) -> int:
    """Images per batch block; 1 (plain NCHW) when the layout pass did not run."""
    lanes: int = graph.nx.graph.get("lanes", 1)
    return lanes
