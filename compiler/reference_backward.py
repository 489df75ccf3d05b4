"""The reference backward pass: the oracle for training, as `cnnc.reference` is for inference.

`reference_backward` runs a graph forward in float64 keeping every value, takes a loss, and
walks the graph backward op by op with each op's gradient rule from the registry. It is
written to be obviously right, not fast: it never fuses, and imports nothing from the passes
or the backends. `ReferenceTrainer` steps a `cnnc.optim` optimizer with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from cnnc import ops
from cnnc.data import Loss, check_targets
from cnnc.dropout import MASKED_OPS
from cnnc.dropout import dropout_masks as make_dropout_masks
from cnnc.errors import InputError, ModelError
from cnnc.graph import INPUT, Graph
from cnnc.reference import check_input

Reduction = Literal["mean", "sum"]


@dataclass
class Backward:
    """What one forward and backward pass gives: the loss, the gradient of every trained
    parameter keyed as in the weights file ("layer.param"), the gradient of the input, the
    output, and in training mode the new running statistics (also "layer.param") and the
    dropout masks it used ({layer: float32 mask})."""

    loss: float
    gradients: dict[str, np.ndarray]
    input_gradient: np.ndarray
    output: np.ndarray
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def loss_and_gradient(output: np.ndarray, target: np.ndarray, loss: Loss,
                      reduction: Reduction) -> tuple[float, np.ndarray]:
    """The loss of float64 `output` [N, ...] against checked `target`, and its gradient.

    cross_entropy: log-softmax over the class scores, fused (a max is subtracted so no exp
    overflows); its mean is over images. squared_error: (output - target)**2 with no factor
    1/2, as D2L and `torch.nn.MSELoss`; its mean is over every element, as MSELoss's."""
    if reduction not in ("mean", "sum"):
        raise InputError(f"unknown reduction '{reduction}'; expected mean or sum")
    if loss == "squared_error":
        difference = output - target
        scale = 1 / difference.size if reduction == "mean" else 1.0
        return float((difference**2).sum() * scale), 2 * difference * scale
    scores = output.reshape(len(output), -1)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probabilities = shifted - log_sum
    rows = np.arange(len(scores))
    scale = 1 / len(scores) if reduction == "mean" else 1.0
    value = -log_probabilities[rows, target].sum() * scale
    grad = np.exp(log_probabilities)
    grad[rows, target] -= 1
    return float(value), (grad * scale).reshape(output.shape)


def check_trainable(graph: Graph) -> None:
    """ModelError when `graph` cannot be trained: more than one output, or an op without a
    gradient rule (named, with its layer)."""
    if len(graph.outputs) != 1:
        raise ModelError(f"training needs a model with one output, model '{graph.name}' has "
                         f"{len(graph.outputs)}")
    for name in graph.order():
        if name != INPUT and ops.OPS[graph.op(name)].gradient is None:
            raise ModelError(f"op '{graph.op(name)}' has no gradient rule yet, so the model "
                             "cannot be trained through it", layer=name, op=graph.op(name))


def check_masks(graph: Graph, masks: dict[str, np.ndarray], batch: int
                ) -> dict[str, np.ndarray]:
    """The given dropout masks as float64, or InputError unless there is one of shape
    (batch, *layer's shape) for every dropout layer and no other."""
    wanted = [name for name in graph.order() if graph.op(name) in MASKED_OPS]
    unknown = sorted(set(masks) - set(wanted))
    if unknown:
        raise InputError(f"dropout masks given for {', '.join(map(repr, unknown))}, which "
                         f"are not dropout layers of model '{graph.name}'")
    checked = {}
    for name in wanted:
        if name not in masks:
            raise InputError(f"no dropout mask given for layer '{name}'")
        mask = np.asarray(masks[name])
        shape = (batch, *graph.shape(name))
        if mask.dtype.kind not in "fiub" or mask.shape != shape:
            raise InputError(f"layer '{name}': its dropout mask must be a float array of "
                             f"shape {shape}, got {mask.dtype} {mask.shape}")
        checked[name] = mask.astype(np.float64)
    return checked


def reference_backward(graph: Graph, x: object, y: object, *, loss: Loss = "cross_entropy",
                       reduction: Reduction = "mean", training: bool = False,
                       params: dict[str, np.ndarray] | None = None,
                       dropout_masks: dict[str, np.ndarray] | None = None, seed: int = 0,
                       step: int = 0, float32_values: str | None = None) -> Backward:
    """The loss of `graph` on batch `x` against targets `y`, and every gradient, in float64.

    `training` computes as `torch.nn.Module.train()` does (batchnorm over the batch's
    statistics, and its running statistics updated; dropout multiplies by a mask, the given
    `dropout_masks` or else those `cnnc.dropout.dropout_masks(graph, seed, step, batch)`
    makes); otherwise as `eval()`. `params` ("layer.param" -> array) replace the graph's own
    where given. `float32_values` ("nearest", "up" or "down") rounds every value and gradient
    between ops to float32 that way, as an engine that keeps them in float32 memory does (the
    arithmetic stays float64): how far that moves a result shows where float32 storage alone
    decides it (a sigmoid's `y (1 - y)` from an output that float32 holds as 1.0)."""
    check_trainable(graph)
    stored = _unchanged if float32_values is None else _float32_rounding(float32_values)
    per_image = 16 * sum(math.prod(graph.shape(name)) for name in graph.order())
    check_input(graph, x, per_image)  # one-line errors for a wrong shape or dtype
    x64 = np.asarray(x, dtype=np.float64)
    if len(x64) == 0:
        raise InputError("a training batch needs at least one image")
    (output_name,) = graph.outputs
    target = check_targets(np.asarray(y), graph.shape(output_name), loss, len(x64))
    params = params or {}
    masks: dict[str, np.ndarray] = {}
    if training:
        given = (dropout_masks if dropout_masks is not None
                 else make_dropout_masks(graph, seed, step, len(x64)))
        masks = check_masks(graph, given, len(x64))
    node_params = {name: {key: np.asarray(params.get(f"{name}.{key}", value), np.float64)
                          for key, value in graph.params(name).items()}
                   for name in graph.order()}

    values: dict[str, np.ndarray] = {INPUT: x64}
    buffers: dict[str, np.ndarray] = {}
    for name in graph.order():
        if name == INPUT:
            continue
        rule = ops.OPS[graph.op(name)].gradient
        assert rule is not None  # check_trainable
        # a masked op reads its mask as a last operand (see dropout's rule in cnnc.ops)
        operands = [values[operand] for operand in graph.operands(name)] + (
            [masks[name]] if name in masks else [])
        attrs = graph.attrs(name)
        if training and rule.training_forward is not None:
            values[name], updated = rule.training_forward(attrs, node_params[name], operands)
            buffers.update({f"{name}.{key}": value for key, value in updated.items()})
        else:
            values[name] = ops.OPS[graph.op(name)].compute(attrs, node_params[name], operands)
        values[name] = stored(values[name])

    value, grad_output = loss_and_gradient(values[output_name], target, loss, reduction)
    grads: dict[str, np.ndarray] = {output_name: grad_output}
    gradients: dict[str, np.ndarray] = {}
    for name in reversed(graph.order()):
        if name == INPUT:
            continue
        rule = ops.OPS[graph.op(name)].gradient
        assert rule is not None
        operands = graph.operands(name)
        trained = [key for key in node_params[name] if key not in rule.buffers]
        if name not in grads:  # the loss does not depend on this op
            gradients.update({f"{name}.{key}": np.zeros_like(node_params[name][key])
                              for key in trained})
            continue
        vjp = rule.training_vjp if training and rule.training_vjp is not None else rule.vjp
        inputs = [values[operand] for operand in operands] + (
            [masks[name]] if name in masks else [])
        grad_inputs, grad_params = vjp(graph.attrs(name), node_params[name], inputs,
                                       values[name], grads.pop(name))
        for operand, grad in zip(operands, grad_inputs):  # a value read twice sums both
            grad = stored(grad)
            grads[operand] = stored(grads[operand] + grad) if operand in grads else grad
        gradients.update({f"{name}.{key}": grad_params[key] for key in trained})
    input_gradient = grads.get(INPUT, np.zeros_like(x64))
    used = {name: mask.astype(np.float32) for name, mask in masks.items()}
    return Backward(value, gradients, input_gradient, values[output_name], buffers, used)


def _float32_rounding(mode: str) -> Callable[[np.ndarray], np.ndarray]:
    if mode not in ("nearest", "up", "down"):
        raise ValueError(f"float32_values must be nearest, up or down, got {mode!r}")

    def rounded(value: np.ndarray) -> np.ndarray:
        nearest = np.asarray(value, np.float32)
        if mode == "up":
            nearest = np.where(nearest < value, np.nextafter(nearest, np.float32(np.inf)),
                               nearest)
        elif mode == "down":
            nearest = np.where(nearest > value, np.nextafter(nearest, np.float32(-np.inf)),
                               nearest)
        return nearest.astype(np.float64)

    return rounded


def _unchanged(value: np.ndarray) -> np.ndarray:
    return value


class Optimizer(Protocol):
    """What `ReferenceTrainer` needs of an optimizer (`cnnc.optim.SGD`, `cnnc.optim.Adam`)."""

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None: ...


class ReferenceTrainer:
    """Trains a graph with the reference backward and a NumPy optimizer, in float64: slow and
    simple, the trajectory that compiled training must follow. Step k (from 0) draws its
    dropout masks from (`seed`, k), as the compiled trainer does."""

    def __init__(self, graph: Graph, optimizer: Optimizer, *, loss: Loss = "cross_entropy",
                 reduction: Reduction = "mean", training: bool = True, seed: int = 0) -> None:
        check_trainable(graph)
        self.graph = graph
        self.optimizer = optimizer
        self.loss: Loss = loss
        self.reduction: Reduction = reduction
        self.training = training
        self.seed = seed
        self.steps = 0  # steps taken: the `step` of the next step's dropout masks
        self.state = {f"{name}.{key}": value.astype(np.float64)
                      for name in graph.order() for key, value in graph.params(name).items()}

    def step(self, x: object, y: object) -> float:
        """One step on one batch; returns the loss before the step."""
        result = reference_backward(self.graph, x, y, loss=self.loss, reduction=self.reduction,
                                    training=self.training, params=self.state,
                                    seed=self.seed, step=self.steps)
        trained = {key: self.state[key] for key in result.gradients}
        self.optimizer.step(trained, result.gradients)
        self.state.update(result.buffers)
        self.steps += 1
        return result.loss

    def parameters(self) -> dict[str, np.ndarray]:
        """{"layer.param": float32 array}, the keys of the weights file."""
        return {key: value.astype(np.float32) for key, value in self.state.items()}
