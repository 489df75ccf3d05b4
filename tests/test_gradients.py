"""Every op's gradient rule in the registry, against central finite differences in float64 and
against PyTorch's autograd on the same values (float32, the one comparison rule).

A case applies the rule to a random output gradient R: the rule's result must be the gradient
of sum(op(inputs, params) * R) with respect to every input and trained parameter.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from cnnc import ops
from cnnc.compare import check_output

torch = pytest.importorskip("torch")


@dataclass(frozen=True)
class Case:
    """One op applied to inputs of per-sample `shapes`, batch 2."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    training: bool = False  # batchnorm over the batch's statistics
    ties: bool = False  # small integer inputs: max pooling must pick the first maximum
    scale: float = 1.0  # of the normal inputs, to reach both sides of kinks far from 0

    @property
    def id(self) -> str:
        written = ",".join(f"{key}={value}" for key, value in self.attrs.items())
        return f"{self.op}[{written}]" + ("-training" if self.training else "")


CASES = [
    Case("conv2d", ((3, 6, 7),), {"out_channels": 4, "kernel_size": 3}),
    Case("conv2d", ((4, 7, 6),), {"out_channels": 6, "kernel_size": [2, 3], "stride": [2, 1],
                                  "padding": [[1, 0], [2, 1]], "dilation": [1, 2], "groups": 2}),
    Case("conv2d", ((2, 5, 5),), {"out_channels": 2, "kernel_size": 2, "stride": 2,
                                  "padding": 1, "groups": 2, "bias": False}),
    Case("dense", ((7,),), {"units": 5}),
    Case("dense", ((4,),), {"units": 3, "bias": False}),
    Case("maxpool2d", ((3, 6, 6),), {"kernel_size": 3, "stride": 2, "padding": 1}),
    Case("maxpool2d", ((2, 7, 5),), {"kernel_size": 2, "ceil_mode": True}),
    Case("maxpool2d", ((2, 6, 6),), {"kernel_size": 3, "stride": 1}, ties=True),
    Case("avgpool2d", ((3, 6, 6),), {"kernel_size": 2, "stride": 2}),
    Case("avgpool2d", ((2, 7, 6),), {"kernel_size": 3, "stride": 2, "padding": 1,
                                     "ceil_mode": True}),
    Case("avgpool2d", ((2, 7, 6),), {"kernel_size": 3, "stride": 2, "padding": 1,
                                     "ceil_mode": True, "count_include_pad": False}),
    Case("global_avgpool2d", ((3, 4, 5),)),
    Case("batchnorm2d", ((3, 4, 4),), {"eps": 1e-3}),
    Case("batchnorm2d", ((3, 4, 4),), training=True),
    Case("sigmoid", ((3, 4, 4),)),
    Case("relu", ((3, 4, 4),)),
    Case("tanh", ((10,),)),
    Case("softmax", ((5,),)),
    Case("softmax", ((4, 3, 3),)),
    Case("flatten", ((2, 3, 4),)),
    Case("add", ((2, 3, 3), (2, 3, 3), (2, 3, 3))),
    Case("concat", ((2, 3, 3), (3, 3, 3))),
    Case("global_maxpool2d", ((3, 4, 5),)),
    Case("leaky_relu", ((3, 4, 4),), {"alpha": 0.2}),
    Case("relu6", ((3, 4, 4),), scale=5.0),
    Case("clip", ((12,),), {"min": -0.5, "max": 0.7}),
    Case("hardsigmoid", ((3, 4, 4),), {"alpha": 0.3, "beta": 0.4}, scale=3.0),
    Case("hardswish", ((3, 4, 4),), scale=3.0),
    Case("elu", ((3, 4, 4),), {"alpha": 0.7}),
    Case("gelu", ((3, 4, 4),), scale=2.0),
    Case("gelu", ((12,),), {"approximate": "tanh"}, scale=2.0),
    Case("silu", ((3, 4, 4),), scale=2.0),
    Case("identity", ((7,),)),
    Case("dropout", ((3, 2, 2),), {"p": 0.3}),
    Case("channel_mul", ((3, 2, 2),)),
    Case("channel_add", ((6,),)),
    Case("log_softmax", ((4, 3, 3),)),
    Case("pad", ((2, 3, 4),), {"pads": [[1, 0], [2, 1]], "value": 0.5}),
]


def test_every_op_has_a_gradient_rule_and_a_case() -> None:
    assert [name for name, spec in ops.OPS.items() if spec.gradient is None] == []
    assert sorted({case.op for case in CASES}) == sorted(ops.OPS)


def _draw(case: Case) -> tuple[dict[str, Any], list[np.ndarray], dict[str, np.ndarray]]:
    """Checked attributes, float64 inputs and parameters of a case; none near a kink of relu
    and, but for `ties`, no two inputs of a max pool within the finite difference's step."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    spec = ops.OPS[case.op]
    attrs = spec.check_attrs(case.attrs)
    if case.ties:
        inputs = [rng.integers(0, 3, (2, *shape)).astype(np.float64) for shape in case.shapes]
    else:
        inputs = [rng.normal(0, case.scale, (2, *shape)) for shape in case.shapes]
        inputs = [np.where(np.abs(x) < 0.05, x + 0.2, x) for x in inputs]
    params = {key: rng.normal(0, 0.5, shape)
              for key, shape in spec.param_shapes(attrs, list(case.shapes)).items()}
    if "running_var" in params:
        params["running_var"] = rng.uniform(0.5, 2.0, params["running_var"].shape)
    return attrs, inputs, params


def _forward(case: Case, attrs: dict[str, Any]
             ) -> Callable[[dict[str, np.ndarray], list[np.ndarray]], np.ndarray]:
    spec = ops.OPS[case.op]
    rule = spec.gradient
    assert rule is not None
    if case.training:
        assert rule.training_forward is not None
        forward = rule.training_forward
        return lambda params, xs: forward(attrs, params, xs)[0]
    return lambda params, xs: spec.compute(attrs, params, xs)


def _rule(case: Case, attrs: dict[str, Any], params: dict[str, np.ndarray],
          inputs: list[np.ndarray], grad_out: np.ndarray
          ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    rule = ops.OPS[case.op].gradient
    assert rule is not None
    vjp = rule.training_vjp if case.training and rule.training_vjp else rule.vjp
    out = _forward(case, attrs)(params, inputs)
    return vjp(attrs, params, inputs, out, grad_out)


def _numeric(function: Callable[[], float], array: np.ndarray, step: float = 1e-6
             ) -> np.ndarray:
    """d function / d array by central differences, one element at a time (in place)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        above = function()
        array[index] = saved - step
        below = function()
        array[index] = saved
        grad[index] = (above - below) / (2 * step)
    return grad


@pytest.mark.parametrize("case", [case for case in CASES if not case.ties], ids=lambda c: c.id)
def test_gradient_matches_finite_differences(case: Case) -> None:
    attrs, inputs, params = _draw(case)
    forward = _forward(case, attrs)
    grad_out = np.random.default_rng(1).normal(0, 1, forward(params, inputs).shape)
    grad_inputs, grad_params = _rule(case, attrs, params, inputs, grad_out)

    def objective() -> float:
        return float((forward(params, inputs) * grad_out).sum())

    rule = ops.OPS[case.op].gradient
    assert rule is not None
    assert sorted(grad_params) == sorted(key for key in params if key not in rule.buffers)
    assert len(grad_inputs) == len(inputs)
    for x, grad in zip(inputs, grad_inputs):
        np.testing.assert_allclose(grad, _numeric(objective, x), rtol=1e-6, atol=1e-8)
    for key, grad in grad_params.items():
        np.testing.assert_allclose(grad, _numeric(objective, params[key]), rtol=1e-6,
                                   atol=1e-8, err_msg=key)


def _torch_forward(case: Case, attrs: dict[str, Any], params: dict[str, Any],
                   inputs: list[Any]) -> Any:
    if case.training:  # torch.nn.BatchNorm2d in train(): batch statistics, running update
        return torch.nn.functional.batch_norm(
            inputs[0], params["running_mean"], params["running_var"], params["weight"],
            params["bias"], True, 0.1, attrs["eps"])
    form = ops.OPS[case.op].torch
    assert form is not None
    return form(torch, attrs, defaultdict(lambda: None, params), inputs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gradient_matches_pytorch_autograd(case: Case) -> None:
    attrs, inputs, params = _draw(case)
    buffers = ops.OPS[case.op].gradient.buffers  # type: ignore[union-attr]
    inputs32 = [x.astype(np.float32) for x in inputs]
    params32 = {key: value.astype(np.float32) for key, value in params.items()}
    grad_out = np.random.default_rng(1).normal(0, 1, _forward(case, attrs)(params, inputs).shape)
    grad_inputs, grad_params = _rule(case, attrs, {k: v.astype(np.float64) for k, v in
                                                   params32.items()},
                                     [x.astype(np.float64) for x in inputs32], grad_out)

    tensors = [torch.tensor(x, requires_grad=True) for x in inputs32]
    weights = {key: torch.tensor(value, requires_grad=key not in buffers)
               for key, value in params32.items()}
    out = _torch_forward(case, attrs, weights, tensors)
    out.backward(torch.tensor(grad_out, dtype=torch.float32))
    for number, (tensor, grad) in enumerate(zip(tensors, grad_inputs)):
        check = check_output(f"input {number}", tensor.grad.numpy(), grad.astype(np.float32))
        assert check.ok, check.describe()
    for key, grad in grad_params.items():
        check = check_output(key, weights[key].grad.numpy(), grad.astype(np.float32))
        assert check.ok, check.describe()
    if case.training:  # the running statistics move as torch's do
        rule = ops.OPS[case.op].gradient
        assert rule is not None and rule.training_forward is not None
        _, updated = rule.training_forward(attrs, params32, [inputs32[0].astype(np.float64)])
        for key in buffers:
            check = check_output(key, weights[key].numpy(), updated[key].astype(np.float32))
            assert check.ok, check.describe()


def test_max_pooling_sends_a_tied_window_to_its_first_maximum() -> None:
    spec = ops.OPS["maxpool2d"]
    assert spec.gradient is not None
    attrs = spec.check_attrs({"kernel_size": 2})
    x = np.array([[[[1.0, 1.0], [1.0, 0.0]]]])
    grads, _ = spec.gradient.vjp(attrs, {}, [x], spec.compute(attrs, {}, [x]),
                                 np.array([[[[5.0]]]]))
    np.testing.assert_array_equal(grads[0], [[[[5.0, 0.0], [0.0, 0.0]]]])
