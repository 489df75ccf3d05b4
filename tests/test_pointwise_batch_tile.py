"""1x1 convolutions of the batch layout (images in the vector lanes, each weight a broadcast
scalar): the register tile the tiling pass gives them takes the broadcast tile's 16
accumulators with AVX-512 (the GPU's one image a lane keeps 14: 4 x 2), a fused global
pooling's sums counted with them, and their results against the NumPy reference where the
tile meets strides, odd rows and the pooling. The channel layout (each input a broadcast
scalar) takes the broadcast tile too, its pooling sums not counted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import agree, build_graph

import cnnc
from cnnc.graph import Graph
from cnnc.passes import Options, run_pipeline
from cnnc.target import CpuIsa

AVX512 = CpuIsa(vector_width=16, vector_registers=32)  # a broadcast tile of 16 accumulators
AVX2 = CpuIsa(vector_width=8, vector_registers=16)  # 8


def pointwise_net(channels: int, out_channels: int, size: int, pooled: bool = False,
                  **conv: Any) -> Graph:
    """A 1x1 convolution, ReLU and, if `pooled`, a global average pooling."""
    layers: list[tuple[str, str, list[str], dict[str, Any]]] = [
        ("conv", "conv2d", ["input"], {"out_channels": out_channels, "kernel_size": 1, **conv}),
        ("act", "relu", ["conv"], {})]
    if pooled:
        layers.append(("pool", "global_avgpool2d", ["act"], {}))
    return build_graph((channels, size, size), layers, seed=channels + out_channels + size)


def tile_of(graph: Graph, cpu: CpuIsa = AVX512, layout: str = "batch") -> tuple[int, int]:
    """The (oc_block, x_block) the tiling pass picks for the graph's one kernel."""
    tiled = run_pipeline(graph, Options(cpu=cpu, layout=layout))
    (group,) = tiled.plan.groups
    return group.schedule.oc_block, group.schedule.x_block


@pytest.mark.parametrize(("graph", "cpu", "picked"), [
    # 4 channels by 4 points: 16 accumulators, 8 loads for 16 FMAs (4 x 2 before).
    (pointwise_net(32, 32, 32), AVX512, (4, 4)),
    (pointwise_net(64, 64, 8), AVX512, (4, 4)),
    # Rows of 7 points: 2 channels by 7 points (14 FMAs, 9 loads) beats 16 by 1 (16, 17).
    (pointwise_net(32, 64, 7), AVX512, (2, 7)),
    # 10 channels pooled over rows of 8: 5 x 2 and 5 pooling sums, 15 registers (2 x 4).
    (pointwise_net(64, 10, 8, pooled=True), AVX512, (5, 2)),
    # AVX2's 16 registers give 8 accumulators.
    (pointwise_net(16, 16, 16), AVX2, (4, 2)),
])
def test_a_batch_pointwise_convolution_takes_the_broadcast_tile(graph: Graph, cpu: CpuIsa,
                                                                 picked: tuple[int, int]) -> None:
    assert tile_of(graph, cpu) == picked


@pytest.mark.parametrize(("graph", "batch", "layout"), [
    (pointwise_net(32, 32, 8), 37, "batch"),
    (pointwise_net(12, 20, 7), 17, "batch"),
    (pointwise_net(16, 32, 12, stride=2), 19, "batch"),
    (pointwise_net(24, 10, 8, pooled=True), 33, "batch"),
    (pointwise_net(64, 64, 16), 2, "channel"),
    (pointwise_net(16, 32, 12, stride=2), 3, "channel"),
    (pointwise_net(128, 128, 8, pooled=True), 1, "channel"),
    (pointwise_net(24, 40, 7, pooled=True), 5, "channel"),
])
def test_tiled_pointwise_convolutions_agree_with_the_reference(graph: Graph, batch: int,
                                                               layout: str) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, *graph.input_shape),
                                                     dtype=np.float32)
    model = cnnc.compile(graph, layout=layout, threads=1, use_cache=False)
    agree(model(x), cnnc.reference(graph, x), graph.name)


@pytest.mark.parametrize(("graph", "picked"), [
    # mobilenet's 64->64 on 16x16: 4 channel vectors by 4 points (4 x 2 before: 66 -> 77 %)
    (pointwise_net(64, 64, 16), (4, 4)),
    # 2 channel vectors (32 channels): 2 x 8
    (pointwise_net(16, 32, 32), (2, 8)),
    # mobilenet's last 1x1, fused with the global pooling: 4 x 4 and 4 sums (54 -> 73 %)
    (pointwise_net(128, 128, 8, pooled=True), (4, 4)),
])
def test_a_channel_pointwise_convolution_takes_the_broadcast_tile(
        graph: Graph, picked: tuple[int, int]) -> None:
    assert tile_of(graph, layout="channel") == picked

