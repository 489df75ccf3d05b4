"""The pass pipeline: each pass is a named function `(graph, options) -> graph`, run in order.

Any pass can be switched off by name; the later passes and lowering fall back to the plain
choice (one kernel per op, NCHW, default schedules, no buffer reuse). `run_pipeline` can dump
the graph after every pass for a user to read and diff.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cnnc.graph import Graph
from cnnc.passes.fold_batchnorm import fold_batchnorm
from cnnc.passes.fuse import fuse, groups_of
from cnnc.passes.layout import layout, layout_of
from cnnc.passes.options import Options
from cnnc.passes.plan_memory import memory_of, plan_memory
from cnnc.passes.prune import prune
from cnnc.passes.tile import tile

Pass = Callable[[Graph, Options], Graph]

PIPELINE: list[tuple[str, Pass]] = [
    ("prune", prune),
    ("fold_batchnorm", fold_batchnorm),
    ("layout", layout),
    ("fuse", fuse),
    ("tile", tile),
    ("plan_memory", plan_memory),
]
PASS_NAMES = tuple(name for name, _ in PIPELINE)


def run_pipeline(graph: Graph, options: Options, disabled: tuple[str, ...] = (),
                 dump_dir: Path | None = None) -> Graph:
    """Run every pass not in `disabled` on a copy of `graph`."""
    unknown = set(disabled) - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"unknown pass {sorted(unknown)[0]!r}; passes: {', '.join(PASS_NAMES)}")
    graph = graph.copy()
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00_input.txt").write_text(describe(graph) + "\n")
    for number, (name, run) in enumerate(PIPELINE, start=1):
        if name in disabled:
            continue
        graph = run(graph, options)
        if dump_dir is not None:
            (dump_dir / f"{number:02d}_{name}.txt").write_text(describe(graph) + "\n")
    return graph


def describe(graph: Graph) -> str:
    """The graph as text, followed by whatever the passes have decided so far."""
    lines = [graph.to_text()]
    if "groups" in graph.nx.graph:
        lines.append("kernels:")
        for group in groups_of(graph):
            lines.append(f"  {group.name}: {', '.join(group.nodes)}")
            lines.append(f"    schedule: {group.schedule.describe()}")
    if "layout" in graph.nx.graph:
        chosen = layout_of(graph)
        form = f"[C][H][W][{chosen.lanes}]" if chosen.kind == "batch" else \
            f"[H][W][C padded to {chosen.lanes}]"
        lines.append(f"layout: {chosen.kind}, {form}")
    if "memory" in graph.nx.graph:
        plan = graph.nx.graph["memory"]
        lines.append(f"memory: {plan.bytes_per_block()} bytes per batch block")
        for tensor, offset in sorted(plan.offsets.items(), key=lambda item: item[1]):
            lines.append(f"  %{tensor}: floats [{offset}, {offset + plan.sizes[tensor]})")
    return "\n".join(lines)


__all__ = ["PASS_NAMES", "PIPELINE", "Options", "describe", "groups_of", "layout_of",
           "memory_of", "run_pipeline"]
