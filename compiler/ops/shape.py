"""Ops that move values rather than compute them, or compute over all channels at once:
softmax (over channels), flatten (a view of an image as features) and concat (along channels).

None fuses with its neighbours; each lowers by a kernel rule of its own in `cnnc.lower`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnc.ops.spec import (
    Attrs,
    FuzzForm,
    FuzzLimits,
    OnnxForm,
    OpSpec,
    Params,
    Shape,
    ShapeError,
    dims,
)


def _softmax_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


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


SPECS = (
    OpSpec(
        "softmax", "opaque", compute=_softmax_reference,
        flops=lambda attrs, shapes, out: 4 * math.prod(out),
        onnx=OnnxForm("Softmax", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.nn.functional.softmax(xs[0], dim=1),
        fuzz=FuzzForm(image=0.6, flat=0.8),
    ),
    OpSpec(
        "flatten", "view", infer=_flat,
        compute=lambda attrs, params, xs: xs[0].reshape(len(xs[0]), -1), flops=_no_flops,
        onnx=OnnxForm("Flatten", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.flatten(xs[0], 1),
        fuzz=FuzzForm(image=1.0, draw=_draw_flatten),
    ),
    OpSpec(
        "concat", "opaque", min_inputs=2, max_inputs=64, infer=_concat_infer,
        compute=lambda attrs, params, xs: np.concatenate(xs, axis=1), flops=_no_flops,
        onnx=OnnxForm("Concat", _axis_1),
        torch=lambda torch, attrs, params, xs: torch.cat(xs, dim=1),
        fuzz=FuzzForm(image=1.3, flat=1.0, joins=lambda shape, other: len(other) == len(shape)
                      and other[1:] == shape[1:]),
    ),
)
