"""Depthwise and 1x1 convolutions on the CPU: the schedules the tiling pass gives them (a
register tile along the row for a depthwise one, a matrix-product tile for a 1x1 one, also
when a global pooling is fused after it), the kernel text that shows them, and their results
against the NumPy reference in both layouts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import cnnc
from cnnc import ops
from cnnc.compare import check_output
from cnnc.graph import Graph
from cnnc.lower import lower
from cnnc.passes import Options, run_pipeline
from cnnc.target import CpuIsa

AVX512 = CpuIsa(vector_width=16, vector_registers=32)  # a register tile of 14 accumulators
AVX2 = CpuIsa(vector_width=8, vector_registers=16)  # 7


def add(graph: Graph, name: str, op: str, inputs: list[str],
        params: dict[str, np.ndarray] | None = None, **attrs: Any) -> None:
    graph.add(name, op, inputs, ops.OPS[op].check_attrs(attrs), params)


def depthwise_net(channels: int, size: int, stride: int, padding: int) -> Graph:
    """A depthwise 3x3 convolution (groups = channels) with a bias, then ReLU6."""
    rng = np.random.default_rng(channels * 100 + size + stride)
    graph = Graph("dw", (channels, size, size))
    add(graph, "dw", "conv2d", ["input"],
        {"weight": rng.standard_normal((channels, 1, 3, 3)).astype(np.float32),
         "bias": rng.standard_normal(channels).astype(np.float32)},
        out_channels=channels, kernel_size=3, stride=stride, padding=padding, groups=channels)
    add(graph, "act", "relu6", ["dw"])
    graph.outputs = ["act"]
    return graph


def pointwise_pool_net(channels: int, out_channels: int, size: int) -> Graph:
    """A 1x1 convolution, ReLU6 and a global average pooling: one fused kernel."""
    rng = np.random.default_rng(out_channels + size)
    graph = Graph("pw", (channels, size, size))
    add(graph, "pw", "conv2d", ["input"],
        {"weight": rng.standard_normal((out_channels, channels, 1, 1)).astype(np.float32)},
        out_channels=out_channels, kernel_size=1, bias=False)
    add(graph, "act", "relu6", ["pw"])
    add(graph, "gap", "global_avgpool2d", ["act"])
    graph.outputs = ["gap"]
    return graph


def kernel_text(graph: Graph, layout: str, cpu: CpuIsa = AVX512) -> str:
    """The first kernel after the pack_input edge kernel, as `Kernel.to_text` prints it."""
    compiled = run_pipeline(graph, Options(layout=layout, cpu=cpu))
    kernel = next(kernel for kernel in lower(compiled).kernels
                  if kernel.name.startswith("conv2d"))
    return kernel.to_text()


def schedule_line(text: str) -> str:
    return text.splitlines()[1]


@pytest.mark.parametrize(("layout", "cpu", "size", "stride", "expected"), [
    # 32 channels are 2 vectors of 16: 8 points along the row, then both channel vectors.
    ("channel", AVX512, 16, 1, "oc_block=1 x_block=8"),
    ("channel", AVX512, 8, 2, "oc_block=2 x_block=4"),  # a row of 4 points
    ("batch", AVX512, 16, 1, "oc_block=1 x_block=8"),
    ("batch", AVX512, 12, 2, "oc_block=2 x_block=6"),  # 6 points, then 2 of 32 channels
    ("channel", AVX2, 16, 1, "oc_block=1 x_block=4"),  # AVX2: a register tile of 7
])
def test_depthwise_tiles_along_the_row_then_over_channels(
        layout: str, cpu: CpuIsa, size: int, stride: int, expected: str) -> None:
    text = kernel_text(depthwise_net(32, size, stride, 1), layout, cpu)
    assert schedule_line(text) == f"// schedule: {expected} unroll_max=3 gpu_threads=128 " \
        "gpu_batch_inner=False gpu_shared_tiles=False"


def test_depthwise_in_the_channel_layout_loads_whole_vectors_of_its_own_channels() -> None:
    """20 channels are 2 vectors of 16 (12 padding lanes). Each tap reads the input channels
    of the output's own lanes: an index consecutive in the lanes (one vector load), not
    clamped to the last real channel (which the backend gathers lane by lane)."""
    text = kernel_text(depthwise_net(20, 8, 1, 1), "channel")
    assert "lane < 20" not in text and ": 19)" not in text
    loads = [line.strip() for line in text.splitlines() if line.strip().startswith("float v")]
    assert len(loads) == 8  # a tile of 8 points of one channel vector, per tap
    assert loads[0] == (
        "float v13 = (-1 < x * 8 + kx11 - 1 && x * 8 + kx11 - 1 < 8 ? in0[((y + ky10 - 1) * 8 "
        "+ (-1 < x * 8 + kx11 - 1 && x * 8 + kx11 - 1 < 8 ? x * 8 + kx11 - 1 : 0)) * 32 + "
        "(cb * 16 + lane + ic9)] : 0.0f);")


def test_a_grouped_convolution_that_is_not_depthwise_keeps_its_clamped_gather() -> None:
    """Two input channels a group: padding lanes still read the last real group."""
    rng = np.random.default_rng(3)
    graph = Graph("grouped", (20, 6, 6))
    add(graph, "conv", "conv2d", ["input"],
        {"weight": rng.standard_normal((10, 2, 3, 3)).astype(np.float32)},
        out_channels=10, kernel_size=3, padding=1, groups=10, bias=False)
    graph.outputs = ["conv"]
    text = kernel_text(graph, "channel")
    assert "lane < 10 ? cb * 16 + lane : 9" in text
    assert "unroll_max=0" in schedule_line(text)


@pytest.mark.parametrize(("layout", "points", "first"), [
    # 64 channels: 4 vectors, a tile of 4 x 4 points (the broadcast tile's 16 accumulators)
    # and 4 pooling sums, which the loop over the input channels does not touch.
    ("channel", 4, 34),
    # 64 channels of a batch block, as many per load; the pooling sums are counted there.
    ("batch", 2, 24),
])
def test_a_1x1_convolution_fused_with_global_pooling_tiles_the_pooled_rows(
        layout: str, points: int, first: int) -> None:
    text = kernel_text(pointwise_pool_net(16, 64, 8), layout)
    assert schedule_line(text) == f"// schedule: oc_block=4 x_block={points} unroll_max=0 " \
        "gpu_threads=128 gpu_batch_inner=False gpu_shared_tiles=False"
    # The window's column loop takes `points` points a step, each with the 4 channel steps.
    assert f"for (wx6 = 0; wx6 < {8 // points}; wx6++) {{" in text
    sums = [line.strip() for line in text.splitlines() if line.strip().startswith("pool")]
    assert sums == [f"pool{channel + 1} = pool{channel + 1} + t{first + 4 * point + channel};"
                    for point in range(points) for channel in range(4)]


def test_a_plain_1x1_convolution_takes_the_tile_with_most_fmas_per_load() -> None:
    """128 channels (8 vectors) by rows of 8: 4 x 4 reads 8 values for 16 FMAs, where 8 x 1
    (what fills the accumulators along the channels only) reads 9 for 8, and 4 x 2 (the
    14-register tile before the broadcast tile) 6 for 8."""
    rng = np.random.default_rng(5)
    graph = Graph("pw", (64, 8, 8))
    add(graph, "pw", "conv2d", ["input"],
        {"weight": rng.standard_normal((128, 64, 1, 1)).astype(np.float32)},
        out_channels=128, kernel_size=1, bias=False)
    graph.outputs = ["pw"]
    assert schedule_line(kernel_text(graph, "channel")).startswith(
        "// schedule: oc_block=4 x_block=4 ")


@pytest.mark.parametrize("channels", [16, 20, 7, 48])
@pytest.mark.parametrize(("size", "stride", "padding"), [(9, 1, 1), (10, 2, 1), (8, 1, 0),
                                                         (11, 2, 0)])
@pytest.mark.parametrize("batch", [1, 17])  # the channel layout, then the batch layout
def test_depthwise_results_equal_the_reference(channels: int, size: int, stride: int,
                                                padding: int, batch: int) -> None:
    graph = depthwise_net(channels, size, stride, padding)
    model = cnnc.compile(graph, use_cache=False)
    x = np.random.default_rng(batch).standard_normal((batch, channels, size, size))
    x = x.astype(np.float32) * 2
    check = check_output("act", model(x), cnnc.reference(graph, x))
    assert check.ok, check.describe()


@pytest.mark.parametrize(("channels", "out_channels", "size"), [(16, 64, 8), (12, 20, 6),
                                                                (32, 128, 7)])
@pytest.mark.parametrize("batch", [1, 17])
def test_1x1_with_global_pooling_results_equal_the_reference(
        channels: int, out_channels: int, size: int, batch: int) -> None:
    graph = pointwise_pool_net(channels, out_channels, size)
    model = cnnc.compile(graph, use_cache=False)
    x = np.random.default_rng(batch).standard_normal((batch, channels, size, size))
    x = x.astype(np.float32)
    check = check_output("gap", model(x), cnnc.reference(graph, x))
    assert check.ok, check.describe()
