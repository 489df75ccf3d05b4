"""The CUDA backend: kernel IR -> CUDA C -> NVRTC (PTX, cubin) -> the CUDA driver API.

`compile_cuda` is what `cnnc.compile(..., target="cuda" | "cuda-sim")` calls. Target "cuda"
compiles with NVRTC at once (no GPU needed) and runs on GPU 0 when called; "cuda-sim" builds
the same CUDA C with the host C++ compiler and runs it on the CPU, for tests and debugging.
"""

from __future__ import annotations

from cnnc.backends.cuda.model import CudaModel
from cnnc.graph import Graph
from cnnc.lower import LoweredModel
from cnnc.passes import Options, groups_of
from cnnc.passes.plan_memory import MemoryPlan
from cnnc.passes.tile import DEFAULT_GPU_ARCH, gpu_arch


def resolve_arch(arch: str | None) -> str:
    """`arch` checked, or the architecture of the GPU present, else sm_90. A GPU newer than
    NVRTC knows gets the newest architecture NVRTC has (the driver compiles its PTX)."""
    if arch is not None:
        gpu_arch(arch)  # ValueError for a malformed name
        return arch
    from cnnc.backends.cuda import driver_api, nvrtc

    present, _ = driver_api.probe()
    if present is None:
        return DEFAULT_GPU_ARCH
    if nvrtc.available() is None:
        supported = nvrtc.supported_archs()
        if present not in supported:
            older = [name for name in supported if _number(name) <= _number(present)]
            return max(older, key=_number) if older else present
    return present


def _number(arch: str) -> int:
    return int("".join(char for char in arch.split("_", 1)[1] if char.isdigit()))


def compile_cuda(graph: Graph, compiled: Graph, lowered: LoweredModel, memory: MemoryPlan,
                 options: Options, use_cache: bool = True) -> CudaModel:
    """The model for target "cuda" (compiled with NVRTC now) or "cuda-sim". With
    `options.check_bounds` every load and store of the generated code checks its index: an
    access out of bounds raises BoundsError on cuda-sim and stops the kernel on a GPU."""
    if options.target not in ("cuda", "cuda-sim"):
        raise ValueError(f"the CUDA backend does not compile for target {options.target!r}")
    kernels = [group.name for group in groups_of(compiled)]
    return CudaModel(graph, kernels, lowered, memory, options.target,
                     resolve_arch(options.arch), options.fast_math, use_cache,
                     check_bounds=options.check_bounds)


__all__ = ["CudaModel", "compile_cuda", "resolve_arch"]
