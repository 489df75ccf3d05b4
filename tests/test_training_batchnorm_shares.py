"""Batch norm while training in shares per block (`cnnc.training.batchnorm`): each block's
share of the statistics and of the gradient sums is computed in the block stage that made
its values, the shares merged in a small whole-batch stage, and a relu right after batch norm
has its backward rule inside batch norm's kernels. Checked against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Layer, agree
from conftest import build_graph as build

import cnnc
from cnnc.optim import SGD
from cnnc.reference_backward import reference_backward

# A ResNet's pattern: a relu read twice (a conv and a residual add), batch norm then relu,
# batch norm then add then relu, a strided shortcut whose batch norm shares g with another.
RESIDUAL: list[Layer] = [
    ("stem", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1,
                                   "bias": False}),
    ("stem_bn", "batchnorm2d", ["stem"], {}),
    ("stem_relu", "relu", ["stem_bn"], {}),
    ("c1", "conv2d", ["stem_relu"], {"out_channels": 4, "kernel_size": 3, "padding": 1,
                                     "bias": False}),
    ("bn1", "batchnorm2d", ["c1"], {}),
    ("r1", "relu", ["bn1"], {}),
    ("c2", "conv2d", ["r1"], {"out_channels": 4, "kernel_size": 3, "padding": 1,
                              "bias": False}),
    ("bn2", "batchnorm2d", ["c2"], {}),
    ("add1", "add", ["bn2", "stem_relu"], {}),
    ("r2", "relu", ["add1"], {}),
    ("c3", "conv2d", ["r2"], {"out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1,
                              "bias": False}),
    ("bn3", "batchnorm2d", ["c3"], {"eps": 1e-3}),
    ("short", "conv2d", ["r2"], {"out_channels": 6, "kernel_size": 1, "stride": 2,
                                 "bias": False}),
    ("short_bn", "batchnorm2d", ["short"], {}),
    ("add2", "add", ["bn3", "short_bn"], {}),
    ("r3", "relu", ["add2"], {}),
    ("gap", "global_avgpool2d", ["r3"], {}),
    ("f", "flatten", ["gap"], {}),
    ("d", "dense", ["f"], {"units": 5}),
]


def _batch(graph: cnnc.Graph, count: int, offset: float = 0.0, scale: float = 1.0,
           seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (offset + scale * rng.normal(0, 1, (count, *graph.input_shape))).astype(np.float32)
    return x, rng.integers(0, graph.shape(graph.outputs[0])[0], count)


def _agrees_with_reference(graph: cnnc.Graph, x: np.ndarray, y: np.ndarray) -> None:
    expected = reference_backward(graph, x, y, training=True)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=48, threads=1)
    np.testing.assert_allclose(trainer.step(x, y), expected.loss, rtol=1e-5)
    gradients = trainer.gradients()
    for key, grad in expected.gradients.items():
        agree(gradients[key], grad, key)
    for key, value in expected.buffers.items():
        agree(trainer.parameters()[key], value, key)


@pytest.mark.parametrize("count", [5, 37])
def test_residual_batch_norms_train_as_the_reference(count: int) -> None:
    """Every gradient and running statistic, for a batch inside one block and one over three
    blocks whose last is partly filled (its empty lanes out of every share)."""
    graph = build((3, 8, 8), RESIDUAL)
    _agrees_with_reference(graph, *_batch(graph, count))


def test_statistics_of_values_far_from_zero_keep_their_precision() -> None:
    """Values at 10 +- 0.1: the batch's variance is 10,000 times smaller than its mean
    squared, so a one-pass E[x^2] - E[x]^2 in float32 would lose about 6e-4 of it; the
    shares' two passes per block and their merge keep it to rtol=1e-4."""
    layers: list[Layer] = [("bn", "batchnorm2d", ["input"], {}), ("r", "relu", ["bn"], {}),
                           ("f", "flatten", ["r"], {}), ("d", "dense", ["f"], {"units": 3})]
    graph = build((2, 6, 6), layers)
    _agrees_with_reference(graph, *_batch(graph, 37, offset=10.0, scale=0.1))


def test_a_relu_after_batch_norm_runs_inside_its_backward_kernels() -> None:
    """Only the relu after an add and read by convs keeps a backward kernel of its own (r3's
    runs inside the pool's); the whole-batch
    stages of batch norm are two per layer, one item per channel, and each block's shares
    are computed in the stage that made the values they sum."""
    graph = build((3, 8, 8), RESIDUAL)
    program = cnnc.compile_training(graph, optimizer=SGD(lr=0.1), batch_size=48,
                                    threads=1).program
    launches = [(stage, launch.kernel) for stage in program.step for launch in stage.launches]
    assert sorted(kernel.layers[0] for _, kernel in launches
                  if kernel.name.startswith("egrad")) == ["r2"]
    norms = ["stem_bn", "bn1", "bn2", "bn3", "short_bn"]
    for prefix in ("bn_stats", "bn_sums"):
        merged = {stage.launches[0].kernel.layers[0]: stage.items for stage in program.step
                  if stage.name.startswith(prefix)}
        assert merged == {name: program.graph.shape(name)[0] for name in norms}
    shares = [(stage, kernel) for stage, kernel in launches if kernel.name.startswith("bn_part")]
    assert len(shares) == 2 * len(norms)
    assert all(stage.items is None and stage.launches.index(next(
        launch for launch in stage.launches if launch.kernel is kernel)) > 0
        for stage, kernel in shares)


def test_every_thread_count_gives_the_same_bits() -> None:
    graph = build((3, 8, 8), RESIDUAL)
    results = []
    for threads in (1, 2, 3):
        trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.1, momentum=0.9),
                                        batch_size=64, threads=threads)
        losses = [trainer.step(*_batch(graph, 50 + step, seed=step)) for step in range(3)]
        results.append((losses, trainer.parameters()))
    for losses, params in results[1:]:
        assert losses == results[0][0]
        for key, value in params.items():
            assert np.array_equal(value, results[0][1][key]), key
