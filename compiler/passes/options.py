"""What a compilation was asked for, shared by every pass and the backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Options:
    """`target` is "llvm", "cuda" or "cuda-sim"; `schedules` maps a kernel name (or "*") to
    Schedule fields that override what the tiling pass picks. `fast_math` lets the CUDA
    targets use the fast, less exact math functions (`__expf`). `check_bounds` makes the
    generated code check the index of every load and store (for fuzzing and debugging)."""

    target: str = "llvm"
    fuse: bool = True
    vector_width: int = 16  # float32 lanes of one vector register on the target
    layout: str = "batch"  # on the CPU: "batch" (many images) or "channel" (one at a time)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)
    arch: str | None = None  # CUDA architecture (sm_XX); None: the GPU present, else sm_90
    fast_math: bool = False
    check_bounds: bool = False  # debug: generated code checks every load and store
