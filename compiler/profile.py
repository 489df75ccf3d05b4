"""Per-kernel profile of a compiled model: where the time goes and how close each kernel
comes to the measured fp32 peak of one core of this machine (`cnnc.target`).

Each kernel is timed alone, on one thread, over the blocks a call would run, after one full
run has filled every tensor. FLOPs count what the model asks for, not what the code executes.
It is core, not `cnnc.tools`: `Model.profile` is part of the model protocol (`cnnc.model`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from cnnc import ops, target
from cnnc.graph import Graph
from cnnc.lower import LoweredModel
from cnnc.util import ceil_div


def node_flops(graph: Graph, node: str) -> int:
    """Floating-point operations per image of one op, by its spec's count."""
    spec = ops.OPS[graph.op(node)]
    shapes = [graph.shape(operand) for operand in graph.operands(node)]
    return spec.flops(graph.attrs(node), shapes, graph.shape(node))


def seconds_per_call(call: Callable[[], object], seconds: float, best_of: int = 1) -> float:
    """How long one `call` takes: after a warm-up call, the number of calls doubles until
    they fill `seconds`; that many calls are then timed `best_of` times, the fastest kept."""
    call()
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or calls >= 1 << 16:
            break
        calls *= 2
    best = elapsed / calls
    for _ in range(best_of - 1):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def profile_table(graph: Graph, lowered: LoweredModel, batch: int,
                  run_one: Callable[[int], int], seconds: float, threads: int = 1,
                  peak: target.CpuTarget | None = None) -> str:
    """The table: per kernel its time alone on one thread, share, GFLOP/s, the fraction of
    one core's peak (`peak`, else the host's) and the bytes its buffers hold. `threads` is
    what the model runs on, said in the table (it does not change what is timed)."""
    cpu = peak if peak is not None else target.host_cpu()
    count = len(lowered.kernels)
    share = seconds / (count + 1)
    # Kernel number `count` does not exist: timing it times the call alone (Python, ctypes,
    # the block loop), which is then taken off every kernel's time.
    calling = seconds_per_call(partial(run_one, count), share, best_of=3)
    timings = [max(0.0, seconds_per_call(partial(run_one, index), share, best_of=3) - calling)
               for index in range(count)]
    total = sum(timings) or 1e-12
    blocks = ceil_div(batch, lowered.images_per_block)
    lines = [cpu.describe_peak()]
    if threads > 1:
        lines.append(f"each kernel is timed on one thread, against one core's peak; the model "
                     f"runs on {threads} threads, each taking whole batch blocks")
    lines += [f"{'kernel':<34} {'time':>10} {'share':>6} {'GFLOP/s':>8} {'of peak':>8} "
             f"{'MB moved':>9}"]
    for kernel, spent in zip(lowered.kernels, timings):
        flops = sum(node_flops(graph, node) for node in kernel.layers if node in graph.nx) \
            * batch if not kernel.uses_batch else 0
        moved = sum(buffer.size for buffer in kernel.buffers) * 4 * blocks
        rate = flops / spent / 1e9 if spent else 0.0
        lines.append(f"{kernel.name:<34} {spent * 1e6:>8.1f}us {spent / total:>6.0%} "
                     f"{rate:>8.1f} {rate / cpu.peak_gflops_per_core:>8.0%} {moved / 1e6:>9.2f}")
    lines.append(f"{'total':<34} {total * 1e6:>8.1f}us (one thread, batch {batch}, "
                 f"{'channel' if lowered.images_per_block == 1 else 'batch'} layout; "
                 f"{calling * 1e6:.1f}us of calling each kernel alone taken off)")
    return "\n".join(lines)
