"""The CUDA backend: kernel IR -> CUDA C -> NVRTC (PTX, cubin) -> the CUDA driver API.

`compile_cuda` is what `cnnc.compile(..., target="cuda" | "cuda-sim")` calls. Target "cuda"
compiles with NVRTC at once (no GPU needed) and runs on GPU 0 when called; "cuda-sim" builds
the same CUDA C with the host C++ compiler and runs it on the CPU, for tests and debugging.
"""

from __future__ import annotations

from cnnc.backends.cuda.model import EXPORT_KINDS, CudaModel
from cnnc.graph import Graph
from cnnc.lower import LoweredModel
from cnnc.model import Model, Variant
from cnnc.passes import Options
from cnnc.plan import MemoryPlan
from cnnc.target import DEFAULT_GPU_ARCH, gpu_arch


def layouts(layout: str) -> tuple[str, ...]:
    """One variant, batch-major: a GPU runs every batch size in the same layout (the `layout`
    option is the CPU's)."""
    return ("batch",)


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
    kernels = [group.name for group in compiled.plan.groups]
    return CudaModel(graph, kernels, lowered, memory, options.target,
                     resolve_arch(options.arch), options.fast_math, use_cache,
                     check_bounds=options.check_bounds)


def build(graph: Graph, variants: list[Variant], options: Options, threads: int | None,
          use_cache: bool) -> Model:
    """The model of the one variant `layouts` asked for; `threads` are the CPU's."""
    only = variants[0]
    return compile_cuda(graph, only.graph, only.lowered, only.memory, options, use_cache)


__all__ = ["EXPORT_KINDS", "CudaModel", "build", "compile_cuda", "layouts", "resolve_arch"]
