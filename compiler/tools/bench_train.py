"""`cnnc bench --train`: cnnc's compiled training step side by side with PyTorch eager, from the
same initial weights on the same batches (SGD, cross entropy with the mean).

Each engine runs in a process of its own (`cnnc.tools.workers`). Before anything is timed,
each takes one step from the model's weights on the same batch: the losses and every parameter
after the step must agree (`cnnc.compare`), or the bench stops with an error naming the
parameter. Then, after a warm-up, the engines are timed interleaved in rounds of steps and we
report the median. Training FLOPs are counted as 3 x the forward FLOPs (forward, input
gradients, weight gradients), the usual convention.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.compare import ATOL, RTOL, check_output
from cnnc.graph import Graph
from cnnc.tools.bench import (
    ANSWER_SECONDS,
    SETTLE_SECONDS,
    START_SECONDS,
    RoundTimes,
    _format_seconds,
)
from cnnc.tools.engines import EngineUnavailable
from cnnc.tools.train_engines import (
    CHECK_IMAGES,
    ENGINE_NAMES,
    EngineName,
    Session,
    make_stepper,
    peak_rss_bytes,
    serve,
    train_batches,
)
from cnnc.tools.workers import Worker, WorkerError

TRAINING_FLOPS_PER_FORWARD = 3  # forward + gradient of the inputs + gradient of the weights
FLOP_CONVENTION = "training FLOPs = 3 x forward FLOPs per image"
ROUND_SECONDS = 0.5  # about how long one timed round of steps lasts, per engine


class TrainBenchError(Exception):
    """The bench cannot go on: the peers disagree after a step, a process died or hung, or
    the model cannot be trained by one of them. The message is one line."""


class LocalRunner:
    """An engine's session in this process (the tests use it)."""

    def __init__(self, engine: EngineName, graph: Graph, batch: int, threads: int, lr: float,
                 data: str, seed: int) -> None:
        self.session = Session(make_stepper(engine, graph, batch, threads, lr),
                               train_batches(graph, data, batch, seed),
                               peak_rss_bytes())

    def ask(self, kind: str, *arguments: Any) -> Any:
        return self.session.actions()[kind](*arguments)

    def close(self) -> None:
        pass


class ProcessRunner:
    """An engine's session in a process of its own; `ready` waits for it to be built."""

    def __init__(self, engine: EngineName, graph: Graph, batch: int, threads: int, lr: float,
                 data: str, seed: int) -> None:
        self.engine = engine
        self.worker = Worker(f"the {engine} training process", serve, engine, graph, batch,
                             threads, lr, data, seed)

    def ready(self) -> None:
        status, detail = self.worker.receive(START_SECONDS)
        if status != "ready":
            raise TrainBenchError(f"{self.engine} cannot train this model: {detail}")

    def ask(self, kind: str, *arguments: Any) -> Any:
        status, answer = self.worker.ask((kind, *arguments), ANSWER_SECONDS)
        if status != "ok":
            raise TrainBenchError(f"{self.engine} failed: {answer}")
        return answer

    def close(self) -> None:
        self.worker.stop(("stop",))


Runner = LocalRunner | ProcessRunner


@dataclass
class TrainResult(RoundTimes):
    engine: str
    threads: int
    batch: int
    seconds: list[float] = field(default_factory=list)  # per step, one entry per round
    store_bytes: int | None = None  # cnnc's training store; None for torch
    base_rss_bytes: int = 0  # the process's peak RSS after importing the engine's package
    peak_rss_bytes: int = 0  # its peak RSS after the timed rounds
    peak_share: float = 0.0  # of threads x the measured per-core fp32 peak


@dataclass
class Check:
    """The step both engines took from the same weights before timing."""

    batch: int
    threads: int
    cnnc_loss: float
    torch_loss: float
    parameters: int
    max_abs: float  # the largest |cnnc - torch| over every parameter after the step


@dataclass
class TrainReport:
    model: str
    lr: float
    data: str
    forward_flops: int  # per image
    peak_gflops_per_core: float
    peak_note: str
    results: list[TrainResult] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    def ratio(self, threads: int, batch: int) -> float:
        rates = {result.engine: result.images_per_second for result in self.results
                 if (result.threads, result.batch) == (threads, batch)}
        return rates["cnnc"] / rates["torch"]

    def points(self) -> list[dict[str, Any]]:
        keys = list(dict.fromkeys((result.threads, result.batch) for result in self.results))
        rows = []
        for threads, batch in keys:
            rates = {result.engine: result for result in self.results
                     if (result.threads, result.batch) == (threads, batch)}
            rows.append({"threads": threads, "batch": batch,
                         "cnnc_images_per_second": rates["cnnc"].images_per_second,
                         "torch_images_per_second": rates["torch"].images_per_second,
                         "ratio": self.ratio(threads, batch),
                         "cnnc_peak_share": rates["cnnc"].peak_share})
        return rows

    def table(self) -> str:
        lines = [f"training {self.model}: SGD(lr={self.lr:g}), cross entropy (mean), "
                 f"{self.data} data; cnnc against PyTorch eager"]
        for check in self.checks:
            lines.append(f"check (threads {check.threads}, {check.batch} images): one step from "
                         f"the same weights, loss {check.cnnc_loss:.6g} (cnnc) and "
                         f"{check.torch_loss:.6g} (torch), {check.parameters} parameters "
                         f"agree after it (max abs difference {check.max_abs:.2g})")
        header = (f"{'threads':>7} {'batch':>5}  {'engine':<6} {'step':>9} {'spread':>6} "
                  f"{'images/s':>9} {'cnnc/torch':>10} {'% of peak':>9} {'memory':>9} "
                  f"{'peak RSS':>9} {'RSS rise':>9}")
        lines += [header, "-" * len(header)]
        for result in self.results:
            ratio = (f"{self.ratio(result.threads, result.batch):>9.2f}x"
                     if result.engine == "cnnc" else f"{'':>10}")
            memory = _mib(result.store_bytes) if result.store_bytes is not None else "-"
            lines.append(
                f"{result.threads:>7} {result.batch:>5}  {result.engine:<6} "
                f"{_format_seconds(result.median):>9} {result.spread:>6.0%} "
                f"{result.images_per_second:>9,.0f} {ratio} {result.peak_share:>9.1%} "
                f"{memory:>9} {_mib(result.peak_rss_bytes):>9} "
                f"{_mib(result.peak_rss_bytes - result.base_rss_bytes):>9}")
        lines += [
            f"note: {FLOP_CONVENTION} ({self.forward_flops / 1e6:.3g} MFLOP forward); % of "
            f"peak = images/s x training FLOPs / (threads x {self.peak_note})",
            "note: memory = cnnc's training store (trainer.store.nbytes: parameters, "
            "gradients, optimizer state and one batch's saved activations); peak RSS = the "
            "engine's process after the timed rounds (getrusage); RSS rise = peak RSS minus "
            "the peak after importing the engine's package"]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": {"name": "SGD", "lr": self.lr},
                "loss": "cross_entropy", "reduction": "mean", "data": self.data,
                "flop_convention": FLOP_CONVENTION,
                "forward_flops_per_image": self.forward_flops,
                "training_flops_per_image": TRAINING_FLOPS_PER_FORWARD * self.forward_flops,
                "peak_gflops_per_core": self.peak_gflops_per_core, "peak": self.peak_note,
                "checks": [asdict(check) for check in self.checks],
                "points": self.points(),
                "results": [result.as_dict() for result in self.results]}


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"


def check_step(graph: Graph, batch: int, threads: int, cnnc: tuple[float, Any],
               torch: tuple[float, Any]) -> Check:
    """The check before timing: the losses and every parameter after one step agree, or
    TrainBenchError names the first parameter that does not."""
    (cnnc_loss, cnnc_params), (torch_loss, torch_params) = cnnc, torch
    loss = check_output("loss", np.array([cnnc_loss]), np.array([torch_loss]))
    if not loss.ok:
        raise TrainBenchError(f"one step from the same weights gives a loss of {cnnc_loss!r} "
                              f"in cnnc and {torch_loss!r} in torch (rtol={RTOL:g})")
    largest = 0.0
    for key, want in torch_params.items():
        if key not in cnnc_params:
            raise TrainBenchError(f"cnnc's trainer has no parameter '{key}', which torch "
                                  "trains")
        found = check_output(key, cnnc_params[key], want)
        if not found.ok:
            where = list(found.first_bad) if found.first_bad is not None else found.problem
            raise TrainBenchError(
                f"after one step from the same weights, parameter '{key}' differs between "
                f"cnnc and torch: {found.bad} of {found.size} values (rtol={RTOL:g}, "
                f"atol={ATOL:g}); first at {where}: cnnc {found.got_value!r}, torch "
                f"{found.want_value!r}")
        largest = max(largest, found.max_abs)
    return Check(batch, threads, cnnc_loss, torch_loss, len(torch_params), largest)


def check_trainable(graph: Graph) -> None:
    """A model the bench cannot train, as one TrainBenchError line, before anything starts."""
    for name in graph.order()[1:]:
        if graph.op(name) == "dropout":
            raise TrainBenchError(f"bench --train cannot time model '{graph.name}': layer "
                                  f"'{name}' is dropout, whose random masks the torch peer "
                                  "does not share")


def forward_flops(graph: Graph) -> int:
    from cnnc.profile import node_flops

    return sum(node_flops(graph, node) for node in graph.order()[1:])


def run_train_bench(graph: Graph, batches: list[int], threads: list[int], lr: float = 0.9,
                    data: str = "random", rounds: int = 7,
                    round_seconds: float = ROUND_SECONDS, seed: int = 0,
                    in_process: bool = False,
                    progress: Callable[[str], None] | None = None) -> TrainReport:
    """Check and time cnnc's training step against PyTorch's at every thread count and batch
    size. Each engine runs in a process of its own unless `in_process`. A model cnnc cannot
    train raises its ModelError (from `cnnc.compile_training`) before any process starts."""
    from cnnc.optim import SGD
    from cnnc.target import host_cpu
    from cnnc.training.trainer import compile_training

    say = progress or (lambda line: None)
    check_trainable(graph)
    cpu = host_cpu()
    report = TrainReport(graph.name, lr, data, forward_flops(graph), cpu.peak_gflops_per_core,
                         cpu.describe_peak().removeprefix("peak: "))
    for batch in batches:
        train_batches(graph, data, batch, seed, count=1)  # a data mistake fails here
        for count in threads:
            if not in_process:  # fails early, and fills the cache for the worker
                compile_training(graph, optimizer=SGD(lr=lr), batch_size=batch, threads=count)
            report.results += _measure(graph, batch, count, lr, (data, seed), rounds,
                                       round_seconds, in_process, report, say)
    return report


def _start(graph: Graph, batch: int, threads: int, lr: float,
           samples: tuple[str, int], in_process: bool) -> dict[str, Runner]:
    runners: dict[str, Runner] = {}
    try:
        for engine in ENGINE_NAMES:
            runners[engine] = (LocalRunner if in_process else ProcessRunner)(
                engine, graph, batch, threads, lr, *samples)
        # Both processes import and build at the same time; then wait for each.
        for runner in runners.values():
            if isinstance(runner, ProcessRunner):
                runner.ready()
    except (WorkerError, EngineUnavailable, TrainBenchError) as error:
        for runner in runners.values():
            runner.close()
        raise TrainBenchError(str(error)) from None
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


def _measure(graph: Graph, batch: int, threads: int, lr: float,
             samples: tuple[str, int], rounds: int, round_seconds: float,
             in_process: bool, report: TrainReport,
             say: Callable[[str], None]) -> list[TrainResult]:
    where = f"threads {threads}, batch {batch}"
    started = time.perf_counter()
    runners = _start(graph, batch, threads, lr, samples, in_process)
    say(f"{where}: started cnnc and torch ({time.perf_counter() - started:.1f} s)")
    try:
        check = check_step(graph, min(batch, CHECK_IMAGES), threads,
                           runners["cnnc"].ask("check"),
                           runners["torch"].ask("check"))
        report.checks.append(check)
        say(f"{where}: cnnc and torch agree after one step")
        steps = {name: int(runner.ask("calls", round_seconds))
                 for name, runner in runners.items()}
        results = {name: TrainResult(name, threads, batch) for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                time.sleep(SETTLE_SECONDS)
                results[name].seconds.append(float(runner.ask("time", steps[name])))
        training_flops = TRAINING_FLOPS_PER_FORWARD * report.forward_flops
        for name, runner in runners.items():
            memory = runner.ask("memory")
            result = results[name]
            result.store_bytes = memory["store_bytes"]
            result.base_rss_bytes = memory["base_rss_bytes"]
            result.peak_rss_bytes = memory["peak_rss_bytes"]
            result.peak_share = (result.images_per_second * training_flops
                                 / (threads * report.peak_gflops_per_core * 1e9))
        say(f"{where}: timed cnnc and torch over {rounds} rounds")
    except WorkerError as error:
        raise TrainBenchError(str(error)) from None
    finally:
        for runner in runners.values():
            runner.close()
    return list(results.values())


def bench_train_command(graph: Graph, batches: list[int], threads: list[int], lr: float,
                        data: str, rounds: int, json_path: Path | None, show: bool) -> None:
    """What `cnnc bench --train` does once its options are parsed: run, print the table,
    write the JSON. A failed check or a lost process is one `error:` line, exit status 1."""
    import click

    def progress(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    try:
        report = run_train_bench(graph, batches, threads, lr, data, rounds,
                                 progress=progress if show else None)
    except TrainBenchError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None
    click.echo(report.table())
    if json_path is not None:
        json_path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        click.echo(f"wrote {json_path}")


# `cnnc bench` options that mean nothing for training steps, by parameter name.
INFERENCE_ONLY = {"target": "--target", "profile": "--profile", "plot_path": "--plot",
                  "schedule": "--schedule", "no_fuse": "--no-fuse",
                  "disabled": "--disable-pass"}


def train_only_conflicts(given: set[str], against: str) -> str | None:
    """The one-line complaint about `cnnc bench --train` options that do not go with it."""
    for name, option in INFERENCE_ONLY.items():
        if name in given:
            return f"{option} applies to inference; --train times cnnc's llvm trainer"
    if "against" in given and against.strip() != "torch":
        return f"--train compares with torch only, got --against {against}"
    return None
