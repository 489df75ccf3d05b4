"""PyTorch's float32 autograd on a training case, for the fuzzer's envelope: where PyTorch
strays from the float64 reference as far as cnnc does, the step is ill-conditioned in
float32 at this input (a sum that cancels to float32 residue, relu at a pre-activation that
is 0 in float32 but not in float64) and the difference is not a wrong rule.

Ops run by their registry forms (`OpSpec.torch`); batch norm in training mode by
`torch.nn.functional.batch_norm`, dropout by the same masks the reference used.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph

Step = tuple[float, dict[str, np.ndarray]]  # a step's loss and gradients


def torch_step(graph: Graph, x: np.ndarray, y: np.ndarray, loss: str, reduction: str,
               masks: dict[str, np.ndarray]) -> Step | None:
    """The loss and every trained parameter's gradient by PyTorch in float32, in training
    mode; None when PyTorch is not installed or has no form of some op."""
    try:
        import torch
    except ImportError:
        return None
    weights = {f"{name}.{key}": torch.tensor(np.asarray(value, np.float32),
                                             requires_grad="running" not in key)
               for name in graph.order() for key, value in graph.params(name).items()}
    try:
        return _step(torch, graph, weights, x, y, loss, reduction, masks)
    except (RuntimeError, ValueError, TypeError):  # a form PyTorch rejects: no run, no excuse
        return None


def _step(torch: Any, graph: Graph, weights: dict[str, Any], x: np.ndarray, y: np.ndarray,
          loss: str, reduction: str, masks: dict[str, np.ndarray]) -> Step | None:
    values: dict[str, Any] = {INPUT: torch.tensor(np.asarray(x, np.float32))}
    functional = torch.nn.functional
    for name in graph.order():
        if name == INPUT:
            continue
        op, attrs = graph.op(name), graph.attrs(name)
        params = {key: weights[f"{name}.{key}"] for key in graph.params(name)}
        operands = [values[operand] for operand in graph.operands(name)]
        if op == "batchnorm2d":
            values[name] = functional.batch_norm(
                operands[0], params["running_mean"].detach().clone(),
                params["running_var"].detach().clone(), params["weight"], params["bias"],
                True, attrs.get("momentum", 0.1), attrs["eps"])
        elif name in masks:
            values[name] = operands[0] * torch.tensor(masks[name])
        else:
            form = ops.OPS[op].torch
            if form is None:
                return None
            values[name] = form(torch, attrs, defaultdict(lambda: None, params), operands)
    (output,) = graph.outputs
    out = values[output]
    if loss == "cross_entropy":
        value = functional.cross_entropy(out, torch.tensor(np.asarray(y, np.int64)),
                                         reduction=reduction)
    else:
        value = functional.mse_loss(out, torch.tensor(np.asarray(y, np.float32)),
                                    reduction=reduction)
    value.backward()
    gradients = {key: (tensor.grad.numpy().astype(np.float64) if tensor.grad is not None
                       else np.zeros(tuple(tensor.shape)))
                 for key, tensor in weights.items() if tensor.requires_grad}
    return float(value.item()), gradients


__all__ = ["torch_step"]
