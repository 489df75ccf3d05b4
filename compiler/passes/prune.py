"""Drop the nodes that no output depends on, so that no kernel computes a value nobody reads."""

from __future__ import annotations

import networkx as nx

from cnnc.graph import INPUT, Graph
from cnnc.passes.options import Options


def prune(graph: Graph, options: Options) -> Graph:
    needed = {INPUT, *graph.outputs}
    for output in graph.outputs:
        needed |= nx.ancestors(graph.nx, output)
    graph.nx.remove_nodes_from([name for name in list(graph.nx) if name not in needed])
    return graph
