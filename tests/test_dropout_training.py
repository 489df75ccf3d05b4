"""Dropout in training mode: the host-made seeded mask (its statistics, determinism and the
p = 0 and p = 1 ends), dropout's training rule against PyTorch's autograd of x * mask, and the
reference backward of a graph with two dropout layers against autograd with the same masks."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest

import cnnc
from cnnc import ops
from cnnc.compare import check_output
from cnnc.dropout import dropout_mask, dropout_masks
from cnnc.errors import InputError, ModelError
from cnnc.optim import SGD
from cnnc.reference_backward import ReferenceTrainer, reference_backward

torch = pytest.importorskip("torch")

LAYERS: list[tuple[str, str, list[str], dict[str, Any]]] = [
    ("c1", "conv2d", ["input"], {"out_channels": 4, "kernel_size": 3, "padding": 1}),
    ("r1", "relu", ["c1"], {}),
    ("drop1", "dropout", ["r1"], {"p": 0.25}),
    ("f", "flatten", ["drop1"], {}),
    ("d1", "dense", ["f"], {"units": 12}),
    ("t1", "tanh", ["d1"], {}),
    ("drop2", "dropout", ["t1"], {"p": 0.5}),
    ("d2", "dense", ["drop2"], {"units": 5}),
]


def build() -> cnnc.Graph:
    rng = np.random.default_rng(3)
    graph = cnnc.Graph("dropped", (2, 5, 5))
    for name, op, inputs, raw in LAYERS:
        spec = ops.OPS[op]
        attrs = spec.check_attrs(raw)
        shapes = spec.param_shapes(attrs, [graph.shape(operand) for operand in inputs])
        params = {key: rng.normal(0, 0.5, shape).astype(np.float32)
                  for key, shape in shapes.items()}
        graph.add(name, op, inputs, attrs, params)
    graph.outputs = ["d2"]
    return graph


def test_mask_has_the_dropout_statistics() -> None:
    mask = dropout_mask(7, 3, "drop1", (256, 8, 8, 8), 0.3)
    assert mask.dtype == np.float32 and mask.shape == (256, 8, 8, 8)
    assert sorted(np.unique(mask)) == [0.0, np.float32(1 / 0.7)]
    kept = float((mask != 0).mean())
    # 131,072 draws: the kept fraction's standard deviation is 0.0013; allow 5 of them
    assert abs(kept - 0.7) < 0.0065
    assert abs(float(mask.mean()) - 1.0) < 0.0065 / 0.7  # the scale keeps the expectation


def test_mask_is_deterministic_in_seed_step_and_layer() -> None:
    mask = dropout_mask(7, 3, "drop1", (4, 6, 5), 0.5)
    np.testing.assert_array_equal(mask, dropout_mask(7, 3, "drop1", (4, 6, 5), 0.5))
    for other in (dropout_mask(8, 3, "drop1", (4, 6, 5), 0.5),
                  dropout_mask(7, 4, "drop1", (4, 6, 5), 0.5),
                  dropout_mask(7, 3, "drop2", (4, 6, 5), 0.5)):
        assert (other != mask).mean() > 0.3  # a fresh draw: about half the elements differ


def test_p_zero_keeps_everything_and_p_one_drops_everything() -> None:
    np.testing.assert_array_equal(dropout_mask(0, 0, "d", (3, 4), 0.0), np.ones((3, 4)))
    np.testing.assert_array_equal(dropout_mask(0, 0, "d", (3, 4), 1.0), np.zeros((3, 4)))
    assert dropout_mask(0, 0, "d", (3, 4), 1.0).dtype == np.float32
    for p, x in ((0.0, torch.randn(3, 4)), (1.0, torch.randn(3, 4))):  # as PyTorch's
        expected = torch.nn.functional.dropout(x, p, training=True).numpy()
        np.testing.assert_array_equal(x.numpy() * dropout_mask(0, 0, "d", (3, 4), p), expected)


@pytest.mark.parametrize(("args", "message"), [
    ((0, 0, "d", (2,), 1.5), "dropout probability p must be between 0 and 1, got 1.5"),
    ((0, 0, "d", (2,), -0.1), "dropout probability p must be between 0 and 1, got -0.1"),
    ((-1, 0, "d", (2,), 0.5), "dropout seed must be an integer >= 0, got -1"),
    ((0, 2.5, "d", (2,), 0.5), "dropout step must be an integer >= 0, got 2.5"),
])
def test_a_wrong_mask_argument_is_a_one_line_error(args: Any, message: str) -> None:
    with pytest.raises(ValueError) as error:
        dropout_mask(*args)
    assert str(error.value) == message


def test_graph_masks_cover_every_dropout_layer_with_the_batch_axis() -> None:
    graph = build()
    masks = dropout_masks(graph, 5, 2, 3)
    assert {name: mask.shape for name, mask in masks.items()} == {
        "drop1": (3, 4, 5, 5), "drop2": (3, 12)}
    np.testing.assert_array_equal(masks["drop2"], dropout_mask(5, 2, "drop2", (3, 12), 0.5))
    graph.attrs("drop1")["p"] = 2.0
    with pytest.raises(ModelError, match=r"^layer 'drop1' \(dropout\): dropout probability"):
        dropout_masks(graph, 5, 2, 3)


def test_training_rule_matches_autograd_of_x_times_mask() -> None:
    rule = ops.OPS["dropout"].gradient
    assert rule is not None and rule.training_forward and rule.training_vjp
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)
    mask = dropout_mask(1, 0, "drop", x.shape, 0.4)
    grad_out = rng.normal(0, 1, x.shape)
    attrs = ops.OPS["dropout"].check_attrs({"p": 0.4})
    inputs = [x.astype(np.float64), mask.astype(np.float64)]
    out, updated = rule.training_forward(attrs, {}, inputs)
    (grad_x,), grad_params = rule.training_vjp(attrs, {}, inputs, out, grad_out)
    assert updated == {} and grad_params == {}

    tensor = torch.tensor(x, requires_grad=True)
    expected = tensor * torch.tensor(mask)
    expected.backward(torch.tensor(grad_out, dtype=torch.float32))
    for what, want, got in (("output", expected.detach().numpy(), out),
                            ("input gradient", tensor.grad.numpy(), grad_x)):
        check = check_output(what, want, got.astype(np.float32))
        assert check.ok, check.describe()
    assert (grad_x[mask == 0] == 0).all()  # a dropped element gets no gradient


def test_training_rule_without_its_mask_says_so() -> None:
    rule = ops.OPS["dropout"].gradient
    assert rule is not None and rule.training_forward
    with pytest.raises(ValueError, match="needs its mask, of the input's shape, as a second"):
        rule.training_forward({"p": 0.5}, {}, [np.ones((2, 3))])


def torch_run(graph: cnnc.Graph, weights: dict[str, Any], x: Any,
              masks: dict[str, np.ndarray]) -> Any:
    """`graph` in torch.nn.functional, each dropout layer as x * its mask."""
    values = {"input": x}
    for name in graph.order()[1:]:
        operands = [values[operand] for operand in graph.operands(name)]
        if graph.op(name) == "dropout":
            values[name] = operands[0] * torch.tensor(masks[name])
            continue
        params = {key: weights[f"{name}.{key}"] for key in graph.params(name)}
        form = ops.OPS[graph.op(name)].torch
        assert form is not None
        values[name] = form(torch, graph.attrs(name), defaultdict(lambda: None, params),
                            operands)
    return values[graph.outputs[0]]


def test_reference_backward_with_dropout_matches_autograd() -> None:
    graph = build()
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (6, 2, 5, 5)).astype(np.float32)
    y = rng.integers(0, 5, 6)
    result = reference_backward(graph, x, y, training=True, seed=11, step=4)
    masks = dropout_masks(graph, 11, 4, 6)
    assert sorted(result.masks) == ["drop1", "drop2"]
    for name, mask in masks.items():
        np.testing.assert_array_equal(result.masks[name], mask)
        assert 0 < (mask == 0).mean() < 1  # some dropped, some kept: the test means something

    weights = {f"{name}.{key}": torch.tensor(value, requires_grad=True)
               for name in graph.order() for key, value in graph.params(name).items()}
    x_tensor = torch.tensor(x, requires_grad=True)
    out = torch_run(graph, weights, x_tensor, masks)
    value = torch.nn.functional.cross_entropy(out, torch.tensor(y))
    value.backward()
    check = check_output("loss", value.detach().numpy(), np.float32(result.loss))
    assert check.ok, check.describe()
    check = check_output("input", x_tensor.grad.numpy(), result.input_gradient.astype(np.float32))
    assert check.ok, check.describe()
    assert sorted(result.gradients) == sorted(weights)
    for key, tensor in weights.items():
        check = check_output(key, tensor.grad.numpy(), result.gradients[key].astype(np.float32))
        assert check.ok, check.describe()

    given = reference_backward(graph, x, y, training=True, dropout_masks=masks)
    assert given.loss == result.loss  # the given masks are the ones used
    evaluated = reference_backward(graph, x, y, training=False)
    assert evaluated.masks == {} and evaluated.loss != result.loss  # eval: no dropout


@pytest.mark.parametrize(("change", "message"), [
    (lambda masks: masks.pop("drop2"), "no dropout mask given for layer 'drop2'"),
    (lambda masks: masks.update(d1=np.ones((2, 12))),
     "dropout masks given for 'd1', which are not dropout layers of model 'dropped'"),
    (lambda masks: masks.update(drop2=np.ones((3, 12))),
     r"layer 'drop2': its dropout mask must be a float array of shape \(2, 12\), "
     r"got float64 \(3, 12\)"),
])
def test_wrong_masks_are_one_line_input_errors(change: Any, message: str) -> None:
    graph = build()
    masks = dropout_masks(graph, 0, 0, 2)
    change(masks)
    with pytest.raises(InputError, match=f"^{message}$"):
        reference_backward(graph, np.zeros((2, 2, 5, 5)), [0, 1], training=True,
                           dropout_masks=masks)


def test_reference_trainer_draws_each_steps_masks_from_its_step() -> None:
    graph = build()
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (4, 2, 5, 5)).astype(np.float32)
    y = rng.integers(0, 5, 4)
    trainer = ReferenceTrainer(graph, SGD(lr=0.0), seed=9)  # lr 0: only the masks change
    losses = [trainer.step(x, y) for _ in range(3)]
    assert trainer.steps == 3
    expected = [reference_backward(graph, x, y, training=True, seed=9, step=step).loss
                for step in range(3)]
    assert losses == expected
    assert len(set(losses)) == 3
