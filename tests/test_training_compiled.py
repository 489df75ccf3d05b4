"""Compiled training (`cnnc.compile_training`) against the float64 reference backward and
against PyTorch: gradients of every compiled rule, optimizer trajectories, the same bits on
every thread count, D2L 6.2, and the trained weights in the inference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LENET_8X8, Layer, agree
from conftest import build_graph as build
from numpy.testing import assert_allclose

import cnnc
from cnnc import ops
from cnnc.errors import InputError, ModelError
from cnnc.optim import SGD, Adam
from cnnc.reference_backward import ReferenceTrainer, reference_backward

# Strides, asymmetric padding, dilation, groups, overlapping windows, a value read twice,
# branches that join, and the other compiled activations.
VARIETY: list[Layer] = [
    ("c1", "conv2d", ["input"], {"out_channels": 6, "kernel_size": [3, 2], "stride": [2, 1],
                                 "padding": [[1, 0], [2, 1]], "dilation": [1, 2]}),
    ("h", "hardswish", ["c1"], {}),
    ("c2", "conv2d", ["h"], {"out_channels": 6, "kernel_size": 3, "padding": 1, "groups": 3,
                             "bias": False}),
    ("r6", "relu6", ["c2"], {}),
    ("twice", "add", ["r6", "r6", "h"], {}),
    ("mp", "maxpool2d", ["twice"], {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("ap", "avgpool2d", ["mp"], {"kernel_size": 2, "stride": 1, "padding": 1,
                                 "count_include_pad": False, "ceil_mode": True}),
    ("c3", "conv2d", ["ap"], {"out_channels": 5, "kernel_size": 1}),
    ("gap", "global_avgpool2d", ["c3"], {}),
    ("f", "flatten", ["gap"], {}),
    ("d", "dense", ["f"], {"units": 4}),
]


# Batch norm in training mode (batch statistics; a conv without bias before it, as in ResNets)
# and dropout with its seeded mask.
NORMALISED: list[Layer] = [
    ("c1", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1,
                                 "bias": False}),
    ("bn1", "batchnorm2d", ["c1"], {}),
    ("r1", "relu", ["bn1"], {}),
    ("c2", "conv2d", ["r1"], {"out_channels": 4, "kernel_size": 3, "stride": 2}),
    ("bn2", "batchnorm2d", ["c2"], {"eps": 1e-3}),
    ("join", "add", ["bn2", "bn2"], {}),
    ("f", "flatten", ["join"], {}),
    ("drop", "dropout", ["f"], {"p": 0.3}),
    ("d", "dense", ["drop"], {"units": 5}),
]


def batch(graph: cnnc.Graph, count: int, loss: str, seed: int = 1) -> tuple[np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (count, *graph.input_shape)).astype(np.float32)
    shape = graph.shape(graph.outputs[0])
    if loss == "cross_entropy":
        return x, rng.integers(0, shape[0], count)
    return x, rng.normal(0, 1, (count, *shape)).astype(np.float32)


@pytest.mark.parametrize(("layers", "shape"), [(LENET_8X8, (1, 8, 8)), (VARIETY, (3, 9, 10))],
                         ids=["lenet8x8", "variety"])
@pytest.mark.parametrize(("loss", "reduction"), [("cross_entropy", "mean"),
                                                 ("cross_entropy", "sum"),
                                                 ("squared_error", "mean"),
                                                 ("squared_error", "sum")])
@pytest.mark.parametrize("count", [5, 37])
def test_compiled_gradients_match_the_reference(layers: list[Layer], shape: tuple[int, ...],
                                                loss: str, reduction: str, count: int) -> None:
    """One step's loss and every parameter's gradient equal the float64 reference backward
    (rtol=1e-4, atol=1e-5), for a batch inside one block and one over three."""
    graph = build(shape, layers)
    x, y = batch(graph, count, loss)
    expected = reference_backward(graph, x, y, loss=loss, reduction=reduction)
    trainer = cnnc.compile_training(graph, loss=loss, reduction=reduction,
                                    optimizer=SGD(lr=0.0), batch_size=48, threads=1)
    value = trainer.step(x, y)
    assert_allclose(value, expected.loss, rtol=1e-5)
    gradients = trainer.gradients()
    assert set(gradients) == set(expected.gradients)
    for key, grad in expected.gradients.items():
        agree(gradients[key], grad, key)


def normalised() -> cnnc.Graph:
    return build((2, 7, 7), NORMALISED)  # running variances in [0.5, 2]


@pytest.mark.parametrize("count", [3, 21])
def test_batchnorm_and_dropout_train_as_the_reference(count: int) -> None:
    """In training mode: batch statistics (of the batch's images only, not a block's empty
    lanes), the running statistics PyTorch keeps, and dropout with step k's mask."""
    graph = normalised()
    x, y = batch(graph, count, "cross_entropy")
    expected = reference_backward(graph, x, y, training=True, seed=4, step=0)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=32, threads=1,
                                    seed=4)
    assert_allclose(trainer.step(x, y), expected.loss, rtol=1e-5)
    for key, grad in expected.gradients.items():
        agree(trainer.gradients()[key], grad, key)
    for key, value in expected.buffers.items():
        agree(trainer.parameters()[key], value, key)
    # eval mode reads the running statistics; dropout is the identity there
    agree(trainer.scores(x), cnnc.reference(_with(graph, trainer.parameters()), x),
                 "eval scores")


def _with(graph: cnnc.Graph, params: dict[str, np.ndarray]) -> cnnc.Graph:
    other = graph.copy()
    for key, value in params.items():
        layer, name = key.rsplit(".", 1)
        other.params(layer)[name] = value
    return other


def test_batchnorm_and_dropout_steps_follow_the_reference_trainer() -> None:
    graph = normalised()
    compiled = cnnc.compile_training(graph, optimizer=SGD(lr=0.1, momentum=0.9), batch_size=20,
                                     threads=2, seed=7)
    reference = ReferenceTrainer(graph, SGD(lr=0.1, momentum=0.9), seed=7)
    for step in range(4):
        x, y = batch(graph, 20 - step, "cross_entropy", seed=step)
        assert_allclose(compiled.step(x, y), reference.step(x, y), rtol=1e-4)
    for key, value in reference.parameters().items():
        agree(compiled.parameters()[key], value, key)


def test_compiled_lenet_of_the_book_matches_the_reference() -> None:
    graph = cnnc.load(Path(__file__).parent.parent / "examples" / "lenet.yaml")
    x, y = batch(graph, 20, "cross_entropy")
    expected = reference_backward(graph, x, y)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.9), batch_size=32, threads=1)
    assert_allclose(trainer.step(x, y), expected.loss, rtol=1e-5)
    for key, grad in expected.gradients.items():
        agree(trainer.gradients()[key], grad, key)


@pytest.mark.parametrize("optimizer", [
    lambda: SGD(lr=0.05, momentum=0.9, weight_decay=1e-2),
    lambda: SGD(lr=0.05, momentum=0.8, nesterov=True),
    lambda: Adam(lr=1e-2, weight_decay=1e-3),
], ids=["sgd-momentum-decay", "sgd-nesterov", "adam"])
def test_optimizer_steps_follow_the_reference_trainer(optimizer: Any) -> None:
    """Five steps on different batches: the compiled update keeps to the reference trainer
    (which follows torch.optim), so the state (momentum, moments, Adam's step) is right."""
    graph = build((1, 8, 8), LENET_8X8)
    compiled = cnnc.compile_training(graph, optimizer=optimizer(), batch_size=24, threads=1)
    reference = ReferenceTrainer(graph, optimizer())
    for step in range(5):
        x, y = batch(graph, 24 - step, "cross_entropy", seed=step)
        assert_allclose(compiled.step(x, y), reference.step(x, y), rtol=1e-4)
    for key, value in reference.parameters().items():
        agree(compiled.parameters()[key], value, key)


def test_every_thread_count_gives_the_same_bits() -> None:
    graph = build((3, 9, 10), VARIETY)
    results = []
    for threads in (1, 2, 3):
        trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.1, momentum=0.9),
                                        batch_size=64, threads=threads)
        losses = [trainer.step(*batch(graph, 50 + step, "cross_entropy", seed=step))
                  for step in range(3)]
        results.append((losses, trainer.parameters()))
    for losses, params in results[1:]:
        assert losses == results[0][0]
        for key, value in params.items():
            assert np.array_equal(value, results[0][1][key]), key


def test_d2l_6_2_compiled_learns_the_edge_kernel_as_pytorch_does() -> None:
    """D2L 6.2 with the compiled trainer: ten steps of gradient descent (lr 3e-2) on the
    summed squared error; after every step the kernel equals PyTorch's to 1e-6."""
    torch = pytest.importorskip("torch")
    image = np.ones((6, 8), np.float32)
    image[:, 2:6] = 0
    edges = image[:, :-1] - image[:, 1:]
    x, y = image.reshape(1, 1, 6, 8), edges.reshape(1, 1, 6, 7)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, kernel_size=(1, 2), bias=False)
    graph = cnnc.Graph("edge", (1, 6, 8))
    attrs = ops.OPS["conv2d"].check_attrs({"out_channels": 1, "kernel_size": [1, 2],
                                           "bias": False})
    graph.add("edge", "conv2d", ["input"], attrs, {"weight": conv.weight.detach().numpy()})
    graph.outputs = ["edge"]
    trainer = cnnc.compile_training(graph, loss="squared_error", reduction="sum",
                                    optimizer=SGD(lr=3e-2), batch_size=1, threads=1)
    for _ in range(10):
        value = trainer.step(x, y)
        loss = ((conv(torch.tensor(x)) - torch.tensor(y)) ** 2).sum()
        assert_allclose(value, loss.item(), rtol=1e-5)
        conv.zero_grad()
        loss.backward()
        conv.weight.data[:] -= 3e-2 * conv.weight.grad
        assert_allclose(trainer.parameters()["edge.weight"], conv.weight.detach().numpy(),
                        rtol=0, atol=1e-6)
    assert_allclose(trainer.parameters()["edge.weight"].reshape(2), [1, -1], atol=0.1)


def test_trained_weights_run_in_the_inference_model(tmp_path: Path) -> None:
    graph = build((1, 8, 8), LENET_8X8)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.5), batch_size=32, threads=1)
    for step in range(3):
        trainer.step(*batch(graph, 32, "cross_entropy", seed=step))
    x, _ = batch(graph, 7, "cross_entropy", seed=9)
    model = trainer.model()
    agree(model(x), trainer.scores(x), "scores")
    saved = np.load(trainer.save(tmp_path / "trained.npz"))
    for key, value in trainer.parameters().items():
        assert np.array_equal(saved[key], value)


def test_what_cannot_be_compiled_is_named_at_once() -> None:
    layers: list[Layer] = [
        ("c", "conv2d", ["input"], {"out_channels": 2, "kernel_size": 3}),
        ("pad", "pad", ["c"], {"pads": 1}),
        ("sm", "softmax", ["pad"], {}),
        ("f", "flatten", ["sm"], {}),
        ("d", "dense", ["f"], {"units": 3}),
    ]
    with pytest.raises(ModelError, match=r"'pad' \(pad\), 'sm' \(softmax\)"):
        cnnc.compile_training(build((1, 6, 6), layers), batch_size=4)


def test_bad_steps_are_clear_errors() -> None:
    graph = build((1, 8, 8), LENET_8X8)
    trainer = cnnc.compile_training(graph, batch_size=8, threads=1)
    x, y = batch(graph, 9, "cross_entropy")
    with pytest.raises(InputError, match="larger than the trainer's batch_size"):
        trainer.step(x, y)
    with pytest.raises(InputError):
        trainer.step(x[:4], y[:3])
    with pytest.raises(InputError):
        trainer.step(x[:4], np.array([0, 1, 2, 10]))
    with pytest.raises(InputError, match="unknown loss"):
        cnnc.compile_training(graph, loss="hinge")
    with pytest.raises(ModelError, match="cross_entropy needs class scores"):
        cnnc.compile_training(build((1, 6, 8), [("c", "conv2d", ["input"], {
            "out_channels": 1, "kernel_size": [1, 2]})]))


def test_a_layer_the_output_does_not_need_keeps_its_weights_and_gets_zero_gradients() -> None:
    layers: list[Layer] = [
        ("unused", "conv2d", ["input"], {"out_channels": 2, "kernel_size": 1}),
        ("c", "conv2d", ["input"], {"out_channels": 2, "kernel_size": 1}),
        ("r", "relu", ["c"], {}),
        ("drop", "dropout", ["r"], {"p": 0.2}),  # named like a forward kernel (dropout_2)
        ("f", "flatten", ["drop"], {}),
    ]
    graph = build((1, 2, 2), layers)
    x, y = batch(graph, 6, "cross_entropy")
    expected = reference_backward(graph, x, y, training=True)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.5), batch_size=8, threads=1)
    trainer.step(x, y)
    for key, grad in expected.gradients.items():
        agree(trainer.gradients()[key], grad, key)
    assert np.array_equal(trainer.parameters()["unused.weight"], graph.params("unused")["weight"])
