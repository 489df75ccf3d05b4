"""Optimizers, as data and as NumPy: `SGD` and `Adam` with PyTorch's update rules exactly
(`torch.optim.SGD`, `torch.optim.Adam`), so the same initial weights give the same trajectory.

An optimizer holds its hyperparameters and its state (momentum buffers, moments) per
parameter name; `step` updates the arrays it is given in place, in their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _check(name: str, value: float, low: float = 0.0) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)) or value < low:
        raise ValueError(f"{name} must be a number >= {low}, got {value!r}")


@dataclass
class SGD:
    """Stochastic gradient descent with optional momentum, Nesterov momentum and weight decay
    (L2, added to the gradient), as `torch.optim.SGD` with dampening 0."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    buffers: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            _check(name, getattr(self, name))
        if self.nesterov and self.momentum <= 0:
            raise ValueError("nesterov momentum needs a momentum > 0")

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update every array of `params` in place from its gradient in `grads`."""
        for key, param in params.items():
            grad = grads[key].astype(param.dtype)
            if self.weight_decay:
                grad = grad + self.weight_decay * param
            if self.momentum:
                if key in self.buffers:  # PyTorch's first step starts the buffer at grad
                    self.buffers[key] = self.momentum * self.buffers[key] + grad
                else:
                    self.buffers[key] = grad.copy()
                buffer = self.buffers[key]
                grad = grad + self.momentum * buffer if self.nesterov else buffer
            param -= self.lr * grad


@dataclass
class Adam:
    """Adam with bias correction and optional L2 weight decay (added to the gradient, not
    decoupled as in AdamW), as `torch.optim.Adam` without amsgrad."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: dict[str, int] = field(default_factory=dict, repr=False)
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay"):
            _check(name, getattr(self, name))
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update every array of `params` in place from its gradient in `grads`."""
        beta1, beta2 = self.betas
        for key, param in params.items():
            grad = grads[key].astype(param.dtype)
            if self.weight_decay:
                grad = grad + self.weight_decay * param
            first, second = self.moments.get(key, (np.zeros_like(param), np.zeros_like(param)))
            first = first + (1 - beta1) * (grad - first)  # torch's lerp_
            second = beta2 * second + (1 - beta2) * grad * grad
            self.moments[key] = (first, second)
            step = self.steps[key] = self.steps.get(key, 0) + 1
            correction1, correction2 = 1 - beta1**step, 1 - beta2**step
            denominator = np.sqrt(second) / np.sqrt(correction2) + self.eps
            param -= (self.lr / correction1) * first / denominator
