"""PyTorch eager (torch.nn) running the op graph, as a user of PyTorch would write it."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.engines import Engine, EngineUnavailable
from cnnc.graph import INPUT, Graph


def make(graph: Graph, threads: int) -> Engine:
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812
    except ImportError:
        raise EngineUnavailable("PyTorch is not installed (pip install torch)") from None
    torch.set_num_threads(threads)

    class GraphModule(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.tensors = {
                f"{name}.{key}": torch.from_numpy(np.array(value))
                for name in graph.order()[1:] for key, value in graph.params(name).items()
            }

        def param(self, name: str, key: str) -> Any:
            return self.tensors.get(f"{name}.{key}")

        def forward(self, x: Any) -> Any:
            values = {INPUT: x}
            for name in graph.order()[1:]:
                op, attrs = graph.op(name), graph.attrs(name)
                args = [values[operand] for operand in graph.operands(name)]
                values[name] = self.compute(name, op, attrs, args)
            return tuple(values[name] for name in graph.outputs)

        def compute(self, name: str, op: str, attrs: dict[str, Any], args: list[Any]) -> Any:
            x = args[0]
            if op in ("conv2d", "maxpool2d", "avgpool2d"):
                (top, bottom), (left, right) = attrs["padding"]
                symmetric = top == bottom and left == right
                if not symmetric:
                    fill = float("-inf") if op == "maxpool2d" else 0.0
                    if op == "avgpool2d" and not attrs["count_include_pad"]:
                        raise EngineUnavailable("asymmetric average pooling without padding")
                    x = F.pad(x, (left, right, top, bottom), value=fill)
                padding = (top, left) if symmetric else 0
            if op == "conv2d":
                return F.conv2d(x, self.param(name, "weight"), self.param(name, "bias"),
                                attrs["stride"], padding, attrs["dilation"], attrs["groups"])
            if op == "dense":
                return F.linear(x, self.param(name, "weight"), self.param(name, "bias"))
            if op == "maxpool2d":
                return F.max_pool2d(x, attrs["kernel_size"], attrs["stride"], padding,
                                    ceil_mode=attrs["ceil_mode"])
            if op == "avgpool2d":
                return F.avg_pool2d(x, attrs["kernel_size"], attrs["stride"], padding,
                                    ceil_mode=attrs["ceil_mode"],
                                    count_include_pad=attrs["count_include_pad"])
            if op == "global_avgpool2d":
                return x.mean(dim=(2, 3), keepdim=True)
            if op == "batchnorm2d":
                return F.batch_norm(x, self.param(name, "running_mean"),
                                    self.param(name, "running_var"), self.param(name, "weight"),
                                    self.param(name, "bias"), False, 0.0, attrs["eps"])
            simple = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh,
                      "flatten": lambda t: torch.flatten(t, 1),
                      "softmax": lambda t: F.softmax(t, dim=1)}
            if op in simple:
                return simple[op](x)
            if op == "add":
                return sum(args[1:], args[0])
            if op == "concat":
                return torch.cat(args, dim=1)
            raise EngineUnavailable(f"no PyTorch form for {op}")

    module = GraphModule().eval()

    def run(x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        with torch.inference_mode():
            outputs = tuple(t.numpy() for t in module(torch.from_numpy(
                np.ascontiguousarray(x, dtype=np.float32))))
        return outputs[0] if len(outputs) == 1 else outputs

    return run
