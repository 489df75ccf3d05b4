"""The pass pipeline: each pass is a named function `(graph, options) -> graph`, run in order.

Each pass stores what it decides in the graph's typed `plan` (`cnnc.plan`). Any pass can be
switched off by name; the later passes and lowering then get the plain choice (one kernel per
op, NCHW, default schedules, no buffer reuse), made where the pass would have run, so that
reading the plan never computes anything. `run_pipeline` can dump the graph after every pass
for a user to read and diff.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cnnc.graph import Graph
from cnnc.passes.fold_batchnorm import fold_batchnorm
from cnnc.passes.fuse import fuse, unfused
from cnnc.passes.layout import layout, layout_of
from cnnc.passes.options import Options
from cnnc.passes.plan_memory import plan_memory, unplanned
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
# What runs in place of a switched-off pass whose product a later pass or lowering reads. The
# others need none: no layout reads as NCHW (`layout_of`), untiled groups keep the default
# schedule, and prune and fold_batchnorm make nothing.
PLAIN_CHOICE: dict[str, Pass] = {"fuse": unfused, "plan_memory": unplanned}


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
            if name in PLAIN_CHOICE:
                graph = PLAIN_CHOICE[name](graph, options)
            continue
        graph = run(graph, options)
        if dump_dir is not None:
            (dump_dir / f"{number:02d}_{name}.txt").write_text(describe(graph) + "\n")
    return graph


def describe(graph: Graph) -> str:
    """The graph as text, followed by whatever the passes have decided so far."""
    lines = [graph.to_text()]
    plan = graph.plan
    if plan.has_groups:
        lines.append("kernels:")
        for group in plan.groups:
            lines.append(f"  {group.name}: {', '.join(group.nodes)}")
            lines.append(f"    schedule: {group.schedule.describe()}")
    if plan.layout is not None:
        chosen = plan.layout
        form = f"[C][H][W][{chosen.vector_width}]" if chosen.kind == "batch" else \
            f"[H][W][C padded to {chosen.vector_width}]"
        lines.append(f"layout: {chosen.kind}, {form}")
    if plan.has_memory:
        memory = plan.memory
        lines.append(f"memory: {memory.bytes_per_block()} bytes per batch block")
        for tensor, offset in sorted(memory.offsets.items(), key=lambda item: item[1]):
            lines.append(f"  %{tensor}: floats [{offset}, {offset + memory.sizes[tensor]})")
    return "\n".join(lines)


__all__ = ["PASS_NAMES", "PIPELINE", "PLAIN_CHOICE", "Options", "describe", "layout_of",
           "run_pipeline"]
