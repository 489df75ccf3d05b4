"""Weight gradients that each batch block computes a share of in the backward stage
(`cnnc.training.weights`), added over the blocks in block order by `block_sum`; and the runs
of border points that leave out the taps reading padding."""

from __future__ import annotations

import numpy as np
from conftest import Layer, agree
from conftest import build_graph as build

import cnnc
from cnnc.optim import SGD
from cnnc.reference_backward import reference_backward
from cnnc.training import weights

# c1 (16x16 outputs) and c2 (stride 2) share by blocks; c3 (4x4 outputs) is one whole-batch
# kernel; c1 has a bias, whose gradient is shared too.
LAYERS: list[Layer] = [
    ("c1", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1}),
    ("r1", "relu", ["c1"], {}),
    ("c2", "conv2d", ["r1"], {"out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1,
                              "bias": False}),
    ("r2", "relu", ["c2"], {}),
    ("c3", "conv2d", ["r2"], {"out_channels": 4, "kernel_size": 3, "stride": 2,
                              "dilation": 1, "padding": [[1, 0], [2, 1]]}),
    ("c4", "conv2d", ["c3"], {"out_channels": 3, "kernel_size": 2, "padding": 1}),
    ("f", "flatten", ["c4"], {}), ("d", "dense", ["f"], {"units": 3})]


def batch(graph: cnnc.Graph, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (count, *graph.input_shape)).astype(np.float32),
            rng.integers(0, 3, count))


def test_blocks_share_the_large_and_strided_weight_gradients() -> None:
    graph = build((2, 16, 16), LAYERS)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=48, threads=1)
    per_block = {launch.kernel.layers[0] for stage in trainer.program.step
                 if stage.items is None for launch in stage.launches
                 if launch.kernel.name.startswith("wgrad")}
    whole = {stage.launches[0].kernel.layers[0] for stage in trainer.program.step
             if stage.items is not None and stage.name.startswith("wgrad")}
    assert per_block == {"c1", "c2", "c3"}
    assert whole == {"c4", "d"}
    assert sum(stage.name == "block_sum" for stage in trainer.program.step) == 1


def test_a_smaller_batch_adds_only_its_own_blocks_shares() -> None:
    """48 images fill three blocks; the next step's 20 fill two, the second partly: the
    third block's shares are the last step's and must not be added."""
    graph = build((2, 16, 16), LAYERS)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=48, threads=2)
    trainer.step(*batch(graph, 48, 0))
    x, y = batch(graph, 20, 1)
    trainer.step(x, y)
    expected = reference_backward(graph, x, y)
    gradients = trainer.gradients()
    for key, grad in expected.gradients.items():
        agree(gradients[key], grad, key)


def test_shared_gradients_have_the_same_bits_on_every_thread_count() -> None:
    graph = build((2, 16, 16), LAYERS)
    results = []
    for threads in (1, 2, 3):
        trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.1, momentum=0.9),
                                        batch_size=64, threads=threads)
        for step in range(2):
            trainer.step(*batch(graph, 57, step))
        results.append(trainer.gradients())
    for gradients in results[1:]:
        for key, value in gradients.items():
            assert np.array_equal(value, results[0][key]), key


def test_runs_of_points_that_read_the_same_taps() -> None:
    """3 taps, padding 1, 8 outputs: the first point misses tap 0, the last tap 2; stride 2
    on 8 inputs with padding 1 gives 4 outputs, only the first missing a tap."""
    assert weights._segments(8, 8, 1, 3, 1, 1) == [(0, 1, (1, 2)), (1, 7, (0, 1, 2)),
                                                   (7, 8, (0, 1))]
    assert weights._segments(8, 4, 2, 3, 1, 1) == [(0, 1, (1, 2)), (1, 4, (0, 1, 2))]
    assert weights._segments(3, 5, 1, 1, 1, 1) == [(0, 1, ()), (1, 4, (0,)), (4, 5, ())]


def test_which_convolutions_share_by_blocks() -> None:
    attrs = {"stride": (1, 1)}
    assert weights.per_block(attrs, (8, 16, 16))
    assert not weights.per_block(attrs, (8, 15, 16))
    assert weights.per_block({"stride": (2, 1)}, (8, 2, 2))
