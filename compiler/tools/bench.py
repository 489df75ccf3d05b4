"""`cnnc bench`: the compiled model side by side with other engines, on the same inputs.

Every engine's output is compared with the NumPy reference (by `cnnc.compare`) before it is
timed; an engine that disagrees is reported and not timed, and one whose process dies or hangs
is reported and dropped. Engines are timed interleaved, round by round, after a warm-up, so
that a noisy machine slows them alike; we report the median of the rounds and the spread
between the fastest and the slowest round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnc.compare import check_outputs
from cnnc.graph import Graph
from cnnc.reference import reference
from cnnc.tools.engines import Engine, EngineUnavailable, check_engine_names, make_engine
from cnnc.tools.workers import Worker, WorkerError

# A pause before each engine's round: the engine timed before it may still have worker
# threads spinning (ONNX Runtime spins after each call; the OpenMP in PyTorch wheels spins
# for 200 ms, its KMP_BLOCKTIME, before its threads sleep).
SETTLE_SECONDS = 0.25
# How long an engine's process may take to start (import its package, build the engine) and
# to answer one request (a check, or one round); then it counts as hung and is stopped.
START_SECONDS = 300.0
ANSWER_SECONDS = 300.0


class Disagrees(Exception):
    """An engine's output differs from the reference's; the message says where, in one line."""


class RoundTimes:
    """What a timed engine's rounds give (the inference bench's and the training bench's
    results): the median, images/s and the spread, from `seconds` per round of `batch`."""

    batch: int
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median

    @property
    def spread(self) -> float:
        """(slowest - fastest round) / median."""
        return (max(self.seconds) - min(self.seconds)) / self.median

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)  # type: ignore[call-overload]
        record.update(median_seconds=self.median, images_per_second=self.images_per_second,
                      spread=self.spread)
        return record


@dataclass
class Result(RoundTimes):
    engine: str
    batch: int
    threads: int
    seconds: list[float] = field(default_factory=list)  # per call, one entry per round
    max_error: float = 0.0


@dataclass
class Report:
    results: list[Result]
    notes: list[str]
    failed: list[str] = field(default_factory=list)  # engines whose process died or hung

    def table(self) -> str:
        engines = list(dict.fromkeys(result.engine for result in self.results))
        header = (f"{'threads':>7} {'batch':>5}  {'engine':<12} {'latency':>11} {'spread':>7} "
                  f"{'images/s':>11}  " + "  ".join(f"{'vs ' + name:>14}" for name in engines))
        lines = [header, "-" * len(header)]
        keys = list(dict.fromkeys((result.threads, result.batch) for result in self.results))
        for threads, batch in keys:
            group = {result.engine: result for result in self.results
                     if (result.threads, result.batch) == (threads, batch)}
            for name, result in group.items():
                ratios = "  ".join(
                    f"{result.images_per_second / group[other].images_per_second:>13.2f}x"
                    if other in group else f"{'-':>14}" for other in engines)
                lines.append(f"{threads:>7} {batch:>5}  {name:<12} "
                             f"{_format_seconds(result.median):>11} {result.spread:>6.0%} "
                             f"{result.images_per_second:>11,.0f}  {ratios}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def _format_seconds(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def bench_input(graph: Graph, seed: int, batch: int) -> np.ndarray:
    """The images every engine is checked and timed on: drawn from the seed and the batch."""
    rng = np.random.default_rng([seed, batch])
    return rng.random((batch, *graph.input_shape), dtype=np.float32)


def check_engine(engine: Engine, x: np.ndarray, want: Any,
                 names: list[str] | None = None) -> float:
    """The largest absolute error of `engine` on `x` against the reference's `want`; raises
    Disagrees, saying where, when `cnnc.compare` finds that an output does not agree."""
    checks = check_outputs(engine(x), want, names)
    for check in checks:
        if not check.ok:
            raise Disagrees(check.describe())
    return max((check.max_abs for check in checks), default=0.0)


class Timer:
    """One engine as the bench drives it: check it at a batch size, then time calls."""

    def __init__(self, engine: Engine, graph: Graph, seed: int) -> None:
        self.engine = engine
        self.graph = graph
        self.seed = seed
        self.inputs: dict[int, np.ndarray] = {}

    def input(self, batch: int) -> np.ndarray:
        if batch not in self.inputs:
            self.inputs[batch] = bench_input(self.graph, self.seed, batch)
        return self.inputs[batch]

    def check(self, batch: int, expected: Any) -> float:
        return check_engine(self.engine, self.input(batch), expected, self.graph.outputs)

    def calls_per_round(self, batch: int, seconds: float) -> int:
        return _calls_per_round(self.engine, self.input(batch), seconds)

    def time(self, batch: int, calls: int) -> float:
        """Seconds per call over `calls` calls, after a short warm-up: the pause between
        rounds lets cores idle, and every engine gets them back awake before it is timed."""
        x = self.input(batch)
        for _ in range(max(1, calls // 5)):
            self.engine(x)
        start = time.perf_counter()
        for _ in range(calls):
            self.engine(x)
        return (time.perf_counter() - start) / calls

    def close(self) -> None:
        pass


class ProcessTimer:
    """An engine in a process of its own, so that no engine's idle worker threads (ONNX
    Runtime and OpenMP spin while they wait) steal cycles from the one being timed. A
    process that dies or hangs raises WorkerError, naming the engine."""

    def __init__(self, graph: Graph, name: str, threads: int, seed: int,
                 compile_options: dict[str, Any], start_seconds: float = START_SECONDS,
                 answer_seconds: float = ANSWER_SECONDS) -> None:
        self.answer_seconds = answer_seconds
        self.worker = Worker(f"the {name} engine's process", _serve, graph, name, threads,
                             seed, compile_options)
        try:
            status, detail = self.worker.receive(start_seconds)
        except WorkerError:
            self.close()
            raise
        if status != "ready":
            self.close()
            raise EngineUnavailable(detail)

    def _ask(self, *request: Any) -> Any:
        status, answer = self.worker.ask(request, self.answer_seconds)
        if status == "mismatch":
            raise Disagrees(answer)
        if status != "ok":
            raise RuntimeError(answer)
        return answer

    def check(self, batch: int, expected: Any) -> float:
        return float(self._ask("check", batch, expected))

    def calls_per_round(self, batch: int, seconds: float) -> int:
        return int(self._ask("calls", batch, seconds))

    def time(self, batch: int, calls: int) -> float:
        return float(self._ask("time", batch, calls))

    def close(self) -> None:
        self.worker.stop(("stop",))


def _serve(connection: Any, graph: Graph, name: str, threads: int, seed: int,
           compile_options: dict[str, Any]) -> None:
    """The worker process of a ProcessTimer: build the engine, then answer requests until
    told to stop. An exception it does not answer with ends the process, and the parent
    reports the last line of its traceback."""
    try:
        if name.startswith("cnnc-"):
            from cnnc.driver import compile as compile_model

            engine: Engine = compile_model(graph, target=name[5:], threads=threads,
                                           **compile_options)
        else:
            engine = make_engine(name, graph, threads)
    except EngineUnavailable as error:
        connection.send(("unavailable", str(error)))
        return
    timer = Timer(engine, graph, seed)
    connection.send(("ready", None))
    actions: dict[str, Callable[..., Any]] = {
        "check": timer.check, "calls": timer.calls_per_round, "time": timer.time}
    while True:
        kind, *arguments = connection.recv()
        if kind == "stop":
            return
        try:
            connection.send(("ok", actions[kind](*arguments)))
        except Disagrees as mismatch:
            connection.send(("mismatch", str(mismatch)))
        except Exception as error:  # reported to the parent, which notes it
            connection.send(("error", f"{type(error).__name__}: {error}"))


def run_bench(graph: Graph, compiled: dict[int, Engine] | None, target: str,
              batches: list[int], threads: list[int], against: list[str], rounds: int = 7,
              round_seconds: float = 0.1, seed: int = 0,
              compile_options: dict[str, Any] | None = None,
              progress: Callable[[str], None] | None = None) -> Report:
    """Time cnnc and the `against` engines at every thread count and batch size.

    With `compiled` ({threads: engine}) every engine runs in this process; without it each
    engine, cnnc included, runs in a process of its own (what `cnnc bench` does).
    `progress` gets a line for each started set of engines, each check and each batch timed.
    An unknown engine name raises UnknownEngine before anything starts."""
    check_engine_names(against)
    report = Report([], [])
    say = progress or (lambda line: None)
    expected = {batch: reference(graph, bench_input(graph, seed, batch)) for batch in batches}
    for count in threads:
        timers: dict[str, Timer | ProcessTimer] = {}
        names = [f"cnnc-{target}", *against]
        start = time.perf_counter()
        for name in names:
            try:
                if compiled is not None:
                    engine = compiled[count] if name == names[0] else \
                        make_engine(name, graph, count)
                    timers[name] = Timer(engine, graph, seed)
                else:
                    timers[name] = ProcessTimer(graph, name, count, seed, compile_options or {})
            except EngineUnavailable as error:
                note = f"{name} skipped: {error}"
                if note not in report.notes:
                    report.notes.append(note)
            except WorkerError as error:
                _drop(report, name, f"{name} failed to start on {count} threads", error)
        say(f"threads {count}: started {', '.join(timers) or 'no engine'} "
            f"({time.perf_counter() - start:.1f} s)")
        try:
            for batch in batches:
                report.results += _measure(timers, batch, count, rounds, round_seconds, report,
                                           expected[batch], say)
        finally:
            for timer in timers.values():
                timer.close()
    return report


def _drop(report: Report, name: str, what: str, error: WorkerError) -> None:
    report.notes.append(f"{what}, dropped: {error}")
    if name not in report.failed:
        report.failed.append(name)


def _measure(timers: dict[str, Timer | ProcessTimer], batch: int, threads: int, rounds: int,
             round_seconds: float, report: Report, expected: Any,
             say: Callable[[str], None]) -> list[Result]:
    """Check every engine at `batch`, then time the ones that agree, interleaved in rounds.
    An engine whose process dies or hangs is noted and removed from `timers`.

    `expected` is the reference's answer, computed by the bench's own process: in an
    engine's process, the threads that NumPy's BLAS starts for it slowed that engine's
    two-thread rounds by 10-30 % on our machines."""
    where = f"threads {threads}, batch {batch}"
    checked: dict[str, Result] = {}
    calls: dict[str, int] = {}

    def lost(name: str, error: WorkerError) -> None:
        _drop(report, name, f"{name} at threads {threads} batch {batch} failed", error)
        timers.pop(name).close()
        checked.pop(name, None)
        say(f"{where}: {name} failed: {error}")

    for name, timer in list(timers.items()):
        try:
            checked[name] = Result(name, batch, threads,
                                   max_error=timer.check(batch, expected))
            calls[name] = timer.calls_per_round(batch, round_seconds)
            say(f"{where}: {name} agrees with the reference (max abs error "
                f"{checked[name].max_error:.2g})")
        except Disagrees as mismatch:
            report.notes.append(f"{name} at batch {batch} disagrees with the reference, not "
                                f"timed: {mismatch}")
            say(f"{where}: {name} disagrees with the reference, not timed")
        except (EngineUnavailable, RuntimeError) as error:
            report.notes.append(f"{name} at batch {batch} failed, not timed: {error}")
            checked.pop(name, None)
            say(f"{where}: {name} failed, not timed")
        except WorkerError as error:
            lost(name, error)
    start = time.perf_counter()
    for _ in range(rounds):
        for name, result in list(checked.items()):
            time.sleep(SETTLE_SECONDS)
            try:
                result.seconds.append(timers[name].time(batch, calls[name]))
            except WorkerError as error:
                lost(name, error)
    if checked:
        say(f"{where}: timed {', '.join(checked)} over {rounds} rounds "
            f"({time.perf_counter() - start:.1f} s)")
    return list(checked.values())


def _calls_per_round(engine: Engine, x: np.ndarray, seconds: float) -> int:
    """Warm up, then find how many calls fill about `seconds`."""
    engine(x)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            engine(x)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4 or calls >= 1 << 20:
            return max(1, int(calls * seconds / max(elapsed, 1e-9)))
        calls *= 4


def plot(report: Report, path: str, title: str) -> None:
    """Images/s per engine and batch size, one panel per thread count, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EngineUnavailable("matplotlib is not installed (pip install -e '.[bench]')") \
            from None
    threads = sorted({result.threads for result in report.results})
    engines = list(dict.fromkeys(result.engine for result in report.results))
    batches = sorted({result.batch for result in report.results})
    figure, axes = plt.subplots(1, len(threads), figsize=(5 * len(threads), 4), squeeze=False)
    width = 0.8 / max(1, len(engines))
    for axis, count in zip(axes[0], threads):
        for number, engine in enumerate(engines):
            rates = [next((r.images_per_second for r in report.results if r.engine == engine
                           and r.threads == count and r.batch == batch), 0.0)
                     for batch in batches]
            positions = [index + number * width for index in range(len(batches))]
            axis.bar(positions, rates, width, label=engine)
        axis.set_xticks([index + width * (len(engines) - 1) / 2 for index in range(len(batches))],
                        [f"batch {batch}" for batch in batches])
        axis.set_ylabel("images / s")
        axis.set_title(f"{title}, {count} thread{'s' if count > 1 else ''}")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
