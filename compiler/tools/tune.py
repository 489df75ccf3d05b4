"""`cnnc tune`: search each kernel's schedule with real measurements.

The search space is the tiling pass's own knobs (`oc_block`, `x_block`, `unroll_max`, and
`winograd` where it applies). For each kernel of each CPU layout, candidates are drawn in an
order fixed by the seed, compiled, checked against the NumPy reference (a schedule may change
speed, never results) and timed alone; the fastest, the heuristic's pick included, is kept.
The result is one JSON line per kernel, keyed by the kernel's signature, the CPU and the cnnc
version, which `cnnc compile --schedule FILE` replays without measuring.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cnnc.backends.llvm.model import CompiledModel
from cnnc.compare import agrees
from cnnc.driver import compile
from cnnc.graph import Graph
from cnnc.passes.layout import layout_of
from cnnc.passes.tile import is_anchor, signature, winograd_tiles
from cnnc.profile import seconds_per_call
from cnnc.reference import reference
from cnnc.version import __version__

BATCH_FOR_LAYOUT = {"batch": 64, "channel": 1}  # what each layout is used for
UNROLL_CHOICES = (0, 3, 5, 8)
MAX_BLOCK = 16


@dataclass
class Record:
    signature: str
    kernel: str
    layout: str
    schedule: dict[str, int]
    seconds: float
    default_seconds: float
    model: str  # the model's name: a record found in another model's file is ignored

    def to_json(self, cpu: str) -> str:
        return json.dumps({"signature": self.signature, "kernel": self.kernel,
                           "layout": self.layout, "cpu": cpu, "cnnc": __version__,
                           "model": self.model,
                           "schedule": self.schedule, "seconds": self.seconds,
                           "default_seconds": self.default_seconds}, sort_keys=True)


def candidates(model: CompiledModel, layout: str, index: int, seed: int
               ) -> Iterator[dict[str, int]]:
    """Schedules for kernel `index` of the `layout` variant, the heuristic's first, then the
    rest of the space in an order fixed by `seed`."""
    variant = next(v for v in model.variants if v.layout == layout)
    group = variant.graph.plan.groups[index]
    picked = group.schedule
    yield {"oc_block": picked.oc_block, "x_block": picked.x_block,
           "unroll_max": picked.unroll_max, "winograd": picked.winograd}
    shape = variant.graph.shape(group.output)
    stored = layout_of(variant.graph)
    channels = stored.channels(shape[0]) // stored.vector(shape[0]) if layout == "channel" \
        else shape[0]
    blocks = [b for b in range(1, MAX_BLOCK + 1) if channels % b == 0] \
        if is_anchor(variant.graph, group.producer) else [1]
    points = [b for b in range(1, MAX_BLOCK + 1) if len(shape) == 3 and shape[-1] % b == 0] \
        or [1]
    space = [{"oc_block": o, "x_block": x, "unroll_max": u, "winograd": 0}
             for o in blocks for x in points for u in UNROLL_CHOICES if o * x <= 2 * MAX_BLOCK]
    # A Winograd kernel's points are its tile and it unrolls no window: only oc_block varies.
    space += [{"oc_block": o, "x_block": 1, "unroll_max": 0, "winograd": tile}
              for o in blocks for tile in winograd_tiles(variant.graph, group)]
    random.Random(seed).shuffle(space)
    yield from space


def time_kernel(model: CompiledModel, layout: str, index: int, batch: int,
                seconds: float = 0.05) -> float:
    """Seconds one run of kernel `index` (counting the edge kernels) takes at `batch`."""
    variant = next(v for v in model.variants if v.layout == layout)
    run = model.kernel_runner(variant, batch)
    return seconds_per_call(lambda: run(index), seconds, best_of=3)


def tune(graph: Graph, seconds: float, seed: int = 0,
         progress: Callable[[float], None] | None = None) -> list[Record]:
    """Tune every kernel of both CPU layouts within about `seconds`, compiling included.

    Each kernel gets an equal share of the time left when its turn comes, so the time a
    kernel whose space runs out early leaves goes to the others. `progress` is told the
    fraction of the time budget spent (after every candidate) and 1.0 when the search ends,
    which is when the budget is spent or every kernel's space is."""
    start = time.perf_counter()
    end = start + seconds

    def report(fraction: float) -> None:
        if progress is not None:
            progress(fraction)

    records = []
    layouts = ("batch", "channel")
    base = {layout: compile(graph, layout=layout, threads=1) for layout in layouts}
    work = [(layout, index) for layout in layouts
            for index in range(len(base[layout].variants[0].graph.plan.groups))]
    for number_done, (layout, index) in enumerate(work):
        model = base[layout]
        variant = model.variants[0]
        group = variant.graph.plan.groups[index]
        batch = BATCH_FOR_LAYOUT[layout]
        x = np.random.default_rng(seed).standard_normal((batch, *graph.input_shape))
        x = x.astype(np.float32)
        expected = reference(graph, x)
        now = time.perf_counter()
        deadline = now + max(0.0, end - now) / (len(work) - number_done)
        best: tuple[float, dict[str, int]] | None = None
        default = 0.0
        for number, schedule in enumerate(candidates(model, layout, index, seed)):
            if number and time.perf_counter() > deadline:
                break
            trial = compile(graph, layout=layout, threads=1, schedule={group.name: schedule})
            report(min(1.0, (time.perf_counter() - start) / seconds))
            if not agrees(trial(x), expected):
                continue  # never keep a schedule that changes results
            spent = time_kernel(trial, layout, index + 1, batch)  # + 1: the packing kernel
            report(min(1.0, (time.perf_counter() - start) / seconds))
            if number == 0:
                default = spent
            if best is None or spent < best[0]:
                best = (spent, schedule)
        if best is not None:
            records.append(Record(signature(variant.graph, group, layout), group.name, layout,
                                  best[1], best[0], default, graph.name))
    report(1.0)
    return records
