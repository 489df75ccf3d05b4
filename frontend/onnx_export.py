"""Writes an op graph as an ONNX model (NCHW, float32, a dynamic batch axis `N`).

Node and tensor names are the graph's node names and initializers are `<layer>.<param>`, so
that `load_onnx` reads the file back to the same graph. Used by `cnnc convert` and by the
ONNX Runtime engine of the bench; it needs the `onnx` package and knows no backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cnnc import ops
from cnnc.graph import INPUT, Graph

OPSET = 21  # the newest opset of onnx 1.16, the oldest onnx the extra allows
IR_VERSION = 10


def _nodes(graph: Graph, name: str, inputs: list[str], param: dict[str, str],
           initializers: list[Any]) -> list[Any]:
    """The nodes of op `name`, in the ONNX form its spec gives; its constant inputs become
    initializers `<layer>.<position>` (an absent optional one is an empty name)."""
    op = graph.op(name)
    form = ops.OPS[op].onnx
    if form is None:
        raise ValueError(f"op '{op}' of node '{name}' has no ONNX form yet")
    attrs = graph.attrs(name)
    if form.nodes is not None:
        return form.nodes(helper, name, inputs, attrs)
    kind = form.many if form.many and len(inputs) > 2 else form.op_type
    args = [*inputs, *(param[key] for key in form.params if key in param)]
    for value in form.constants(attrs) if form.constants else ():
        if value is None:
            args.append("")
            continue
        args.append(f"{name}.{len(args)}")
        initializers.append(numpy_helper.from_array(np.asarray(value), args[-1]))
    while args and not args[-1]:
        args.pop()
    return [helper.make_node(kind, args, [name], name, **form.attrs(attrs))]


def to_onnx(graph: Graph) -> Any:
    """The op graph as a checked ONNX ModelProto."""
    nodes, initializers = [], []
    for name in graph.order()[1:]:
        param = {key: f"{name}.{key}" for key in graph.params(name)}
        for key, value in graph.params(name).items():
            initializers.append(numpy_helper.from_array(value, param[key]))
        nodes += _nodes(graph, name, graph.operands(name), param, initializers)
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
