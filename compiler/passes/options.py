"""What a compilation was asked for, shared by every pass and the backends, with the facts of
the target it is for (`cnnc.target`): the passes read those from here, not from constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cnnc.target import CpuIsa, host_isa

GPU_TARGETS = ("cuda", "cuda-sim")


@dataclass(frozen=True)
class Options:
    """`target` is "llvm", "cuda" or "cuda-sim"; `schedules` maps a kernel name (or "*") to
    Schedule fields that override what the tiling pass picks. `fast_math` lets the CUDA
    targets use the fast, less exact math functions (`__expf`). `check_bounds` makes the
    generated code check the index of every load and store (for fuzzing and debugging).
    `cpu` (the host's vector registers) and `vector_width` come from the target when not
    given: the host CPU for "llvm", one lane per thread on a GPU."""

    target: str = "llvm"
    fuse: bool = True
    vector_width: int = 0  # float32 lanes of one vector register on the target; 0: the target's
    layout: str = "batch"  # on the CPU: "batch" (many images) or "channel" (one at a time)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    arch: str | None = None  # CUDA architecture (sm_XX); None: the GPU present, else sm_90
    fast_math: bool = False
    check_bounds: bool = False  # debug: generated code checks every load and store
    # The heuristic may compute a convolution by Winograd, whose weights are transformed at
    # compile time; a trainer's kernels read the live weights, so training turns it off.
    winograd: bool = True
    cpu: CpuIsa | None = None  # the CPU's registers, for "llvm"; None on a GPU target

    def __post_init__(self) -> None:
        on_gpu = self.target in GPU_TARGETS
        if self.cpu is None and not on_gpu:
            object.__setattr__(self, "cpu", host_isa())
        if self.vector_width == 0:
            width = 1 if on_gpu or self.cpu is None else self.cpu.vector_width
            object.__setattr__(self, "vector_width", width)
