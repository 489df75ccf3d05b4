"""The channel layout's tiles (batch 1: one image, output channels in the vector lanes): a
convolution's channels x points register tile, the window loops a narrow padded convolution
unrolls, and a dense layer whose weights stream from memory kept in channel blocks (stored
block by block) that batch 1 on two threads shares out, with the bits of one block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import agree, build_graph

import cnnc
from cnnc.backends.llvm import split
from cnnc.graph import Graph
from cnnc.passes import Options, run_pipeline
from cnnc.target import CpuIsa

AVX512 = CpuIsa(vector_width=16, vector_registers=32)


def conv_net(channels: int, out_channels: int, size: int, pool: bool = False,
             **conv: Any) -> Graph:
    """A convolution (3x3 unless `conv` says), ReLU and, if `pool`, a 2x2 max pooling."""
    layers: list[tuple[str, str, list[str], dict[str, Any]]] = [
        ("conv", "conv2d", ["input"], {"out_channels": out_channels, "kernel_size": 3, **conv}),
        ("act", "relu", ["conv"], {})]
    if pool:
        layers.append(("pool", "maxpool2d", ["act"], {"kernel_size": 2}))
    return build_graph((channels, size, size), layers, seed=channels + out_channels + size)


def dense_net(features: int, units: int) -> Graph:
    """A dense layer of `units` over `features` inputs (16 channels of features / 16)."""
    side = int(np.sqrt(features // 16))
    return build_graph((16, side, side), [("flat", "flatten", ["input"], {}),
                                          ("fc", "dense", ["flat"], {"units": units})])


def picked(graph: Graph, cpu: CpuIsa = AVX512) -> dict[str, tuple[int, int, int, int]]:
    """Each kernel's (oc_block, x_block, unroll_max, winograd) in the channel layout, where
    the heuristic's Winograd is off (tests/test_winograd.py tests it)."""
    tiled = run_pipeline(graph, Options(layout="channel", cpu=cpu, winograd=False))
    return {group.name: (group.schedule.oc_block, group.schedule.x_block,
                         group.schedule.unroll_max, group.schedule.winograd)
            for group in tiled.plan.groups}


@pytest.mark.parametrize(("graph", "expected"), [
    # vgg_bn's 128->128 on 8x8: its 590 KB of weights stream from L2, an input's broadcast
    # from L1, so 2 channel vectors by 8 points, half the weight loads of 4 x 4 (was 8 x 1,
    # then Winograd F(2x2) at 4 x 1: 35-38 % of the peak; then 4 x 4, 80 %; now 2 x 8).
    (conv_net(128, 128, 8, padding=1), (2, 8, 0, 0)),
    # Weights that fit L1 (8->64: 18 KB): 4 x 4, 2 FMAs a load.
    (conv_net(8, 64, 8, padding=1), (4, 4, 0, 0)),
    # A pooled row of 4 points: each point of the tile takes its window's row (2 neighbouring
    # convolution points, whose taps share input loads), so 2 x 4 pooled points is 16
    # accumulators, the weights streaming as above; the pooling's maxima are not counted.
    (conv_net(128, 128, 8, pool=True, padding=1), (2, 4, 0, 0)),
    # Pooled, weights that fit L1 (8->64): 4 x 2 pooled points, 4 x 4 of the convolution.
    (conv_net(8, 64, 8, pool=True, padding=1), (4, 2, 0, 0)),
    # Two channel vectors: 8 points of a row of 32 (16 accumulators).
    (conv_net(32, 32, 32, padding=1), (2, 8, 0, 0)),
    # mnist_cnn's 32->64 (73 KB of weights), its pooled rows of 12 points: 2 x 4 of them,
    # 2 x 8 convolution points (was 4 x 3, then 4 x 4 pooled points a window's stride apart).
    (conv_net(32, 64, 26, pool=True), (2, 4, 0, 0)),
])
def test_a_channel_convolution_takes_the_tile_with_most_fmas_per_load(
        graph: Graph, expected: tuple[int, int, int, int]) -> None:
    assert list(picked(graph).values()) == [expected]  # its one kernel


def test_weights_that_fit_the_l1_the_os_reports_take_the_tile_of_most_fmas_per_load() -> None:
    # mnist_cnn's 32->64 (73 KB of weights) pooled, with an L1 of 96 KB: 4 x 2 pooled points
    assert list(picked(conv_net(32, 64, 26, pool=True), CpuIsa(16, 32, 96 << 10)).values()) \
        == [(4, 2, 0, 0)]


def test_the_l1_size_is_what_the_os_reports(tmp_path: Path) -> None:
    for index, (level, kind, size) in enumerate([("1", "Instruction", "32K"),
                                                 ("1", "Data", "48K"), ("2", "Unified", "2048K")]):
        directory = tmp_path / f"index{index}"
        directory.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (directory / name).write_text(value + "\n")
    assert cnnc.target.l1_data_bytes(tmp_path) == 48 << 10
    assert cnnc.target.l1_data_bytes(tmp_path / "missing") == cnnc.target.L1_DEFAULT_BYTES
    assert AVX512.l1_bytes == cnnc.target.L1_DEFAULT_BYTES == 32 << 10


def test_few_padded_input_channels_unroll_the_window() -> None:
    # NiN's first layer: 3 input channels, a 5x5 window with 2 columns of padding.
    assert picked(conv_net(3, 32, 32, kernel_size=5, padding=2)) == {
        "conv2d_relu_0": (2, 8, 5, 0)}
    # Without padding (LeNet's first layer measured slower unrolled) the loops stay rolled.
    assert picked(conv_net(3, 32, 32, kernel_size=5))["conv2d_relu_0"][2] == 0
    # Many input channels: rolled.
    assert picked(conv_net(16, 32, 32, padding=1))["conv2d_relu_0"][2] == 0


def test_a_dense_layer_past_a_megabyte_keeps_four_channel_blocks() -> None:
    # mnist_cnn's 9216 -> 128 (4.7 MB): 8 channel vectors in 4 blocks of 2.
    assert picked(dense_net(9216, 128)) == {"dense_0": (2, 1, 0, 0)}
    # 1024 -> 128 (0.5 MB) stays in one block of 8 accumulators.
    assert picked(dense_net(1024, 128)) == {"dense_0": (8, 1, 0, 0)}


def test_a_blocked_dense_layer_stores_each_block_contiguously_and_keeps_the_bits() -> None:
    graph = dense_net(9216, 128)
    blocked = cnnc.compile(graph, threads=1)
    whole = cnnc.compile(graph, threads=1, schedule={"dense_0": {"oc_block": 8}})
    kernel = next(k for k in blocked.variant_for(1).lowered.kernels  # type: ignore[attr-defined]
                  if k.name == "dense_0")
    weights = graph.params("fc")["weight"]  # [units][features]
    (packed,) = [buffer.data for buffer in kernel.buffers if buffer.size == 9216 * 128]
    # Block 1 (units 32..63) after all of block 0: [block][feature][32 units].
    np.testing.assert_array_equal(packed[9216 * 32:9216 * 64].reshape(9216, 32),
                                  weights[32:64].T)
    x = np.random.default_rng(1).standard_normal((1, 16, 24, 24)).astype(np.float32)
    got = blocked(x)
    assert got.tobytes() == whole(x).tobytes()  # the same sums in the same order
    agree(got, cnnc.reference(graph, x), "fc")


def test_a_streaming_dense_layer_is_split_at_batch_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split, "host_barrier_us", lambda threads: 1.0)
    graph = dense_net(9216, 128)
    variant = cnnc.compile(graph, threads=1).variant_for(1)  # type: ignore[attr-defined]
    stages = split.plan_stages(variant.graph, variant.lowered, 2, 1e6, 1.0, memory_gbps=20.0)
    assert [(variant.lowered.kernels[stage.kernels[0]].name, stage.items)
            for stage in stages if stage.items > 1] == [("dense_0", 2)]
    two = cnnc.compile(graph, threads=2)
    x = np.random.default_rng(2).standard_normal((1, 16, 24, 24)).astype(np.float32)
    assert two(x).tobytes() == cnnc.compile(graph, threads=1)(x).tobytes()
