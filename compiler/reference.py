"""The NumPy reference: runs an op graph op by op, the oracle every compiled target must match.

It is written to be obviously right, not fast: each op is computed in float64 by the registry's
reference function and the outputs are rounded to float32 once, at the end. It never fuses or
tiles, and it imports nothing from the passes or the backends.
"""

from __future__ import annotations

import numpy as np

from cnnc import ops
from cnnc.errors import InputError
from cnnc.graph import INPUT, Graph, format_shape


def check_input(graph: Graph, x: object) -> np.ndarray:
    """`x` as a C-contiguous float32 array of shape (N, *graph.input_shape), or InputError."""
    array = np.asarray(x)
    if array.dtype.kind not in "fiub":
        raise InputError(f"model '{graph.name}' expects a float array "
                         f"{format_shape(graph.input_shape)}, got dtype {array.dtype}")
    if array.ndim != 1 + len(graph.input_shape) or tuple(array.shape[1:]) != graph.input_shape:
        raise InputError(f"model '{graph.name}' expects input {format_shape(graph.input_shape)}"
                         f", got shape ({', '.join(map(str, array.shape))})")
    return np.ascontiguousarray(array, dtype=np.float32)


def reference(graph: Graph, x: object) -> np.ndarray | tuple[np.ndarray, ...]:
    """Run `graph` on `x` (N, C, H, W); one output gives an array, several a tuple."""
    values: dict[str, np.ndarray] = {INPUT: check_input(graph, x).astype(np.float64)}
    for name in graph.order():
        if name == INPUT:
            continue
        spec = ops.OPS[graph.op(name)]
        operands = [values[operand] for operand in graph.operands(name)]
        with np.errstate(over="ignore", invalid="ignore"):
            values[name] = spec.compute(graph.attrs(name), graph.params(name), operands)
    outputs = tuple(values[name].astype(np.float32) for name in graph.outputs)
    return outputs[0] if len(outputs) == 1 else outputs
