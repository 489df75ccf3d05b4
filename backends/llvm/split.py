"""Batch 1 on several threads: one image's kernels split across the thread pool.

A kernel whose top loop nest walks output channels or rows (`PARALLEL_ROLES`) is rewritten
so that item i of a pool stage runs one share of that loop's iterations; the other kernels
run on one thread, consecutive ones as one stage of one item. A kernel is split only when its
time at the core's measured peak (a lower bound of its time) saves well over a pool barrier,
measured on this machine (`cnnc.target.pool_barrier_us`); the model then times the plan
against one thread (`measured.time_calls`) and keeps it only where it is faster. Each output
element is computed by the same code as on one thread: the bits do not change. Nothing here
knows a model's file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cnnc import target
from cnnc.gpu_bind import PARALLEL_ROLES
from cnnc.graph import Graph
from cnnc.kernel import For, If, Kernel, Load, Store, Var, less, substitute, walk
from cnnc.lower import LoweredModel
from cnnc.profile import node_flops
from cnnc.util import ceil_div

# A split must save this many barriers' worth of time: the estimate leaves out what moving
# a tensor between cores' caches and a late worker cost.
SPLIT_MARGIN = 4.0
BARRIER_STAGES = 256  # empty stages timed per run of the barrier measurement
BARRIER_RUNS = 15  # the cheapest of these runs is kept, as the peak keeps the fastest
BARRIER_WORK_US = 2.0  # the work of one item of a timed stage
MEMORY_FLOATS = 16 << 20  # 64 MiB streamed to measure the memory bandwidth
MEMORY_RUNS = 5


@dataclass(frozen=True)
class Stage:
    """One stage of a batch-1 call: `kernels` (indices into the variant's kernels) run in
    order for each of `items` items; with more than one item, the one kernel is split."""

    kernels: tuple[int, ...]
    items: int


def split_loop(kernel: Kernel, parts: int) -> For | None:
    """The loop whose iterations `split_kernel` shares out: of the perfectly nested channel
    and row loops at the top of the kernel with at least `parts` iterations, the outermost
    row loop, else the outermost. A share of rows reads mostly the rows the same thread
    wrote in the stage before; a share of channels reads every input channel, half of them
    from the other core's cache.
    None where the kernel cannot be split: an edge kernel (it reads the batch), one of several
    top statements, one that reads what it writes or updates a buffer in place."""
    if kernel.uses_batch or len(kernel.body) != 1 or \
            any(buffer.role == "inout" for buffer in kernel.buffers):
        nodes = []
    else:
        nodes = walk(kernel.body)
    # A scratch buffer is read after it is written, but each iteration of the top loop has
    # its own part of it (`cnnc.scratch`), so that shares do not meet there.
    private = {buffer.name for buffer in kernel.buffers if buffer.role == "scratch"}
    written = {node.buffer for node in nodes if isinstance(node, Store)} - private
    if not nodes or written & {node.buffer for node in nodes if isinstance(node, Load)}:
        return None
    stmt = kernel.body[0]
    nest: list[For] = []
    while isinstance(stmt, For) and stmt.role in PARALLEL_ROLES:
        nest.append(stmt)
        if len(stmt.body) != 1:
            break
        stmt = stmt.body[0]
    wide = [loop for loop in nest if loop.extent >= parts]
    rows = [loop for loop in wide if loop.role == "spatial"]
    loop = (rows or wide or [None])[0]
    if loop is not None and private and (loop is not kernel.body[0] or any(
            kernel.buffer(name).parts < loop.extent for name in private)):
        return None  # shares would meet in the scratch
    return loop


def split_kernel(kernel: Kernel, parts: int) -> Kernel:
    """`kernel` computing one of `parts` shares of its `split_loop`: share `block` (the
    kernel's block argument) runs iterations [block * chunk, (block + 1) * chunk) of it."""
    loop = split_loop(kernel, parts)
    assert loop is not None, f"kernel {kernel.name} cannot be split"
    chunk = ceil_div(loop.extent, parts)
    index = Var(loop.var) + Var("block") * chunk
    inner = [substitute(stmt, {loop.var: index}) for stmt in loop.body]
    if chunk * parts != loop.extent:  # the last share is shorter
        inner = [If(less(index, loop.extent), inner)]
    shared = replace(loop, extent=chunk, body=inner)

    def swap(stmt: For) -> For:
        if stmt is loop:
            return shared
        assert len(stmt.body) == 1 and isinstance(stmt.body[0], For)
        return replace(stmt, body=[swap(stmt.body[0])])

    top = kernel.body[0]
    assert isinstance(top, For)
    return replace(kernel, name=f"{kernel.name}_part_of_{parts}", body=[swap(top)])


def kernel_flops(graph: Graph, kernel: Kernel) -> int:
    """Floating-point operations of one image through `kernel`, by the ops' counts."""
    if kernel.uses_batch:
        return 0
    return sum(node_flops(graph, node) for node in kernel.layers if node in graph.nx)


def kernel_param_bytes(kernel: Kernel) -> int:
    """The bytes of parameters one image through `kernel` reads."""
    return 4 * sum(buffer.size for buffer in kernel.buffers if buffer.role == "param")


def plan_stages(graph: Graph, lowered: LoweredModel, threads: int, peak_gflops: float,
                barrier_us: float, memory_gbps: float = math.inf) -> list[Stage]:
    """The stages of a batch-1 call on `threads` threads: each kernel that saves more than
    SPLIT_MARGIN barriers when split is a stage of its own, the others grouped into stages of
    one item. A kernel's time is bounded below by its FLOPs at `peak_gflops` per core and by
    its parameters streamed at `memory_gbps` per core (a dense layer's weights at batch 1:
    each core of a split streams its share). Empty when no kernel is worth splitting: the
    call then stays on one thread."""
    stages: list[Stage] = []
    run: list[int] = []
    for index, kernel in enumerate(lowered.kernels):
        loop = split_loop(kernel, threads)
        if loop is not None:
            at_peak_us = max(kernel_flops(graph, kernel) / (peak_gflops * 1e3),
                             kernel_param_bytes(kernel) / (memory_gbps * 1e3))
            saved_us = at_peak_us * (1 - ceil_div(loop.extent, threads) / loop.extent)
            if saved_us > SPLIT_MARGIN * barrier_us:
                if run:
                    stages.append(Stage(tuple(run), 1))
                    run = []
                stages.append(Stage((index,), threads))
                continue
        run.append(index)
    if not any(stage.items > 1 for stage in stages):
        return []
    if run:
        stages.append(Stage(tuple(run), 1))
    return stages


def describe(lowered: LoweredModel, stages: Sequence[Stage],
             timing: tuple[float, float] | None = None) -> str:
    """One line per stage: its kernels, and on how many items they run; then, given the
    `measured.time_calls` timing, whether the plan is used."""
    lines = [f"stage {number}: {', '.join(lowered.kernels[k].name for k in stage.kernels)}"
             f" x{stage.items}" for number, stage in enumerate(stages)]
    if timing is not None:
        split_us, whole_us = (seconds * 1e6 for seconds in timing)
        verdict = "used" if split_pays(*timing) else "not used: one thread runs the call"
        lines.append(f"measured: {split_us:.1f} us a call split, {whole_us:.1f} us on one "
                     f"thread; {verdict}")
    return "\n".join(lines)


def split_pays(split_seconds: float, whole_seconds: float) -> bool:
    """Whether the split plan ran a call faster than one thread did."""
    return split_seconds < whole_seconds


def host_barrier_us(threads: int) -> float:
    """The measured cost of one pool barrier on `threads` threads of this machine (cached
    per CPU model by `cnnc.target`)."""
    return target.pool_barrier_us(threads, lambda: measure_barrier_us(threads))


def host_memory_gbps() -> float:
    """One core's measured streaming bandwidth from main memory (cached per CPU model by
    `cnnc.target`)."""
    return target.memory_gbps(measure_memory_gbps)


def measure_memory_gbps() -> float:
    """GB/s of one core taking the maximum of an array larger than small machines' caches
    (64 MiB; NumPy's maximum is vectorised and single-threaded, its sum is slower than the
    memory): the best of MEMORY_RUNS runs."""
    data = np.ones(MEMORY_FLOATS, np.float32)
    best = math.inf
    for _ in range(MEMORY_RUNS):
        start = time.perf_counter()
        np.maximum.reduce(data)
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def measure_barrier_us(threads: int) -> float:
    """What one stage of a pool sequence costs beyond its work, in microseconds: stages of
    `threads` items of BARRIER_WORK_US each (a spin on the cycle counter) are timed on a pool
    of `threads` threads against the same items' work alone. The cheapest of BARRIER_RUNS
    runs of BARRIER_STAGES stages: what it costs when no other program takes the cores."""
    from cnnc.backends.llvm import jit, runtime

    native = runtime.native()
    ticks = max(1, int(native.spin_ticks / runtime.SPIN_SECONDS * BARRIER_WORK_US * 1e-6))
    library = jit.JitLibrary(jit.emit_object(jit.optimise(_spin_module(ticks))))
    address = library.address("cnnc_spin_stage")
    pooled = np.array([address, threads] * BARRIER_STAGES, np.int64)
    alone = np.array([address, 1] * BARRIER_STAGES, np.int64)
    data = np.zeros(2, np.int64)
    slots = np.array([data.ctypes.data, data.ctypes.data], np.int64)
    x_slot, y_slot = int(slots.ctypes.data), int(slots.ctypes.data) + 8
    arenas = np.full(threads, data.ctypes.data, np.int64)
    pool = runtime.ThreadPool(threads)
    pooled_s, alone_s = [], []
    for run in range(BARRIER_RUNS + 1):  # the first run starts the workers
        start = time.perf_counter()
        status = pool.try_sequence(int(pooled.ctypes.data), BARRIER_STAGES, x_slot, y_slot, 1,
                                   int(arenas.ctypes.data))
        middle = time.perf_counter()
        native.sequence(int(data.ctypes.data), int(alone.ctypes.data), BARRIER_STAGES, x_slot,
                        y_slot, 1)
        end = time.perf_counter()
        assert status == 0
        if run:
            pooled_s.append(middle - start)
            alone_s.append(end - middle)
    del pool
    return max(0.0, (min(pooled_s) - min(alone_s)) * 1e6 / BARRIER_STAGES)


def _spin_module(ticks: int) -> str:
    """`cnnc_spin_stage`, a runner (`abi.RUNNER`) that spins `ticks` cycles per item."""
    return f"""
declare i64 @llvm.readcyclecounter()
define i32 @cnnc_spin_stage(ptr %x, ptr %y, i64 %batch, i64 %first, i64 %end, ptr %arena) {{
entry:
  %items = sub i64 %end, %first
  %want = mul i64 %items, {ticks}
  %start = call i64 @llvm.readcyclecounter()
  br label %spin
spin:
  %now = call i64 @llvm.readcyclecounter()
  %spent = sub i64 %now, %start
  %more = icmp ult i64 %spent, %want
  br i1 %more, label %spin, label %done
done:
  ret i32 0
}}
"""


__all__ = ["Stage", "describe", "host_barrier_us", "host_memory_gbps", "measure_barrier_us",
           "measure_memory_gbps", "plan_stages", "split_kernel", "split_loop", "split_pays"]
