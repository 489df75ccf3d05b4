"""Bind a kernel to a GPU: which loops its threads take, how images map onto blocks, and which
inputs a block stages in shared memory, recorded on the kernel IR for the CUDA printer to print.

It reads the kernel's `Schedule` (the tiling pass's choice or a user's) and the architecture's
limits (`cnnc.target`), as TVM's dlight rules take `(func, target)`; tinygrad's
`codegen/gpudims.py` does the same job. It returns a new kernel and never edits the one given;
it knows nothing of CUDA's spelling.
"""

from __future__ import annotations

import math
from dataclasses import replace

from cnnc.kernel import (
    Const,
    For,
    GpuBinding,
    GpuMapping,
    Kernel,
    Load,
    LoopKind,
    LoopRole,
    Stmt,
    substitute,
    walk,
)
from cnnc.target import GpuArch
from cnnc.util import ceil_div

PARALLEL_ROLES: tuple[LoopRole, ...] = ("channel", "spatial")
# __launch_bounds__ asks for enough resident blocks to fill this many threads per SM: at most
# 65536 / 1024 = 64 registers a thread.
THREADS_PER_SM_WANTED = 1024


def bind_gpu(kernel: Kernel, arch: GpuArch) -> Kernel:
    """`kernel` bound to `arch`'s blocks and threads. The perfectly nested channel and spatial
    loops at the top of each statement become GPU loops (their iterations, flattened, are the
    points of an image); the one-lane loop inside them goes (its variable is 0). With
    `gpu_shared_tiles` a block takes one image and stages the inputs its reductions and
    windows read (neighbouring points read them again) while they fit the static shared
    memory; otherwise the grid's threads take the images and points, neighbouring threads on
    neighbouring images with `gpu_batch_inner`. ValueError for a kernel that reads the batch
    (an edge kernel) or has more than one lane."""
    if kernel.uses_batch:
        raise ValueError(f"kernel {kernel.name} reads the batch: the GPU copies it instead")
    schedule = kernel.schedule
    mapping: GpuMapping = "block_per_image" if schedule.gpu_shared_tiles else \
        "image_minor" if schedule.gpu_batch_inner else "image_major"
    kind: LoopKind = "gpu_thread" if mapping == "block_per_image" else "gpu_grid"
    body = [_bind_nest(stmt, kind) for stmt in kernel.body]
    points = max(math.prod(loop.extent for loop in gpu_loops(stmt)) for stmt in body)
    threads = max(1, min(schedule.gpu_threads, arch.max_threads_per_block))
    staged: set[str] = set()
    if mapping == "block_per_image":
        reused = reused_buffers(kernel.body)
        shared = 0
        for buffer in kernel.arguments:
            if buffer.name in reused and buffer.role == "input" and \
                    shared + buffer.size * 4 <= arch.static_shared_limit:
                staged.add(buffer.name)
                shared += buffer.size * 4
    buffers = [replace(buffer, staged=True) if buffer.name in staged else buffer
               for buffer in kernel.buffers]
    min_blocks = min(arch.resident_blocks, ceil_div(THREADS_PER_SM_WANTED, threads))
    return replace(kernel, buffers=buffers, body=body,
                   gpu=GpuBinding(mapping, threads, points, min_blocks))


def gpu_loops(stmt: Stmt) -> list[For]:
    """The GPU loops at the top of a bound statement, outermost first."""
    loops: list[For] = []
    while isinstance(stmt, For) and stmt.kind in ("gpu_grid", "gpu_thread"):
        loops.append(stmt)
        if len(stmt.body) != 1:
            break
        stmt = stmt.body[0]
    return loops


def inside_gpu_loops(stmt: Stmt) -> list[Stmt]:
    """What one thread runs at one point of a bound statement: the body of its GPU loops, or
    of its one-lane loop where it has none (a kernel over a vector has one point)."""
    loops = gpu_loops(stmt)
    if loops:
        return loops[-1].body
    return stmt.body if isinstance(stmt, For) and _is_lane(stmt) else [stmt]


def reused_buffers(body: list[Stmt]) -> set[str]:
    """Buffers loaded inside a reduction or window loop: neighbouring points read them again."""
    loops = [loop for loop in walk(body, expressions=False)
             if isinstance(loop, For) and loop.role in ("reduce", "window")]
    # Only the outermost of nested reductions need a look: it holds the others' loads.
    nested = {id(inner) for loop in loops for inner in walk(loop.body, expressions=False)}
    return {load.buffer for loop in loops if id(loop) not in nested
            for load in walk(loop.body) if isinstance(load, Load)}


def _bind_nest(stmt: Stmt, kind: LoopKind) -> Stmt:
    """`stmt` with its leading parallel loops made `kind` and the one-lane loop inside them
    removed, `lane` replaced by 0. Without parallel loops, a one-lane loop stays as the
    nest's wrapper (a statement cannot become several)."""
    if isinstance(stmt, For) and stmt.role in PARALLEL_ROLES:
        inner = stmt.body
        if len(inner) == 1 and isinstance(inner[0], For) and inner[0].role in PARALLEL_ROLES:
            return replace(stmt, kind=kind, body=[_bind_nest(inner[0], kind)])
        if len(inner) == 1 and _is_lane(inner[0]):
            inner = _one_lane(inner[0]).body
        else:
            inner = [substitute(part, {"lane": Const(0)}) for part in inner]
        return replace(stmt, kind=kind, body=inner)
    if _is_lane(stmt):
        return _one_lane(stmt)
    return substitute(stmt, {"lane": Const(0)})


def _one_lane(lane: Stmt) -> For:
    """A one-lane loop with `lane` replaced by 0 in its body."""
    assert isinstance(lane, For)
    if lane.extent != 1:
        raise ValueError("the CUDA backend needs the one-lane layout")
    return replace(lane, body=[substitute(stmt, {"lane": Const(0)}) for stmt in lane.body])


def _is_lane(stmt: Stmt) -> bool:
    return isinstance(stmt, For) and stmt.role == "lane"
