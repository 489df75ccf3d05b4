"""Weight initialisation for training from scratch: `init="xavier_uniform"` is D2L 6.6's recipe
(`nn.init.xavier_uniform_` on every Conv2d and Linear weight; biases keep their values).

It draws float32 arrays from a seed and sets them on a graph's nodes; it knows the layouts of
conv2d and dense weights (those of torch.nn) and nothing of passes or backends.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal, get_args

import numpy as np

from cnnc import ops
from cnnc.errors import ModelError
from cnnc.graph import Graph

Init = Literal["xavier_uniform"]
INITS: tuple[str, ...] = get_args(Init)

# The ops whose weight an init draws: torch.nn's Conv2d and Linear.
WEIGHTED_OPS = ("conv2d", "dense")


def fans(op: str, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight, as torch computes them: for conv2d's
    [out, in/groups, kh, kw] in/groups*kh*kw and out*kh*kw; for dense's [out, in] in and out."""
    if op not in WEIGHTED_OPS:
        raise ValueError(f"op '{op}' has no weight to initialise; expected one of "
                         f"{', '.join(WEIGHTED_OPS)}")
    out_features, in_features, *kernel = weight_shape
    receptive = math.prod(kernel)
    return in_features * receptive, out_features * receptive


def xavier_uniform(graph: Graph, seed: int) -> dict[str, np.ndarray]:
    """{"layer.weight": float32 array} for every conv2d and dense layer, uniform in
    [-b, b) with b = sqrt(6 / (fan_in + fan_out)) (gain 1, as `nn.init.xavier_uniform_`)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"init seed must be an integer >= 0, got {seed!r}")
    weights = {}
    for name in graph.order():
        op = graph.op(name)
        if op not in WEIGHTED_OPS:
            continue
        shapes = [graph.shape(operand) for operand in graph.operands(name)]
        shape = ops.OPS[op].param_shapes(graph.attrs(name), shapes)["weight"]
        fan_in, fan_out = fans(op, shape)
        bound = math.sqrt(6 / (fan_in + fan_out))
        # One stream per layer: a layer's weights do not depend on the layers before it.
        rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
        weights[f"{name}.weight"] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return weights


def apply_init(graph: Graph, init: str, seed: int) -> None:
    """Set the weights of `graph`'s conv2d and dense layers, in place, by the init named
    `init`; biases and every other parameter keep their values."""
    if init not in INITS:
        raise ModelError(f"unknown init '{init}'; expected one of {', '.join(INITS)}")
    for key, weight in xavier_uniform(graph, seed).items():
        layer, param = key.rsplit(".", 1)
        graph.params(layer)[param] = weight
