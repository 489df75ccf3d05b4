"""The `cnnc` command: print a model's op graph, compile it, run it on an input.

It parses options, calls the package's API and prints; it computes nothing itself. Every
`CnncError` a user can cause is printed alone as `error: <message>` on stderr with exit status
2, never as a traceback.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from cnnc import __version__
from cnnc.cli_options import (
    Failure,
    compile_for_cli,
    compile_options,
    input_shape_option,
    make_directory,
)
from cnnc.cli_train import train
from cnnc.compare import ATOL, RTOL, OutputCheck, check_outputs
from cnnc.driver import TARGETS as COMPILED_TARGETS
from cnnc.driver import export_kinds
from cnnc.errors import CnncError, InputError
from cnnc.frontend import load
from cnnc.graph import Graph, format_shape
from cnnc.reference import check_memory, output_bytes, reference

# The targets `cnnc run` accepts; `_make_runner` must know each one.
TARGETS: tuple[str, ...] = (*COMPILED_TARGETS, "reference")

Outputs = np.ndarray | tuple[np.ndarray, ...]
Runner = Callable[[np.ndarray], Outputs]


# Commands from `cnnc.tools`, imported only when one runs (or `--help` lists them), so that
# `import cnnc.cli` stays light: the fuzzer alone is over a thousand lines.
TOOL_COMMANDS = {"bench": ("cnnc.tools.commands", "bench_command"),
                 "fuzz": ("cnnc.tools.fuzz.command", "fuzz_command"),
                 "tune": ("cnnc.tools.commands", "tune_command")}


class _Cli(click.Group):
    """The command group, turning a user's mistake into one line and exit status 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *TOOL_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in TOOL_COMMANDS:
            module, attribute = TOOL_COMMANDS[name]
            command: click.Command = getattr(importlib.import_module(module), attribute)
            return command
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CnncError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)
        except click.UsageError as error:  # a bad option or argument: one line, as above
            path = error.ctx.command_path.split()[1:] if error.ctx is not None else []
            where = " ".join(["cnnc", *path])
            click.echo(f"error: {error.format_message()} (see `{where} --help`)", err=True)
            ctx.exit(2)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="cnnc",
                      message="%(prog)s %(version)s")
def main() -> None:
    """cnnc compiles small convolutional networks (LeNet-class), runs and trains them.

    A MODEL is a YAML file in cnnc's model format (see docs/model-format.md). Every mistake in
    a model or an input is reported as `error: FILE:LINE: layer 'NAME' (OP): ...` on stderr
    with exit status 2.
    """


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--format", "fmt", type=click.Choice(["text", "dot"]), default="text",
              show_default=True,
              help="text: one line per op with its attributes and output shape; "
                   "dot: Graphviz DOT (pipe it to `dot -Tsvg`).")
def graph(model: Path, fmt: str, input_shape: tuple[int, ...] | None) -> None:
    """Print the op graph of MODEL, with the shape of every tensor (N is the batch)."""
    loaded = load(model, input_shape)
    click.echo(loaded.to_text() if fmt == "text" else loaded.to_dot())


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--target", "-t", type=click.Choice(COMPILED_TARGETS), default="llvm",
              show_default=True, help="llvm: the host CPU; cuda: NVIDIA GPUs (CUDA C, NVRTC).")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Write the compiled model here. llvm: NAME.h plus --emit; cuda: NAME.cu, "
                   "NAME.ptx, NAME.cubin and NAME.json.")
@click.option("--emit", default=None,
              help="Comma-separated outputs of -o. llvm: among ll, asm, obj, so [default: "
                   "obj,so]; cuda: among cu, ptx, cubin, json [default: all].")
@click.option("--dump-ir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the graph after every pass, and the kernels, as numbered text files.")
@click.option("--verbose", "-v", is_flag=True,
              help="Also print each kernel's loop IR and schedule.")
@compile_options
def compile_command(model: Path, target: str, output_dir: Path | None, emit: str | None,
                    dump_ir: Path | None, verbose: bool, no_fuse: bool, schedule: Path | None,
                    disabled: tuple[str, ...], threads: int | None, arch: str | None,
                    fast_math: bool, check_bounds: bool,
                    input_shape: tuple[int, ...] | None) -> None:
    """Compile MODEL and print its kernels; with -o, write the compiled files."""
    kinds = None if emit is None else tuple(filter(None, map(str.strip, emit.split(","))))
    known = export_kinds(target)
    unknown = sorted(set(kinds or ()) - set(known))
    if unknown:
        raise Failure(f"unknown --emit kind '{unknown[0]}'; expected {', '.join(known)}")
    for directory, option in ((output_dir, "--output-dir"), (dump_ir, "--dump-ir")):
        if directory is not None:
            make_directory(directory, option)
    start = time.perf_counter()
    compiled = compile_for_cli(load(model, input_shape), target, no_fuse, schedule, disabled,
                               threads, arch, fast_math, check_bounds, dump_ir)
    seconds = time.perf_counter() - start
    click.echo(f"compiled {compiled.name} for {target} in {seconds:.2f} s: "
               f"{len(compiled.kernels)} kernels")
    resources = compiled.resources
    for name in compiled.kernels:
        line = f"  {name}"
        if name in resources:
            line += "  " + "  ".join(f"{key}={value}" for key, value in resources[name].items())
        click.echo(line)
    if verbose:
        click.echo(compiled.source("kernel"))
    if output_dir is not None:
        try:
            written = compiled.export(output_dir, emit=kinds)
        except OSError as error:
            raise Failure(f"cannot write into '{output_dir}': "
                           f"{error.strerror or error}") from None
        for path in written:
            click.echo(f"wrote {path}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--input", "-i", "input_path", type=click.Path(dir_okay=False, path_type=Path),
              help="A .npy file holding a float array (N, C, H, W) to run the model on. "
                   "Without it, a random input in [0, 1) is drawn (see --batch and --seed).")
@click.option("--batch", "-n", type=click.IntRange(min=1), default=None,
              help="The batch size N of the random input.  [default: 1]")
@click.option("--seed", "-s", type=click.IntRange(min=0), default=None,
              help="The seed of the random input.  [default: 0]")
@click.option("--output", "-o", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the output to this file: a .npy array for a model with one output, "
                   "a .npz archive keyed by output name for a model with several.")
@click.option("--target", "-t", type=click.Choice(TARGETS), default="llvm",
              show_default=True,
              help="What runs the model: llvm (the host CPU), cuda (an NVIDIA GPU), cuda-sim "
                   "(the CUDA code on the CPU), reference (the NumPy oracle).")
@click.option("--check", is_flag=True,
              help=f"Also run the NumPy reference, print the largest errors and fail (exit 1) "
                   f"beyond rtol={RTOL:g}, atol={ATOL:g}.")
@compile_options
def run(model: Path, input_path: Path | None, batch: int | None, seed: int | None,
        output_path: Path | None, target: str, check: bool, no_fuse: bool,
        schedule: Path | None, disabled: tuple[str, ...], threads: int | None,
        arch: str | None, fast_math: bool, check_bounds: bool,
        input_shape: tuple[int, ...] | None) -> None:
    """Run MODEL on an input and print the shape of each output.

    For an output of shape (N, classes) it also prints the top-1 class of each row.
    """
    if input_path is not None and (batch is not None or seed is not None):
        raise click.UsageError("give either --input or --batch/--seed, not both")
    loaded = load(model, input_shape)
    if output_path is not None:
        _check_output_path(output_path, loaded)
    if input_path is not None:
        x = _read_input(input_path)
        origin = str(input_path)
    else:
        rng = np.random.default_rng(seed or 0)
        # The input and the outputs, before either is allocated.
        check_memory(loaded, batch or 1, 4 * math.prod(loaded.input_shape) + output_bytes(loaded))
        x = rng.random((batch or 1, *loaded.input_shape), dtype=np.float32)
        origin = f"random, seed {seed or 0}"
    runner = _make_runner(loaded, target, no_fuse=no_fuse, schedule=schedule,
                          disabled=disabled, threads=threads, arch=arch, fast_math=fast_math,
                          check_bounds=check_bounds)
    result = runner(x)
    outputs = result if isinstance(result, tuple) else (result,)

    click.echo(f"input: {_shape_text(x)} ({origin})")
    for name, array in zip(loaded.outputs, outputs, strict=True):
        click.echo(f"output %{name}: {_shape_text(array)}")
        if array.ndim == 2 and len(array):
            click.echo(f"top-1: {_top1(array)}")
    if output_path is not None:
        _write_outputs(output_path, loaded.outputs, outputs)
        click.echo(f"wrote {output_path}")
    if check and not _check(loaded, x, outputs):
        raise SystemExit(1)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@input_shape_option
@click.option("--output", "-o", "output_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write: .onnx for ONNX, .yaml for cnnc's format (with its "
                   ".weights.npz beside it).")
def convert(model: Path, input_shape: tuple[int, ...] | None, output_path: Path) -> None:
    """Convert MODEL between ONNX and cnnc's YAML format; the result loads to the same graph."""
    loaded = load(model, input_shape)
    suffix = output_path.suffix.lower()
    try:
        if suffix == ".onnx":
            try:
                from cnnc.frontend.onnx_export import save_onnx
            except ImportError:
                raise Failure("writing ONNX needs the onnx package (pip install -e "
                              "'.[onnx]')") from None
            written = [save_onnx(loaded, output_path)]
        elif suffix in (".yaml", ".yml"):
            from cnnc.frontend.yaml_export import save_yaml

            written = save_yaml(loaded, output_path)
        else:
            raise Failure(f"cannot tell the format of '{output_path}'; name it .onnx or .yaml")
    except OSError as error:
        raise Failure(f"cannot write '{output_path}': {error.strerror or error}") from None
    for path in written:
        click.echo(f"wrote {path}")



def _make_runner(graph: Graph, target: str, **options: Any) -> Runner:
    """A function that runs `graph` on an input array for `target` (one of TARGETS)."""
    if target == "reference":
        return lambda x: reference(graph, x)
    if target in COMPILED_TARGETS:
        return compile_for_cli(graph, target, **options)
    raise click.UsageError(f"unknown target '{target}'; expected one of {', '.join(TARGETS)}")


def _check(graph: Graph, x: np.ndarray, outputs: tuple[np.ndarray, ...]) -> bool:
    """Compare `outputs` with the reference's; print what decides; True when they agree."""
    checks = check_outputs(outputs, reference(graph, x), graph.outputs)
    for result in checks:
        click.echo(f"check %{result.name}: {_verdict(result)}")
    return all(result.ok for result in checks)


def _verdict(result: OutputCheck) -> str:
    """What decides agreement: each |got - expected| against atol + rtol * |expected|."""
    tolerance = f"rtol={RTOL:g}, atol={ATOL:g}"
    if result.problem is not None:
        return f"{result.problem}: MISMATCH"
    if result.ok:
        return f"max abs error {result.max_abs:.3g} ({tolerance}): ok"
    got, want = result.got_value, result.want_value
    where = ", ".join(map(str, result.first_bad or ()))
    nan_side = ("cnnc gives NaN where the reference does not" if got is not None and
                math.isnan(got) else "the reference gives NaN where cnnc does not"
                if want is not None and math.isnan(want) else None)
    detail = nan_side or f"got {got:.7g}, expected {want:.7g}"
    return (f"max abs error {result.max_abs:.3g}; {result.bad} of {result.size} values beyond "
            f"{tolerance}; first at "
            f"[{where}]: {detail}: MISMATCH")


def _top1(array: np.ndarray) -> str:
    """The top-1 class of each row; 'nan' for a row that holds a NaN."""
    return " ".join("nan" if np.isnan(row).any() else str(int(row.argmax())) for row in array)


def _read_input(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"cannot read the input '{path}': {error}") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise InputError(f"the input '{path}' is a .npz archive; expected one .npy array")
    return array


def _check_output_path(path: Path, graph: Graph) -> None:
    if len(graph.outputs) > 1 and path.suffix != ".npz":
        raise Failure(f"the model has {len(graph.outputs)} outputs; write them to a .npz "
                       f"file, not '{path}'")


def _write_outputs(path: Path, names: list[str], outputs: tuple[np.ndarray, ...]) -> None:
    try:
        with open(path, "wb") as file:
            if len(outputs) == 1:
                np.save(file, outputs[0])
            else:
                arrays: dict[str, Any] = dict(zip(names, outputs, strict=True))
                np.savez(file, **arrays)
    except OSError as error:
        raise Failure(f"cannot write '{path}': {error.strerror or error}") from None


def _shape_text(array: np.ndarray) -> str:
    # The graph's notation, with the batch size in place of N.
    return format_shape(tuple(array.shape[1:]), batch=str(array.shape[0]))


main.add_command(train)

if __name__ == "__main__":
    main(prog_name="cnnc")
