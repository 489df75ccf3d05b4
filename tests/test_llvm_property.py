"""Random convolution and pooling attributes, odd sizes and batches: the LLVM target must
match the NumPy reference at rtol=1e-4, atol=1e-5 for every one hypothesis draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import cnnc
from cnnc import ops
from cnnc.frontend.parameters import init_from_seed
from cnnc.graph import Graph

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def add_layer(graph: Graph, name: str, op: str, operand: str, given: dict) -> str:
    """Add a checked layer with seeded parameters; hypothesis skips shapes that do not fit."""
    spec = ops.OPS[op]
    attrs = spec.check_attrs(given)
    try:
        graph.add(name, op, [operand], attrs)
    except ops.ShapeError:
        assume(False)
    shapes = spec.param_shapes(attrs, [graph.shape(operand)])
    if shapes:
        graph.params(name).update(init_from_seed(len(graph), {name: shapes})[name])
    return name


pads = st.lists(st.integers(0, 2), min_size=4, max_size=4)


@st.composite
def conv_models(draw: st.DrawFn) -> Graph:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    channels = groups * draw(st.integers(1, 2))
    height = draw(st.sampled_from([1, 2, 3, 5, 7, 11, 13]))
    width = draw(st.sampled_from([1, 2, 3, 5, 7, 11, 13]))
    graph = Graph("random_conv", (channels, height, width))
    top, bottom, left, right = draw(pads)
    conv = add_layer(graph, "conv", "conv2d", "input", {
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": [draw(st.integers(1, 4)), draw(st.integers(1, 4))],
        "stride": [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
        "padding": [[top, bottom], [left, right]],
        "dilation": [draw(st.integers(1, 2)), draw(st.integers(1, 2))],
        "groups": groups,
        "bias": draw(st.booleans()),
    })
    last = conv
    activation = draw(st.sampled_from([None, "sigmoid", "relu", "tanh"]))
    if activation:
        last = add_layer(graph, "act", activation, last, {})
    pool = draw(st.sampled_from([None, "maxpool2d", "avgpool2d"]))
    if pool:
        kernel = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
        attrs = {
            "kernel_size": kernel,
            "stride": [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
            "padding": [draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))],
            "ceil_mode": draw(st.booleans()),
        }
        if pool == "avgpool2d":
            attrs["count_include_pad"] = draw(st.booleans())
        last = add_layer(graph, "pool", pool, last, attrs)
    graph.outputs = [last]
    return graph


@SETTINGS
@given(graph=conv_models(), batch=st.sampled_from([1, 2, 37]), fuse=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_conv_act_pool_matches_reference(graph: Graph, batch: int, fuse: bool,
                                                seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((batch, *graph.input_shape))
    x = x.astype(np.float32)
    actual = cnnc.compile(graph, fuse=fuse)(x)
    assert_allclose(actual, cnnc.reference(graph, x), rtol=1e-4, atol=1e-5)


@st.composite
def pool_models(draw: st.DrawFn) -> Graph:
    size = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 9]))
    graph = Graph("random_pool", (draw(st.integers(1, 3)), size, draw(st.sampled_from([1, 3, 8]))))
    kernel = [draw(st.integers(1, 4)), draw(st.integers(1, 4))]
    op = draw(st.sampled_from(["maxpool2d", "avgpool2d"]))
    top, left = draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2))
    attrs = {
        "kernel_size": kernel,
        "stride": [draw(st.integers(1, 3)), draw(st.integers(1, 3))],
        "padding": [[top, draw(st.integers(0, kernel[0] // 2))],
                    [left, draw(st.integers(0, kernel[1] // 2))]],
        "ceil_mode": draw(st.booleans()),
    }
    if op == "avgpool2d":
        attrs["count_include_pad"] = draw(st.booleans())
    graph.outputs = [add_layer(graph, "pool", op, "input", attrs)]
    return graph


@SETTINGS
@given(graph=pool_models(), batch=st.sampled_from([1, 5, 17]), seed=st.integers(0, 2**16))
def test_random_pooling_matches_reference(graph: Graph, batch: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((batch, *graph.input_shape))
    x = x.astype(np.float32)
    assert_allclose(cnnc.compile(graph)(x), cnnc.reference(graph, x), rtol=1e-4, atol=1e-5)


def test_saturating_inputs_propagate_like_the_reference(tmp_path: Path) -> None:
    """Huge values saturate sigmoid and tanh; NaN and infinities flow as in NumPy."""
    graph = Graph("saturate", (2, 4, 4))
    last = add_layer(graph, "conv", "conv2d", "input", {"out_channels": 2, "kernel_size": 1})
    for index, op in enumerate(["sigmoid", "tanh", "relu"]):
        branch = add_layer(graph, f"a{index}", op, last, {})
        graph.outputs.append(branch)
    x = np.random.default_rng(1).standard_normal((5, 2, 4, 4)).astype(np.float32) * 1e4
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 1, 1] = np.inf
    x[2, 0, 2, 2] = -np.inf
    actual = cnnc.compile(graph)(x)
    for got, want in zip(actual, cnnc.reference(graph, x)):
        assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
