"""Ops that move values rather than compute them, or compute over all channels at once:
softmax (over channels), flatten (a view of an image as features) and concat (along channels).

None fuses with its neighbours; each lowers by a kernel rule of its own in `cnnc.lower`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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
    draw_padding,
    need_image,
)


def _softmax_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _softmax_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                 grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    return [out * (grad_out - (grad_out * out).sum(axis=1, keepdims=True))], {}


def _flatten_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                 grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    return [grad_out.reshape(xs[0].shape)], {}


def _concat_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    ends = np.cumsum([x.shape[1] for x in xs])[:-1]
    return [part.copy() for part in np.split(grad_out, ends, axis=1)], {}


def _concat_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    for shape in shapes[1:]:
        if len(shape) != len(shapes[0]) or shape[1:] != shapes[0][1:]:
            raise ShapeError(
                "operands must agree in every dimension but channels, got "
                f"[{dims(shapes[0])}] and [{dims(shape)}]"
            )
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def _flat(attrs: Attrs, shapes: list[Shape]) -> Shape:
    return (math.prod(shapes[0]),)


def _draw_flatten(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs | None:
    return {} if math.prod(shape) <= limits.max_features else None


def _no_flops(attrs: Attrs, shapes: list[Shape], out: Shape) -> int:
    return 0


def _axis_1(attrs: Attrs) -> dict[str, Any]:
    return {"axis": 1}


def _log_softmax_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    shifted = xs[0] - xs[0].max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _pad_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, height, width = need_image(shapes[0])
    if attrs["pads"] == "same":
        raise ShapeError("'pads' must be given per side; 'same' is for conv2d and pools")
    (top, bottom), (left, right) = attrs["pads"]
    return channels, height + top + bottom, width + left + right


def _pad_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    return np.pad(xs[0], ((0, 0), (0, 0), *attrs["pads"]), constant_values=attrs["value"])


def _log_softmax_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                     grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    return [grad_out - np.exp(out) * grad_out.sum(axis=1, keepdims=True)], {}


def _pad_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
             grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    (top, _), (left, _) = attrs["pads"]
    height, width = xs[0].shape[2:]
    return [grad_out[:, :, top : top + height, left : left + width].copy()], {}


def _pad_onnx(attrs: Attrs) -> tuple[np.ndarray, ...]:
    (top, bottom), (left, right) = attrs["pads"]
    return (np.array([0, 0, top, left, 0, 0, bottom, right], np.int64),
            np.float32(attrs["value"]))


def _torch_pad(torch: Any, attrs: Attrs, params: dict[str, Any], xs: list[Any]) -> Any:
    (top, bottom), (left, right) = attrs["pads"]
    return torch.nn.functional.pad(xs[0], (left, right, top, bottom), value=attrs["value"])


def _draw_pad(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    attrs: Attrs = {"pads": draw_padding(rng, 2, 2)}
    if rng.random() < 0.4:
        attrs["value"] = float(rng.choice([-1.0, 0.5, 3.0]))
    return attrs


SPECS = (
    OpSpec(
        "softmax", "opaque", compute=_softmax_reference,
        flops=lambda attrs, shapes, out: 4 * math.prod(out),
        onnx=OnnxForm("Softmax", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.softmax(xs[0], dim=1),
        fuzz=FuzzForm(image=0.6, flat=0.8),
        gradient=GradientRule(_softmax_vjp),
    ),
    OpSpec(
        "flatten", "view", infer=_flat,
        compute=lambda attrs, params, xs: xs[0].reshape(len(xs[0]), -1), flops=_no_flops,
        onnx=OnnxForm("Flatten", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.flatten(xs[0], 1),
        fuzz=FuzzForm(image=1.0, draw=_draw_flatten),
        gradient=GradientRule(_flatten_vjp),
    ),
    OpSpec(
        "concat", "opaque", min_inputs=2, max_inputs=64, infer=_concat_infer,
        compute=lambda attrs, params, xs: np.concatenate(xs, axis=1), flops=_no_flops,
        onnx=OnnxForm("Concat", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.cat(xs, dim=1),
        fuzz=FuzzForm(image=1.3, flat=1.0, joins=lambda shape, other: len(other) == len(shape)
                      and other[1:] == shape[1:]),
        gradient=GradientRule(_concat_vjp),
    ),
    OpSpec(
        "log_softmax", "opaque", compute=_log_softmax_reference,
        flops=lambda attrs, shapes, out: 5 * math.prod(out),
        onnx=OnnxForm("LogSoftmax", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.log_softmax(xs[0], dim=1),
        fuzz=FuzzForm(image=0.2, flat=0.3),
        gradient=GradientRule(_log_softmax_vjp),
    ),
    OpSpec(
        "pad", "opaque",
        attrs=(Attr("pads", "padding", minimum=0,
                    help="an integer, [ph, pw] or [[top, bottom], [left, right]]"),
               Attr("value", "number", default=0.0)),
        infer=_pad_infer, compute=_pad_reference, flops=_no_flops,
        onnx=OnnxForm("Pad", constants=_pad_onnx), torch=_torch_pad,
        fuzz=FuzzForm(image=0.3, draw=_draw_pad),
        gradient=GradientRule(_pad_vjp),
    ),
)
