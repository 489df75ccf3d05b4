"""Drop the nodes that no output depends on, so that no kernel computes a value nobody reads."""

from __future__ import annotations

from cnnc.graph import Graph
from cnnc.passes.options import Options


def prune(graph: Graph, options: Options) -> Graph:
    graph.eliminate_dead_code()
    return graph
