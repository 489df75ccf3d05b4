"""Dropout's masks for training, made on the host from (seed, step, layer).

The reference backward and the compiled trainer both take each dropout layer's mask from here,
so they drop the very same elements and their results can be compared exactly. This module
only draws masks; it computes nothing of the model and imports no pass or backend.
"""

from __future__ import annotations

import zlib

import numpy as np

from cnnc.errors import ModelError
from cnnc.graph import Graph

# The ops whose training forward multiplies by a host-made mask, read as an extra last operand.
MASKED_OPS = ("dropout",)


def dropout_mask(seed: int, step: int, layer: str, shape: tuple[int, ...], p: float
                 ) -> np.ndarray:
    """A float32 mask of `shape` (batch axis included): each element is 0 with probability
    `p`, else 1/(1-p), as `torch.nn.functional.dropout` scales. The same (seed, step, layer)
    always gives the same mask; p == 0 gives ones and p == 1 zeros, as PyTorch."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"dropout probability p must be between 0 and 1, got {p!r}")
    for what, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"dropout {what} must be an integer >= 0, got {value!r}")
    if p == 1:  # 1/(1-p) is undefined: everything is dropped
        return np.zeros(shape, np.float32)
    # One stream per (seed, step, layer): a layer's mask does not depend on the others' sizes
    # or order, so adding a layer to a model leaves the other layers' masks as they were.
    rng = np.random.default_rng([int(seed), int(step), zlib.crc32(layer.encode())])
    keep = rng.random(shape) >= p
    return keep.astype(np.float32) * np.float32(1 / (1 - p))


def dropout_masks(graph: Graph, seed: int, step: int, batch: int) -> dict[str, np.ndarray]:
    """{layer: mask of shape (batch, *layer's shape)} for every dropout layer of `graph`."""
    masks = {}
    for name in graph.order():
        if graph.op(name) not in MASKED_OPS:
            continue
        p = graph.attrs(name)["p"]
        if not 0 <= p <= 1:
            raise ModelError(f"dropout probability 'p' must be between 0 and 1, got {p}",
                             layer=name, op=graph.op(name))
        masks[name] = dropout_mask(seed, step, name, (batch, *graph.shape(name)), p)
    return masks
