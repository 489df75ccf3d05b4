"""Where a compiled training step's time goes: each kernel of each stage timed alone, on one
thread, over the blocks (or items) a step of the batch runs, after one full step has filled
every value; its share of the step and, where its FLOPs are known, GFLOP/s against one
core's measured peak (`cnnc.target`). Profiling only reads what a step computes: the store is
put back as it was, so the trainer's next step is the one it would have taken.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from cnnc import target
from cnnc.kernel import Kernel
from cnnc.profile import node_flops, seconds_per_call
from cnnc.training.program import Stage

if TYPE_CHECKING:
    from cnnc.graph import Graph
    from cnnc.training.trainer import Trainer


def kernel_flops(graph: Graph, kernel: Kernel) -> int:
    """FLOPs per image of a training kernel, 0 where not counted: a forward kernel its ops'
    count, a weight gradient its layer's forward count, an input gradient that count times
    the share of the layer's taps its weights hold (a phase of a strided conv's)."""
    layers = [layer for layer in kernel.layers if layer in graph.nx]
    if kernel.name.startswith("wgrad"):
        return sum(node_flops(graph, layer) for layer in layers)
    if kernel.name.startswith("dgrad") and len(layers) == 1 and "weight" in graph.params(
            layers[0]):
        full = graph.params(layers[0])["weight"].size
        held = sum(buffer.size for buffer in kernel.buffers if buffer.role == "param"
                   and (buffer.param_of or "").endswith(".weight"))
        return round(node_flops(graph, layers[0]) * held / full)
    if "_t" in kernel.name or kernel.uses_batch:  # the other rules a training step adds
        return 0
    return sum(node_flops(graph, layer) for layer in layers)


def profile(trainer: Trainer, x: np.ndarray, y: np.ndarray, seconds: float = 2.0) -> str:
    """The table of one step on batch (x, y): a row per kernel of `trainer.program.step`,
    then the step's total and the time of one whole step."""
    from cnnc.backends.llvm.training import LlvmTrainingCode

    saved = trainer.store.copy()
    steps = trainer.steps
    trainer.step(x, y)
    images = trainer._images(x)
    batch = len(images)
    program = trainer.program
    split = [Stage(stage.name, [launch], stage.items) for stage in program.step
             for launch in stage.launches]
    code = LlvmTrainingCode(dataclasses.replace(program, step=split, evaluate=[]), 1)
    code.set_store(trainer.store)
    share = seconds / (len(split) + 2)
    # Each time holds one native call (Python, ctypes, the block loop), said in the table:
    # taking it off would leave the smallest kernels at zero or below.
    calling = seconds_per_call(partial(code.run, [], images, batch), share / 4, best_of=3)
    timings = [seconds_per_call(partial(code.run, [stage], images, batch), share, best_of=3)
               for stage in split]
    whole = seconds_per_call(partial(trainer.step, x, y), share, best_of=3)
    trainer.store[...] = saved
    trainer.steps = steps
    cpu = target.host_cpu()
    total = sum(timings)
    lines = [cpu.describe_peak(),
             f"{'stage':<16} {'kernel':<20} {'layers':<14} {'time':>10} {'share':>6} "
             f"{'GFLOP/s':>8} {'of peak':>8}"]
    for stage, spent in zip(split, timings):
        kernel = stage.launches[0].kernel
        flops = kernel_flops(program.graph, kernel) * batch
        gflops = flops / spent / 1e9
        rate = f"{gflops:>8.1f} {gflops / cpu.peak_gflops_per_core:>8.0%}" if flops \
            else f"{'-':>8} {'-':>8}"
        layers = ",".join(kernel.layers)
        lines.append(f"{stage.name:<16} {kernel.name:<20} {layers[:14]:<14} "
                     f"{spent * 1e6:>8.1f}us {spent / total:>6.1%} {rate}")
    counted = sum(kernel_flops(program.graph, stage.launches[0].kernel) for stage in split)
    lines.append(f"{'total':<52} {total * 1e6:>8.1f}us (one thread, batch {batch}; each "
                 f"time holds one call, {calling * 1e6:.1f}us alone; "
                 f"{counted * batch / total / 1e9:.1f} GFLOP/s over the counted kernels)")
    lines.append(f"{'one whole step':<52} {whole * 1e6:>8.1f}us ({batch / whole:.0f} images/s "
                 f"on {trainer.threads} thread{'s' if trainer.threads > 1 else ''}, with the "
                 f"host's part of a step)")
    return "\n".join(lines)
