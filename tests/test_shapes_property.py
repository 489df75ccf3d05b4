"""Property tests over random convolution and pooling attributes: the shape the registry infers
is PyTorch's output-size formula, the reference produces exactly that shape, and its values
equal a plain loop over every output element (written here, sharing no code with cnnc)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import cnnc
from cnnc import ops

SETTINGS = settings(max_examples=50, deadline=None)


def out_size(size: int, kernel: int, stride: int, before: int, after: int, dilation: int = 1,
             ceil_mode: bool = False) -> int:
    """PyTorch's output length (pooling_output_shape), with the padding split per side."""
    span = size + before + after - dilation * (kernel - 1) - 1
    rounded = math.ceil(span / stride) if ceil_mode else math.floor(span / stride)
    out = rounded + 1
    if ceil_mode and (out - 1) * stride >= size + before:
        out -= 1
    return out


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    groups = draw(st.integers(1, 3))
    return {
        "groups": groups,
        "in_channels": groups * draw(st.integers(1, 2)),
        "out_channels": groups * draw(st.integers(1, 2)),
        "height": draw(st.integers(1, 8)),
        "width": draw(st.integers(1, 8)),
        "kernel": (draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        "stride": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "dilation": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "padding": ((draw(st.integers(0, 3)), draw(st.integers(0, 3))),
                    (draw(st.integers(0, 3)), draw(st.integers(0, 3)))),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def naive_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, case: dict,
               out_hw: tuple[int, int]) -> np.ndarray:
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    per_group_in = channels // case["groups"]
    per_group_out = out_channels // case["groups"]
    (kh, kw), (sh, sw), (dh, dw) = case["kernel"], case["stride"], case["dilation"]
    top, left = case["padding"][0][0], case["padding"][1][0]
    out = np.zeros((batch, out_channels, *out_hw))
    for n in range(batch):
        for o in range(out_channels):
            first_in = (o // per_group_out) * per_group_in
            for oy in range(out_hw[0]):
                for ox in range(out_hw[1]):
                    total = 0.0 if bias is None else float(bias[o])
                    for c in range(per_group_in):
                        for ky in range(kh):
                            for kx in range(kw):
                                iy, ix = oy * sh - top + ky * dh, ox * sw - left + kx * dw
                                if 0 <= iy < height and 0 <= ix < width:
                                    total += weight[o, c, ky, kx] * x[n, first_in + c, iy, ix]
                    out[n, o, oy, ox] = total
    return out


@SETTINGS
@given(conv_cases())
def test_conv_shape_matches_pytorch_and_reference(case: dict) -> None:
    (kh, kw), (sh, sw), (dh, dw) = case["kernel"], case["stride"], case["dilation"]
    (top, bottom), (left, right) = case["padding"]
    expected_hw = (out_size(case["height"], kh, sh, top, bottom, dh),
                   out_size(case["width"], kw, sw, left, right, dw))
    attrs = ops.OPS["conv2d"].check_attrs({
        "out_channels": case["out_channels"], "kernel_size": list(case["kernel"]),
        "stride": list(case["stride"]), "dilation": list(case["dilation"]),
        "padding": [list(side) for side in case["padding"]], "groups": case["groups"],
        "bias": case["bias"],
    })
    input_shape = (case["in_channels"], case["height"], case["width"])
    graph = cnnc.Graph("conv", input_shape)
    if min(expected_hw) < 1:
        try:
            graph.add("y", "conv2d", ["input"], attrs)
        except ops.ShapeError as error:
            assert "is larger than the padded input" in str(error)
            return
        raise AssertionError("a kernel larger than its padded input was accepted")

    rng = np.random.default_rng(case["seed"])
    weight = rng.uniform(-1, 1, (case["out_channels"], case["in_channels"] // case["groups"],
                                 kh, kw)).astype(np.float32)
    bias = rng.uniform(-1, 1, case["out_channels"]).astype(np.float32) if case["bias"] else None
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    shape = graph.add("y", "conv2d", ["input"], attrs, params)
    graph.outputs = ["y"]
    assert shape == (case["out_channels"], *expected_hw)

    x = rng.uniform(-1, 1, (2, *input_shape)).astype(np.float32)
    y = cnnc.reference(graph, x)
    assert isinstance(y, np.ndarray)
    assert y.shape == (2, *shape)
    assert_allclose(y, naive_conv(x, weight, bias, case, expected_hw), rtol=1e-4, atol=1e-5)


@st.composite
def pool_cases(draw: st.DrawFn) -> dict:
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return {
        "op": draw(st.sampled_from(["maxpool2d", "avgpool2d"])),
        "height": draw(st.integers(1, 9)),
        "width": draw(st.integers(1, 9)),
        "kernel": kernel,
        "stride": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        # PyTorch allows at most half the kernel on each side.
        "padding": ((draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[0] // 2))),
                    (draw(st.integers(0, kernel[1] // 2)), draw(st.integers(0, kernel[1] // 2)))),
        "ceil_mode": draw(st.booleans()),
        "count_include_pad": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def naive_pool(x: np.ndarray, case: dict, out_hw: tuple[int, int]) -> np.ndarray:
    """PyTorch's pooling loops: the average divides by the window clipped to the padded input
    (count_include_pad) or to the input itself."""
    _, _, height, width = x.shape
    (kh, kw), (sh, sw) = case["kernel"], case["stride"]
    (top, bottom), (left, right) = case["padding"]
    out = np.zeros((*x.shape[:2], *out_hw))
    for oy in range(out_hw[0]):
        for ox in range(out_hw[1]):
            y0, x0 = oy * sh - top, ox * sw - left
            y1, x1 = min(y0 + kh, height + bottom), min(x0 + kw, width + right)
            padded_count = (y1 - y0) * (x1 - x0)
            y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
            window = x[:, :, y0:y1, x0:x1]
            if case["op"] == "maxpool2d":
                out[:, :, oy, ox] = window.max(axis=(2, 3))
            else:
                count = padded_count if case["count_include_pad"] else (y1 - y0) * (x1 - x0)
                out[:, :, oy, ox] = window.sum(axis=(2, 3)) / count
    return out


@SETTINGS
@given(pool_cases())
def test_pool_shape_matches_pytorch_and_reference(case: dict) -> None:
    (kh, kw), (sh, sw) = case["kernel"], case["stride"]
    (top, bottom), (left, right) = case["padding"]
    expected_hw = (out_size(case["height"], kh, sh, top, bottom, ceil_mode=case["ceil_mode"]),
                   out_size(case["width"], kw, sw, left, right, ceil_mode=case["ceil_mode"]))
    given_attrs = {"kernel_size": list(case["kernel"]), "stride": list(case["stride"]),
                   "padding": [list(side) for side in case["padding"]],
                   "ceil_mode": case["ceil_mode"]}
    if case["op"] == "avgpool2d":
        given_attrs["count_include_pad"] = case["count_include_pad"]
    attrs = ops.OPS[case["op"]].check_attrs(given_attrs)
    graph = cnnc.Graph("pool", (2, case["height"], case["width"]))
    if min(expected_hw) < 1:
        try:
            graph.add("y", case["op"], ["input"], attrs)
        except ops.ShapeError as error:
            assert "is larger than the padded input" in str(error)
            return
        raise AssertionError("a window larger than its padded input was accepted")

    shape = graph.add("y", case["op"], ["input"], attrs)
    graph.outputs = ["y"]
    assert shape == (2, *expected_hw)
    x = np.random.default_rng(case["seed"]).uniform(-1, 1, (3, *graph.input_shape))
    y = cnnc.reference(graph, x.astype(np.float32))
    assert isinstance(y, np.ndarray)
    assert y.shape == (3, *shape)
    assert_allclose(y, naive_pool(x.astype(np.float32), case, expected_hw), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))
def test_global_pool_flatten_and_dense_shapes(channels: int, height: int, width: int,
                                              units: int) -> None:
    graph = cnnc.Graph("head", (channels, height, width))
    assert graph.add("g", "global_avgpool2d", ["input"]) == (channels, 1, 1)
    assert graph.add("f", "flatten", ["input"]) == (channels * height * width,)
    dense = ops.OPS["dense"].check_attrs({"units": units})
    assert graph.add("d", "dense", ["f"], dense) == (units,)
    graph.outputs = ["g", "d"]
    params = {"weight": np.zeros((units, channels * height * width), np.float32),
              "bias": np.zeros(units, np.float32)}
    graph.params("d").update(params)
    pooled, out = cnnc.reference(graph, np.ones((2, channels, height, width), np.float32))
    assert pooled.shape == (2, channels, 1, 1)
    assert out.shape == (2, units)
