"""The faster training kernels against the float64 reference backward: a strided conv's input
gradient computed phase by phase (`cnnc.training.transposed.phases`), and weight gradients
that take several output channels per item (`cnnc.training.kernels.weight_tile`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import Layer, agree
from conftest import build_graph as build

import cnnc
from cnnc.errors import InputError
from cnnc.optim import SGD
from cnnc.reference_backward import reference_backward
from cnnc.training import kernels, transposed

# A first conv so that the strided conv under test has an input that needs a gradient.
STEM: Layer = ("c0", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 1})


def strided(raw: dict[str, Any]) -> list[Layer]:
    return [STEM, ("c1", "conv2d", ["c0"], {"out_channels": 6, **raw}),
            ("f", "flatten", ["c1"], {}), ("d", "dense", ["f"], {"units": 3})]


STRIDED = {
    "3x3 s2 p1 even": ({"kernel_size": 3, "stride": 2, "padding": 1}, (2, 8, 8)),
    "3x3 s2 p1 odd": ({"kernel_size": 3, "stride": 2, "padding": 1}, (2, 9, 7)),
    "1x1 s2": ({"kernel_size": 1, "stride": 2}, (2, 8, 9)),
    "2x2 s2": ({"kernel_size": 2, "stride": 2}, (2, 8, 8)),
    "3x2 s[3,2] asymmetric": ({"kernel_size": [3, 2], "stride": [3, 2],
                               "padding": [[2, 0], [1, 1]]}, (2, 10, 7)),
    "3x3 s2 groups 2": ({"kernel_size": 3, "stride": 2, "padding": 1, "groups": 2},
                        (2, 7, 7)),
}


def step_agrees(graph: cnnc.Graph, count: int = 21) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (count, *graph.input_shape)).astype(np.float32)
    y = rng.integers(0, 3, count)
    expected = reference_backward(graph, x, y)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=48, threads=1)
    trainer.step(x, y)
    gradients = trainer.gradients()
    for key, grad in expected.gradients.items():
        agree(gradients[key], grad, key)


@pytest.mark.parametrize("case", list(STRIDED))
def test_a_strided_conv_gives_its_input_gradient_phase_by_phase(case: str) -> None:
    """Every gradient (c0's weight reads the strided conv's input gradient) equals the
    reference, and the step runs the phase kernels, not the gather."""
    raw, shape = STRIDED[case]
    graph = build(shape, strided(raw))
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=32, threads=1)
    names = [launch.kernel.name for stage in trainer.program.step for launch in stage.launches]
    assert sum(name.startswith("interleave") for name in names) == 1
    step_agrees(graph)


def test_an_input_narrower_than_the_stride_takes_the_gather() -> None:
    """A phase of no input points (width 1, stride 2) has no convolution: the gather
    computes that gradient (found by `cnnc fuzz --train`: it raised ShapeError)."""
    graph = build((2, 3, 1), strided({"kernel_size": 5, "stride": [1, 2],
                                      "padding": [[2, 2], [3, 3]]}))
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=32, threads=1)
    names = [launch.kernel.name for stage in trainer.program.step for launch in stage.launches]
    assert not any(name.startswith("interleave") for name in names)
    step_agrees(graph)


def test_phases_of_resnet_s2_conv1() -> None:
    """3x3, stride 2, padding 1 on 32x32: one tap, two taps across, two down and four."""
    attrs = {"kernel_size": (3, 3), "stride": (2, 2), "dilation": (1, 1),
             "padding": ((1, 1), (1, 1))}
    found = transposed.phases(attrs, (16, 32, 32), (32, 16, 16))
    assert found is not None
    assert [phase.taps for phase in found] == [((1,), (1,)), ((1,), (0, 2)), ((0, 2), (1,)),
                                               ((0, 2), (0, 2))]
    assert [phase.padding for phase in found] == [((0, 0), (0, 0)), ((0, 0), (0, 1)),
                                                  ((0, 1), (0, 0)), ((0, 1), (0, 1))]
    assert transposed.phases({**attrs, "dilation": (2, 2)}, (16, 32, 32), (32, 15, 15)) is None


@pytest.mark.parametrize(("outs", "kernel_size", "groups", "tile"),
                         [(6, 3, 1, 2), (5, 3, 1, 1), (8, 1, 1, 4), (6, 5, 1, 1),
                          (6, 3, 3, 2), (4, 3, 4, 1)])
def test_weight_gradients_of_several_channels_per_item(outs: int, kernel_size: int,
                                                       groups: int, tile: int) -> None:
    assert kernels.weight_tile(outs // groups, kernel_size * kernel_size) == tile
    layers: list[Layer] = [
        ("c1", "conv2d", ["input"], {"out_channels": outs, "kernel_size": kernel_size,
                                     "padding": 1, "groups": groups}),
        ("r", "relu", ["c1"], {}), ("f", "flatten", ["r"], {}),
        ("d", "dense", ["f"], {"units": 3})]
    step_agrees(build((12, 6, 7), layers), count=37)


def test_profile_names_every_stage_and_leaves_the_trainer_as_it_was() -> None:
    graph = build((2, 7, 7), [
        ("c1", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1,
                                     "bias": False}),
        ("bn", "batchnorm2d", ["c1"], {}), ("r", "relu", ["bn"], {}),
        ("c2", "conv2d", ["r"], {"out_channels": 4, "kernel_size": 3, "stride": 2}),
        ("f", "flatten", ["c2"], {}), ("d", "dense", ["f"], {"units": 3})])
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.1), batch_size=20, threads=1)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (20, 2, 7, 7)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    before = trainer.parameters()
    table = trainer.profile(x, y, seconds=0.2)
    rows = [line.split() for line in table.splitlines()[2:-2]]
    kernels_run = [(stage.name, launch.kernel.name) for stage in trainer.program.step
                   for launch in stage.launches]
    assert [(row[0], row[1]) for row in rows] == kernels_run
    assert all(float(row[3].removesuffix("us")) > 0 for row in rows)
    wgrad = next(row for row in rows if row[1].startswith("wgrad") and row[2] == "c2")
    assert float(wgrad[5]) > 0  # GFLOP/s, counted
    assert trainer.steps == 0
    for key, value in trainer.parameters().items():
        assert np.array_equal(value, before[key]), key
    with pytest.raises(InputError, match="larger than the trainer's batch_size"):
        trainer.profile(np.zeros((21, 2, 7, 7), np.float32), np.zeros(21, int))
