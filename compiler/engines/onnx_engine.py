"""ONNX Runtime running an ONNX graph built from the op graph with the `onnx` package."""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.engines import Engine, EngineUnavailable
from cnnc.graph import INPUT, Graph

OPSET = 17


def to_onnx(graph: Graph) -> Any:
    """The op graph as an ONNX model (NCHW, float32, symbolic batch)."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise EngineUnavailable("onnx is not installed (pip install 'cnnc[bench]')") from None
    nodes, initializers = [], []
    tensor = {INPUT: "input"}
    for index, name in enumerate(graph.order()[1:]):
        op, attrs, params = graph.op(name), graph.attrs(name), graph.params(name)
        out = f"t{index}"
        inputs = [tensor[operand] for operand in graph.operands(name)]
        for key, value in params.items():
            initializers.append(numpy_helper.from_array(value, f"t{index}.{key}"))
        param = {key: f"t{index}.{key}" for key in params}
        if op in ("conv2d", "maxpool2d", "avgpool2d"):
            (top, bottom), (left, right) = attrs["padding"]
            window: dict[str, Any] = {"kernel_shape": list(attrs["kernel_size"]),
                                      "strides": list(attrs["stride"]),
                                      "pads": [top, left, bottom, right]}
        if op == "conv2d":
            args = [inputs[0], param["weight"]] + ([param["bias"]] if "bias" in param else [])
            node = helper.make_node("Conv", args, [out], dilations=list(attrs["dilation"]),
                                    group=attrs["groups"], **window)
        elif op == "dense":
            args = [inputs[0], param["weight"]] + ([param["bias"]] if "bias" in param else [])
            node = helper.make_node("Gemm", args, [out], transB=1)
        elif op == "maxpool2d":
            node = helper.make_node("MaxPool", inputs, [out], ceil_mode=int(attrs["ceil_mode"]),
                                    **window)
        elif op == "avgpool2d":
            node = helper.make_node("AveragePool", inputs, [out],
                                    ceil_mode=int(attrs["ceil_mode"]),
                                    count_include_pad=int(attrs["count_include_pad"]), **window)
        elif op == "batchnorm2d":
            args = [inputs[0], param["weight"], param["bias"], param["running_mean"],
                    param["running_var"]]
            node = helper.make_node("BatchNormalization", args, [out], epsilon=attrs["eps"])
        elif op == "flatten":
            node = helper.make_node("Flatten", inputs, [out], axis=1)
        elif op == "softmax":
            node = helper.make_node("Softmax", inputs, [out], axis=1)
        elif op == "concat":
            node = helper.make_node("Concat", inputs, [out], axis=1)
        elif op == "add":
            node = helper.make_node("Sum", inputs, [out])
        else:
            simple = {"sigmoid": "Sigmoid", "relu": "Relu", "tanh": "Tanh",
                      "global_avgpool2d": "GlobalAveragePool"}
            node = helper.make_node(simple[op], inputs, [out])
        nodes.append(node)
        tensor[name] = out
    model_inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                  ["N", *graph.input_shape])]
    outputs = [helper.make_tensor_value_info(tensor[name], TensorProto.FLOAT,
                                             ["N", *graph.shape(name)]) for name in graph.outputs]
    model = helper.make_model(helper.make_graph(nodes, graph.name, model_inputs, outputs,
                                                initializers),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def make(graph: Graph, threads: int) -> Engine:
    model = to_onnx(graph)
    try:
        import onnxruntime
    except ImportError:
        raise EngineUnavailable("onnxruntime is not installed (pip install 'cnnc[bench]')") \
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
