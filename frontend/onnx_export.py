"""Writes an op graph as an ONNX model (NCHW, float32, a dynamic batch axis `N`).

Node and tensor names are the graph's node names and initializers are `<layer>.<param>`, so
that `load_onnx` reads the file back to the same graph. Used by `cnnc convert` and by the
ONNX Runtime engine of the bench; it needs the `onnx` package and knows no backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper, numpy_helper

from cnnc.graph import INPUT, Graph

OPSET = 21  # the newest opset of onnx 1.16, the oldest onnx the extra allows
IR_VERSION = 10


def _window(attrs: dict[str, Any]) -> dict[str, Any]:
    (top, bottom), (left, right) = attrs["padding"]
    return {"kernel_shape": list(attrs["kernel_size"]), "strides": list(attrs["stride"]),
            "pads": [top, left, bottom, right]}


def _node(graph: Graph, name: str, inputs: list[str], param: dict[str, str]) -> Any:
    op, attrs = graph.op(name), graph.attrs(name)
    out = [name]
    if op == "conv2d":
        args = [inputs[0], param["weight"]] + ([param["bias"]] if "bias" in param else [])
        return helper.make_node("Conv", args, out, name, dilations=list(attrs["dilation"]),
                                group=attrs["groups"], **_window(attrs))
    if op == "dense":
        args = [inputs[0], param["weight"]] + ([param["bias"]] if "bias" in param else [])
        return helper.make_node("Gemm", args, out, name, transB=1)
    if op == "maxpool2d":
        return helper.make_node("MaxPool", inputs, out, name, ceil_mode=int(attrs["ceil_mode"]),
                                **_window(attrs))
    if op == "avgpool2d":
        return helper.make_node("AveragePool", inputs, out, name,
                                ceil_mode=int(attrs["ceil_mode"]),
                                count_include_pad=int(attrs["count_include_pad"]),
                                **_window(attrs))
    if op == "batchnorm2d":
        args = [inputs[0], *(param[key] for key in ("weight", "bias", "running_mean",
                                                   "running_var"))]
        return helper.make_node("BatchNormalization", args, out, name, epsilon=attrs["eps"])
    if op in ("flatten", "softmax", "concat"):
        kind = {"flatten": "Flatten", "softmax": "Softmax", "concat": "Concat"}[op]
        return helper.make_node(kind, inputs, out, name, axis=1)
    if op == "add":
        return helper.make_node("Add" if len(inputs) == 2 else "Sum", inputs, out, name)
    simple = {"sigmoid": "Sigmoid", "relu": "Relu", "tanh": "Tanh",
              "global_avgpool2d": "GlobalAveragePool"}
    if op not in simple:
        raise ValueError(f"op '{op}' of node '{name}' has no ONNX form yet")
    return helper.make_node(simple[op], inputs, out, name)


def to_onnx(graph: Graph) -> Any:
    """The op graph as a checked ONNX ModelProto."""
    nodes, initializers = [], []
    for name in graph.order()[1:]:
        param = {key: f"{name}.{key}" for key in graph.params(name)}
        for key, value in graph.params(name).items():
            initializers.append(numpy_helper.from_array(value, param[key]))
        nodes.append(_node(graph, name, graph.operands(name), param))
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *graph.input_shape])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *graph.shape(name)])
               for name in graph.outputs]
    model = helper.make_model(
        helper.make_graph(nodes, graph.name, inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="cnnc")
    onnx.checker.check_model(model)
    return model


def save_onnx(graph: Graph, path: str | Path) -> Path:
    """Write `graph` as an ONNX file at `path`."""
    path = Path(path)
    path.write_bytes(to_onnx(graph).SerializeToString())
    return path
