"""PyTorch eager (torch.nn) running the op graph, as a user of PyTorch would write it: each op
by the torch.nn form its spec gives (`OpSpec.torch`)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph
from cnnc.tools.engines import Engine, EngineUnavailable


def make(graph: Graph, threads: int, device: str = "cpu") -> Engine:
    """`device` is "cpu" or "cuda": the parameters live there, and each call copies the input
    in and the outputs back, as the compiled CUDA model does."""
    try:
        import torch
    except ImportError:
        raise EngineUnavailable("PyTorch is not installed (pip install torch)") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable("PyTorch sees no CUDA device (a CPU-only build, or no GPU)")
    torch.set_num_threads(threads)

    class GraphModule(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.tensors = {
                name: {key: torch.from_numpy(np.array(value)).to(device)
                       for key, value in graph.params(name).items()}
                for name in graph.order()[1:]
            }

        def forward(self, x: Any) -> Any:
            values = {INPUT: x}
            for name in graph.order()[1:]:
                op, attrs = graph.op(name), graph.attrs(name)
                args = [values[operand] for operand in graph.operands(name)]
                values[name] = self.compute(name, op, attrs, args)
            return tuple(values[name] for name in graph.outputs)

        def compute(self, name: str, op: str, attrs: dict[str, Any], args: list[Any]) -> Any:
            form = ops.OPS[op].torch
            if form is None:
                raise EngineUnavailable(f"no PyTorch form for {op}")
            # an absent parameter (a conv2d without bias) is None, as torch.nn takes it
            params: dict[str, Any] = defaultdict(lambda: None, self.tensors[name])
            try:
                return form(torch, attrs, params, args)
            except NotImplementedError as error:
                raise EngineUnavailable(str(error)) from None

    module = GraphModule().eval()

    def run(x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        with torch.inference_mode():
            outputs = tuple(t.cpu().numpy() for t in module(torch.from_numpy(
                np.ascontiguousarray(x, dtype=np.float32)).to(device)))
        return outputs[0] if len(outputs) == 1 else outputs

    return run
