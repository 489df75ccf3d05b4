"""The op registry owns every fact of an op: each spec says how it lowers, what it costs, and
its ONNX, torch.nn and fuzzer forms; a new elementwise op needs nothing outside its spec."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc
from cnnc import ops
from cnnc.compare import ATOL, RTOL
from cnnc.kernel import Const, Var
from cnnc.layouts import BatchLayout, ChannelLayout
from cnnc.lower.anchors import PRODUCERS
from cnnc.lower.standalone import KERNELS
from cnnc.profile import node_flops


def test_every_op_has_a_lowering_flops_and_its_bench_and_fuzz_forms() -> None:
    for name, spec in ops.OPS.items():
        rules = [spec.lower is not None, spec.window is not None,
                 name in PRODUCERS, name in KERNELS]
        assert sum(rules) == 1, f"{name} has {sum(rules)} lowering rules"
        assert (spec.lower is not None) == (spec.kind == "elementwise"), name
        assert (spec.window is not None) == (spec.kind == "window"), name
        assert (name in PRODUCERS) == (spec.kind == "anchor"), name
        assert spec.onnx is not None and spec.torch is not None and spec.fuzz is not None, name
    assert ops.ACTIVATIONS == ("sigmoid", "relu", "tanh", "relu6", "hardswish", "silu")


def test_flops_come_from_the_specs() -> None:
    graph = cnnc.Graph("g", (3, 8, 8))
    graph.add("conv", "conv2d", ["input"], ops.OPS["conv2d"].check_attrs(
        {"out_channels": 4, "kernel_size": 3, "groups": 1}))
    graph.add("act", "tanh", ["conv"])
    graph.add("pool", "global_avgpool2d", ["act"])
    assert node_flops(graph, "conv") == 2 * 4 * 6 * 6 * 3 * 3 * 3
    assert node_flops(graph, "act") == 4 * 4 * 6 * 6
    assert node_flops(graph, "pool") == 4 * 6 * 6


def test_layouts_answer_sizes_and_places() -> None:
    batch, channel = BatchLayout(8), ChannelLayout(16)
    assert (batch.images_per_block, channel.images_per_block) == (8, 1)
    assert (batch.floats((3, 4, 4)), channel.floats((3, 4, 4))) == (384, 128)
    assert (channel.vector(6), channel.channels(6), channel.channels(20)) == (8, 8, 32)
    assert (batch.kind, channel.kind) == ("batch", "channel")
    coords = [Var("c"), Var("y"), Const(1)]
    assert str(batch.index((3, 4, 4), coords)) != str(channel.index((3, 4, 4), coords))
    weight = np.arange(2 * 3 * 1 * 1, dtype=np.float32).reshape(2, 3, 1, 1)
    assert channel.conv_weights(weight).shape == (3, 1, 1, 8)
    assert batch.conv_weights(weight) is weight


@pytest.mark.parametrize("config", [{}, {"layout": "channel"}, {"fuse": False},
                                    {"target": "cuda-sim"}])
def test_an_elementwise_op_added_to_the_registry_alone_compiles_everywhere(
        monkeypatch: pytest.MonkeyPatch, config: dict[str, object]) -> None:
    negate = ops.OpSpec("negate", "elementwise", compute=lambda attrs, params, xs: -xs[0],
                        lower=lambda xs: Const(0.0) - xs[0])
    monkeypatch.setitem(ops.OPS, "negate", negate)
    graph = cnnc.Graph("g", (2, 5, 5))
    graph.add("conv", "conv2d", ["input"], ops.OPS["conv2d"].check_attrs(
        {"out_channels": 3, "kernel_size": 3}))
    graph.params("conv").update(
        weight=np.linspace(-1, 1, 54, dtype=np.float32).reshape(3, 2, 3, 3),
        bias=np.array([0.5, -0.5, 0.0], np.float32))
    graph.add("neg", "negate", ["conv"])
    graph.outputs = ["neg"]
    x = np.random.default_rng(0).standard_normal((3, 2, 5, 5)).astype(np.float32)
    model = cnnc.compile(graph, use_cache=False, **config)  # type: ignore[call-overload]
    np.testing.assert_allclose(model(x), cnnc.reference(graph, x), rtol=RTOL, atol=ATOL)
