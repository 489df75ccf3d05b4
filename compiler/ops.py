"""The op registry: for every op, its attributes and their checks, its shape rule, its
parameters, its fusion kind and its NumPy reference.

This is the one place that knows what an op means. The frontend asks it to check a layer,
passes ask it what fuses, and the reference interpreter asks it to compute. Shapes here are
per sample: the batch dimension N is never part of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnc.util import ceil_div

Shape = tuple[int, ...]
Attrs = dict[str, Any]
Params = dict[str, np.ndarray]

ACTIVATIONS = ("sigmoid", "relu", "tanh")


class AttrError(ValueError):
    """An attribute's value is wrong; `attr` names it so the frontend can point at its line."""

    def __init__(self, attr: str, message: str) -> None:
        self.attr = attr
        super().__init__(message)


class ShapeError(ValueError):
    """The operands' shapes do not fit the op."""


# --- attribute kinds -------------------------------------------------------------------------

REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """One attribute: how to check and normalise a value, and its default."""

    name: str
    kind: str  # "int", "pair", "padding", "bool", "float"
    default: Any = REQUIRED
    minimum: int = 1
    help: str = ""
    same_as: str = ""  # when absent, take the value of this other attribute


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
    """An int, [ph, pw] (both sides of each axis), or [[top, bottom], [left, right]]."""
    expected = "an integer, [ph, pw] or [[top, bottom], [left, right]]"
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


_CHECKERS: dict[str, Callable[[Attr, Any], Any]] = {
    "int": _check_int,
    "pair": _check_pair,
    "padding": _check_padding,
    "bool": _check_bool,
    "float": _check_float,
}


# --- the op specification --------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """Everything cnnc knows about one op.

    `kind` is the op's fusion pattern, after TVM's: "anchor" ops (conv2d, dense) start a fused
    kernel, "elementwise" ops join the kernel that produces their input, "window" ops (pooling)
    join after the elementwise ops, "view" ops cost nothing, "opaque" ops stand alone.
    """

    name: str
    kind: str
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


# --- shape helpers, shared by the shape rules and the reference ------------------------------


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


def _need_image(shape: Shape) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ShapeError(f"expects an image input [C, H, W], got [{_dims(shape)}]")
    channels, height, width = shape
    return channels, height, width


def _dims(shape: Shape) -> str:
    return ", ".join(str(dim) for dim in shape)


# --- conv2d ----------------------------------------------------------------------------------


def _conv_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, height, width = _need_image(shapes[0])
    groups, out = attrs["groups"], attrs["out_channels"]
    if channels % groups:
        raise ShapeError(f"input channels ({channels}) are not divisible by groups ({groups})")
    if out % groups:
        raise ShapeError(f"out_channels ({out}) is not divisible by groups ({groups})")
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel_size"], attrs["stride"], attrs["dilation"]
    pad_h, pad_w = attrs["padding"]
    oh = window_out(height, kh, sh, pad_h, dh)
    ow = window_out(width, kw, sw, pad_w, dw)
    if oh < 1 or ow < 1:
        raise ShapeError(
            f"kernel {kh}x{kw} (dilation {dh}x{dw}) is larger than the padded input "
            f"{height + sum(pad_h)}x{width + sum(pad_w)}"
        )
    return out, oh, ow


def _conv_params(attrs: Attrs, shapes: list[Shape]) -> dict[str, Shape]:
    kh, kw = attrs["kernel_size"]
    params: dict[str, Shape] = {
        "weight": (attrs["out_channels"], shapes[0][0] // attrs["groups"], kh, kw)
    }
    if attrs["bias"]:
        params["bias"] = (attrs["out_channels"],)
    return params


def conv2d_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    """Direct convolution: one product-sum per kernel tap over strided views of the input."""
    x = xs[0]
    weight = params["weight"].astype(np.float64)
    batch, channels = x.shape[:2]
    groups = attrs["groups"]
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    _, oh, ow = _conv_infer(attrs, [x.shape[1:]])
    padded = np.pad(x, ((0, 0), (0, 0), *attrs["padding"]))
    padded = padded.reshape(batch, groups, channels // groups, *padded.shape[2:])
    weight = weight.reshape(groups, out_channels // groups, channels // groups, kh, kw)
    out = np.zeros((batch, groups, out_channels // groups, oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            rows = slice(ky * dh, ky * dh + sh * (oh - 1) + 1, sh)
            cols = slice(kx * dw, kx * dw + sw * (ow - 1) + 1, sw)
            patch = padded[:, :, :, rows, cols]
            out += np.einsum("ngchw,goc->ngohw", patch, weight[:, :, :, ky, kx])
    out = out.reshape(batch, out_channels, oh, ow)
    if "bias" in params:
        out += params["bias"].astype(np.float64)[None, :, None, None]
    return out


# --- dense -----------------------------------------------------------------------------------


def _dense_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    if len(shapes[0]) != 1:
        raise ShapeError(
            f"expects a flat input [features], got [{_dims(shapes[0])}]; add a 'flatten' layer"
        )
    return (attrs["units"],)


def _dense_params(attrs: Attrs, shapes: list[Shape]) -> dict[str, Shape]:
    params: dict[str, Shape] = {"weight": (attrs["units"], shapes[0][0])}
    if attrs["bias"]:
        params["bias"] = (attrs["units"],)
    return params


def dense_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    out = xs[0] @ params["weight"].astype(np.float64).T
    if "bias" in params:
        out = out + params["bias"].astype(np.float64)
    return out


# --- pooling ---------------------------------------------------------------------------------


def _pool_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, height, width = _need_image(shapes[0])
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    pad_h, pad_w = attrs["padding"]
    if max(pad_h) > kh // 2 or max(pad_w) > kw // 2:
        raise ShapeError(
            f"padding {pad_h[0]},{pad_h[1]} x {pad_w[0]},{pad_w[1]} is more than half the "
            f"kernel {kh}x{kw} (as in PyTorch, each side may pad at most kernel_size // 2)"
        )
    ceil = attrs["ceil_mode"]
    oh = window_out(height, kh, sh, pad_h, 1, ceil)
    ow = window_out(width, kw, sw, pad_w, 1, ceil)
    if oh < 1 or ow < 1:
        raise ShapeError(
            f"kernel {kh}x{kw} is larger than the padded input "
            f"{height + sum(pad_h)}x{width + sum(pad_w)}"
        )
    return channels, oh, ow


def _pool_windows(padded: np.ndarray, attrs: Attrs, out_hw: tuple[int, int]) -> np.ndarray:
    """All pooling windows of `padded` as an array [N, C, OH, OW, KH, KW]."""
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    oh, ow = out_hw
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    return windows[:, :, : sh * (oh - 1) + 1 : sh, : sw * (ow - 1) + 1 : sw]


def _pool_padding(x: np.ndarray, attrs: Attrs, out_hw: tuple[int, int]) -> tuple:
    """The padding that makes every window, ceil-mode ones included, fit in the array."""
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    (top, bottom), (left, right) = attrs["padding"]
    extra_h = max(0, (out_hw[0] - 1) * sh + kh - (x.shape[2] + top + bottom))
    extra_w = max(0, (out_hw[1] - 1) * sw + kw - (x.shape[3] + left + right))
    return (top, bottom, extra_h), (left, right, extra_w)


def maxpool_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    _, out_h, out_w = _pool_infer(attrs, [x.shape[1:]])
    out_hw = (out_h, out_w)
    (top, bottom, extra_h), (left, right, extra_w) = _pool_padding(x, attrs, out_hw)
    pads = ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w))
    padded = np.pad(x, pads, constant_values=-np.inf)
    return _pool_windows(padded, attrs, out_hw).max(axis=(4, 5))


def avgpool_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    """Average pooling; the divisor counts padding only with `count_include_pad`, and never
    the part of a ceil-mode window that hangs past the padding (PyTorch's rule)."""
    x = xs[0]
    _, out_h, out_w = _pool_infer(attrs, [x.shape[1:]])
    out_hw = (out_h, out_w)
    (top, bottom, extra_h), (left, right, extra_w) = _pool_padding(x, attrs, out_hw)
    pads = ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w))
    sums = _pool_windows(np.pad(x, pads), attrs, out_hw).sum(axis=(4, 5))
    counted = np.ones((1, 1, *x.shape[2:]))
    if attrs["count_include_pad"]:
        counted = np.pad(counted, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=1)
        counted = np.pad(counted, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)))
    else:
        counted = np.pad(counted, pads)
    divisor = _pool_windows(counted, attrs, out_hw).sum(axis=(4, 5))
    return sums / divisor


def _global_pool_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, _, _ = _need_image(shapes[0])
    return channels, 1, 1


# --- batch norm, activations, softmax --------------------------------------------------------


def _batchnorm_params(attrs: Attrs, shapes: list[Shape]) -> dict[str, Shape]:
    channels = _need_image(shapes[0])[0]
    return {name: (channels,) for name in ("weight", "bias", "running_mean", "running_var")}


def batchnorm_scale_shift(attrs: Attrs, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Inference batch norm as y = x * scale + shift, per channel, in float64."""
    p = {name: value.astype(np.float64) for name, value in params.items()}
    scale = p["weight"] / np.sqrt(p["running_var"] + attrs["eps"])
    return scale, p["bias"] - p["running_mean"] * scale


def batchnorm_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    scale, shift = batchnorm_scale_shift(attrs, params)
    return xs[0] * scale[None, :, None, None] + shift[None, :, None, None]


def _softmax_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| never overflows, so neither branch warns for inputs of any size.
    small = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + small), small / (1 + small))


def _same_shapes(attrs: Attrs, shapes: list[Shape]) -> Shape:
    for shape in shapes[1:]:
        if shape != shapes[0]:
            raise ShapeError(
                f"operands must have one shape, got [{_dims(shapes[0])}] and [{_dims(shape)}]"
            )
    return shapes[0]


def _concat_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    for shape in shapes[1:]:
        if len(shape) != len(shapes[0]) or shape[1:] != shapes[0][1:]:
            raise ShapeError(
                "operands must agree in every dimension but channels, got "
                f"[{_dims(shapes[0])}] and [{_dims(shape)}]"
            )
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def _flat(attrs: Attrs, shapes: list[Shape]) -> Shape:
    return (math.prod(shapes[0]),)


def _image_only(attrs: Attrs, shapes: list[Shape]) -> Shape:
    _need_image(shapes[0])
    return shapes[0]


# --- the registry ----------------------------------------------------------------------------

_KERNEL = Attr("kernel_size", "pair", help="an integer or [kh, kw]")
_POOL_ATTRS = (
    _KERNEL,
    Attr("stride", "pair", same_as="kernel_size"),
    Attr("padding", "padding", default=0, minimum=0),
    Attr("ceil_mode", "bool", default=False),
)

OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "conv2d", "anchor",
            attrs=(
                Attr("out_channels", "int", help="the number of output channels"),
                _KERNEL,
                Attr("stride", "pair", default=1),
                Attr("padding", "padding", default=0, minimum=0),
                Attr("dilation", "pair", default=1),
                Attr("groups", "int", default=1),
                Attr("bias", "bool", default=True),
            ),
            infer=_conv_infer, param_shapes=_conv_params, compute=conv2d_reference,
        ),
        OpSpec(
            "dense", "anchor",
            attrs=(
                Attr("units", "int", help="the number of outputs"),
                Attr("bias", "bool", default=True),
            ),
            infer=_dense_infer, param_shapes=_dense_params, compute=dense_reference,
        ),
        OpSpec(
            "maxpool2d", "window", attrs=_POOL_ATTRS, infer=_pool_infer, compute=maxpool_reference
        ),
        OpSpec(
            "avgpool2d", "window",
            attrs=(*_POOL_ATTRS, Attr("count_include_pad", "bool", default=True)),
            infer=_pool_infer, compute=avgpool_reference,
        ),
        OpSpec(
            "global_avgpool2d", "window", infer=_global_pool_infer,
            compute=lambda attrs, params, xs: xs[0].mean(axis=(2, 3), keepdims=True),
        ),
        OpSpec(
            "batchnorm2d", "elementwise", attrs=(Attr("eps", "float", default=1e-5),),
            infer=_image_only, param_shapes=_batchnorm_params, compute=batchnorm_reference,
        ),
        OpSpec("sigmoid", "elementwise", compute=lambda attrs, params, xs: _sigmoid(xs[0])),
        OpSpec("relu", "elementwise", compute=lambda attrs, params, xs: np.maximum(xs[0], 0)),
        OpSpec("tanh", "elementwise", compute=lambda attrs, params, xs: np.tanh(xs[0])),
        OpSpec("softmax", "opaque", compute=_softmax_reference),
        OpSpec("flatten", "view", infer=_flat,
               compute=lambda attrs, params, xs: xs[0].reshape(len(xs[0]), -1)),
        OpSpec("add", "elementwise", min_inputs=2, max_inputs=64, infer=_same_shapes,
               compute=lambda attrs, params, xs: sum(xs[1:], xs[0])),
        OpSpec("concat", "opaque", min_inputs=2, max_inputs=64, infer=_concat_infer,
               compute=lambda attrs, params, xs: np.concatenate(xs, axis=1)),
    )
}

ALIASES = {"linear": "dense"}


def lookup(name: str) -> OpSpec | None:
    """The spec of op `name` (aliases included), or None."""
    return OPS.get(ALIASES.get(name, name))

