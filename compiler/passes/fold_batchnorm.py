"""Fold an inference batch norm into the convolution before it.

y = (conv(x) + b) * scale + shift is conv(x) with weights scaled per output channel, so the
batch norm costs nothing. Only when the convolution has no other reader and is not an output.
"""

from __future__ import annotations

import numpy as np

from cnnc.graph import Graph
from cnnc.ops import batchnorm_scale_shift
from cnnc.passes.options import Options


def fold_batchnorm(graph: Graph, options: Options) -> Graph:
    for norm in [name for name in graph.order() if graph.op(name) == "batchnorm2d"]:
        (conv,) = graph.operands(norm)
        if graph.op(conv) != "conv2d" or len(graph.users(conv)) != 1 or conv in graph.outputs:
            continue
        scale, shift = batchnorm_scale_shift(graph.attrs(norm), graph.params(norm))
        params = graph.params(conv)
        weight = params["weight"].astype(np.float64) * scale[:, None, None, None]
        bias = params.get("bias", np.zeros(len(scale), np.float32)).astype(np.float64)
        params["weight"] = weight.astype(np.float32)
        params["bias"] = (bias * scale + shift).astype(np.float32)
        graph.attrs(conv)["bias"] = True
        graph.replace_all_uses(norm, conv)
        graph.erase(norm)
    return graph
