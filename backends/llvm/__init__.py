"""The LLVM backend: kernel IR -> LLVM IR (llvmlite.ir) -> native code for the host CPU.

What the driver asks of a backend (`cnnc.model.Backend`): which layouts to compile, and the
model built from them (`model.LlvmModel`). Importing this package does not import llvmlite.
"""

from __future__ import annotations

from cnnc.backends.llvm.export import EXPORT_KINDS
from cnnc.graph import Graph
from cnnc.model import Model, Variant
from cnnc.passes import Options


def layouts(layout: str) -> tuple[str, ...]:
    """Both layouts for "auto" (batch-blocked for many images, channel-vectorised for a
    few; each call uses the one that suits its batch), else the one asked for."""
    return ("batch", "channel") if layout == "auto" else (layout,)


def resolve_arch(arch: str | None) -> str | None:
    """The CPU has no architecture option: `arch` as it is."""
    return arch


def build(graph: Graph, variants: list[Variant], options: Options, threads: int | None,
          use_cache: bool) -> Model:
    from cnnc.backends.llvm.model import LlvmModel

    return LlvmModel(graph, variants, threads, use_cache, options.check_bounds)


__all__ = ["EXPORT_KINDS", "build", "layouts", "resolve_arch"]
