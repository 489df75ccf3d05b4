"""ONNX Runtime running the ONNX graph that `cnnc.frontend.onnx_export` builds from the op graph."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.graph import Graph
from cnnc.tools.engines import Engine, EngineUnavailable


def to_onnx(graph: Graph) -> Any:
    """The op graph as an ONNX model, built by the frontend's exporter."""
    try:
        from cnnc.frontend.onnx_export import to_onnx as build
    except ImportError:
        raise EngineUnavailable("onnx is not installed (pip install -e '.[bench]')") from None
    return build(graph)


def make(graph: Graph, threads: int) -> Engine:
    model = to_onnx(graph)
    try:
        import onnxruntime
    except ImportError:
        raise EngineUnavailable("onnxruntime is not installed (pip install -e '.[bench]')") \
            from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        outputs = tuple(session.run(None, {"input": np.ascontiguousarray(x, np.float32)}))
        return outputs[0] if len(outputs) == 1 else outputs

    return run
