"""The zoo's models in PyTorch: each `torch.nn` definition beside its cnnc YAML file, initialised
with PyTorch's default init from a fixed seed, written as `NAME.weights.npz` (the keys of its
`state_dict`, which are the YAML's `<layer>.<parameter>` names), and checked: cnnc's NumPy
reference on the YAML model must match the PyTorch forward at rtol=1e-4, atol=1e-5.

The weights files are not in the repository (mnist_cnn's alone is 4.8 MB); they take well under
a second to make, the same bytes every time for one PyTorch version:
    python examples/zoo/make_weights.py [--out DIR] [--models lenet,vgg_bn]
Needs torch; tests/test_zoo.py and `python -m cnnc.tools.zoo` import this file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ZOO = Path(__file__).resolve().parent
SEED = 0
# Batch norm starts as the identity (mean 0, variance 1): a few forward passes in training
# mode on random images give its running statistics values that make the check mean something.
CALIBRATION_BATCHES = 4


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2, 2), nn.Flatten(),
        nn.Linear(400, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, 10))


def lenet_modern() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10))


def vgg_bn() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


def _conv_bn_relu(inputs: int, outputs: int, kernel: int, stride: int = 1,
                  groups: int = 1, activation: type[nn.Module] = nn.ReLU6) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(outputs), activation()]


def mobilenet() -> nn.Module:
    """MobileNet v1's blocks with ReLU6, and v3's Hardswish in the stem."""
    layers = _conv_bn_relu(3, 16, 3, activation=nn.Hardswish)
    channels = 16
    for width, stride in [(32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]:
        layers += _conv_bn_relu(channels, channels, 3, stride, groups=channels)
        layers += _conv_bn_relu(channels, width, 1)
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def nin() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for width, kernel, out in [(32, 5, 32), (64, 3, 64), (64, 3, 10)]:
        layers += [nn.Conv2d(channels, width, kernel, padding=kernel // 2), nn.ReLU(),
                   nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, out, 1), nn.ReLU()]
        if out != 10:
            layers.append(nn.MaxPool2d(3, 2, padding=1))
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ResNet8(nn.Module):
    """CIFAR ResNet-8: attribute names are the YAML's layer names, so the state_dict fits."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        channels = 16
        for stage, width in ((1, 16), (2, 32), (3, 64)):
            stride = 1 if stage == 1 else 2
            self.add_module(f"s{stage}_conv1",
                            nn.Conv2d(channels, width, 3, stride, 1, bias=False))
            self.add_module(f"s{stage}_bn1", nn.BatchNorm2d(width))
            self.add_module(f"s{stage}_conv2", nn.Conv2d(width, width, 3, 1, 1, bias=False))
            self.add_module(f"s{stage}_bn2", nn.BatchNorm2d(width))
            if stride != 1:
                self.add_module(f"s{stage}_short",
                                nn.Conv2d(channels, width, 1, stride, bias=False))
                self.add_module(f"s{stage}_short_bn", nn.BatchNorm2d(width))
            channels = width
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        for stage in (1, 2, 3):
            def layer(name: str) -> nn.Module:
                return getattr(self, f"s{stage}_{name}")  # noqa: B023 - called at once

            y = torch.relu(layer("bn1")(layer("conv1")(x)))
            y = layer("bn2")(layer("conv2")(y))
            shortcut = x if stage == 1 else layer("short_bn")(layer("short")(x))
            x = torch.relu(y + shortcut)
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def resnet8() -> nn.Module:
    return ResNet8()


# name -> (definition, per-sample input shape); the YAML file is ZOO / f"{name}.yaml".
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "lenet": (lenet, (1, 28, 28)),
    "lenet_modern": (lenet_modern, (1, 28, 28)),
    "mnist_cnn": (mnist_cnn, (1, 28, 28)),
    "vgg_bn": (vgg_bn, (3, 32, 32)),
    "resnet8": (resnet8, (3, 32, 32)),
    "mobilenet": (mobilenet, (3, 32, 32)),
    "nin": (nin, (3, 32, 32)),
}


def build(name: str) -> nn.Module:
    """The model `name` in eval mode, initialised by PyTorch from SEED (and its batch-norm
    statistics calibrated on random images drawn from SEED)."""
    definition, shape = MODELS[name]
    torch.manual_seed(SEED)
    model = definition()
    if any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        generator = torch.Generator().manual_seed(SEED)
        model.train()
        with torch.no_grad():
            for _ in range(CALIBRATION_BATCHES):
                model(torch.rand((16, *shape), generator=generator))
    return model.eval()


def state(model: nn.Module) -> dict[str, np.ndarray]:
    """The parameters as cnnc's weights format wants them: float32, no step counters."""
    return {key: value.detach().numpy().astype(np.float32)
            for key, value in model.state_dict().items()
            if not key.endswith("num_batches_tracked")}


def forward(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def write(name: str, directory: Path = ZOO) -> Path:
    """Write `directory/NAME.weights.npz`, and the YAML beside it when `directory` is not the
    zoo itself; returns the YAML's path. The file is replaced in one step, so that a process
    reading it meanwhile sees the old or the new file, never half of one."""
    directory.mkdir(parents=True, exist_ok=True)
    if directory.resolve() != ZOO:
        shutil.copyfile(ZOO / f"{name}.yaml", directory / f"{name}.yaml")
    target = directory / f"{name}.weights.npz"
    arrays: dict[str, Any] = state(build(name))  # Any: savez's other keyword is a bool
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz", delete=False) as file:
        np.savez(file, **arrays)
    os.replace(file.name, target)
    return directory / f"{name}.yaml"


def check(name: str, directory: Path = ZOO, batch: int = 3) -> float:
    """The largest absolute difference between cnnc's reference (on the YAML model and its
    weights file in `directory`) and PyTorch's forward; raises AssertionError, saying where,
    when they do not agree at rtol=1e-4, atol=1e-5."""
    import cnnc
    from cnnc.compare import check_outputs

    graph = cnnc.load(directory / f"{name}.yaml")
    x = np.random.default_rng([SEED, batch]).random((batch, *graph.input_shape), np.float32)
    checks = check_outputs(forward(build(name), x), cnnc.reference(graph, x))
    for result in checks:
        if not result.ok:
            raise AssertionError(f"{name}: cnnc's reference and PyTorch disagree: "
                                 f"{result.describe()}")
    return max(result.max_abs for result in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ZOO,
                        help="directory of the weights files (and YAML copies); default: here")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated names; default: all")
    args = parser.parse_args(argv)
    names = [name for name in args.models.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        print(f"error: unknown model '{unknown[0]}'; expected one of {', '.join(MODELS)}",
              file=sys.stderr)
        return 2
    for name in names:
        write(name, args.out)
        error = check(name, args.out)
        size = (args.out / f"{name}.weights.npz").stat().st_size
        print(f"{name:<13} {size / 1e6:5.2f} MB  reference matches PyTorch "
              f"(max abs difference {error:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
