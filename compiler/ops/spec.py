"""The machinery of the op registry: attributes and their checks, and `OpSpec`, the one
record of everything cnnc knows about an op (shape rule, reference, lowering, FLOPs, its ONNX,
torch.nn and fuzzer forms).

The op families (`conv`, `dense`, `pool`, `elementwise`, `shape`) fill it in; nothing here
knows any one op. Shapes are per sample: the batch dimension N is never part of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cnnc.kernel import Expr
from cnnc.util import ceil_div

Shape = tuple[int, ...]
Attrs = dict[str, Any]
Params = dict[str, np.ndarray]
OpKind = Literal["anchor", "elementwise", "window", "view", "opaque"]


class AttrError(ValueError):
    """An attribute's value is wrong; `attr` names it so the frontend can point at its line."""

    def __init__(self, attr: str, message: str) -> None:
        self.attr = attr
        super().__init__(message)


class ShapeError(ValueError):
    """The operands' shapes do not fit the op."""


REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """One attribute: how to check and normalise a value, and its default."""

    name: str
    kind: str  # "int", "pair", "padding", "bool", "float" (> 0), "number", "choice"
    default: Any = REQUIRED
    minimum: int = 1
    help: str = ""
    same_as: str = ""  # when absent, take the value of this other attribute
    choices: tuple[str, ...] = ()  # the values of a "choice"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(attr: Attr, value: Any) -> int:
    if not _is_int(value):
        raise AttrError(attr.name, f"'{attr.name}' must be an integer, got {value!r}")
    if value < attr.minimum:
        raise AttrError(attr.name, f"'{attr.name}' must be >= {attr.minimum}, got {value}")
    if value > 1 << 24:
        raise AttrError(attr.name, f"'{attr.name}' is too large ({value}); at most {1 << 24}")
    return int(value)


def _check_pair(attr: Attr, value: Any) -> tuple[int, int]:
    """An int, or [h, w]."""
    items = value if isinstance(value, list) else [value, value]
    if len(items) != 2 or not all(_is_int(item) for item in items):
        raise AttrError(attr.name, f"'{attr.name}' must be an integer or [h, w], got {value!r}")
    first, second = (_check_int(attr, item) for item in items)
    return first, second


def _check_padding(attr: Attr, value: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """An int, [ph, pw] (both sides of each axis), [[top, bottom], [left, right]], or "same"
    (the output keeps the input's size over the stride; the shape rule resolves it)."""
    expected = "an integer, [ph, pw], [[top, bottom], [left, right]] or \"same\""
    if value == "same":
        return value
    if _is_int(value):
        pad = _check_int(attr, value)
        return (pad, pad), (pad, pad)
    if not isinstance(value, list) or len(value) != 2:
        raise AttrError(attr.name, f"'{attr.name}' must be {expected}, got {value!r}")
    if all(_is_int(item) for item in value):
        ph, pw = (_check_int(attr, item) for item in value)
        return (ph, ph), (pw, pw)
    if all(isinstance(item, list) and len(item) == 2 and all(map(_is_int, item)) for item in value):
        (top, bottom), (left, right) = ([_check_int(attr, v) for v in item] for item in value)
        return (top, bottom), (left, right)
    raise AttrError(attr.name, f"'{attr.name}' must be {expected}, got {value!r}")


def _check_bool(attr: Attr, value: Any) -> bool:
    if not isinstance(value, bool):
        raise AttrError(attr.name, f"'{attr.name}' must be true or false, got {value!r}")
    return value


def _check_float(attr: Attr, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AttrError(attr.name, f"'{attr.name}' must be a number, got {value!r}")
    if value <= 0:
        raise AttrError(attr.name, f"'{attr.name}' must be > 0, got {value}")
    return float(value)


def _check_number(attr: Attr, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AttrError(attr.name, f"'{attr.name}' must be a finite number, got {value!r}")
    return float(value)


def _check_choice(attr: Attr, value: Any) -> str:
    if value not in attr.choices:
        raise AttrError(attr.name, f"'{attr.name}' must be one of "
                        f"{', '.join(attr.choices)}, got {value!r}")
    return str(value)


_CHECKERS: dict[str, Callable[[Attr, Any], Any]] = {
    "int": _check_int,
    "pair": _check_pair,
    "padding": _check_padding,
    "bool": _check_bool,
    "float": _check_float,
    "number": _check_number,
    "choice": _check_choice,
}


@dataclass(frozen=True)
class WindowRule:
    """How a window op lowers: a reduction from `init` with `combine`, divided by the window's
    size when `average`; `whole_image` windows cover the input (global pooling)."""

    init: float
    combine: Callable[[Expr, Expr], Expr]
    average: bool = False
    whole_image: bool = False


@dataclass(frozen=True)
class OnnxForm:
    """The ONNX node an op is written as, and read back from. `params` are the initializers
    after the tensor inputs, in ONNX's order; `many` is the op type for more than two inputs.
    An op without attributes or parameters is imported by a generic handler."""

    op_type: str
    attrs: Callable[[Attrs], dict[str, Any]] = field(default=lambda attrs: {})
    params: tuple[str, ...] = ()
    many: str = ""
    # constant inputs after the params (Clip's min and max, Pad's pads), from the attributes
    constants: Callable[[Attrs], tuple[np.ndarray | None, ...]] | None = None
    # a form of several nodes: (onnx.helper, output name, inputs, attrs) -> the nodes
    nodes: Callable[[Any, str, list[str], Attrs], list[Any]] | None = None


@dataclass(frozen=True)
class FuzzLimits:
    """What the fuzzer allows a drawn layer: channels of an image, features of a flat tensor."""

    max_channels: int
    max_features: int


# attrs for one layer reading `shape`, or None to draw nothing (the random draws happen anyway)
AttrDraw = Callable[[np.random.Generator, Shape, FuzzLimits], "Attrs | None"]
ParamDraw = Callable[[np.random.Generator, dict[str, Shape]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class FuzzForm:
    """How the fuzzer draws an op: its weight among image ([C, H, W]) and flat inputs, its
    attributes, the other operands it may join (same shape, or same but channels), and its
    parameters when the fuzzer's generic weight styles do not fit."""

    image: float = 0.0
    flat: float = 0.0
    draw: AttrDraw = field(default=lambda rng, shape, limits: {})
    joins: Callable[[Shape, Shape], bool] | None = None
    params: ParamDraw | None = None


# A vector-Jacobian product: (attrs, params, inputs, output, gradient of the output) ->
# (gradients of the inputs, in order; gradients of the trained parameters, by name).
VJP = Callable[[Attrs, Params, list[np.ndarray], np.ndarray, np.ndarray],
               tuple[list[np.ndarray], Params]]
# A forward pass in training mode: (attrs, params, inputs) -> (output, new values of buffers).
TrainingForward = Callable[[Attrs, Params, list[np.ndarray]], tuple[np.ndarray, Params]]


@dataclass(frozen=True)
class GradientRule:
    """How an op differentiates, in float64 NumPy: the oracle that compiled backward kernels
    must match. `vjp` is the eval-mode rule. An op that computes differently while training
    (batchnorm: batch statistics) also has `training_forward` and `training_vjp`. `buffers`
    are parameters that are state, not trained (running statistics): they get no gradient.
    `lower` is the same rule in the kernel IR, for an elementwise op that training compiles."""

    vjp: VJP
    training_forward: TrainingForward | None = None
    training_vjp: VJP | None = None
    buffers: tuple[str, ...] = ()
    # An elementwise op's input gradient at a point, in the kernel IR, for compiled training:
    # (input, output, output's gradient, attrs) -> the input's gradient.
    lower: Callable[[Expr, Expr, Expr, Attrs], Expr] | None = None


# torch.nn's form: (torch, attrs, params as tensors (absent ones None), operands) -> result
TorchForm = Callable[[Any, Attrs, dict[str, Any], list[Any]], Any]


def _per_element(attrs: Attrs, shapes: list[Shape], out: Shape) -> int:
    return math.prod(out)


@dataclass(frozen=True)
class OpSpec:
    """Everything cnnc knows about one op.

    `kind` is the op's fusion pattern, after TVM's: "anchor" ops (conv2d, dense) start a fused
    kernel, "elementwise" ops join the kernel that produces their input, "window" ops (pooling)
    join after the elementwise ops, "view" ops cost nothing, "opaque" ops stand alone.
    An elementwise op lowers by `lower`, from its operands' values (the fused value first, then
    the other operands, then the `channel_params` loaded at the point's channel) to its value
    (with `lower_attrs`, from those and the node's attributes);
    a window op by its `window` rule; other ops by a rule of `cnnc.lower` named after them.
    """

    name: str
    kind: OpKind
    attrs: tuple[Attr, ...] = ()
    min_inputs: int = 1
    max_inputs: int = 1
    infer: Callable[[Attrs, list[Shape]], Shape] = field(default=lambda attrs, shapes: shapes[0])
    param_shapes: Callable[[Attrs, list[Shape]], dict[str, Shape]] = field(
        default=lambda attrs, shapes: {}
    )
    compute: Callable[[Attrs, Params, list[np.ndarray]], np.ndarray] = field(
        default=lambda attrs, params, xs: xs[0]
    )
    activation: bool = False  # may be written as a layer's `activation:`
    lower: Callable[..., Expr] | None = None
    lower_attrs: bool = False  # `lower` takes (operands, attrs): its expression reads them
    channel_params: Callable[[Attrs, Params], tuple[np.ndarray, ...]] | None = None
    window: WindowRule | None = None
    flops: Callable[[Attrs, list[Shape], Shape], int] = _per_element  # per image
    onnx: OnnxForm | None = None
    torch: TorchForm | None = None
    fuzz: FuzzForm | None = None
    gradient: GradientRule | None = None  # None: the op cannot be trained through

    def attr(self, name: str) -> Attr | None:
        return next((attr for attr in self.attrs if attr.name == name), None)

    def check_attrs(self, given: dict[str, Any]) -> Attrs:
        """Normalise `given` (already known to hold only this op's attribute names)."""
        attrs: Attrs = {}
        for attr in self.attrs:
            if attr.name in given:
                attrs[attr.name] = _CHECKERS[attr.kind](attr, given[attr.name])
            elif attr.same_as:
                attrs[attr.name] = attrs[attr.same_as]
            elif attr.default is REQUIRED:
                raise AttrError(attr.name, f"missing attribute '{attr.name}' ({attr.help})")
            elif attr.default is not None:
                attrs[attr.name] = _CHECKERS[attr.kind](attr, attr.default)
        return attrs


def window_out(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int = 1,
               ceil_mode: bool = False) -> int:
    """Output length of a sliding window along one axis, with PyTorch's rules.

    With `ceil_mode` a last, partial window is kept only if it starts inside the input or its
    leading padding (PyTorch drops a window that would start in the trailing padding); so a
    window longer than the padded input still gives one output when the stride covers the gap.
    """
    span = size + pad[0] + pad[1] - dilation * (kernel - 1) - 1
    if span < 0 and not ceil_mode:
        return 0
    out = (ceil_div(span, stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad[0]:
        out -= 1
    return max(out, 0)


def need_image(shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(f"expects an image input [C, H, W], got [{dims(shape)}]")
    channels, height, width = shape
    return channels, height, width


def dims(shape: Shape) -> str:
    return ", ".join(str(dim) for dim in shape)



def torch_padded(torch: Any, x: Any, attrs: Attrs, fill: float) -> tuple[Any, Any]:
    """torch.nn takes one padding per axis: pad an asymmetric one explicitly with `fill`.
    Returns the input and the padding argument to give torch."""
    (top, bottom), (left, right) = attrs["padding"]
    if top == bottom and left == right:
        return x, (top, left)
    return torch.nn.functional.pad(x, (left, right, top, bottom), value=fill), 0


def draw_pair(rng: np.random.Generator, first: int, second: int) -> int | list[int]:
    """For the fuzzer: an int when both are equal (sometimes), else [h, w]."""
    if first == second and rng.random() < 0.7:
        return first
    return [first, second]


def draw_padding(rng: np.random.Generator, limit_h: int, limit_w: int) -> Any:
    """For the fuzzer: a padding in one of its three written forms, each side at most its
    limit."""
    form = rng.integers(0, 3)
    if form == 0:
        return int(rng.integers(0, min(limit_h, limit_w) + 1))
    if form == 1:
        return [int(rng.integers(0, limit_h + 1)), int(rng.integers(0, limit_w + 1))]
    return [[int(rng.integers(0, limit_h + 1)), int(rng.integers(0, limit_h + 1))],
            [int(rng.integers(0, limit_w + 1)), int(rng.integers(0, limit_w + 1))]]


def onnx_window(attrs: Attrs) -> dict[str, Any]:
    """The ONNX attributes of a sliding window (Conv, MaxPool, AveragePool)."""
    (top, bottom), (left, right) = attrs["padding"]
    return {"kernel_shape": list(attrs["kernel_size"]), "strides": list(attrs["stride"]),
            "pads": [top, left, bottom, right]}
