"""The ONNX op table: one entry per ONNX op type, mapping a node onto cnnc's ops.

Each handler checks the attributes cnnc implements, reads its inputs through the `Importer`
and returns its outputs' values. What exporters emit besides layers (Shape/Gather/Concat
chains for a flatten size, Identity, Dropout, a Pad before a Conv) maps onto nothing or onto
an attribute. An op of the registry without attributes or parameters is read by the generic
handler from its spec's ONNX name; any other needs a handler here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.frontend.onnx_activations import alpha_handler, clip, gelu, mul, per_channel
from cnnc.frontend.onnx_ops import Dims, Handler, Importer, Tensor, Unsupported, Value
from cnnc.util import ceil_div

Node = Any


def _pads(ctx: Importer, node: Node, shape: tuple[int, ...], kernel: list[int],
          strides: list[int], dilations: list[int]) -> list[list[int]]:
    """[[top, bottom], [left, right]] from `pads` or `auto_pad` (SAME_* as ONNX defines)."""
    auto = ctx.attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        sides = []
        for size, k, s, d in zip(shape[1:], kernel, strides, dilations):
            total = max(0, (ceil_div(size, s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            sides.append([small, big] if auto == "SAME_UPPER" else [big, small])
        return sides
    if auto == "VALID":
        return [[0, 0], [0, 0]]
    if auto != "NOTSET":
        raise Unsupported(f"{node.op_type} with auto_pad {auto}")
    pads = list(ctx.attr(node, "pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise Unsupported(f"{node.op_type} with pads {pads}; expected 4 values")
    if min(pads) < 0:
        raise Unsupported(f"{node.op_type} with negative pads {pads}")
    return [[pads[0], pads[2]], [pads[1], pads[3]]]


def _spatial(ctx: Importer, node: Node, name: str, kernel: list[int]) -> list[int]:
    value = list(ctx.attr(node, name, [1] * len(kernel)))
    if len(value) != 2:
        raise Unsupported(f"{node.op_type} with {name} {value}; cnnc works on images (2-D)")
    return value


def conv(ctx: Importer, node: Node, label: str) -> list[Value]:
    weight, weight_name = ctx.weight(node, 1)
    bias, bias_name = ctx.weight(node, 2)
    if weight is None:
        raise Unsupported("Conv without a weight")
    if weight.ndim != 4:
        raise Unsupported(f"Conv over {weight.ndim - 2} spatial dimensions; cnnc convolves "
                          "images (2-D)")
    kernel = list(ctx.attr(node, "kernel_shape", weight.shape[2:]))
    if kernel != list(weight.shape[2:]):
        raise Unsupported(f"kernel_shape {kernel} disagrees with the weight's "
                          f"{list(weight.shape[2:])}")
    strides = _spatial(ctx, node, "strides", kernel)
    dilations = _spatial(ctx, node, "dilations", kernel)
    x = ctx.tensor(node, 0, allow_pad=True)
    padding = _pads(ctx, node, x.shape, kernel, strides, dilations)
    if x.pad is not None:
        padding = [[a + b for a, b in zip(side, extra)] for side, extra in zip(padding, x.pad)]
    attrs = {"out_channels": int(weight.shape[0]), "kernel_size": kernel, "stride": strides,
             "padding": padding, "dilation": dilations, "groups": int(ctx.attr(node, "group", 1)),
             "bias": bias is not None}
    return [ctx.add(label, "conv2d", [Tensor(x.node, x.shape)], attrs,
                    {"weight": (weight, weight_name), "bias": (bias, bias_name)})]


def _pool(op: str) -> Handler:
    def pool(ctx: Importer, node: Node, label: str) -> list[Value]:
        kernel = list(ctx.attr(node, "kernel_shape", []))
        if len(kernel) != 2:
            raise Unsupported(f"{node.op_type} with kernel_shape {kernel}; cnnc pools images")
        strides = _spatial(ctx, node, "strides", kernel)
        dilations = _spatial(ctx, node, "dilations", kernel)
        if dilations != [1, 1]:
            raise Unsupported(f"{node.op_type} with dilations {dilations}; cnnc pools without "
                              "dilation")
        x = ctx.tensor(node, 0)
        attrs: dict[str, Any] = {
            "kernel_size": kernel, "stride": strides,
            "padding": _pads(ctx, node, x.shape, kernel, strides, dilations),
            "ceil_mode": bool(ctx.attr(node, "ceil_mode", 0))}
        if op == "avgpool2d":
            attrs["count_include_pad"] = bool(ctx.attr(node, "count_include_pad", 0))
        return [ctx.add(label, op, [x], attrs)]
    return pool


def _unary(op: str) -> Handler:
    def unary(ctx: Importer, node: Node, label: str) -> list[Value]:
        return [ctx.add(label, op, [ctx.tensor(node, 0)], {})]
    return unary


def batchnorm(ctx: Importer, node: Node, label: str) -> list[Value]:
    if ctx.attr(node, "training_mode", 0):
        raise Unsupported("BatchNormalization in training mode; export the model in eval()")
    if not ctx.attr(node, "spatial", 1):
        raise Unsupported("BatchNormalization with spatial=0")
    params = {key: ctx.weight(node, index) for index, key in
              enumerate(("weight", "bias", "running_mean", "running_var"), start=1)}
    # ONNX keeps a float32: its shortest decimal form is the value the exporter was given
    eps = float(str(np.float32(ctx.attr(node, "epsilon", 1e-5))))
    return [ctx.add(label, "batchnorm2d", [ctx.tensor(node, 0)], {"eps": eps}, params)]


def gemm(ctx: Importer, node: Node, label: str) -> list[Value]:
    if ctx.attr(node, "transA", 0):
        raise Unsupported("Gemm with transA=1; cnnc multiplies [N, F] by a constant")
    weight, weight_name = ctx.weight(node, 1)
    if weight is None or weight.ndim != 2:
        raise Unsupported("Gemm whose B is not a 2-D constant")
    alpha, beta = float(ctx.attr(node, "alpha", 1.0)), float(ctx.attr(node, "beta", 1.0))
    if not ctx.attr(node, "transB", 0):
        weight, weight_name = weight.T, None
    if alpha != 1:
        weight, weight_name = weight * np.float32(alpha), None
    bias, bias_name = ctx.weight(node, 2)
    units = weight.shape[0]
    if bias is not None:
        if bias.size not in (1, units) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            raise Unsupported(f"Gemm with C of shape {list(bias.shape)}; cnnc adds a bias of "
                              f"[{units}]")
        if bias.size != units or bias.ndim != 1:
            bias, bias_name = np.broadcast_to(bias.reshape(-1), (units,)).copy(), None
        if beta != 1:
            bias, bias_name = bias * np.float32(beta), None
        if beta == 0:
            bias = None
    return [_dense(ctx, node, label, weight, weight_name, bias, bias_name)]


def _dense(ctx: Importer, node: Node, label: str, weight: np.ndarray, weight_name: str | None,
           bias: np.ndarray | None, bias_name: str | None) -> Tensor:
    x = ctx.tensor(node, 0)
    if len(x.shape) != 1:
        raise Unsupported(f"{node.op_type} of a [N, {', '.join(map(str, x.shape))}] tensor; "
                          "cnnc multiplies flat tensors [N, F]")
    return ctx.add(label, "dense", [x], {"units": int(weight.shape[0]), "bias": bias is not None},
                   {"weight": (weight, weight_name), "bias": (bias, bias_name)})


def matmul(ctx: Importer, node: Node, label: str) -> list[Value]:
    weight, _ = ctx.weight(node, 1)
    if weight is None or weight.ndim != 2:
        raise Unsupported("MatMul whose second operand is not a 2-D constant")
    return [_dense(ctx, node, label, weight.T, None, None, None)]


def add(ctx: Importer, node: Node, label: str) -> list[Value]:
    values = [ctx.value(node, index) for index in range(len(node.input))]
    if all(isinstance(value, Tensor) for value in values):
        return [ctx.add(label, "add", [ctx.tensor(node, index) for index in range(len(values))],
                        {})]
    if node.op_type == "Add" and len(values) == 2:
        first = isinstance(values[0], Tensor)
        x, constant = ctx.tensor(node, 0 if first else 1), ctx.const(node, 1 if first else 0)
        assert constant is not None
        if _fold_bias(ctx, node, x, constant, 0 if first else 1):
            return [x]
        shift = per_channel(node, x, constant)
        return [ctx.add(label, "channel_add", [x], {}, {"shift": (shift, None)})]
    raise Unsupported(f"{node.op_type} of constants and tensors")


def _fold_bias(ctx: Importer, node: Node, x: Tensor, constant: np.ndarray, index: int) -> bool:
    """Make `constant` the bias of the bias-free conv2d or dense that computes `x`, when
    nothing else reads that node's output."""
    graph = ctx.graph
    if x.node == "input" or ctx.uses[node.input[index]] != 1 or graph.op(x.node) not in (
            "dense", "conv2d") or graph.attrs(x.node)["bias"]:
        return False
    channels = x.shape[0]
    wanted = [(channels,), (1, channels)] if len(x.shape) == 1 else \
        [(channels, 1, 1), (1, channels, 1, 1)]
    if constant.shape not in wanted or constant.dtype != np.float32:
        return False
    graph.attrs(x.node)["bias"] = True
    graph.params(x.node)["bias"] = np.ascontiguousarray(constant.reshape(-1))
    return True


def softmax(ctx: Importer, node: Node, label: str) -> list[Value]:
    """Softmax and LogSoftmax over axis 1 (before opset 13, over axis 1 and the rest)."""
    op = "log_softmax" if node.op_type == "LogSoftmax" else "softmax"
    x = ctx.tensor(node, 0)
    rank = len(x.shape) + 1
    axis = int(ctx.attr(node, "axis", 1 if ctx.opset < 13 else -1))
    axis = axis + rank if axis < 0 else axis
    if axis != 1 or (ctx.opset < 13 and math.prod(x.shape[1:]) != 1):
        raise Unsupported(f"{node.op_type} over axis {axis} of a rank-{rank} tensor; cnnc's "
                          f"{op} is over axis 1")
    return [ctx.add(label, op, [x], {})]


def flatten(ctx: Importer, node: Node, label: str) -> list[Value]:
    x = ctx.tensor(node, 0)
    axis = int(ctx.attr(node, "axis", 1))
    if axis not in (1, 1 - len(x.shape) - 1):
        raise Unsupported(f"Flatten at axis {axis}; cnnc flattens at axis 1")
    return [_flat(ctx, label, x)]


def _flat(ctx: Importer, label: str, x: Tensor, suffix: str = "") -> Tensor:
    return x if len(x.shape) == 1 else ctx.add(label, "flatten", [x], {}, suffix=suffix)


def reshape(ctx: Importer, node: Node, label: str) -> list[Value]:
    x = ctx.tensor(node, 0)
    target = ctx.value(node, 1)
    if isinstance(target, np.ndarray):
        items: list[int | None] = [int(item) for item in target.reshape(-1)]
    elif isinstance(target, Dims):
        items = list(target.items)
    else:
        raise Unsupported("Reshape to a shape computed from the data")
    if not ctx.attr(node, "allowzero", 0):
        # 0 copies the input's dimension; the first is the batch
        items = [None if position == 0 and item == 0 else item if item != 0 or position == 0
                 else (x.shape[position - 1] if position - 1 < len(x.shape) else 0)
                 for position, item in enumerate(items)]
    features = math.prod(x.shape)
    batch_ok = bool(items) and items[0] in (None, -1, ctx.batch)
    if batch_ok and None not in items[1:]:
        rest = [int(item) for item in items[1:] if item is not None]
        known = [item for item in rest if item != -1]
        if rest.count(-1) == 1 and features % max(math.prod(known), 1) == 0:
            rest = [features // math.prod(known) if item == -1 else item for item in rest]
        if rest == list(x.shape):
            return [x]
        if rest == [features]:
            return [_flat(ctx, label, x)]
    shown = ", ".join("N" if item is None else str(item) for item in items)
    raise Unsupported(f"Reshape of [N, {', '.join(map(str, x.shape))}] to [{shown}]; cnnc "
                      "reshapes only to [N, features] (a flatten)")


def concat(ctx: Importer, node: Node, label: str) -> list[Value]:
    values = [ctx.value(node, index) for index in range(len(node.input))]
    axis = int(ctx.attr(node, "axis", 0))
    if all(isinstance(value, (Dims, np.ndarray)) for value in values):
        items: list[int | None] = []
        for value in values:
            items += list(value.items) if isinstance(value, Dims) else \
                [int(item) for item in np.asarray(value).reshape(-1)]
        return [Dims(tuple(items))]
    tensors = [ctx.tensor(node, index) for index in range(len(values))]
    rank = len(tensors[0].shape) + 1
    if (axis + rank if axis < 0 else axis) != 1:
        raise Unsupported(f"Concat along axis {axis}; cnnc concatenates along axis 1")
    if len(tensors) == 1:
        return [tensors[0]]
    return [ctx.add(label, "concat", tensors, {})]


def identity(ctx: Importer, node: Node, label: str) -> list[Value]:
    value = ctx.value(node, 0)
    if node.op_type == "Dropout" and len(node.input) > 2:
        training = ctx.const(node, 2)
        if training is not None and bool(np.asarray(training).reshape(-1)[0]):
            raise Unsupported("Dropout in training mode; export the model in eval()")
    if value is None:
        raise Unsupported("it has no input")
    if isinstance(value, Tensor):
        ctx.tensor(node, 0)  # refuses an Absent or a pending Pad
    return [value]


def cast(ctx: Importer, node: Node, label: str) -> list[Value]:
    value = ctx.value(node, 0)
    to = int(ctx.attr(node, "to", 0))
    if isinstance(value, Dims):
        return [value]
    if to != ctx.onnx.TensorProto.FLOAT:
        name = ctx.onnx.helper.tensor_dtype_to_string(to).replace("TensorProto.", "").lower()
        raise Unsupported(f"Cast of a tensor to {name}; cnnc computes float32")
    return [ctx.tensor(node, 0)]


def shape(ctx: Importer, node: Node, label: str) -> list[Value]:
    x = ctx.tensor(node, 0, allow_pad=True)
    items: list[int | None] = [None, *x.shape]
    if x.pad is not None:
        items[2:4] = [x.shape[1] + sum(x.pad[0]), x.shape[2] + sum(x.pad[1])]
    start, end = ctx.attr(node, "start", 0), ctx.attr(node, "end", None)
    return [Dims(tuple(items[slice(start, end)]))]


def gather(ctx: Importer, node: Node, label: str) -> list[Value]:
    data, indices = ctx.value(node, 0), ctx.const(node, 1)
    if not isinstance(data, Dims) or indices is None or ctx.attr(node, "axis", 0) != 0:
        raise Unsupported("Gather of a tensor; cnnc gathers only from a shape")
    picked = tuple(data.items[int(index)] for index in indices.reshape(-1))
    return [_dims_or_array(picked, indices.ndim == 0)]


def _dims_or_array(items: tuple[int | None, ...], scalar: bool) -> Value:
    if None in items:
        return Dims(items, scalar)
    array = np.array(items, np.int64)
    return array.reshape(()) if scalar else array


def _axes(ctx: Importer, node: Node) -> list[int] | None:
    axes = ctx.attr(node, "axes", None)
    if axes is None and len(node.input) > 1:
        constant = ctx.const(node, 1)
        axes = None if constant is None else [int(axis) for axis in constant.reshape(-1)]
    return None if axes is None else list(axes)


def unsqueeze(ctx: Importer, node: Node, label: str) -> list[Value]:
    data = ctx.value(node, 0)
    if isinstance(data, Dims) and data.scalar and _axes(ctx, node) in ([0], [-1]):
        return [Dims(data.items)]
    raise Unsupported("Unsqueeze of a tensor; cnnc unsqueezes only a shape's entries")


def squeeze(ctx: Importer, node: Node, label: str) -> list[Value]:
    data = ctx.value(node, 0)
    axes = _axes(ctx, node)
    if isinstance(data, Dims) and len(data.items) == 1:
        return [Dims(data.items, scalar=True)]
    x = ctx.tensor(node, 0)
    rank = len(x.shape) + 1
    axes = [axis + rank if axis < 0 else axis for axis in (axes or [])]
    if len(x.shape) == 3 and x.shape[1:] == (1, 1) and sorted(axes) == [2, 3]:
        return [_flat(ctx, label, x)]
    raise Unsupported(f"Squeeze of [N, {', '.join(map(str, x.shape))}] at axes {axes}")


def slice_shape(ctx: Importer, node: Node, label: str) -> list[Value]:
    data = ctx.value(node, 0)
    if not isinstance(data, Dims):
        raise Unsupported("Slice of a tensor; cnnc slices only a shape")
    starts, ends = ctx.const(node, 1), ctx.const(node, 2)
    if starts is None or ends is None or len(node.input) > 3 and node.input[3]:
        raise Unsupported("Slice of a shape with axes or steps")
    items = data.items[int(starts.reshape(-1)[0]):int(min(ends.reshape(-1)[0], 1 << 30))]
    return [_dims_or_array(items, False)]


def reduce_mean(ctx: Importer, node: Node, label: str) -> list[Value]:
    x = ctx.tensor(node, 0)
    rank = len(x.shape) + 1
    axes = sorted(axis + rank if axis < 0 else axis for axis in (_axes(ctx, node) or []))
    keep = bool(ctx.attr(node, "keepdims", 1))
    if rank != 4 or axes != [2, 3]:
        raise Unsupported(f"ReduceMean over axes {axes} of a rank-{rank} tensor; cnnc "
                          "averages images over (2, 3)")
    pooled = ctx.add(label, "global_avgpool2d", [x], {})
    return [pooled if keep else _flat(ctx, label, pooled, suffix=".flatten")]


def pad(ctx: Importer, node: Node, label: str) -> list[Value]:
    x = ctx.tensor(node, 0)
    mode = ctx.attr(node, "mode", "constant")
    pads = ctx.attr(node, "pads", None)
    if pads is None:
        constant = ctx.const(node, 1)
        pads = None if constant is None else [int(item) for item in constant.reshape(-1)]
    value = ctx.attr(node, "value", 0.0)
    if len(node.input) > 2 and node.input[2]:
        constant = ctx.const(node, 2)
        value = 0.0 if constant is None or constant.size == 0 else float(constant.reshape(-1)[0])
    if len(node.input) > 3 and node.input[3]:
        raise Unsupported("Pad with axes")
    if mode != "constant" or pads is None or len(pads) != 8 or len(x.shape) != 3:
        raise Unsupported(f"Pad (mode {mode}, pads {pads}); cnnc pads the height and width of "
                          "an image with a constant")
    if any(pads[index] for index in (0, 1, 4, 5)) or min(pads) < 0:
        raise Unsupported(f"Pad with pads {pads}; cnnc pads only the height and width")
    sides = ((pads[2], pads[6]), (pads[3], pads[7]))
    if value != 0:
        return [ctx.add(label, "pad", [x], {"pads": [list(side) for side in sides],
                                            "value": value})]
    # a following Conv takes it into its padding; anything else reads a pad node
    return [Tensor(x.node, x.shape, sides, label)]


def constant(ctx: Importer, node: Node, label: str) -> list[Value]:
    return ctx.fold(node, [])


def _plain(spec: ops.OpSpec) -> bool:
    """An op read by the generic handler: one tensor in, no attributes, no parameters."""
    return spec.onnx is not None and not spec.attrs and spec.max_inputs == 1 and \
        not spec.param_shapes({}, [(1, 1, 1)]) and spec.onnx.constants is None and \
        spec.onnx.nodes is None


# The registry's plain ops first; a handler of its own (below) takes precedence.
HANDLERS: dict[str, Handler] = {
    **{spec.onnx.op_type: _unary(spec.name) for spec in ops.OPS.values()
       if spec.onnx is not None and _plain(spec)},
    "Constant": constant,
    "Conv": conv,
    "Gemm": gemm,
    "MatMul": matmul,
    "MaxPool": _pool("maxpool2d"),
    "AveragePool": _pool("avgpool2d"),
    "BatchNormalization": batchnorm,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    "LeakyRelu": alpha_handler("leaky_relu", {"alpha": 0.01}),
    "Elu": alpha_handler("elu", {"alpha": 1.0}),
    "HardSigmoid": alpha_handler("hardsigmoid", {"alpha": 0.2, "beta": 0.5}),
    "Clip": clip,
    "Gelu": gelu,
    "Mul": mul,
    "Div": mul,
    "Sub": mul,
    "Flatten": flatten,
    "Reshape": reshape,
    "Add": add,
    "Sum": add,
    "Concat": concat,
    "Identity": identity,
    "Dropout": identity,
    "Cast": cast,
    "Shape": shape,
    "Gather": gather,
    "Unsqueeze": unsqueeze,
    "Squeeze": squeeze,
    "Slice": slice_shape,
    "ReduceMean": reduce_mean,
    "Pad": pad,
}
