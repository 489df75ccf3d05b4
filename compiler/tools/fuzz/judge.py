"""Judging one model: load it, run it on each configuration and compare every output with the
NumPy reference, by `cnnc.compare`'s rule, widened only where float32 rounding could fairly
move an ill-conditioned model (its envelope: the reference rounded or perturbed at every op).
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.compare import ATOL, RTOL, bad_elements
from cnnc.errors import BoundsError, CnncError
from cnnc.frontend import load
from cnnc.graph import INPUT, Graph
from cnnc.reference import Adjust, check_input, reference
from cnnc.reference import evaluate as interpret
from cnnc.tools.fuzz.configs import CONFIGS
from cnnc.tools.fuzz.model import Case, present

NOISE = 2.0**-20  # relative perturbation of the noisy references (16 float32 ulps)
NOISE_SLACK = 8.0  # how many times the noisy references' spread a result may stray


def _as_tuple(outputs: Any) -> tuple[np.ndarray, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def reference_variants(graph: Graph, x: np.ndarray, rng_seed: int = 0,
                       noisy: int = 3) -> tuple[list[tuple[np.ndarray, ...]],
                                                list[tuple[np.ndarray, ...]]]:
    """What float32 arithmetic could fairly give: the reference with every value an op reads
    rounded to float32, and `noisy` runs with each operand and parameter perturbed by a
    relative NOISE (which shows where the model is ill-conditioned at this input)."""
    x64 = check_input(graph, x).astype(np.float64)
    rng = np.random.default_rng(rng_seed)

    def rounded(key: str, value: np.ndarray) -> np.ndarray:
        return value.astype(np.float32).astype(np.float64)

    def perturbed(key: str, value: np.ndarray) -> np.ndarray:
        return value * (1 + NOISE * rng.uniform(-1, 1, value.shape))

    def run(each: Adjust) -> tuple[np.ndarray, ...]:
        with np.errstate(all="ignore"):
            return tuple(output.astype(np.float32) for output in interpret(graph, x64, each))

    return [run(rounded)], [run(perturbed) for _ in range(noisy)]


def compare(got: Any, want: tuple[np.ndarray, ...], names: list[str],
            variants: Callable[[], tuple[list[tuple[np.ndarray, ...]],
                                         list[tuple[np.ndarray, ...]]]]
            ) -> tuple[str | None, int]:
    """None when every output matches, else what differs; and how many elements matched only
    within the float32 envelope of an ill-conditioned model (see `reference_variants`)."""
    outputs = _as_tuple(got)
    if len(outputs) != len(want):
        return f"{len(outputs)} outputs, expected {len(want)}", 0
    envelope: tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]]] | None = None
    excused = 0
    for number, (actual, expected, name) in enumerate(zip(outputs, want, names)):
        if not isinstance(actual, np.ndarray) or actual.shape != expected.shape or \
                actual.dtype != np.float32:
            shape = getattr(actual, "shape", None)
            dtype = getattr(actual, "dtype", type(actual).__name__)
            return (f"output %{name} is {dtype} {shape}, expected float32 "
                    f"{expected.shape}"), excused
        bad = bad_elements(actual, expected)
        if not bad.any():
            continue
        if envelope is None:
            envelope = variants()
        rounded, noisy = envelope
        with np.errstate(invalid="ignore", over="ignore"):
            spread = np.zeros(expected.shape)
            for run in noisy:
                difference = np.abs(run[number].astype(np.float64) - expected)
                difference[np.isnan(run[number]) & np.isnan(expected)] = 0.0
                difference[np.isnan(difference)] = np.inf
                spread = np.maximum(spread, difference)
        still = bad & bad_elements(actual, expected, NOISE_SLACK * spread)
        for run in [*rounded, *noisy]:
            still &= bad_elements(actual, run[number], NOISE_SLACK * spread)
        excused += int(bad.sum() - still.sum())
        if still.any():
            where = tuple(int(i) for i in np.argwhere(still)[0])
            return (f"output %{name}: {int(still.sum())} of {still.size} values differ from "
                    f"the reference (rtol={RTOL:g}, atol={ATOL:g}); at {list(where)} got "
                    f"{actual[where]!r}, expected {expected[where]!r}"), excused
    return None, excused


@dataclass
class Failure:
    """What went wrong with one configuration. `kind` is "load", "reference", "compile",
    "crash" (an exception while running, or the process died), "bounds", "mismatch",
    "nondeterministic", "hang" or, in the training mode, "missing" (a gradient the trainer
    does not give); `error` is the exception's type, if any."""

    config: str
    kind: str
    message: str
    error: str = ""

    @property
    def signature(self) -> tuple[str, str, str]:
        return self.config, self.kind, self.error

    def describe(self) -> str:
        head = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"{self.config}: {self.kind}{f' ({self.error})' if self.error else ''}: {head}"


@dataclass
class Outcome:
    """The result of running one model on its configurations."""

    configs: list[str]
    failures: list[Failure] = field(default_factory=list)
    excused: int = 0  # output values accepted only within the float32 envelope
    seconds: float = 0.0
    ops: list[str] = field(default_factory=list)


def evaluate(model: Path, x: np.ndarray, layout: str, configs: list[str],
             progress: Callable[[str], None] | None = None,
             schedule: dict[str, Any] | None = None) -> Outcome:
    """Load `model`, run it on `x` (presented as `layout`) for every configuration and judge
    each result against the reference."""
    start = time.perf_counter()
    outcome = Outcome(list(configs))
    try:
        graph = load(model)
    except Exception as error:  # a valid model refused, or the loader itself broke
        outcome.failures.append(Failure("load", "load", error_text(error), type(error).__name__))
        return outcome
    outcome.ops = sorted({graph.op(name) for name in graph.order() if name != INPUT})
    presented = present(x, layout)
    try:
        want = _as_tuple(reference(graph, presented))
        want_one = _as_tuple(reference(graph, presented[:1]))
    except Exception as error:
        outcome.failures.append(Failure("reference", "reference", error_text(error),
                                        type(error).__name__))
        return outcome
    variants_cache: dict[int, Any] = {}

    def variants_of(batch: int) -> Callable[[], Any]:
        def make() -> Any:
            if batch not in variants_cache:
                variants_cache[batch] = reference_variants(graph, presented[:batch])
            return variants_cache[batch]
        return make

    results: dict[str, tuple[np.ndarray, ...]] = {}
    for name in configs:
        config = CONFIGS[name]
        if progress is not None:
            progress(name)
        try:
            compiled = config.compile(graph, schedule)
        except Exception as error:
            outcome.failures.append(Failure(name, "compile", error_text(error),
                                            type(error).__name__))
            continue
        try:
            got = compiled(presented)
            got_one = compiled(presented[:1])  # a batch of one: the other CPU layout
        except BoundsError as error:
            outcome.failures.append(Failure(name, "bounds", str(error), type(error).__name__))
            continue
        except Exception as error:
            outcome.failures.append(Failure(name, "crash", error_text(error),
                                            type(error).__name__))
            continue
        mismatched = False
        for batch, actual, expected in ((len(presented), got, want), (1, got_one, want_one)):
            problem, excused = compare(actual, expected, graph.outputs, variants_of(batch))
            outcome.excused += excused
            if problem is not None:
                outcome.failures.append(Failure(name, "mismatch", f"batch {batch}: {problem}"))
                mismatched = True
                break
        if not mismatched and config.target == "llvm" and not all(
                same_bits(alone, together[:1])
                for alone, together in zip(_as_tuple(got_one), _as_tuple(got))):
            # Each image's bits do not depend on the batch it came in (llvm.fma everywhere).
            outcome.failures.append(Failure(name, "nondeterministic",
                                            f"image 0 alone gives other bits than in a batch "
                                            f"of {len(presented)}"))
        results[name] = _as_tuple(got)
    _check_determinism(results, outcome)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _check_determinism(results: dict[str, tuple[np.ndarray, ...]], outcome: Outcome) -> None:
    """One thread and two must give the same bits (the README promises it)."""
    one, two = results.get("llvm"), results.get("llvm-2threads")
    if one is None or two is None:
        return
    for first, second in zip(one, two):
        if not same_bits(first, second):
            outcome.failures.append(Failure("llvm-2threads", "nondeterministic",
                                            "two threads gave other bits than one"))
            return


def same_bits(first: np.ndarray, second: np.ndarray) -> bool:
    """Bitwise equal float32 arrays, but that any NaN equals any other NaN."""
    if first.shape != second.shape:
        return False
    both_nan = np.isnan(first) & np.isnan(second)
    return bool(np.all((first.view(np.uint32) == second.view(np.uint32)) | both_nan))


def error_text(error: BaseException) -> str:
    """A CnncError's own message; for anything else, which is a bug, its traceback's end."""
    if isinstance(error, CnncError):
        return str(error)
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:]


def evaluate_case(case: Case, configs: list[str],
                  progress: Callable[[str], None] | None = None) -> Outcome:
    """`evaluate` on a case held in memory: its model written to a temporary folder; a case
    of the training mode is judged by `training.evaluate_training`."""
    if case.training is not None:
        from cnnc.tools.fuzz.training import evaluate_training_case  # it builds on this module

        return evaluate_training_case(case, configs, progress)
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-") as folder:
        path = case.spec.write(Path(folder))
        return evaluate(path, case.x, case.layout, configs, progress, case.schedule)
