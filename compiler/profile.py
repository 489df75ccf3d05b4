"""Per-kernel profile of a compiled model: where the time goes and how close each kernel
comes to the machine's floating-point peak.

Each kernel is timed alone over the same blocks a call would run, after one full run has
filled every intermediate tensor. FLOPs count what the model asks for (a fused pooling does
not add the convolution outputs it never stores twice), not what the code executes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

from cnnc.graph import Graph
from cnnc.lower import LoweredModel

# fp32 FMA throughput of one core of our machines (AMD Zen 4, AVX-512), measured with a
# hand-written loop of independent FMAs: the ceiling a kernel is compared with.
PEAK_GFLOPS_PER_CORE = 117.0


def node_flops(graph: Graph, node: str) -> int:
    """Floating-point operations per image of one op."""
    op = graph.op(node)
    out = math.prod(graph.shape(node))
    if op == "conv2d":
        attrs = graph.attrs(node)
        kh, kw = attrs["kernel_size"]
        per_output = graph.shape(graph.operands(node)[0])[0] // attrs["groups"] * kh * kw
        return 2 * out * per_output
    if op == "dense":
        return 2 * out * graph.shape(graph.operands(node)[0])[0]
    if op in ("maxpool2d", "avgpool2d"):
        kh, kw = graph.attrs(node)["kernel_size"]
        return out * kh * kw
    if op == "global_avgpool2d":
        return math.prod(graph.shape(graph.operands(node)[0]))
    if op in ("flatten", "concat"):
        return 0
    return out * (4 if op in ("sigmoid", "tanh", "softmax") else 1)


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
                  run_one: Callable[[int], int], seconds: float) -> str:
    count = len(lowered.kernels)
    share = seconds / (count + 1)
    # Kernel number `count` does not exist: timing it times the call alone (Python, ctypes,
    # the block loop), which is then taken off every kernel's time.
    calling = seconds_per_call(partial(run_one, count), share, best_of=3)
    timings = [max(0.0, seconds_per_call(partial(run_one, index), share, best_of=3) - calling)
               for index in range(count)]
    total = sum(timings) or 1e-12
    blocks = -(-batch // lowered.lanes)
    lines = [f"{'kernel':<34} {'time':>10} {'share':>6} {'GFLOP/s':>8} {'of peak':>8} "
             f"{'MB moved':>9}"]
    for kernel, spent in zip(lowered.kernels, timings):
        flops = sum(node_flops(graph, node) for node in kernel.layers if node in graph.nx) \
            * batch if not kernel.uses_batch else 0
        moved = sum(buffer.size for buffer in kernel.buffers) * 4 * blocks
        rate = flops / spent / 1e9 if spent else 0.0
        lines.append(f"{kernel.name:<34} {spent * 1e6:>8.1f}us {spent / total:>6.0%} "
                     f"{rate:>8.1f} {rate / PEAK_GFLOPS_PER_CORE:>8.0%} {moved / 1e6:>9.2f}")
    lines.append(f"{'total':<34} {total * 1e6:>8.1f}us (one thread, batch {batch}, "
                 f"{'channel' if lowered.lanes == 1 else 'batch'} layout; "
                 f"{calling * 1e6:.1f}us of calling each kernel alone taken off)")
    return "\n".join(lines)
