"""`cnnc fuzz`: the click command over `loop.fuzz` and `replay.replay`. Mistakes in its options
or files are one line, `error: ...`, with exit status 2; a run that found failures exits 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from cnnc.tools.fuzz.configs import BOUNDS_EVERY, CONFIGS, TRAINING_CONFIGS
from cnnc.tools.fuzz.loop import fuzz
from cnnc.tools.fuzz.model import CASE_FILE
from cnnc.tools.fuzz.replay import case_dirs, replay


class _Failure(click.ClickException):
    """A mistake in the command's options or files: `error: ...` and exit status 2, as every
    cnnc command reports one."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _target_list(text: str | None, training: bool) -> list[str]:
    known = list(TRAINING_CONFIGS if training else CONFIGS)
    if text is None:
        return known
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        mode = " with --train" if training else ""
        raise _Failure(f"unknown target '{unknown[0] if unknown else text}'{mode}; expected "
                       f"some of {', '.join(known)}")
    return names


@click.command("fuzz")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The seed: model i of seed S is always the same model.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="How many models to check.  [default: 100, or unlimited with --seconds]")
@click.option("--seconds", type=click.FloatRange(min=0), default=None,
              help="Stop starting new models after this many seconds.")
@click.option("--targets", default=None,
              help="Comma-separated configurations to compile each model for.  [default: "
                   f"{','.join(CONFIGS)}; with --train {','.join(TRAINING_CONFIGS)}]")
@click.option("--train", "training", is_flag=True,
              help="Fuzz compiled training instead: models of the ops whose gradient cnnc "
                   "compiles, one step (lr 0) of a random loss, reduction and batch of 1 to "
                   "40 images, its loss and gradients against cnnc.reference_backward, and "
                   f"the same bits on 1 and 2 threads; on cuda-sim, every {BOUNDS_EVERY}th model.")
@click.option("--sample", type=click.IntRange(min=0), default=None,
              help="Run each model on the first target and this many of the others, in turn "
                   "(faster); by default every target, and the bounds-checking ones on every "
                   f"{BOUNDS_EVERY}th model.")
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=None,
              help="Worker processes (0: run in this process).  [default: all cores]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fuzz-failures"), show_default=True,
              help="Where each failure is written, shrunk, as model.yaml, model.weights.npz, "
                   "input.npy and case.json.")
@click.option("--shrink-seconds", type=click.FloatRange(min=0), default=60.0,
              show_default=True, help="Time spent shrinking each distinct failure.")
@click.option("--replay", "replay_dir", type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path),
              default=None, help="Run the cases written in DIR (or its subfolders) again.")
@click.option("--quiet", "-q", is_flag=True,
              help="Only the summary: no progress or failure lines on stderr.")
def fuzz_command(seed: int, count: int | None, seconds: float | None, targets: str | None,
                 training: bool, sample: int | None, jobs: int | None, out_dir: Path,
                 shrink_seconds: float, replay_dir: Path | None, quiet: bool) -> None:
    """Check random valid models against the NumPy reference on every target.

    Each model is written in the model format, loaded, compiled for each target (llvm fused
    and unfused, on 1 and 2 threads, cuda-sim, and with bounds checking) and run on inputs of
    large, tiny, saturating, NaN and infinite values; every output is compared with the
    reference by the rule of `cnnc run --check`. A crash, a compile error or a mismatch is
    shrunk and written under --out. Progress goes to stderr when it is a terminal. Exits
    with status 1 when anything failed.

    With --train it fuzzes compiled training: each model's loss and every gradient of one
    step must match the float64 reference backward, and be the same bits on a second step
    and on two threads as on one; failures are shrunk and written the same way (and a
    target.npy).
    """
    if replay_dir is not None:
        failed = 0
        directories = case_dirs(replay_dir)
        if not directories:
            raise _Failure(f"no cases (folders with {CASE_FILE}) in {replay_dir}")
        for directory in directories:
            try:
                outcome = replay(directory)
            except (ValueError, OSError) as error:
                raise _Failure(str(error)) from None
            status = "ok" if not outcome.failures else "FAILED"
            click.echo(f"{directory}: {status} ({', '.join(outcome.configs)})")
            for failure in outcome.failures:
                click.echo(f"  {failure.describe()}")
            failed += bool(outcome.failures)
        click.echo(f"{len(directories) - failed} of {len(directories)} cases pass")
        if failed:
            raise SystemExit(1)
        return
    def say(line: str) -> None:
        click.echo(line, err=True)

    chosen = _target_list(targets, training) if targets is not None else None
    report = fuzz(seed, count, seconds, chosen, sample,
                  jobs if jobs is not None else (os.cpu_count() or 1), out_dir,
                  shrink_seconds, log=None if quiet else say,
                  progress=say if not quiet and sys.stderr.isatty() else None,
                  training=training)
    click.echo(report.summary())
    if report.failures:
        raise SystemExit(1)
