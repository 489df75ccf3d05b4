"""OpenVINO's CPU plugin running the ONNX graph that the ONNX Runtime engine runs (built from the
op graph by `cnnc.frontend.onnx_export`), for side-by-side benchmarks only.

Its settings are forced rather than left to OpenVINO's defaults: on CPUs with AVX-512 BF16 or
AMX it infers in bf16 unless told otherwise, which fails the bench's float32 check; and it picks
its own thread and stream counts, which would not be the `threads` that the other engines get.
"""

from __future__ import annotations

import io

import numpy as np

from cnnc.graph import Graph
from cnnc.tools.engines import Engine, EngineUnavailable
from cnnc.tools.engines.onnx_engine import to_onnx


def make(graph: Graph, threads: int) -> Engine:
    model = to_onnx(graph)
    try:
        import openvino
    except ImportError:
        raise EngineUnavailable("openvino is not installed (pip install -e '.[bench]')") \
            from None
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(io.BytesIO(model.SerializeToString())), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
    })
    # One request, reused: creating one per call costs more than LeNet's whole forward pass.
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        # share_inputs: the request reads the caller's array in place during this call;
        # share_outputs stays off, so each call returns arrays of its own.
        answer = request.infer({0: np.ascontiguousarray(x, np.float32)}, share_inputs=True)
        values = tuple(np.asarray(answer[output]) for output in outputs)
        return values[0] if len(values) == 1 else values

    return run
