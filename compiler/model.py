"""What `cnnc.compile` returns, whatever the backend: the `Model` protocol, and the variants
(one compilation of the model per layout) that the driver hands a backend to build it from.

Both backends' models (`cnnc.backends.llvm.model`, `cnnc.backends.cuda.model`) implement
`Model`, and the driver and the CLI use nothing else of them. This module imports no backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cnnc.graph import Graph
from cnnc.lower import LoweredModel
from cnnc.passes import Options
from cnnc.plan import MemoryPlan


@dataclass
class Variant:
    """One compilation of the model in one layout: its graph after the passes, its kernels
    and its memory plan."""

    layout: str
    graph: Graph  # after the passes
    lowered: LoweredModel
    memory: MemoryPlan

    @property
    def images_per_block(self) -> int:
        return self.lowered.images_per_block


class Model(Protocol):
    """A compiled model: called on a float array (N, C, H, W), it returns the output array
    (a tuple of them for a model with several outputs)."""

    name: str
    graph: Graph  # as loaded, before the passes
    kernels: list[str]  # the fused kernels' names, in launch order
    output_shapes: list[tuple[int, ...]]

    def __call__(self, x: Any) -> np.ndarray | tuple[np.ndarray, ...]: ...

    def source(self, kind: str = ...) -> str:
        """The generated code of one kind ("kernel", the loop IR, is there for every
        backend)."""
        ...

    def export(self, directory: str | Path, emit: Sequence[str] | None = None) -> list[Path]:
        """Write the files a program without Python needs, of the kinds in `emit` (the
        backend's own kinds; None: its default set); returns their paths."""
        ...

    def memory_bytes(self, batch: int) -> int:
        """Bytes of intermediate memory a call with `batch` images uses."""
        ...

    def profile(self, batch: int, seconds: float = 0.2) -> str:
        """A table of the time each kernel takes at batch size `batch`."""
        ...

    @property
    def resources(self) -> dict[str, dict[str, int]]:
        """Per kernel, what the native compiler reports it uses (registers, shared memory,
        spills); empty where the backend reports nothing."""
        ...


class Backend(Protocol):
    """What the driver asks of a backend package (`cnnc.backends.llvm`, `cnnc.backends.cuda`),
    imported when a model is first compiled for one of its targets."""

    EXPORT_KINDS: tuple[str, ...]  # what its models' `export` can write

    def layouts(self, layout: str) -> tuple[str, ...]:
        """The layouts to compile a variant in, for the `layout` option of `compile`."""
        ...

    def resolve_arch(self, arch: str | None) -> str | None:
        """The `arch` option checked, or the default chosen (before the passes, which read
        it)."""
        ...

    def build(self, graph: Graph, variants: list[Variant], options: Options,
              threads: int | None, use_cache: bool) -> Model:
        """The model of `graph` (as loaded) from its compiled `variants`."""
        ...


def c_name(name: str) -> str:
    """A C identifier from a model name (which is free text): the stem of exported files and
    the prefix of their symbols."""
    cleaned = re.sub(r"\W", "_", name, flags=re.ASCII) or "model"
    return cleaned if not cleaned[0].isdigit() else f"m_{cleaned}"


def check_emit(emit: Sequence[str], kinds: Sequence[str]) -> None:
    """Refuse an output kind that is not among a backend's `kinds`."""
    unknown = sorted(set(emit) - set(kinds))
    if unknown:
        raise ValueError(f"unknown output kind {unknown[0]!r}; kinds: {', '.join(kinds)}")
