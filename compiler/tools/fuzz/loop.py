"""A fuzzing run (`fuzz()`): models seed/0, 1, 2, ... judged in worker processes until a count
or a time is reached; then the failures, distinct kinds first, are shrunk and written. With
`training`, the models are the training mode's, each judged by one compiled training step.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cnnc.compare import ATOL, RTOL
from cnnc.tools.fuzz.configs import (
    CONFIGS,
    TRAINING_CONFIGS,
    configs_for,
    training_configs_for,
)
from cnnc.tools.fuzz.judge import Failure, Outcome
from cnnc.tools.fuzz.replay import write_case
from cnnc.tools.fuzz.runner import Job, Runner
from cnnc.tools.fuzz.shrink import shrink


@dataclass
class Report:
    """What a fuzzing run did and found."""

    seed: int
    models: int = 0
    runs: int = 0  # (model, configuration) pairs
    seconds: float = 0.0
    excused: int = 0
    excused_models: dict[int, int] = field(default_factory=dict)  # model index: values
    failures: list[tuple[int, Failure]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    runs_per_config: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        configs = ", ".join(f"{name} {count}" for name, count in
                            sorted(self.runs_per_config.items()))
        lines = [f"fuzzed {self.models} models (seed {self.seed}) in {self.seconds:.1f} s: "
                 f"{self.runs} runs ({configs}); {len(self.failures)} failures"]
        if self.excused:
            lines.append(self._excused_line())
        for index, failure in self.failures[:20]:
            lines.append(f"  model {index}: {failure.describe()}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more")
        lines += [f"wrote {path}" for path in self.written]
        return "\n".join(lines)

    def _excused_line(self) -> str:
        """What the values accepted within the float32 envelope mean, in plain words."""
        indices = sorted(self.excused_models)
        shown = [str(index) for index in indices[:10]]
        if len(indices) > 10:
            shown.append(f"{len(indices) - 10} more")
        names = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"
        plural = len(indices) > 1
        return (f"{self.excused} output values of model{'s' if plural else ''} {names} (seed "
                f"{self.seed}) passed within float32 rounding: they are further from the "
                f"reference than rtol={RTOL:g}, atol={ATOL:g}, but no further than float32 "
                f"rounding can move {'these models' if plural else 'this model'}, whose "
                "output changes a lot for tiny changes inside. They count as passes; nothing "
                "is written for them.")


PROGRESS_SECONDS = 2.0  # at most one progress line this often


def fuzz(seed: int = 0, count: int | None = None, seconds: float | None = None,
         targets: list[str] | None = None, sample: int | None = None, jobs: int = 1,
         out: Path | None = None, shrink_seconds: float = 60.0, max_shrunk: int = 5,
         log: Callable[[str], None] | None = None,
         progress: Callable[[str], None] | None = None, training: bool = False) -> Report:
    """Generate and check models `seed`/0, 1, 2, ... until `count` models or `seconds` have
    passed; shrink up to `max_shrunk` failures of distinct kinds and write them under `out`.
    `log` gets a line per failure and per shrinking step; `progress` a line on how far the
    run is, after a model, at most every PROGRESS_SECONDS. `training` fuzzes compiled
    training steps instead, on `targets` of TRAINING_CONFIGS (`training_configs_for`)."""
    known = TRAINING_CONFIGS if training else CONFIGS
    picked = bool(targets)  # by the user: then every model runs every one
    targets = list(targets or known)
    unknown = [name for name in targets if name not in known]
    if unknown:
        raise ValueError(f"unknown fuzzing target {unknown[0]!r}; targets: "
                         f"{', '.join(known)}")
    if count is None and seconds is None:
        count = 100
    report = Report(seed)
    start = shown = time.monotonic()
    deadline = start + seconds if seconds is not None else None
    limit = count if count is not None else 1 << 62
    jobs_iter = (Job(training_configs_for(index, targets, picked) if training
                     else configs_for(index, targets, sample), seed, index, training=training)
                 for index in range(limit))
    found: list[tuple[int, Job, Outcome]] = []
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-cache-") as cache, \
            Runner(jobs, os.environ.get("CNNC_CACHE_DIR", cache)) as runner:
        for _, job, outcome in runner.run(jobs_iter, deadline):
            report.models += 1
            report.runs += len(outcome.configs)
            report.excused += outcome.excused
            if outcome.excused:
                report.excused_models[job.index] = outcome.excused
            for name in outcome.configs:
                report.runs_per_config[name] = report.runs_per_config.get(name, 0) + 1
            for op in outcome.ops:
                report.ops[op] = report.ops.get(op, 0) + 1
            if outcome.failures:
                found.append((job.index, job, outcome))
                for failure in outcome.failures:
                    report.failures.append((job.index, failure))
                    if log is not None:
                        log(f"model {job.index}: {failure.describe()}")
            if progress is not None and time.monotonic() >= shown + PROGRESS_SECONDS:
                shown = time.monotonic()
                total = f" of {count}" if count is not None else ""
                progress(f"{report.models}{total} models checked, {len(report.failures)} "
                         f"failures, {shown - start:.0f} s")
        report.seconds = time.monotonic() - start
        found.sort(key=lambda item: item[0])
        if out is not None and found:
            _write_failures(found, runner, out, seed, shrink_seconds, max_shrunk, report, log)
    return report


def _write_failures(found: list[tuple[int, Job, Outcome]], runner: Runner, out: Path,
                    seed: int, shrink_seconds: float, max_shrunk: int, report: Report,
                    log: Callable[[str], None] | None) -> None:
    # Distinct kinds of failure are shrunk first, then more of the same, up to max_shrunk.
    seen: set[tuple[str, str, str]] = set()
    firsts = []
    for item in found:
        if item[2].failures[0].signature not in seen:
            seen.add(item[2].failures[0].signature)
            firsts.append(item[0])
    chosen = set((firsts + [item[0] for item in found if item[0] not in firsts])[:max_shrunk])
    for index, job, outcome in found:
        failure = outcome.failures[0]
        case = job.resolve()
        mode = "training-" if job.training else ""
        directory = out / f"seed{seed}-{mode}model{index}-{failure.config}-{failure.kind}"
        shrunk = False
        if index in chosen:
            if log is not None:
                log(f"shrinking model {index} ({failure.describe()})")
            case = shrink(case, failure, runner, shrink_seconds, log=log)
            shrunk = True
            again = runner.evaluate(case, [failure.config])
            failure = next((item for item in again.failures
                            if item.signature == failure.signature), failure)
        elif len(report.written) >= 20:
            continue
        report.written.append(write_case(directory, case, failure, job.configs,
                                         {"seed": seed, "index": index, "shrunk": shrunk}))
