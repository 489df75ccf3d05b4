"""The elementwise family: activations, inference batch norm and the sum of tensors.

Each lowers by one expression over its operands' values at a point (`OpSpec.lower`), so it
fuses into the kernel that computes its input. An op added here is lowered, fuzzed, profiled,
exported to ONNX and run by the PyTorch engine with no other edit.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from cnnc.kernel import Bin, Call, Const, Expr, Select, less, maximum
from cnnc.ops.spec import (
    Attr,
    Attrs,
    FuzzForm,
    FuzzLimits,
    GradientRule,
    OnnxForm,
    OpSpec,
    Params,
    Shape,
    ShapeError,
    dims,
    need_image,
)


def _batchnorm_params(attrs: Attrs, shapes: list[Shape]) -> dict[str, Shape]:
    channels = need_image(shapes[0])[0]
    return {name: (channels,) for name in ("weight", "bias", "running_mean", "running_var")}


def batchnorm_scale_shift(attrs: Attrs, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Inference batch norm as y = x * scale + shift, per channel, in float64."""
    p = {name: value.astype(np.float64) for name, value in params.items()}
    scale = p["weight"] / np.sqrt(p["running_var"] + attrs["eps"])
    return scale, p["bias"] - p["running_mean"] * scale


def batchnorm_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    scale, shift = batchnorm_scale_shift(attrs, params)
    return xs[0] * scale[None, :, None, None] + shift[None, :, None, None]


BATCHNORM_MOMENTUM = 0.1  # PyTorch's default; the model format has no attribute for it yet
_CHANNELS = (0, 2, 3)  # the axes batch statistics reduce over


def _per_channel(values: np.ndarray) -> np.ndarray:
    return values[None, :, None, None]


def _batch_statistics(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The batch's mean and biased variance per channel, and x normalised by them."""
    if x.size // x.shape[1] < 2:
        raise ShapeError("batchnorm2d in training mode needs more than one value per channel")
    mean, var = x.mean(axis=_CHANNELS), x.var(axis=_CHANNELS)
    return mean, var, (x - _per_channel(mean)) / _per_channel(np.sqrt(var + eps))


def batchnorm_training_forward(attrs: Attrs, params: Params, xs: list[np.ndarray]
                               ) -> tuple[np.ndarray, Params]:
    """Batch norm over the batch's statistics, and the running statistics it leaves:
    PyTorch's momentum update, with the unbiased variance."""
    p = {name: value.astype(np.float64) for name, value in params.items()}
    mean, var, normalised = _batch_statistics(xs[0], attrs["eps"])
    count = xs[0].size // xs[0].shape[1]
    momentum = attrs.get("momentum", BATCHNORM_MOMENTUM)
    out = normalised * _per_channel(p["weight"]) + _per_channel(p["bias"])
    return out, {
        "running_mean": (1 - momentum) * p["running_mean"] + momentum * mean,
        "running_var": (1 - momentum) * p["running_var"] + momentum * var * count / (count - 1),
    }


def batchnorm_training_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                           grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    """The gradient through the batch statistics too: every value of a channel moves its
    mean and variance."""
    _, var, normalised = _batch_statistics(xs[0], attrs["eps"])
    count = xs[0].size // xs[0].shape[1]
    grad_bias = grad_out.sum(axis=_CHANNELS)
    grad_weight = (grad_out * normalised).sum(axis=_CHANNELS)
    scale = params["weight"].astype(np.float64) / np.sqrt(var + attrs["eps"])
    grad_x = _per_channel(scale) * (grad_out - _per_channel(grad_bias / count)
                                    - normalised * _per_channel(grad_weight / count))
    return [grad_x], {"weight": grad_weight, "bias": grad_bias}


def batchnorm_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                  grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    """Eval mode: an affine map per channel over the running statistics."""
    scale, _ = batchnorm_scale_shift(attrs, params)
    std = np.sqrt(params["running_var"].astype(np.float64) + attrs["eps"])
    normalised = (xs[0] - _per_channel(params["running_mean"].astype(np.float64))) \
        / _per_channel(std)
    return [grad_out * _per_channel(scale)], {
        "weight": (grad_out * normalised).sum(axis=_CHANNELS),
        "bias": grad_out.sum(axis=_CHANNELS)}


def pointwise_gradient(derivative: Callable[[np.ndarray, np.ndarray], np.ndarray],
                       lower: Callable[[Expr, Expr, Expr, Attrs], Expr] | None = None
                       ) -> GradientRule:
    """The rule of a one-input elementwise op from its derivative at (input, output), and
    `lower`, the input's gradient (input, output, gradient, attrs) -> Expr in the kernel IR."""
    def vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
            grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
        return [grad_out * derivative(xs[0], out)], {}

    return GradientRule(vjp, lower=lower)


def positive(x: Expr) -> Expr:
    """0 < x, a condition of the kernel IR."""
    return Bin("<", Const(0.0), x)


def _add_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
             grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    return [grad_out.copy() for _ in xs], {}


def _image_only(attrs: Attrs, shapes: list[Shape]) -> Shape:
    need_image(shapes[0])
    return shapes[0]


def _same_shapes(attrs: Attrs, shapes: list[Shape]) -> Shape:
    for shape in shapes[1:]:
        if shape != shapes[0]:
            raise ShapeError(
                f"operands must have one shape, got [{dims(shapes[0])}] and [{dims(shape)}]"
            )
    return shapes[0]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| never overflows, so neither branch warns for inputs of any size.
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + small), small / (1 + small))


def _lower_sigmoid(xs: list[Expr]) -> Expr:
    return Const(1.0) / (Call("exp", Const(0.0) - xs[0]) + 1.0)


# Below this |x|, tanh is its Taylor polynomial to x^9 (relative error under 1e-11 there).
TANH_SERIES_BOUND = 0.125


def _lower_tanh(xs: list[Expr]) -> Expr:
    # 1 - 2 / (e^2x + 1) saturates to +-1 instead of overflowing, but cancels near 0: it
    # gives tanh(1e-8) = 0, which a relu after it takes for "off", and its gradient is lost.
    x = xs[0]
    square = x * x
    series = x * (square * (square * (square * (square * (62 / 2835) - 17 / 315) + 2 / 15)
                            - 1 / 3) + 1.0)
    formula = Const(1.0) - Const(2.0) / (Call("exp", x * 2.0) + 1.0)
    return Select(less(square, Const(TANH_SERIES_BOUND**2)), series, formula)


def _torch_batchnorm(torch: Any, attrs: Attrs, params: dict[str, Any], xs: list[Any]) -> Any:
    return torch.nn.functional.batch_norm(xs[0], params["running_mean"], params["running_var"],
                                          params["weight"], params["bias"], False, 0.0,
                                          attrs["eps"])


def _draw_batchnorm(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    attrs: Attrs = {}
    if rng.random() < 0.4:
        attrs["eps"] = float(rng.choice([1e-5, 1e-3, 0.1, 1.0, 1e-9]))
    return attrs


def _draw_batchnorm_params(rng: np.random.Generator, shapes: dict[str, Shape]
                           ) -> dict[str, np.ndarray]:
    """Statistics a trained network could have; one in ten with a variance near zero."""
    channels = shapes["weight"]
    values = {"weight": rng.normal(1.0, 0.5, channels), "bias": rng.normal(0.0, 0.5, channels),
              "running_mean": rng.normal(0.0, 1.0, channels),
              "running_var": rng.uniform(0.05, 4.0, channels)}
    if rng.random() < 0.1:
        values["running_var"] = rng.uniform(0.0, 1e-3, channels)
    return values


def _per_element_times(cost: int) -> Callable[[Attrs, list[Shape], Shape], int]:
    return lambda attrs, shapes, out: cost * math.prod(out)


SPECS = (
    OpSpec(
        "batchnorm2d", "elementwise", attrs=(Attr("eps", "float", default=1e-5),),
        infer=_image_only, param_shapes=_batchnorm_params, compute=batchnorm_reference,
        lower=lambda xs: xs[0] * xs[1] + xs[2], channel_params=batchnorm_scale_shift,
        onnx=OnnxForm("BatchNormalization", lambda attrs: {"epsilon": attrs["eps"]},
                      params=("weight", "bias", "running_mean", "running_var")),
        torch=_torch_batchnorm,
        fuzz=FuzzForm(image=1.2, draw=_draw_batchnorm, params=_draw_batchnorm_params),
        gradient=GradientRule(batchnorm_vjp, batchnorm_training_forward, batchnorm_training_vjp,
                              buffers=("running_mean", "running_var")),
    ),
    OpSpec(
        "sigmoid", "elementwise", compute=lambda attrs, params, xs: _sigmoid(xs[0]),
        activation=True, lower=_lower_sigmoid, flops=_per_element_times(4),
        onnx=OnnxForm("Sigmoid"), torch=lambda torch, attrs, params, xs: torch.sigmoid(xs[0]),
        fuzz=FuzzForm(image=0.8, flat=0.8),
        gradient=pointwise_gradient(lambda x, out: out * (1 - out),
                                    lambda x, out, g, attrs: g * (Const(1.0) - out) * out),
    ),
    OpSpec(
        "relu", "elementwise", compute=lambda attrs, params, xs: np.maximum(xs[0], 0),
        activation=True, lower=lambda xs: maximum(xs[0], Const(0.0)),
        onnx=OnnxForm("Relu"), torch=lambda torch, attrs, params, xs: torch.relu(xs[0]),
        fuzz=FuzzForm(image=0.8, flat=0.8),
        gradient=pointwise_gradient(lambda x, out: (x > 0).astype(np.float64),
                                    lambda x, out, g, attrs: Select(positive(out), g,
                                                                    Const(0.0))),
    ),
    OpSpec(
        "tanh", "elementwise", compute=lambda attrs, params, xs: np.tanh(xs[0]),
        activation=True, lower=_lower_tanh, flops=_per_element_times(4),
        onnx=OnnxForm("Tanh"), torch=lambda torch, attrs, params, xs: torch.tanh(xs[0]),
        fuzz=FuzzForm(image=0.8, flat=0.8),
        gradient=pointwise_gradient(lambda x, out: 1 - out**2,
                                    lambda x, out, g, attrs: g * (Const(1.0) - out * out)),
    ),
    OpSpec(
        "add", "elementwise", min_inputs=2, max_inputs=64, infer=_same_shapes,
        compute=lambda attrs, params, xs: sum(xs[1:], xs[0]),
        lower=lambda xs: functools.reduce(operator.add, xs),
        onnx=OnnxForm("Add", many="Sum"),
        torch=lambda torch, attrs, params, xs: sum(xs[1:], xs[0]),
        fuzz=FuzzForm(image=1.3, flat=1.0, joins=lambda shape, other: other == shape),
        gradient=GradientRule(_add_vjp),
    ),
)
