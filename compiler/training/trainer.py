"""`cnnc.compile_training`: a model, a loss and an optimizer compiled into one native training
step, and the `Trainer` that feeds it batches.

The trainer owns the store (`cnnc.training.program`): the parameters, their gradients, the
optimizer's state and every batch block's values live in one float32 array, made once per
batch size. A step writes the targets into it, makes one native call (forward, loss,
backward, weight gradients, update) and reads the loss back.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.errors import InputError
from cnnc.frontend import load
from cnnc.graph import INPUT, Graph
from cnnc.passes.fuse import tensor_of
from cnnc.reference import check_input
from cnnc.training import program as programs
from cnnc.util import ceil_div

LOSSES = ("cross_entropy", "squared_error")
REDUCTIONS = ("mean", "sum")


@dataclass
class Epoch:
    """One epoch of `Trainer.fit`: the mean loss over its steps, accuracies (None when not
    measured) and the training throughput."""

    epoch: int
    loss: float
    train_accuracy: float | None
    test_accuracy: float | None
    images_per_second: float


@dataclass
class History:
    epochs: list[Epoch] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every step's loss, in order


class Trainer:
    """A compiled training step for batches of up to `batch_size` images."""

    def __init__(self, graph: Graph, loss: str, reduction: str, optimizer: Any, batch_size: int,
                 threads: int | None, use_cache: bool = True, seed: int = 0,
                 target: str = "llvm", check_bounds: bool = False) -> None:
        from cnnc.backends.llvm import runtime

        if loss not in LOSSES:
            raise InputError(f"unknown loss '{loss}'; expected {' or '.join(LOSSES)}")
        if reduction not in REDUCTIONS:
            raise InputError(f"unknown reduction '{reduction}'; expected mean or sum")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.graph = graph
        self.loss_name, self.reduction, self.optimizer = loss, reduction, optimizer
        self.batch_size = batch_size
        self.seed = seed  # of the dropout masks
        self.threads = max(1, threads or runtime.cpus())
        self.program = programs.build(graph, loss, optimizer, batch_size)
        self.target = target
        self.code = _code(self.program, target, self.threads, use_cache, check_bounds)
        self.store = np.zeros(self.program.store_floats + 16, np.float32)
        start = (-self.store.ctypes.data % 64) // 4
        self.store = self.store[start: start + self.program.store_floats]
        self.code.set_store(self.store)
        for name in self.program.graph.order():
            for key, value in self.program.graph.params(name).items():
                self._param_view(f"{name}.{key}")[...] = value
        for offset, data in self.program.constants:
            self.store[offset: offset + data.size] = data
        self.steps = 0
        self._blocks = self.store[self.program.global_floats:].reshape(
            self.program.blocks, self.program.block_floats)

    # --- the store ---------------------------------------------------------------------------

    def _param_view(self, key: str, region: int = 0) -> np.ndarray:
        offset, shape = self.program.params[key]
        start = region + offset
        return self.store[start: start + math.prod(shape)].reshape(shape)

    def _block_view(self, offset: int, floats: int, blocks: int) -> np.ndarray:
        """A per-block tensor of `floats` per image, as (blocks, floats, width)."""
        width = self.program.width
        return self._blocks[:blocks, offset: offset + floats * width].reshape(
            blocks, floats, width)

    @property
    def memory_bytes(self) -> int:
        """All of training's memory: parameters, gradients, optimizer state and every batch
        block's saved values and gradients (the store, planned once)."""
        return int(self.store.nbytes)

    def parameters(self) -> dict[str, np.ndarray]:
        """Every parameter, keyed as in the weights file ("layer.param"); those of layers the
        output does not depend on (pruned from the program) keep their initial values."""
        params = {f"{name}.{key}": value.copy() for name in self.graph.order()
                  for key, value in self.graph.params(name).items()}
        params.update({key: self._param_view(key).copy() for key in self.program.params})
        return params

    def gradients(self) -> dict[str, np.ndarray]:
        """The gradient of every trained parameter in the last step (zero for a layer the
        output does not depend on)."""
        from cnnc import ops

        region = self.program.grads_offset  # the params region starts the store
        grads = {}
        for name in self.graph.order():
            rule = ops.OPS[self.graph.op(name)].gradient if name != INPUT else None
            for key, value in self.graph.params(name).items():
                if rule is None or key not in rule.buffers:
                    grads[f"{name}.{key}"] = np.zeros_like(value)
        grads.update({key: self._param_view(key, region).copy()
                      for key in self.program.trained})
        return grads

    def save(self, path: str | Path) -> Path:
        """Write the parameters as a .npz weights file (`weights:` in the YAML)."""
        path = Path(path)
        with open(path, "wb") as file:
            np.savez(file, **self.parameters())  # type: ignore[arg-type]
        return path

    def model(self, target: str = "llvm", **options: Any) -> Any:
        """The inference model (`cnnc.compile`) with the trained parameters."""
        from cnnc.driver import compile as compile_model

        graph = self.graph.copy()
        for key, value in self.parameters().items():
            layer, param = key.rsplit(".", 1)
            graph.params(layer)[param] = value
        return compile_model(graph, target, **options)

    # --- running -----------------------------------------------------------------------------

    def _images(self, x: Any) -> np.ndarray:
        x = check_input(self.graph, x)
        if len(x) == 0:
            raise InputError("a training batch needs at least one image")
        if len(x) > self.batch_size:
            raise InputError(f"a batch of {len(x)} images is larger than the trainer's "
                             f"batch_size ({self.batch_size})")
        return np.ascontiguousarray(x, np.float32)

    def _targets(self, y: Any, count: int) -> np.ndarray:
        """Targets as float32 (count, classes): one-hot rows for cross entropy."""
        from cnnc.data import check_targets

        classes = self.program.classes
        target = check_targets(np.asarray(y), self.graph.shape(self.graph.outputs[0]),
                               self.loss_name, count)
        if self.loss_name == "cross_entropy":
            rows = np.zeros((count, classes), np.float32)
            rows[np.arange(count), target] = 1.0
            return rows
        return np.asarray(target, np.float32).reshape(count, classes)

    def step(self, x: Any, y: Any) -> float:
        """One step on a batch; returns its loss (the mean or the sum, as the reduction)."""
        images = self._images(x)
        count = len(images)
        targets = self._targets(y, count)
        for layer in self.program.stats_layers:
            if count * math.prod(self.graph.shape(layer)[1:]) < 2:
                raise InputError(f"layer '{layer}' (batchnorm2d) needs more than one value "
                                 "per channel in a training batch")
        program = self.program
        scale = (1.0 / count if self.loss_name == "cross_entropy"
                 else 1.0 / (count * program.classes)) if self.reduction == "mean" else 1.0
        self._write_images(program.target_offset, targets)
        self._write_images(program.weight_offset, np.full((count, 1), scale, np.float32))
        self._write_images(program.valid_offset, np.ones((count, 1), np.float32))
        if program.masks:
            self._write_masks(count)
        self.steps += 1
        self._hyper(count)
        self.code.run(program.step, images, count)
        blocks = ceil_div(count, program.width)
        losses = self._block_view(program.loss_offset, 1, blocks).reshape(-1)[:count]
        return float(losses.astype(np.float64).sum())

    def _write_images(self, offset: int, rows: np.ndarray) -> None:
        """Per-image values (count, floats) into the tensor at `offset` of every block, in
        the blocks' layout (the images of a block side by side); lanes past the batch get 0."""
        width = self.program.width
        count, floats = rows.shape
        blocks = ceil_div(count, width)
        padded = np.zeros((blocks * width, floats), np.float32)
        padded[:count] = rows
        self._block_view(offset, floats, blocks)[...] = \
            padded.reshape(blocks, width, floats).transpose(0, 2, 1)

    def _write_masks(self, count: int) -> None:
        """Step k's dropout masks (from the seed and k, as the reference trainer draws them),
        in the blocks' layout."""
        from cnnc.dropout import dropout_masks

        masks = dropout_masks(self.graph, self.seed, self.steps, count)
        for layer, offset in self.program.masks.items():  # the dropout layers the output needs
            self._write_images(offset, masks[layer].reshape(count, -1))

    def _hyper(self, count: int) -> None:
        from cnnc.optim import Adam

        self.store[self.program.hyper_offset + 2] = count
        if isinstance(self.optimizer, Adam):
            beta1, beta2 = self.optimizer.betas
            at = self.program.hyper_offset
            self.store[at] = -self.optimizer.lr / (1 - beta1**self.steps)
            self.store[at + 1] = math.sqrt(1 - beta2**self.steps)

    def profile(self, x: Any, y: Any, seconds: float = 2.0) -> str:
        """A table of where a step on (x, y) spends its time, kernel by kernel, on one thread
        (`cnnc.training.profile`); the trainer's state is as it was before."""
        from cnnc.training.profile import profile

        if self.target != "llvm":
            raise InputError("Trainer.profile times the llvm target's kernels; this trainer "
                             f"runs on {self.target}")
        self._targets(y, len(self._images(x)))  # a mistake is one clear error
        return profile(self, x, y, seconds)

    def scores(self, x: Any) -> np.ndarray:
        """The model's outputs on `x` with the current parameters, by the compiled forward
        kernels, `batch_size` images at a time."""
        images = check_input(self.graph, x)
        program = self.program
        out = np.empty((len(images), program.classes), np.float32)
        shape = self.graph.shape(self.graph.outputs[0])
        offset = program.tensors[tensor_of(program.graph, program.output)]
        for start in range(0, len(images), self.batch_size):
            chunk = np.ascontiguousarray(images[start: start + self.batch_size], np.float32)
            blocks = ceil_div(len(chunk), program.width)
            self.code.run(program.evaluate, chunk, len(chunk))
            values = self._block_view(offset, program.classes, blocks).transpose(0, 2, 1)
            out[start: start + len(chunk)] = values.reshape(-1, program.classes)[:len(chunk)]
        return out.reshape(len(images), *shape)

    def accuracy(self, x: Any, y: Any) -> float:
        return float((self.scores(x).argmax(axis=1) == np.asarray(y)).mean())

    def fit(self, x: Any, y: Any, epochs: int = 1, validation: tuple[Any, Any] | None = None,
            shuffle: bool = True, seed: int = 0, progress: bool = True,
            log: Any = None) -> History:
        """Train for `epochs` over (x, y) in batches of `batch_size` (the last one smaller),
        shuffled each epoch from `seed`; after each epoch measure the training and the
        `validation` accuracy (cross entropy). Prints a progress bar and a line per epoch to
        `log` (stderr) unless `progress` is False."""
        images = check_input(self.graph, x)
        labels = np.asarray(y)
        if len(labels) != len(images):
            raise InputError(f"x has {len(images)} images but y has {len(labels)} targets")
        out = log if log is not None else sys.stderr
        history = History()
        rng = np.random.default_rng(seed)
        steps = ceil_div(len(images), self.batch_size)
        for epoch in range(1, epochs + 1):
            order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
            started = time.perf_counter()
            total = 0.0
            for number in range(steps):
                chosen = order[number * self.batch_size: (number + 1) * self.batch_size]
                value = self.step(images[chosen], labels[chosen])
                history.losses.append(value)
                total += value * (len(chosen) if self.reduction == "mean" else 1)
                if progress:
                    done = (number + 1) * 30 // steps
                    out.write(f"\repoch {epoch}/{epochs} [{'#' * done}{'.' * (30 - done)}] "
                              f"loss {value:.4f}")
                    out.flush()
            seconds = time.perf_counter() - started
            mean = total / len(images) if self.reduction == "mean" else total / steps
            classify = self.loss_name == "cross_entropy"
            train = self.accuracy(images, labels) if classify else None
            test = self.accuracy(*validation) if classify and validation is not None else None
            record = Epoch(epoch, mean, train, test, len(images) / seconds)
            history.epochs.append(record)
            if progress:
                out.write("\r" + describe(record) + " " * 20 + "\n")
                out.flush()
        return history


def _code(program: programs.TrainingProgram, target: str, threads: int, use_cache: bool,
          check_bounds: bool) -> Any:
    """The compiled step: LLVM for the host CPU, or CUDA C for a GPU or cuda-sim."""
    if target == "llvm":
        from cnnc.backends.llvm.training import LlvmTrainingCode

        if check_bounds:
            raise InputError("check_bounds is a check of the CUDA targets' generated code; "
                             "use target='cuda-sim' with it")
        return LlvmTrainingCode(program, threads, use_cache)
    if target in ("cuda", "cuda-sim"):
        from cnnc.backends.cuda.training import CudaTrainingCode

        return CudaTrainingCode(program, target, use_cache, check_bounds)
    raise InputError(f"unknown training target '{target}'; expected llvm, cuda or cuda-sim")


def describe(epoch: Epoch) -> str:
    parts = [f"epoch {epoch.epoch}: loss {epoch.loss:.4f}"]
    if epoch.train_accuracy is not None:
        parts.append(f"train acc {epoch.train_accuracy:.3f}")
    if epoch.test_accuracy is not None:
        parts.append(f"test acc {epoch.test_accuracy:.3f}")
    parts.append(f"{epoch.images_per_second:,.0f} images/s")
    return ", ".join(parts)


def compile_training(model: str | Path | Graph, loss: str = "cross_entropy",
                     reduction: str = "mean", optimizer: Any = None, batch_size: int = 256,
                     threads: int | None = None, init: str | None = None, seed: int = 0,
                     use_cache: bool = True, target: str = "llvm",
                     check_bounds: bool = False) -> Trainer:
    """Compile a training step of `model` for the host CPU: forward, `loss` (cross_entropy
    with integer labels, or squared_error) with `reduction`, backward and `optimizer`'s
    update (`cnnc.optim.SGD` or `Adam`; default SGD(lr=0.1)), as one native call per batch.
    Initial weights are the model's (`weights:` or `seed:`), or `init` ("xavier_uniform")
    drawn from `seed`; step k's dropout masks are drawn from (`seed`, k). `target` "cuda"
    runs the step on a GPU and "cuda-sim" runs the same CUDA C on the CPU (with
    `check_bounds`, every access checks its index)."""
    from cnnc.driver import check_threads
    from cnnc.optim import SGD

    check_threads(threads)
    graph = (model.copy() if isinstance(model, Graph) else load(model))
    if init is not None:
        from cnnc.init import apply_init

        apply_init(graph, init, seed)
    return Trainer(graph, loss, reduction, optimizer if optimizer is not None else SGD(lr=0.1),
                   batch_size, threads, use_cache, seed, target, check_bounds)
