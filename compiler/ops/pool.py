"""The pooling family: max and average pooling over windows, and global average pooling.

Their lowering is a reduction over the window (`WindowRule`): the fused kernel computes the
ops before the pool at every point of a window and folds them with the rule's `combine`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cnnc.kernel import Expr, maximum
from cnnc.ops.conv import KERNEL, resolve_same
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
    WindowRule,
    draw_padding,
    draw_pair,
    need_image,
    onnx_window,
    torch_padded,
    window_out,
)

POOL_ATTRS = (
    KERNEL,
    Attr("stride", "pair", same_as="kernel_size"),
    Attr("padding", "padding", default=0, minimum=0),
    Attr("ceil_mode", "bool", default=False),
)


def _infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, height, width = need_image(shapes[0])
    resolve_same(attrs, height, width)
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


def _windows(padded: np.ndarray, attrs: Attrs, out_hw: tuple[int, int]) -> np.ndarray:
    """All pooling windows of `padded` as an array [N, C, OH, OW, KH, KW]."""
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    oh, ow = out_hw
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))
    return windows[:, :, : sh * (oh - 1) + 1 : sh, : sw * (ow - 1) + 1 : sw]


def _padding(x: np.ndarray, attrs: Attrs, out_hw: tuple[int, int]) -> tuple:
    """The padding that makes every window, ceil-mode ones included, fit in the array."""
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    (top, bottom), (left, right) = attrs["padding"]
    extra_h = max(0, (out_hw[0] - 1) * sh + kh - (x.shape[2] + top + bottom))
    extra_w = max(0, (out_hw[1] - 1) * sw + kw - (x.shape[3] + left + right))
    return (top, bottom, extra_h), (left, right, extra_w)


def maxpool_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    x = xs[0]
    _, out_h, out_w = _infer(attrs, [x.shape[1:]])
    out_hw = (out_h, out_w)
    (top, bottom, extra_h), (left, right, extra_w) = _padding(x, attrs, out_hw)
    pads = ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w))
    padded = np.pad(x, pads, constant_values=-np.inf)
    return _windows(padded, attrs, out_hw).max(axis=(4, 5))


def avgpool_reference(attrs: Attrs, params: Params, xs: list[np.ndarray]) -> np.ndarray:
    """Average pooling; the divisor counts padding only with `count_include_pad`, and never
    the part of a ceil-mode window that hangs past the padding (PyTorch's rule)."""
    x = xs[0]
    _, out_h, out_w = _infer(attrs, [x.shape[1:]])
    out_hw = (out_h, out_w)
    (top, bottom, extra_h), (left, right, extra_w) = _padding(x, attrs, out_hw)
    pads = ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w))
    sums = _windows(np.pad(x, pads), attrs, out_hw).sum(axis=(4, 5))
    return sums / _avg_divisor(x, attrs, out_hw)


def _avg_divisor(x: np.ndarray, attrs: Attrs, out_hw: tuple[int, int]) -> np.ndarray:
    """What each average pooling window divides by, [1, 1, OH, OW]."""
    (top, bottom, extra_h), (left, right, extra_w) = _padding(x, attrs, out_hw)
    counted = np.ones((1, 1, *x.shape[2:]))
    if attrs["count_include_pad"]:
        counted = np.pad(counted, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=1)
        counted = np.pad(counted, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)))
    else:
        counted = np.pad(counted, ((0, 0), (0, 0), (top, bottom + extra_h),
                                   (left, right + extra_w)))
    return _windows(counted, attrs, out_hw).sum(axis=(4, 5))


def _unpad(grad_padded: np.ndarray, x: np.ndarray, attrs: Attrs) -> np.ndarray:
    """The gradient of `x` from that of its padded copy: padding cells get none."""
    (top, _), (left, _) = attrs["padding"]
    return grad_padded[:, :, top : top + x.shape[2], left : left + x.shape[3]]


def maxpool_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    """Each window's gradient goes to its first maximum in row-major order, as in PyTorch."""
    x = xs[0]
    out_h, out_w = grad_out.shape[2:]
    (top, bottom, extra_h), (left, right, extra_w) = _padding(x, attrs, (out_h, out_w))
    pads = ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w))
    padded = np.pad(x, pads, constant_values=-np.inf)
    windows = _windows(padded, attrs, (out_h, out_w))
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    first = windows.reshape(*windows.shape[:4], kh * kw).argmax(axis=4)
    rows = np.arange(out_h)[:, None] * sh + first // kw
    cols = np.arange(out_w)[None, :] * sw + first % kw
    images = np.arange(x.shape[0])[:, None, None, None]
    channels = np.arange(x.shape[1])[None, :, None, None]
    grad_padded = np.zeros(padded.shape)
    np.add.at(grad_padded, (images, channels, rows, cols), grad_out)
    return [_unpad(grad_padded, x, attrs)], {}


def avgpool_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    """Each window shares its gradient among its cells, over the same divisor."""
    x = xs[0]
    out_h, out_w = grad_out.shape[2:]
    (top, bottom, extra_h), (left, right, extra_w) = _padding(x, attrs, (out_h, out_w))
    share = grad_out / _avg_divisor(x, attrs, (out_h, out_w))
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    grad_padded = np.zeros((*x.shape[:2], x.shape[2] + top + bottom + extra_h,
                            x.shape[3] + left + right + extra_w))
    for ky in range(kh):
        for kx in range(kw):
            grad_padded[:, :, ky : ky + sh * (out_h - 1) + 1 : sh,
                        kx : kx + sw * (out_w - 1) + 1 : sw] += share
    return [_unpad(grad_padded, x, attrs)], {}


def _global_avgpool_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                        grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    height, width = xs[0].shape[2:]
    return [np.broadcast_to(grad_out / (height * width), xs[0].shape).copy()], {}


def _global_maxpool_vjp(attrs: Attrs, params: Params, xs: list[np.ndarray], out: np.ndarray,
                        grad_out: np.ndarray) -> tuple[list[np.ndarray], Params]:
    """All to the image's first maximum, as a max pool over the whole image (PyTorch's
    `amax` would share it among ties)."""
    x = xs[0]
    flat = x.reshape(*x.shape[:2], -1)
    first = flat.argmax(axis=2)
    grad = np.zeros(flat.shape)
    np.put_along_axis(grad, first[..., None], grad_out.reshape(*x.shape[:2], 1), axis=2)
    return [grad.reshape(x.shape)], {}


def _global_infer(attrs: Attrs, shapes: list[Shape]) -> Shape:
    channels, _, _ = need_image(shapes[0])
    return channels, 1, 1


def _window_flops(attrs: Attrs, shapes: list[Shape], out: Shape) -> int:
    kh, kw = attrs["kernel_size"]
    return math.prod(out) * kh * kw


def _torch_max(torch: Any, attrs: Attrs, params: dict[str, Any], xs: list[Any]) -> Any:
    x, padding = torch_padded(torch, xs[0], attrs, float("-inf"))
    return torch.nn.functional.max_pool2d(x, attrs["kernel_size"], attrs["stride"], padding,
                                          ceil_mode=attrs["ceil_mode"])


def _torch_avg(torch: Any, attrs: Attrs, params: dict[str, Any], xs: list[Any]) -> Any:
    x, padding = torch_padded(torch, xs[0], attrs, 0.0)
    if padding == 0 and not attrs["count_include_pad"]:  # 0: torch_padded padded it
        raise NotImplementedError("asymmetric average pooling without padding")
    return torch.nn.functional.avg_pool2d(x, attrs["kernel_size"], attrs["stride"], padding,
                                          ceil_mode=attrs["ceil_mode"],
                                          count_include_pad=attrs["count_include_pad"])


def _draw(rng: np.random.Generator, average: bool) -> Attrs:
    kh, kw = (int(value) for value in rng.integers(1, 5, size=2))
    if rng.random() < 0.5:
        kw = kh
    attrs: dict[str, Any] = {"kernel_size": draw_pair(rng, kh, kw)}
    if rng.random() < 0.6:
        attrs["stride"] = draw_pair(rng, *(int(value) for value in rng.integers(1, 4, size=2)))
    if rng.random() < 0.5:
        attrs["padding"] = draw_padding(rng, kh // 2, kw // 2)
    if rng.random() < 0.5:
        attrs["ceil_mode"] = bool(rng.random() < 0.7)
    if average and rng.random() < 0.5:
        attrs["count_include_pad"] = bool(rng.random() < 0.5)
    return attrs


def _draw_max(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    return _draw(rng, average=False)


def _draw_avg(rng: np.random.Generator, shape: Shape, limits: FuzzLimits) -> Attrs:
    return _draw(rng, average=True)


def _add(total: Expr, value: Expr) -> Expr:
    return total + value


def _ceil_mode(attrs: Attrs) -> dict[str, Any]:
    return {"ceil_mode": int(attrs["ceil_mode"]), **onnx_window(attrs)}


SPECS = (
    OpSpec(
        "maxpool2d", "window", attrs=POOL_ATTRS, infer=_infer, compute=maxpool_reference,
        window=WindowRule(-math.inf, maximum), flops=_window_flops,
        onnx=OnnxForm("MaxPool", _ceil_mode), torch=_torch_max,
        fuzz=FuzzForm(image=2.0, draw=_draw_max),
        gradient=GradientRule(maxpool_vjp),
    ),
    OpSpec(
        "avgpool2d", "window",
        attrs=(*POOL_ATTRS, Attr("count_include_pad", "bool", default=True)),
        infer=_infer, compute=avgpool_reference,
        window=WindowRule(0.0, _add, average=True), flops=_window_flops,
        onnx=OnnxForm("AveragePool", lambda attrs: {
            "count_include_pad": int(attrs["count_include_pad"]), **_ceil_mode(attrs)}),
        torch=_torch_avg, fuzz=FuzzForm(image=2.0, draw=_draw_avg),
        gradient=GradientRule(avgpool_vjp),
    ),
    OpSpec(
        "global_avgpool2d", "window", infer=_global_infer,
        compute=lambda attrs, params, xs: xs[0].mean(axis=(2, 3), keepdims=True),
        window=WindowRule(0.0, _add, average=True, whole_image=True),
        flops=lambda attrs, shapes, out: math.prod(shapes[0]),
        onnx=OnnxForm("GlobalAveragePool"),
        torch=lambda torch, attrs, params, xs: xs[0].mean(dim=(2, 3), keepdim=True),
        fuzz=FuzzForm(image=0.4),
        gradient=GradientRule(_global_avgpool_vjp),
    ),
    OpSpec(
        "global_maxpool2d", "window", infer=_global_infer,
        compute=lambda attrs, params, xs: xs[0].max(axis=(2, 3), keepdims=True),
        window=WindowRule(-math.inf, maximum, whole_image=True),
        flops=lambda attrs, shapes, out: math.prod(shapes[0]),
        onnx=OnnxForm("GlobalMaxPool"),
        torch=lambda torch, attrs, params, xs: xs[0].amax(dim=(2, 3), keepdim=True),
        fuzz=FuzzForm(image=0.2),
        gradient=GradientRule(_global_maxpool_vjp),
    ),
)
