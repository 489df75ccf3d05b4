"""`cnnc.compile`: a model in, a compiled model out, called on NumPy arrays.

The driver checks the options, runs the pass pipeline and lowers the groups to kernels, once
per layout the backend asks for, and hands the variants to the backend of the target, which
returns a `cnnc.model.Model`. Backends are imported when first used: `import cnnc` imports
neither llvmlite nor the CUDA bindings.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from cnnc import pickling
from cnnc.errors import ModelError
from cnnc.frontend import load
from cnnc.graph import Graph
from cnnc.lower import lower
from cnnc.model import Backend, Model, Variant
from cnnc.passes import Options, run_pipeline
from cnnc.schedule_file import read_schedules

if TYPE_CHECKING:
    from cnnc.backends.llvm.model import LlvmModel

# Each target's backend package (a `cnnc.model.Backend`), imported on first use.
BACKENDS = {"llvm": "cnnc.backends.llvm", "cuda": "cnnc.backends.cuda",
            "cuda-sim": "cnnc.backends.cuda"}
TARGETS = tuple(BACKENDS)
LAYOUTS = ("auto", "batch", "channel")


def backend(target: str) -> Backend:
    """The backend that compiles for `target` (one of TARGETS)."""
    if target not in BACKENDS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    return cast(Backend, importlib.import_module(BACKENDS[target]))


def export_kinds(target: str) -> tuple[str, ...]:
    """The kinds of file a model compiled for `target` can export."""
    return backend(target).EXPORT_KINDS


@overload
def compile(  # noqa: A001 - the public name the users asked for
    model: str | Path | Graph, target: Literal["llvm"] = ..., fuse: bool = ...,
    threads: int | None = ..., schedule: str | Path | dict[str, Any] | None = ...,
    disable_passes: tuple[str, ...] = ..., dump_ir: str | Path | None = ...,
    use_cache: bool = ..., arch: str | None = ..., layout: str = ..., fast_math: bool = ...,
    check_bounds: bool = ...) -> LlvmModel: ...


@overload
def compile(  # noqa: A001
    model: str | Path | Graph, target: str, fuse: bool = ..., threads: int | None = ...,
    schedule: str | Path | dict[str, Any] | None = ..., disable_passes: tuple[str, ...] = ...,
    dump_ir: str | Path | None = ..., use_cache: bool = ..., arch: str | None = ...,
    layout: str = ..., fast_math: bool = ..., check_bounds: bool = ...) -> Model: ...


def compile(  # noqa: A001
    model: str | Path | Graph,
    target: str = "llvm",
    fuse: bool = True,
    threads: int | None = None,
    schedule: str | Path | dict[str, Any] | None = None,
    disable_passes: tuple[str, ...] = (),
    dump_ir: str | Path | None = None,
    use_cache: bool = True,
    arch: str | None = None,
    layout: str = "auto",
    fast_math: bool = False,
    check_bounds: bool = False,
) -> Model:
    """Compile `model` (a path or a Graph) for `target`; returns a callable `Model`: an
    `LlvmModel` (`cnnc.CompiledModel`) for "llvm", a `CudaModel` for "cuda" and "cuda-sim".

    On the CPU, `layout="auto"` compiles the model twice: batch-blocked for many images and
    channel-vectorised for a few. A call below one batch block takes the channel layout; a
    larger one the layout that ran a block faster when the model was first built on this
    CPU (measured once, cached; the layouts round alike).
    `check_bounds` (debug) makes every load and store check its index; an access out of
    bounds then raises `CnncError` instead of touching memory."""
    builder = backend(target)
    check_threads(threads)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    graph = model if isinstance(model, Graph) else load(model)
    check_graph(graph)
    schedules = read_schedules(schedule, model=graph.name)
    # What a pickle of the model carries to rebuild it (cnnc.pickling): the arguments, with
    # the schedules read, so that a worker needs neither the model file nor the tuning log.
    recipe = {"target": target, "fuse": fuse, "schedule": schedules,
              "disable_passes": list(disable_passes), "use_cache": use_cache, "arch": arch,
              "layout": layout, "fast_math": fast_math, "check_bounds": check_bounds}
    dump_dir = Path(dump_ir) if dump_ir is not None else None
    kinds = builder.layouts(layout)
    # Resolved before the passes: a GPU's tiling and NVRTC must agree on the architecture.
    options = Options(target=target, fuse=fuse, schedules=schedules,
                      arch=builder.resolve_arch(arch), layout=kinds[0], fast_math=fast_math,
                      check_bounds=check_bounds)
    variants = []
    for number, kind in enumerate(kinds):
        # The first variant's passes are dumped in DIR, a second one's in DIR/<layout>.
        where = dump_dir if dump_dir is None or number == 0 else dump_dir / f"{kind}_layout"
        variant_options = replace(options, layout=kind)
        compiled = run_pipeline(graph, variant_options, disable_passes, where)
        lowered = lower(compiled)
        if where is not None:
            text = "\n\n".join(kernel.to_text() for kernel in lowered.kernels)
            (where / "99_kernels.txt").write_text(text + "\n")
        variants.append(Variant(kind, compiled, lowered, compiled.plan.memory))
    return pickling.remember(builder.build(graph, variants, options, threads, use_cache),
                             graph, recipe, threads)


def check_graph(graph: Graph) -> None:
    """Refuse a graph that cannot be compiled, before the passes: a model file is checked
    when it is read, a Graph built in Python only here."""
    if not graph.outputs:
        raise ModelError(f"model {graph.name!r} has no outputs: set Graph.outputs to the "
                         "nodes whose values it returns", file=graph.source)


def check_threads(threads: object) -> None:
    """Refuse a thread count that is not None or a positive integer, before anything runs."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an integer >= 1 or None (one per CPU), got "
                        f"{threads!r} ({type(threads).__name__})")
    if threads < 1:
        raise ValueError(f"threads must be an integer >= 1 or None (one per CPU), got {threads}")
