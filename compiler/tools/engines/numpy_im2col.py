"""The fastest plain-NumPy way to run a graph: convolutions and dense layers as one float32
matrix product each (im2col over sliding windows, then BLAS); other ops as in the reference,
but in float32."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph
from cnnc.tools.engines import Engine


def conv2d(x: np.ndarray, attrs: dict[str, Any], params: dict[str, np.ndarray]) -> np.ndarray:
    weight = params["weight"]
    batch, channels = x.shape[:2]
    out_channels, per_group, kh, kw = weight.shape
    groups = attrs["groups"]
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    _, oh, ow = ops.OPS["conv2d"].infer(attrs, [x.shape[1:]])
    padded = np.pad(x, ((0, 0), (0, 0), *attrs["padding"]))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(2, 3))
    windows = windows[:, :, : sh * (oh - 1) + 1 : sh, : sw * (ow - 1) + 1 : sw, ::dh, ::dw]
    outputs = []
    for group in range(groups):
        part = windows[:, group * per_group : (group + 1) * per_group]
        columns = part.transpose(0, 2, 3, 1, 4, 5).reshape(batch * oh * ow, per_group * kh * kw)
        rows = out_channels // groups
        kernel = weight[group * rows : (group + 1) * rows].reshape(rows, -1)
        outputs.append(columns @ kernel.T)
    out = np.concatenate(outputs, axis=1) if groups > 1 else outputs[0]
    if "bias" in params:
        out += params["bias"]
    return np.ascontiguousarray(out.reshape(batch, oh, ow, out_channels).transpose(0, 3, 1, 2))


def make(graph: Graph, threads: int) -> Engine:
    limit: AbstractContextManager[Any] = nullcontext()
    try:
        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=threads)
    except ImportError:  # BLAS then uses its own thread count
        pass

    def run(x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        values = {INPUT: np.ascontiguousarray(x, dtype=np.float32)}
        with limit:
            for name in graph.order()[1:]:
                op, attrs, params = graph.op(name), graph.attrs(name), graph.params(name)
                operands = [values[operand] for operand in graph.operands(name)]
                if op == "conv2d":
                    values[name] = conv2d(operands[0], attrs, params)
                elif op == "dense":
                    result = operands[0] @ params["weight"].T
                    values[name] = result + params["bias"] if "bias" in params else result
                else:
                    result = ops.OPS[op].compute(attrs, params, operands)
                    values[name] = np.asarray(result, dtype=np.float32)
        outputs = tuple(values[name] for name in graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    return run
