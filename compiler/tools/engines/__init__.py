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


# The engines a user can name, in the order they are listed to one: what each is.
ENGINES: dict[str, str] = {
    "reference": "cnnc's NumPy reference (float64 accumulation)",
    "onnxruntime": "ONNX Runtime on an ONNX graph built from the op graph",
    "openvino": "OpenVINO (CPU, f32) on the same ONNX graph",
    "torch": "PyTorch eager (torch.nn.functional)",
    "numpy": "NumPy im2col + BLAS",
    "torch-cuda": "PyTorch eager on the GPU (CUDA device 0), the peer of --target cuda",
}


class UnknownEngine(ValueError):
    """A name that is not in ENGINES."""


def check_engine_names(names: list[str]) -> None:
    """Raise UnknownEngine for the first name that is not an engine's."""
    for name in names:
        if name not in ENGINES:
            raise UnknownEngine(f"unknown engine '{name}'; expected one of "
                                f"{', '.join(ENGINES)}")


def make_engine(name: str, graph: Graph, threads: int) -> Engine:
    check_engine_names([name])
    if name == "numpy":
        from cnnc.tools.engines import numpy_im2col

        return numpy_im2col.make(graph, threads)
    if name == "torch":
        from cnnc.tools.engines import torch_engine

        return torch_engine.make(graph, threads)
    if name == "torch-cuda":
        from cnnc.tools.engines import torch_engine

        return torch_engine.make(graph, threads, device="cuda")
    if name == "onnxruntime":
        from cnnc.tools.engines import onnx_engine

        return onnx_engine.make(graph, threads)
    if name == "openvino":
        from cnnc.tools.engines import openvino_engine

        return openvino_engine.make(graph, threads)
    from cnnc.reference import reference

    return lambda x: reference(graph, x)
