"""Convolutions of the batch layout (images in the vector lanes, each weight a broadcast
scalar): the channels x points register tile the tiling pass gives them, a fused pooling
window's row counted as the tile's points, the loop nest that keeps an output row's input in
cache, and their results against the NumPy reference, also where the tile meets padding,
strides, groups and the GPU's one image a thread."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import agree, build_graph

import cnnc
from cnnc.graph import Graph
from cnnc.lower import lower
from cnnc.passes import Options, run_pipeline
from cnnc.target import CpuIsa

AVX512 = CpuIsa(vector_width=16, vector_registers=32)  # a broadcast tile of 16 accumulators
AVX2 = CpuIsa(vector_width=8, vector_registers=16)  # 8


def conv_net(channels: int, out_channels: int, size: int, pool: str | None = None,
             **conv: Any) -> Graph:
    """A 3x3 convolution, ReLU and, if `pool` names one, a 2x2 pooling window of stride 2."""
    layers: list[tuple[str, str, list[str], dict[str, Any]]] = [
        ("conv", "conv2d", ["input"], {"out_channels": out_channels, "kernel_size": 3, **conv}),
        ("act", "relu", ["conv"], {})]
    if pool is not None:
        layers.append(("pool", pool, ["act"], {"kernel_size": 2}))
    return build_graph((channels, size, size), layers, seed=channels + out_channels + size)


def schedules(graph: Graph, cpu: CpuIsa = AVX512, **options: Any) -> dict[str, tuple[int, int]]:
    """Each kernel's (oc_block, x_block) as the tiling pass picks them for the direct
    convolution (its Winograd schedules: tests/test_winograd.py)."""
    tiled = run_pipeline(graph, Options(cpu=cpu, winograd=False, **options))
    return {group.name: (group.schedule.oc_block, group.schedule.x_block)
            for group in tiled.plan.groups}


def kernel_text(graph: Graph, cpu: CpuIsa = AVX512) -> str:
    compiled = run_pipeline(graph, Options(layout="batch", cpu=cpu, winograd=False))
    return next(kernel for kernel in lower(compiled).kernels
                if kernel.name.startswith("conv2d")).to_text()


@pytest.mark.parametrize(("graph", "cpu", "picked"), [
    # 4 channels by 4 points: 16 accumulators, 8 loads a tap for 16 FMAs.
    (conv_net(32, 64, 16, padding=1), AVX512, (4, 4)),
    # A 2x2 window: 4 channels by 2 pooled points, each a window row of 2.
    (conv_net(32, 64, 26, pool="maxpool2d"), AVX512, (4, 2)),
    # Rows of 26 points: 2 or 13 to a tile; 8 x 2 is the best that fits.
    (conv_net(1, 32, 28), AVX512, (8, 2)),
    # AVX2's 16 registers give 8 accumulators.
    (conv_net(16, 16, 16, padding=1), AVX2, (4, 2)),
    # Padded by 4 on a row of 10 (LeNet's input gradient of its 5x5 conv): most tiles check
    # taps, so at most 2 points; 2 x 7 would have the most FMAs per load.
    (build_graph((16, 10, 10), [("conv", "conv2d", ["input"], {
        "out_channels": 6, "kernel_size": 5, "padding": 4})]), AVX512, (6, 2)),
])
def test_a_batch_convolution_takes_a_channels_by_points_tile(graph: Graph, cpu: CpuIsa,
                                                              picked: tuple[int, int]) -> None:
    name = next(iter(schedules(graph, cpu, layout="batch")))
    assert schedules(graph, cpu, layout="batch")[name] == picked


def test_the_channel_layout_and_the_gpu_keep_their_own_tiles() -> None:
    graph = conv_net(8, 64, 16, padding=1)
    # The channel layout: 4 channel vectors by 4 points, 16 accumulators (`cpu.broadcast_tile`:
    # the inputs are the broadcast operand there; the weights, 18 KB, fit L1).
    assert schedules(graph, layout="channel") == {"conv2d_relu_0": (4, 4)}
    assert schedules(graph, target="cuda", arch="sm_90") == {"conv2d_relu_0": (8, 1)}


def test_the_tile_loops_rows_outside_channel_blocks_and_takes_window_rows_whole() -> None:
    text = kernel_text(conv_net(32, 64, 26, pool="maxpool2d"))
    loops = [line.strip() for line in text.splitlines() if line.strip().startswith("for (")]
    assert loops[:4] == ["for (y = 0; y < 12; y++) {", "for (cb = 0; cb < 16; cb++) {",
                         "for (x = 0; x < 6; x++) {",
                         "for (lane = 0; lane < 16; lane++) {  // vectorized"]
    # The window's columns are the tile's points: its wx loop runs once, over 2 x 2 points.
    assert "for (wx10 = 0; wx10 < 1; wx10++) {" in text
    assert text.count("float acc") == 16


@pytest.mark.parametrize(("graph", "batch"), [
    (conv_net(3, 16, 12, padding=1), 37),
    (conv_net(4, 8, 12, pool="maxpool2d"), 21),
    (conv_net(4, 8, 12, pool="avgpool2d", padding=1), 16),
    (conv_net(5, 12, 13, pool="maxpool2d", stride=2, padding=2), 19),
    (conv_net(8, 8, 10, groups=2, padding=1), 17),
    (conv_net(4, 6, 11, dilation=2), 18),
])
def test_tiled_batch_convolutions_agree_with_the_reference(graph: Graph, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, *graph.input_shape),
                                                     dtype=np.float32)
    model = cnnc.compile(graph, layout="batch", threads=1, use_cache=False)
    agree(model(x), cnnc.reference(graph, x), graph.name)


@pytest.mark.parametrize("layout", ["batch", "channel"])
def test_a_pooling_window_over_the_edge_is_not_tiled_as_window_rows(layout: str) -> None:
    # 9 columns pooled 2 by 2 in ceil mode: 5 windows, the last over the edge. Tiled as the
    # register tile's points, it read a column past the row (found by test_hostile_inputs:
    # off by up to 5.8 in the batch layout, before the channel layout tiled window rows).
    graph = build_graph((2, 9, 9), [
        ("conv", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        ("act", "relu", ["conv"], {}),
        ("pool", "maxpool2d", ["act"], {"kernel_size": 2, "ceil_mode": True})], seed=1)
    model = cnnc.compile(graph, layout=layout, threads=1, use_cache=False)
    (group,) = model.variants[0].graph.plan.groups
    assert group.nodes[-1] == "pool"  # fused
    x = np.random.default_rng(0).standard_normal((17, 2, 9, 9), dtype=np.float32)
    agree(model(x), cnnc.reference(graph, x), graph.name)
