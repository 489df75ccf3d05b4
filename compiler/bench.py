"""`cnnc bench`: the compiled model side by side with other engines, on the same inputs.

Every engine's output is compared with the NumPy reference before it is timed; an engine that
disagrees is reported and not timed. Engines are timed interleaved, round by round, after a
warm-up, so that a noisy machine slows them alike; we report the median of the rounds and the
spread between the fastest and the slowest round.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cnnc.engines import Engine, EngineUnavailable, make_engine
from cnnc.graph import Graph
from cnnc.reference import reference

RTOL, ATOL = 1e-4, 1e-5


@dataclass
class Result:
    engine: str
    batch: int
    threads: int
    seconds: list[float] = field(default_factory=list)  # per call, one entry per round
    max_error: float = 0.0

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
        record = asdict(self)
        record.update(median_seconds=self.median, images_per_second=self.images_per_second,
                      spread=self.spread)
        return record


@dataclass
class Report:
    results: list[Result]
    notes: list[str]

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


def check_engine(engine: Engine, graph: Graph, x: np.ndarray) -> float:
    """The largest absolute error of `engine` against the reference; raises AssertionError
    beyond rtol=1e-4, atol=1e-5."""
    got, want = engine(x), reference(graph, x)
    pairs = zip(got if isinstance(got, tuple) else (got,),
                want if isinstance(want, tuple) else (want,))
    worst = 0.0
    for actual, expected in pairs:
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
        worst = max(worst, float(np.abs(actual - expected).max(initial=0)))
    return worst


def run_bench(graph: Graph, compiled: dict[int, Engine], target: str, batches: list[int],
              threads: list[int], against: list[str], rounds: int = 7,
              round_seconds: float = 0.1, seed: int = 0) -> Report:
    """Time `compiled[threads]` (the cnnc model per thread count) and the `against` engines."""
    results: list[Result] = []
    notes: list[str] = []
    rng = np.random.default_rng(seed)
    for count in threads:
        engines: dict[str, Engine] = {f"cnnc-{target}": compiled[count]}
        for name in against:
            try:
                engines[name] = make_engine(name, graph, count)
            except EngineUnavailable as error:
                if f"{name}: {error}" not in notes:
                    notes.append(f"{name} skipped: {error}")
        for batch in batches:
            x = rng.random((batch, *graph.input_shape), dtype=np.float32)
            timed: dict[str, tuple[Engine, Result]] = {}
            for name, engine in engines.items():
                try:
                    worst = check_engine(engine, graph, x)
                except AssertionError as mismatch:
                    notes.append(f"{name} at batch {batch} disagrees with the reference, "
                                 f"not timed: {str(mismatch).strip().splitlines()[-1]}")
                    continue
                except EngineUnavailable as missing:
                    notes.append(f"{name} skipped: {missing}")
                    continue
                timed[name] = (engine, Result(name, batch, count, max_error=worst))
            calls = {name: _calls_per_round(engine, x, round_seconds)
                     for name, (engine, _) in timed.items()}
            for _ in range(rounds):
                for name, (engine, result) in timed.items():
                    start = time.perf_counter()
                    for _ in range(calls[name]):
                        engine(x)
                    result.seconds.append((time.perf_counter() - start) / calls[name])
            results += [result for _, result in timed.values()]
    return Report(results, notes)


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
