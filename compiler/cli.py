"""The `cnnc` command: print a model's op graph, run a model on an input.

It parses options, calls the package's API and prints; it computes nothing itself. Every
`CnncError` a user can cause is printed alone as `error: <message>` on stderr with exit status
2, never as a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from cnnc import __version__
from cnnc.errors import CnncError, InputError
from cnnc.frontend import load
from cnnc.graph import Graph, format_shape
from cnnc.reference import reference

# The targets `cnnc run` accepts; `_make_runner` must know each one.
TARGETS: tuple[str, ...] = ("reference",)

Outputs = np.ndarray | tuple[np.ndarray, ...]
Runner = Callable[[np.ndarray], Outputs]


class _Cli(click.Group):
    """The command group, turning a user's mistake into one line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CnncError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)


class _Failure(click.ClickException):
    """A mistake in the command's own options, printed and exited like a CnncError."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="cnnc",
                      message="%(prog)s %(version)s")
def main() -> None:
    """cnnc compiles small convolutional networks (LeNet-class) and runs them.

    A MODEL is a YAML file in cnnc's model format (see docs/model-format.md). Every mistake in
    a model or an input is reported as `error: FILE:LINE: layer 'NAME' (OP): ...` on stderr
    with exit status 2.
    """


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "dot"]), default="text",
              show_default=True,
              help="text: one line per op with its attributes and output shape; "
                   "dot: Graphviz DOT (pipe it to `dot -Tsvg`).")
def graph(model: Path, fmt: str) -> None:
    """Print the op graph of MODEL, with the shape of every tensor (N is the batch)."""
    loaded = load(model)
    click.echo(loaded.to_text() if fmt == "text" else loaded.to_dot())


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
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
@click.option("--target", "-t", type=click.Choice(TARGETS), default=TARGETS[0],
              show_default=True,
              help="What runs the model: 'reference' is the NumPy oracle.")
def run(model: Path, input_path: Path | None, batch: int | None, seed: int | None,
        output_path: Path | None, target: str) -> None:
    """Run MODEL on an input and print the shape of each output.

    For an output of shape (N, classes) it also prints the top-1 class of each row.
    """
    if input_path is not None and (batch is not None or seed is not None):
        raise click.UsageError("give either --input or --batch/--seed, not both")
    loaded = load(model)
    if output_path is not None:
        _check_output_path(output_path, loaded)
    if input_path is not None:
        x = _read_input(input_path)
        origin = str(input_path)
    else:
        rng = np.random.default_rng(seed or 0)
        x = rng.random((batch or 1, *loaded.input_shape), dtype=np.float32)
        origin = f"random, seed {seed or 0}"
    runner = _make_runner(loaded, target)
    result = runner(x)
    outputs = result if isinstance(result, tuple) else (result,)

    click.echo(f"input: {_shape_text(x)} ({origin})")
    for name, array in zip(loaded.outputs, outputs, strict=True):
        click.echo(f"output %{name}: {_shape_text(array)}")
        if array.ndim == 2:
            classes = " ".join(str(int(index)) for index in array.argmax(axis=1))
            click.echo(f"top-1: {classes}")
    if output_path is not None:
        _write_outputs(output_path, loaded.outputs, outputs)
        click.echo(f"wrote {output_path}")


def _make_runner(graph: Graph, target: str, **options: Any) -> Runner:
    """A function that runs `graph` on an input array for `target` (one of TARGETS)."""
    if target == "reference":
        return lambda x: reference(graph, x)
    raise click.UsageError(f"unknown target '{target}'; expected one of {', '.join(TARGETS)}")


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
        raise _Failure(f"the model has {len(graph.outputs)} outputs; write them to a .npz "
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
        raise _Failure(f"cannot write '{path}': {error.strerror or error}") from None


def _shape_text(array: np.ndarray) -> str:
    # The graph's notation, with the batch size in place of N.
    return format_shape(tuple(array.shape[1:]), batch=str(array.shape[0]))


if __name__ == "__main__":
    main(prog_name="cnnc")
