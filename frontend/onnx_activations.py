"""The ONNX handlers of the activations with attributes (LeakyRelu, Elu, HardSigmoid, Clip,
Gelu) and of Mul, Div and Sub: by a constant per channel, or x * Sigmoid(x) as a SiLU.

Part of the ONNX op table (`onnx_table.HANDLERS`); each reads its node through the `Importer`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnc.frontend.onnx_ops import Handler, Importer, Tensor, Unsupported, Value

Node = Any


def per_channel(node: Node, x: Tensor, constant: np.ndarray) -> np.ndarray:
    """A constant that broadcasts against [N, *x.shape] per channel (or is one value), as
    one value per channel: [C, 1, 1] for an image, [F] for a flat tensor."""
    rank = len(x.shape) + 1
    aligned = (1,) * (rank - constant.ndim) + tuple(constant.shape)
    channels = x.shape[0]
    if constant.ndim > rank or aligned[0] != 1 or any(dim != 1 for dim in aligned[2:]) \
            or aligned[1] not in (1, channels):
        raise Unsupported(f"{node.op_type} by a constant of shape {list(constant.shape)}; cnnc "
                          f"takes one value per channel of [N, {', '.join(map(str, x.shape))}]")
    if constant.dtype != np.float32:
        raise Unsupported(f"{constant.dtype} constant: cnnc computes float32")
    values = np.broadcast_to(constant.reshape(aligned)[0].reshape(-1), (channels,))
    return values.reshape((channels, 1, 1) if rank == 4 else (channels,)).copy()


def _tensor_and_constant(ctx: Importer, node: Node) -> tuple[Tensor, np.ndarray, bool] | None:
    """The tensor and the constant of a binary node (and whether the tensor comes first),
    or None when both are tensors."""
    values = [ctx.value(node, index) for index in range(2)]
    if all(isinstance(value, Tensor) for value in values):
        return None
    first = isinstance(values[0], Tensor)
    constant = ctx.const(node, 1 if first else 0)
    if constant is None:
        raise Unsupported("it has no second operand")
    return ctx.tensor(node, 0 if first else 1), constant, first


def mul(ctx: Importer, node: Node, label: str) -> list[Value]:
    """Mul by a constant per channel, Div or Sub by one (x / c as x * (1 / c)), and the
    x * Sigmoid(x) of a SiLU."""
    pair = _tensor_and_constant(ctx, node)
    if pair is None:
        if node.op_type == "Mul":
            return [_silu(ctx, node, label)]
        raise Unsupported(f"{node.op_type} of two tensors; cnnc computes it only by a constant")
    x, constant, first = pair
    values = per_channel(node, x, constant)
    if node.op_type == "Mul":
        return [ctx.add(label, "channel_mul", [x], {}, {"scale": (values, None)})]
    if not first:
        raise Unsupported(f"{node.op_type} of a constant by a tensor; cnnc computes only a "
                          "tensor by a constant")
    if node.op_type == "Sub":
        return [ctx.add(label, "channel_add", [x], {}, {"shift": (-values, None)})]
    return [ctx.add(label, "channel_mul", [x], {}, {"scale": (1 / values, None)})]


def _silu(ctx: Importer, node: Node, label: str) -> Tensor:
    """x * Sigmoid(x), with nothing else reading the Sigmoid: one silu node."""
    left, right = ctx.tensor(node, 0), ctx.tensor(node, 1)
    graph = ctx.graph
    for x, gate, name in ((left, right, node.input[1]), (right, left, node.input[0])):
        if gate.node != "input" and graph.op(gate.node) == "sigmoid" and \
                graph.operands(gate.node) == [x.node] and ctx.uses[name] == 1:
            graph.erase(gate.node)
            return ctx.add(label, "silu", [x], {})
    raise Unsupported("Mul of two tensors; cnnc multiplies a tensor only by a constant or by "
                      "its own Sigmoid (SiLU)")


def alpha_handler(op: str, defaults: dict[str, float]) -> Handler:
    """An activation whose ONNX attributes are cnnc's, with ONNX's defaults (HardSigmoid's
    alpha is 0.2 there, 1/6 in PyTorch: the node's value is always read)."""
    def handler(ctx: Importer, node: Node, label: str) -> list[Value]:
        attrs = {key: float(np.float32(ctx.attr(node, key, default)))
                 for key, default in defaults.items()}
        return [ctx.add(label, op, [ctx.tensor(node, 0)], attrs)]
    return handler


def clip(ctx: Importer, node: Node, label: str) -> list[Value]:
    """Clip with constant bounds (inputs since opset 11, attributes before); [0, 6] is relu6."""
    bounds: list[float | None] = []
    for index, name in ((1, "min"), (2, "max")):
        if ctx.opset < 11:
            value = ctx.attr(node, name, None)
        else:
            constant = ctx.const(node, index)
            if constant is not None and constant.size != 1:
                raise Unsupported(f"Clip with a {name} of shape {list(constant.shape)}")
            value = None if constant is None else float(constant.reshape(-1)[0])
        bounds.append(None if value is None else float(value))
    x = ctx.tensor(node, 0)
    if bounds == [0.0, 6.0]:
        return [ctx.add(label, "relu6", [x], {})]
    attrs = {key: value for key, value in zip(("min", "max"), bounds) if value is not None}
    return [ctx.add(label, "clip", [x], attrs)]


def gelu(ctx: Importer, node: Node, label: str) -> list[Value]:
    approximate = ctx.attr(node, "approximate", "none")
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"Gelu with approximate={approximate}")
    return [ctx.add(label, "gelu", [ctx.tensor(node, 0)], {"approximate": approximate})]
