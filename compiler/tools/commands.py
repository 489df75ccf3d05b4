"""`cnnc bench` and `cnnc tune`: commands of the tools, registered lazily by `cnnc.cli` so
that the compiler's own commands never import the bench, its engines or the tuner.
"""

from __future__ import annotations

from pathlib import Path

import click

from cnnc.cli_options import Failure, compile_for_cli, input_shape_option, int_list
from cnnc.driver import TARGETS as COMPILED_TARGETS
from cnnc.frontend import load
from cnnc.passes import PASS_NAMES


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--target", "-t", type=click.Choice(COMPILED_TARGETS), default="llvm",
              show_default=True, help="The cnnc target to time.")
@click.option("--batch", "batches", default="1,64,256", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--threads", "thread_counts", default="1,2", show_default=True,
              help="Comma-separated thread counts (every engine gets the same).")
@click.option("--against", default="numpy,onnxruntime,torch", show_default=True,
              help="Comma-separated engines to compare with: reference, numpy (im2col + "
                   "BLAS), onnxruntime, openvino, torch. Engines not installed are skipped "
                   "with a note.")
@click.option("--rounds", type=click.IntRange(min=3), default=7, show_default=True,
              help="Timed rounds per engine, interleaved.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every measurement to this JSON file.")
@click.option("--profile", is_flag=True,
              help="Also time each kernel of the compiled model alone (llvm).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw images/s per engine and batch size into this PNG.")
@click.option("--schedule", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Schedules to compile with (as for `cnnc compile`).")
@click.option("--no-fuse", is_flag=True,
              help="Time cnnc with one kernel per op instead of fusing conv + activation + "
                   "pooling (as for `cnnc compile`).")
@click.option("--disable-pass", "disabled", multiple=True, type=click.Choice(PASS_NAMES),
              help="Switch off one pass of cnnc's pipeline (repeatable).")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress lines on stderr (there are none when stderr is not a "
                   "terminal).")
@click.option("--train", is_flag=True,
              help="Time training steps (SGD, cross entropy) against PyTorch eager instead "
                   "of inference; --batch defaults to 256 (docs/training.md).")
@click.option("--lr", type=click.FloatRange(min=0), default=0.9, show_default=True,
              help="With --train: SGD's learning rate, on both sides.")
@click.option("--data", type=click.Choice(["random", "mnist"]), default="random",
              show_default=True, help="With --train: seeded random images and labels, or "
                                      "the MNIST sample (the train extra).")
def bench_command(model: Path, target: str, batches: str, thread_counts: str, against: str,
          rounds: int, json_path: Path | None, profile: bool, plot_path: Path | None,
          schedule: Path | None, no_fuse: bool, disabled: tuple[str, ...],
          quiet: bool, input_shape: tuple[int, ...] | None, train: bool, lr: float,
          data: str) -> None:
    """Time MODEL compiled by cnnc against other engines on the same inputs.

    Each engine's output is checked against the NumPy reference before it is timed. Prints
    the median latency, the spread of the rounds, images/s and the ratio to every engine.
    Exits with status 1 when an engine's process died or hung (see the notes). With
    --train, times training steps against PyTorch, after checking one step on each side.
    """
    import json
    import sys

    from cnnc.tools.bench import run_bench
    from cnnc.tools.engines import UnknownEngine, check_engine_names

    given = _given_options()
    if train:
        from cnnc.tools.bench_train import bench_train_command, train_only_conflicts

        conflict = train_only_conflicts(given, against)
        if conflict:
            raise Failure(conflict)
        bench_train_command(load(model, input_shape),
                            int_list(batches if "batches" in given else "256", "--batch"),
                            int_list(thread_counts, "--threads"), lr, data, rounds, json_path,
                            not quiet and sys.stderr.isatty())
        return
    if given & {"lr", "data"}:
        raise Failure("--lr and --data apply to --train only")
    if target != "llvm" and profile:
        raise Failure("--profile times the kernels of the llvm target only")
    engines = [name.strip() for name in against.split(",") if name.strip()]
    try:
        check_engine_names(engines)
    except UnknownEngine as error:
        raise Failure(str(error)) from None
    sizes = int_list(batches, "--batch")
    counts = int_list(thread_counts, "--threads")
    loaded = load(model, input_shape)
    show = not quiet and sys.stderr.isatty()

    def progress(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    # Each engine runs in a process of its own; compiling once here fills the cache for them.
    if show:
        progress(f"compiling {loaded.name} for {target} on {', '.join(map(str, counts))} "
                 "threads")
    compiled = {count: compile_for_cli(loaded, target, no_fuse, schedule, disabled, count, None)
                for count in counts}
    report = run_bench(loaded, None, target, sizes, counts, engines, rounds=rounds,
                       compile_options={"schedule": schedule, "fuse": not no_fuse,
                                        "disable_passes": disabled},
                       progress=progress if show else None)
    click.echo(report.table())
    if profile:
        for count in counts:
            for size in sizes:
                click.echo(f"\nprofile: threads={count} batch={size}")
                click.echo(compiled[count].profile(size))
    if plot_path is not None:
        from cnnc.tools.bench import plot

        plot(report, str(plot_path), f"{loaded.name} ({target})")
        click.echo(f"wrote {plot_path}")
    if json_path is not None:
        records = {"model": loaded.name, "target": target,
                   "results": [result.as_dict() for result in report.results],
                   "notes": report.notes}
        json_path.write_text(json.dumps(records, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    if report.failed:
        raise SystemExit(1)


def _given_options() -> set[str]:
    """The options of the running command that the user gave (not left at their default)."""
    context = click.get_current_context()
    return {name for name in context.params
            if context.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--target", "-t", type=click.Choice(["llvm"]), default="llvm", show_default=True,
              help="The target whose kernels are tuned.")
@click.option("--seconds", type=click.FloatRange(min=1), default=60, show_default=True,
              help="About how long to search, over all kernels.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Fixes the order the search tries schedules in.")
@click.option("--output", "-o", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="The JSON-lines file of tuned schedules to write.")
def tune_command(model: Path, target: str, seconds: float, seed: int, output_path: Path,
         input_shape: tuple[int, ...] | None) -> None:
    """Search each kernel's schedule with real measurements; write the best per kernel.

    `cnnc compile --schedule FILE` (and `run`, `bench`) replay the file without measuring.
    Each candidate is checked against the NumPy reference before it is timed.
    """
    from cnnc.target import llvm_cpu_name
    from cnnc.tools.tune import tune as search

    loaded = load(model, input_shape)
    # The bar counts the time budget, which is what ends the search, in steps of 0.1 %.
    with click.progressbar(length=1000, label="tuning", file=None) as bar:
        def advance(fraction: float) -> None:
            bar.update(max(0, round(fraction * 1000) - bar.pos))

        records = search(loaded, seconds, seed, progress=advance)
    lines = [record.to_json(llvm_cpu_name()) for record in records]
    output_path.write_text("".join(line + "\n" for line in lines))
    for record in records:
        gain = record.default_seconds / record.seconds if record.seconds else 1.0
        click.echo(f"{record.layout:>7} {record.kernel:<32} {record.seconds * 1e6:9.1f} us "
                   f"({gain:.2f}x the heuristic)  {record.schedule}")
    click.echo(f"wrote {output_path}")
