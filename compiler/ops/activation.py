"""The activations exported CNNs use beyond sigmoid, relu and tanh, and the per-channel scale
and shift by a constant that a folded batch norm or a `Scale` leaves.

Each is elementwise and lowers by one kernel-IR expression built from what every backend
already has (+ - * /, max, exp): min is a max of negations, erf a rational-exp approximation.
No lowering here may compare floats (the IR has no float comparison).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnc.kernel import Bin, Call, Const, Expr, Select, maximum
from cnnc.ops.elementwise import pointwise_gradient, positive
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
)

# The reference's erf is the C library's, element by element, in float64: NumPy has none, and
# the core does not depend on SciPy.
_ERF = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.asarray(_ERF(x), dtype=np.float64)


def minimum(left: Expr, right: Expr) -> Expr:
    """min(a, b) = -max(-a, -b): NaN-propagating as `maximum` is."""
    return Const(0.0) - maximum(Const(0.0) - left, Const(0.0) - right)


def _clamp(x: Expr, low: float, high: float) -> Expr:
    return minimum(maximum(x, Const(low)), Const(high))


def _nan_at_minus_infinity(x: Expr) -> Expr:
    """0, or NaN where x = -inf: the reference's -inf * 0 there, which the backends' exp
    (clamped on the CPU, exact on a GPU) would not agree on by themselves."""
    negative = minimum(x, Const(0.0))
    return negative - negative


def _sigmoid_of(x: Expr) -> Expr:
    return Const(1.0) / (Call("exp", Const(0.0) - x) + 1.0)


# erfc(a) for a >= 0 as t * exp(-a^2 + P(t)), t = 1 / (1 + a / 2): fractional error below
# 1.2e-7 everywhere (Numerical Recipes' erfcc, after Chebyshev).
_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
         -1.13520398, 1.48851587, -0.82215223, 0.17087277)
_SIGN_SCALE = 1e30  # sign(z) as clamp(z * 1e30, -1, 1): exact but for |z| < 1e-30


def _one_plus_erf(z: Expr) -> Expr:
    """1 + erf(z) = 2 - erfc(|z|) for z >= 0 and erfc(|z|) below, chosen without a compare."""
    size = maximum(z, Const(0.0) - z)
    t = Const(1.0) / (size * 0.5 + 1.0)
    poly: Expr = Const(_ERFC[-1])
    for coefficient in reversed(_ERFC[:-1]):
        poly = poly * t + coefficient
    erfc = t * Call("exp", poly - size * size)
    sign = _clamp(z * _SIGN_SCALE, -1.0, 1.0)
    return Const(1.0) + sign * (Const(1.0) - erfc)


_GELU_TANH = math.sqrt(2.0 / math.pi)


def _lower_gelu(xs: list[Expr], attrs: Attrs) -> Expr:
    x = xs[0]
    if attrs.get("approximate", "none") == "tanh":
        # 0.5 x (1 + tanh u) = x * sigmoid(2u): no cancellation for negative x
        inner = (x + x * x * x * 0.044715) * (2.0 * _GELU_TANH)
        return x * _sigmoid_of(inner) + _nan_at_minus_infinity(x)
    return x * _one_plus_erf(x * (1.0 / math.sqrt(2.0))) * 0.5


def _gelu(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    if attrs.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(_GELU_TANH * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2.0)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + small), small / (1 + small))


def _lower_leaky(xs: list[Expr], attrs: Attrs) -> Expr:
    x = xs[0]
    return maximum(x, Const(0.0)) + minimum(x, Const(0.0)) * attrs.get("alpha", 0.01)


def _lower_clip(xs: list[Expr], attrs: Attrs) -> Expr:
    value = xs[0]
    if attrs.get("min") is not None:
        value = maximum(value, Const(attrs["min"]))
    if attrs.get("max") is not None:
        value = minimum(value, Const(attrs["max"]))
    return value


def _clip(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    value = xs[0]
    if attrs.get("min") is not None:
        value = np.maximum(value, attrs["min"])
    if attrs.get("max") is not None:
        value = np.minimum(value, attrs["max"])
    return value


def _lower_hardsigmoid(xs: list[Expr], attrs: Attrs) -> Expr:
    return _clamp(xs[0] * attrs["alpha"] + attrs["beta"], 0.0, 1.0)


def _lower_elu(xs: list[Expr], attrs: Attrs) -> Expr:
    x = xs[0]
    return maximum(x, Const(0.0)) + (Call("exp", minimum(x, Const(0.0))) - 1.0) * attrs["alpha"]


def _per_element_times(cost: int) -> Any:
    return lambda attrs, shapes, out: cost * math.prod(out)


def _draw_alpha(low: float, high: float) -> Any:
    def draw(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
        return {"alpha": float(np.float32(rng.uniform(low, high)))} if rng.random() < 0.6 else {}
    return draw


def _draw_clip(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    low = float(np.float32(rng.uniform(-2.0, 0.5)))
    attrs: Attrs = {}
    if rng.random() < 0.8:
        attrs["min"] = low
    if rng.random() < 0.8:
        attrs["max"] = float(np.float32(low + rng.uniform(0.0, 3.0)))
    return attrs


def _draw_gelu(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    return {"approximate": "tanh"} if rng.random() < 0.5 else {}


def _channel_param(attrs: Attrs, shapes: list[Shape], name: str) -> dict[str, Shape]:
    """One value per channel of an image ([C, 1, 1], as ONNX broadcasts it) or per feature."""
    shape = shapes[0]
    if len(shape) not in (1, 3):
        raise ShapeError(f"expects [C, H, W] or [features], got {list(shape)}")
    return {name: (shape[0], 1, 1) if len(shape) == 3 else (shape[0],)}


def _broadcast(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    return values.astype(np.float64).reshape(1, -1, *([1] * (x.ndim - 2)))


def _draw_channel_values(name: str) -> Any:
    def draw(rng: np.random.Generator, shapes: dict[str, Shape]) -> dict[str, np.ndarray]:
        return {name: rng.normal(0.0, 1.0, shapes[name])}
    return draw


def _gelu_slope(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    if attrs.get("approximate", "none") == "tanh":
        inner = _GELU_TANH * (x + 0.044715 * x**3)
        tanh = np.tanh(inner)
        return 0.5 * (1 + tanh) + 0.5 * x * (1 - tanh**2) * _GELU_TANH * (1 + 3 * 0.044715 * x**2)
    return 0.5 * (1 + _erf(x / math.sqrt(2.0))) + x * np.exp(-x * x / 2) / math.sqrt(
        2 * math.pi)


def _slope_rule(slope: Any) -> GradientRule:
    """The rule of an activation whose derivative `slope(x, attrs)` reads its attributes;
    at a kink it takes PyTorch's side (clamp passes the bounds, hardtanh does not)."""
    def vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
            grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
        return [grad_out * slope(xs[0], attrs)], {}
    return GradientRule(vjp)


def _inside(x: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """1 where clamp(x, low, high) passes x through (bounds included, as torch.clamp)."""
    low = -np.inf if low is None else low
    high = np.inf if high is None else high
    return ((x >= low) & (x <= high)).astype(np.float64)


# In training mode dropout reads its mask (0 or 1/(1-p), made on the host by
# `cnnc.dropout.dropout_masks`) as a second operand after x, which `reference_backward`
# appends. An operand, not a reserved key of `params` or `attrs`: it is a per-batch array
# like x, not a trained parameter nor a setting of the layer, and the compiled trainer takes
# it as an input array too; the vector-Jacobian product already receives the operands.
def _dropout_mask(xs: list[np.ndarray]) -> np.ndarray:
    if len(xs) != 2 or xs[1].shape != xs[0].shape:
        raise ValueError("dropout in training mode needs its mask, of the input's shape, as a "
                         "second operand (cnnc.dropout.dropout_masks makes it)")
    return xs[1]


def _dropout_training(attrs: Attrs, params: Params, xs: list[np.ndarray]
                      ) -> tuple[np.ndarray, Params]:
    return xs[0] * _dropout_mask(xs), {}


def _dropout_training_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                          grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    return [grad_out * _dropout_mask(xs)], {}  # the mask is data: it gets no gradient


def _channel_mul_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                     grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    x, scale = xs[0], params["scale"]
    axes = (0, *range(2, x.ndim))
    return [grad_out * _broadcast(scale, x)], {
        "scale": (grad_out * x).sum(axis=axes).reshape(scale.shape)}


def _channel_add_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                     grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    axes = (0, *range(2, xs[0].ndim))
    return [grad_out.copy()], {"shift": grad_out.sum(axis=axes).reshape(params["shift"].shape)}


SPECS = (
    OpSpec(
        "leaky_relu", "elementwise", attrs=(Attr("alpha", "number", default=0.01),),
        compute=lambda attrs, params, xs: np.where(xs[0] > 0, xs[0], xs[0] * attrs["alpha"]),
        lower=_lower_leaky, lower_attrs=True, flops=_per_element_times(2),
        onnx=OnnxForm("LeakyRelu", lambda attrs: {"alpha": attrs["alpha"]}),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.leaky_relu(
            xs[0], attrs["alpha"]),
        fuzz=FuzzForm(image=0.2, flat=0.2, draw=_draw_alpha(-0.5, 1.5)),
        gradient=_slope_rule(lambda x, attrs: np.where(x > 0, 1.0, attrs["alpha"])),
    ),
    OpSpec(
        "relu6", "elementwise", compute=lambda attrs, params, xs: np.clip(xs[0], 0.0, 6.0),
        activation=True, lower=lambda xs: _clamp(xs[0], 0.0, 6.0), flops=_per_element_times(2),
        onnx=OnnxForm("Clip", constants=lambda attrs: (np.float32(0.0), np.float32(6.0))),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.relu6(xs[0]),
        fuzz=FuzzForm(image=0.2, flat=0.2),
        gradient=pointwise_gradient(
            lambda x, out: ((x > 0) & (x < 6)).astype(np.float64),
            lambda x, out, g, attrs: Select(Bin("and", positive(out), Bin("<", out, Const(6.0))),
                                            g, Const(0.0))),
    ),
    OpSpec(
        "clip", "elementwise",
        attrs=(Attr("min", "number", default=None, help="the lower bound"),
               Attr("max", "number", default=None, help="the upper bound")),
        compute=_clip, lower=_lower_clip, lower_attrs=True, flops=_per_element_times(2),
        onnx=OnnxForm("Clip", constants=lambda attrs: (
            None if attrs.get("min") is None else np.float32(attrs["min"]),
            None if attrs.get("max") is None else np.float32(attrs["max"]))),
        torch=lambda torch, attrs, params, xs: torch.clamp(xs[0], attrs.get("min"),
                                                           attrs.get("max")),
        fuzz=FuzzForm(image=0.2, flat=0.2, draw=_draw_clip),
        gradient=_slope_rule(lambda x, attrs: _inside(x, attrs.get("min"), attrs.get("max"))),
    ),
    OpSpec(
        "hardsigmoid", "elementwise",
        attrs=(Attr("alpha", "number", default=1 / 6), Attr("beta", "number", default=0.5)),
        compute=lambda attrs, params, xs: np.clip(xs[0] * attrs["alpha"] + attrs["beta"], 0, 1),
        lower=_lower_hardsigmoid, lower_attrs=True, flops=_per_element_times(3),
        onnx=OnnxForm("HardSigmoid", lambda attrs: {"alpha": attrs["alpha"],
                                                    "beta": attrs["beta"]}),
        torch=lambda torch, attrs, params, xs: torch.clamp(
            xs[0] * attrs["alpha"] + attrs["beta"], 0.0, 1.0),
        fuzz=FuzzForm(image=0.2, flat=0.2, draw=_draw_alpha(0.05, 1.0)),
        gradient=_slope_rule(lambda x, attrs: attrs["alpha"] * _inside(
            x * attrs["alpha"] + attrs["beta"], 0.0, 1.0)),
    ),
    OpSpec(
        "hardswish", "elementwise",
        compute=lambda attrs, params, xs: xs[0] * np.clip(xs[0] + 3.0, 0.0, 6.0) / 6.0,
        activation=True, lower=lambda xs: xs[0] * _clamp(xs[0] + 3.0, 0.0, 6.0) / 6.0,
        flops=_per_element_times(4), onnx=OnnxForm("HardSwish"),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.hardswish(xs[0]),
        fuzz=FuzzForm(image=0.2, flat=0.2),
        gradient=pointwise_gradient(
            lambda x, out: np.where(x < -3, 0.0, np.where(x <= 3, x / 3 + 0.5, 1.0)),
            lambda x, out, g, attrs: Select(Bin("<", x, Const(-3.0)), Const(0.0), Select(
                Bin("<=", x, Const(3.0)), g * (x / 3.0 + 0.5), g))),
    ),
    OpSpec(
        "elu", "elementwise", attrs=(Attr("alpha", "number", default=1.0),),
        compute=lambda attrs, params, xs: np.where(xs[0] > 0, xs[0],
                                                   attrs["alpha"] * np.expm1(xs[0])),
        lower=_lower_elu, lower_attrs=True, flops=_per_element_times(5),
        onnx=OnnxForm("Elu", lambda attrs: {"alpha": attrs["alpha"]}),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.elu(xs[0], attrs["alpha"]),
        fuzz=FuzzForm(image=0.2, flat=0.2, draw=_draw_alpha(0.1, 2.0)),
        gradient=_slope_rule(lambda x, attrs: np.where(
            x > 0, 1.0, attrs["alpha"] * np.exp(np.minimum(x, 0)))),
    ),
    OpSpec(
        "gelu", "elementwise",
        attrs=(Attr("approximate", "choice", default="none", choices=("none", "tanh")),),
        compute=_gelu, lower=_lower_gelu, lower_attrs=True, flops=_per_element_times(20),
        onnx=OnnxForm("Gelu", lambda attrs: {"approximate": attrs["approximate"]}),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.gelu(
            xs[0], approximate=attrs["approximate"]),
        fuzz=FuzzForm(image=0.2, flat=0.2, draw=_draw_gelu),
        gradient=_slope_rule(_gelu_slope),
    ),
    OpSpec(
        "silu", "elementwise", compute=lambda attrs, params, xs: xs[0] * _sigmoid(xs[0]),
        activation=True, flops=_per_element_times(5),
        lower=lambda xs: xs[0] * _sigmoid_of(xs[0]) + _nan_at_minus_infinity(xs[0]),
        onnx=OnnxForm("Sigmoid", nodes=lambda helper, name, inputs, attrs: [
            helper.make_node("Sigmoid", inputs, [f"{name}.sigmoid"], f"{name}.sigmoid"),
            helper.make_node("Mul", [inputs[0], f"{name}.sigmoid"], [name], name)]),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.silu(xs[0]),
        fuzz=FuzzForm(image=0.2, flat=0.2),
        gradient=pointwise_gradient(lambda x, out: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
    ),
    OpSpec(
        "identity", "elementwise", compute=lambda attrs, params, xs: xs[0],
        lower=lambda xs: xs[0], flops=lambda attrs, shapes, out: 0,
        onnx=OnnxForm("Identity"), torch=lambda torch, attrs, params, xs: xs[0],
        fuzz=FuzzForm(image=0.05, flat=0.05),
        gradient=pointwise_gradient(lambda x, out: np.ones_like(x)),
    ),
    OpSpec(
        "dropout", "elementwise", attrs=(Attr("p", "number", default=0.5),),
        compute=lambda attrs, params, xs: xs[0], lower=lambda xs: xs[0],
        flops=lambda attrs, shapes, out: 0,
        onnx=OnnxForm("Dropout", constants=lambda attrs: (np.float32(attrs["p"]),)),
        torch=lambda torch, attrs, params, xs: xs[0],
        fuzz=FuzzForm(image=0.2, flat=0.2),
        gradient=GradientRule(pointwise_gradient(lambda x, out: np.ones_like(x)).vjp,
                              _dropout_training, _dropout_training_vjp),
    ),
    OpSpec(
        "channel_mul", "elementwise",
        param_shapes=lambda attrs, shapes: _channel_param(attrs, shapes, "scale"),
        compute=lambda attrs, params, xs: xs[0] * _broadcast(params["scale"], xs[0]),
        lower=lambda xs: xs[0] * xs[1],
        channel_params=lambda attrs, params: (params["scale"].reshape(-1),),
        onnx=OnnxForm("Mul", params=("scale",)),
        torch=lambda torch, attrs, params, xs: xs[0] * params["scale"],
        fuzz=FuzzForm(image=0.2, flat=0.2, params=_draw_channel_values("scale")),
        gradient=GradientRule(_channel_mul_vjp),
    ),
    OpSpec(
        "channel_add", "elementwise",
        param_shapes=lambda attrs, shapes: _channel_param(attrs, shapes, "shift"),
        compute=lambda attrs, params, xs: xs[0] + _broadcast(params["shift"], xs[0]),
        lower=lambda xs: xs[0] + xs[1],
        channel_params=lambda attrs, params: (params["shift"].reshape(-1),),
        onnx=OnnxForm("Add", params=("shift",)),
        torch=lambda torch, attrs, params, xs: xs[0] + params["shift"],
        fuzz=FuzzForm(image=0.2, flat=0.2, params=_draw_channel_values("shift")),
        gradient=GradientRule(_channel_add_vjp),
    ),
)
