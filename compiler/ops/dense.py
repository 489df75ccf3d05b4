"""The dense family: a fully connected layer over a flat input (`linear` is its alias)."""

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
)


def _infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    if len(shapes[0]) != 1:
        raise ShapeError(
            f"expects a flat input [features], got [{dims(shapes[0])}]; add a 'flatten' layer"
        )
    return (attrs["units"],)


def _params(attrs: Attrs, shapes: list[Shape]) -> dict[str, Shape]:
    params: dict[str, Shape] = {"weight": (attrs["units"], shapes[0][0])}
    if attrs["bias"]:
        params["bias"] = (attrs["units"],)
    return params


def dense_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    out = xs[0] @ params["weight"].astype(np.float64).T
    if "bias" in params:
        out = out + params["bias"].astype(np.float64)
    return out


def dense_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
              grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    weight = params["weight"].astype(np.float64)
    grads: Params = {"weight": grad_out.T @ xs[0]}
    if "bias" in params:
        grads["bias"] = grad_out.sum(axis=0)
    return [grad_out @ weight], grads


def _torch(torch: Any, attrs: Attrs, params: dict[str, Any], xs: list[Any]) -> Any:
    return torch.nn.functional.linear(xs[0], params["weight"], params["bias"])


def _draw(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs | None:
    attrs: dict[str, Any] = {"units": int(rng.integers(1, 17))}
    if rng.random() < 0.3:
        attrs["bias"] = bool(rng.random() < 0.5)
    return attrs if math.prod(shape) <= limits.max_features else None


SPECS = (
    OpSpec(
        "dense", "anchor",
        attrs=(
            Attr("units", "int", help="the number of outputs"),
            Attr("bias", "bool", default=True),
        ),
        infer=_infer, param_shapes=_params, compute=dense_reference,
        flops=lambda attrs, shapes, out: 2 * math.prod(out) * shapes[0][0],
        onnx=OnnxForm("Gemm", lambda attrs: {"transB": 1}, params=("weight", "bias")),
        torch=_torch, fuzz=FuzzForm(flat=5.0, draw=_draw),
        gradient=GradientRule(dense_vjp),
    ),
)
