"""What the `cnnc` commands share: the options that shape compilation, option parsing, and
the one-line failure for a mistake in an option.

`cnnc.cli` and the tool commands (`cnnc.tools.commands`) both build on it; it computes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cnnc.driver import compile as compile_model
from cnnc.errors import CnncError
from cnnc.graph import Graph
from cnnc.model import Model
from cnnc.passes import PASS_NAMES


class Failure(click.ClickException):
    """A mistake in the command's own options, printed and exited like a CnncError."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def parse_input_shape(ctx: click.Context, param: click.Parameter,
                       value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        dims = tuple(int(item) for item in value.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise Failure(f"--input-shape takes positive integers C,H,W, got '{value}'")
    return dims


input_shape_option = click.option(
    "--input-shape", callback=parse_input_shape, default=None, metavar="C,H,W",
    help="The per-sample input shape of an ONNX model whose input has dynamic dimensions "
         "besides the batch.")


def compile_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that shape compilation, shared by `compile` and `run`."""
    options = [
        click.option("--no-fuse", is_flag=True,
                     help="One kernel per op instead of fusing conv + activation + pooling."),
        click.option("--schedule", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="A JSON file of schedules ({kernel: {field: value}}, or the JSON "
                          "lines `cnnc tune` writes) that replace the tiling pass's choices."),
        click.option("--disable-pass", "disabled", multiple=True, type=click.Choice(PASS_NAMES),
                     help="Switch off one pass of the pipeline (repeatable)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads the batch is split across.  [default: all cores]"),
        click.option("--arch", default=None,
                     help="CUDA architecture, e.g. sm_90.  [default: the GPU present, else "
                          "sm_90]"),
        click.option("--fast-math", is_flag=True,
                     help="CUDA: use the fast, less exact math functions (__expf)."),
        click.option("--check-bounds", is_flag=True,
                     help="Debug: the generated code checks every load and store."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def compile_for_cli(graph: Graph, target: str, no_fuse: bool, schedule: Path | None,
             disabled: tuple[str, ...], threads: int | None, arch: str | None,
             fast_math: bool = False, check_bounds: bool = False,
             dump_ir: Path | None = None) -> Model:
    try:
        return compile_model(graph, target=target, fuse=not no_fuse, threads=threads,
                             schedule=schedule, disable_passes=disabled, dump_ir=dump_ir,
                             arch=arch, fast_math=fast_math, check_bounds=check_bounds)
    except ValueError as error:  # a bad schedule file or field
        if isinstance(error, CnncError):
            raise
        raise Failure(str(error)) from None


def int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise Failure(f"{option} takes comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise Failure(f"{option} takes integers >= 1, got '{text}'")
    return values


def make_directory(path: Path, option: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise Failure(f"{option}: cannot create the directory '{path}': "
                       f"{error.strerror or error}") from None
