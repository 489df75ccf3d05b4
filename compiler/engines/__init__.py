"""Other engines that run an op graph, for side-by-side benchmarks: plain NumPy (im2col and
BLAS), PyTorch (torch.nn) and ONNX Runtime (an ONNX graph built with the `onnx` package).

Each engine module has `make(graph, threads) -> callable`, raising `EngineUnavailable` when
its package is not installed. They are never used to compute cnnc's own results.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cnnc.graph import Graph

Engine = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, ...]"]


class EngineUnavailable(Exception):
    """The engine's package is not installed, or it cannot express this graph."""


def make_engine(name: str, graph: Graph, threads: int) -> Engine:
    if name == "numpy":
        from cnnc.engines import numpy_im2col

        return numpy_im2col.make(graph, threads)
    if name == "torch":
        from cnnc.engines import torch_engine

        return torch_engine.make(graph, threads)
    if name == "onnxruntime":
        from cnnc.engines import onnx_engine

        return onnx_engine.make(graph, threads)
    if name == "reference":
        from cnnc.reference import reference

        return lambda x: reference(graph, x)
    raise ValueError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")


ENGINES = ("reference", "numpy", "onnxruntime", "torch")
