"""The convolution family: conv2d (grouped, strided, dilated, padded on each side)."""

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
    draw_padding,
    draw_pair,
    need_image,
    onnx_window,
    torch_padded,
    window_out,
)

KERNEL = Attr("kernel_size", "pair", help="an integer or [kh, kw]")


def resolve_same(attrs: Attrs, height: int, width: int) -> None:
    """Replace `padding: same` by the pads it stands for, in place: ONNX's SAME_UPPER (the
    output is ceil(input / stride); the odd pad goes after), which for stride 1 is PyTorch's
    padding="same". The shape rule calls it, so the graph keeps explicit pads."""
    if attrs.get("padding") != "same":
        return
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    dh, dw = attrs.get("dilation", (1, 1))
    sides = []
    for size, kernel, stride, dilation in ((height, kh, sh, dh), (width, kw, sw, dw)):
        total = max(0, (-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size)
        sides.append((total // 2, total - total // 2))
    attrs["padding"] = tuple(sides)


def _infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, height, width = need_image(shapes[0])
    resolve_same(attrs, height, width)
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


def _params(attrs: Attrs, shapes: list[Shape]) -> dict[str, Shape]:
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
    _, oh, ow = _infer(attrs, [x.shape[1:]])
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


def conv2d_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
               grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    """The transpose of `conv2d_reference`, tap by tap: each tap's product-sum sends the
    output's gradient back to the strided view it read and to that tap of the weight."""
    x = xs[0]
    weight = params["weight"].astype(np.float64)
    batch, channels, height, width = x.shape
    groups = attrs["groups"]
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    (top, _), (left, _) = attrs["padding"]
    oh, ow = grad_out.shape[2:]
    padded = np.pad(x, ((0, 0), (0, 0), *attrs["padding"]))
    padded = padded.reshape(batch, groups, channels // groups, *padded.shape[2:])
    weight = weight.reshape(groups, out_channels // groups, channels // groups, kh, kw)
    grad = grad_out.reshape(batch, groups, out_channels // groups, oh, ow)
    grad_padded = np.zeros_like(padded)
    grad_weight = np.zeros_like(weight)
    for ky in range(kh):
        for kx in range(kw):
            rows = slice(ky * dh, ky * dh + sh * (oh - 1) + 1, sh)
            cols = slice(kx * dw, kx * dw + sw * (ow - 1) + 1, sw)
            grad_padded[:, :, :, rows, cols] += np.einsum("ngohw,goc->ngchw", grad,
                                                          weight[:, :, :, ky, kx])
            grad_weight[:, :, :, ky, kx] = np.einsum("ngchw,ngohw->goc",
                                                     padded[:, :, :, rows, cols], grad)
    grad_x = grad_padded.reshape(batch, channels, *padded.shape[3:])
    grad_x = grad_x[:, :, top : top + height, left : left + width]
    grads: Params = {"weight": grad_weight.reshape(params["weight"].shape)}
    if "bias" in params:
        grads["bias"] = grad_out.sum(axis=(0, 2, 3))
    return [grad_x], grads


def _flops(attrs: Attrs, shapes: list[Shape], out: Shape) -> int:
    kh, kw = attrs["kernel_size"]
    return 2 * math.prod(out) * (shapes[0][0] // attrs["groups"] * kh * kw)


def _torch(torch: Any, attrs: Attrs, params: dict[str, Any], xs: list[Any]) -> Any:
    x, padding = torch_padded(torch, xs[0], attrs, 0.0)
    return torch.nn.functional.conv2d(x, params["weight"], params["bias"], attrs["stride"],
                                      padding, attrs["dilation"], attrs["groups"])


def _draw(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    channels, height, width = shape
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    groups = int(rng.choice(divisors)) if rng.random() < 0.35 else 1
    per_group = int(rng.integers(1, max(1, limits.max_channels // groups // 2) + 1))
    attrs: dict[str, Any] = {"out_channels": groups * per_group}
    kh, kw = (int(value) for value in rng.integers(1, 6, size=2))
    if rng.random() < 0.5:
        kw = kh
    attrs["kernel_size"] = draw_pair(rng, kh, kw)
    if rng.random() < 0.5:
        attrs["stride"] = draw_pair(rng, *(int(value) for value in rng.integers(1, 4, size=2)))
    if rng.random() < 0.6:
        attrs["padding"] = draw_padding(rng, 3, 3)
    if rng.random() < 0.25:
        attrs["dilation"] = draw_pair(rng, *(int(value) for value in rng.integers(1, 4, size=2)))
    if groups > 1 or rng.random() < 0.1:
        attrs["groups"] = groups
    if rng.random() < 0.3:
        attrs["bias"] = bool(rng.random() < 0.5)
    return attrs


SPECS = (
    OpSpec(
        "conv2d", "anchor",
        attrs=(
            Attr("out_channels", "int", help="the number of output channels"),
            KERNEL,
            Attr("stride", "pair", default=1),
            Attr("padding", "padding", default=0, minimum=0),
            Attr("dilation", "pair", default=1),
            Attr("groups", "int", default=1),
            Attr("bias", "bool", default=True),
        ),
        infer=_infer, param_shapes=_params, compute=conv2d_reference, flops=_flops,
        onnx=OnnxForm("Conv", lambda attrs: {"dilations": list(attrs["dilation"]),
                                             "group": attrs["groups"], **onnx_window(attrs)},
                      params=("weight", "bias")),
        torch=_torch, fuzz=FuzzForm(image=5.0, draw=_draw),
        gradient=GradientRule(conv2d_vjp),
    ),
)
