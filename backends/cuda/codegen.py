"""Kernel IR -> CUDA C: one `__global__` function per fused kernel, and how to launch it.

With the GPU layout (one lane) a buffer holds one image in plain NCHW order. Each kernel is
first bound to the GPU (`cnnc.gpu_bind`): its GPU loops are flattened into "points", each
thread runs the kernel's body at one point of one image, and the binding says how images and
points map onto blocks and threads and which inputs a block stages; this module prints what
the binding says. Parameters become `__constant__` arrays when they are small and every thread
of a warp reads the same element at once, else read-only global arrays. The model's input and
outputs are copied, not packed: the edge kernels are not generated. This module writes text
only; it never calls NVRTC, the driver or a host compiler.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from cnnc.gpu_bind import bind_gpu, gpu_loops, inside_gpu_loops
from cnnc.kernel import (
    GPU_MAPPINGS,
    Buffer,
    CStylePrinter,
    Expr,
    For,
    GpuBinding,
    Kernel,
    Load,
    Var,
    walk,
)
from cnnc.lower import LoweredModel
from cnnc.target import GpuArch, gpu_arch
from cnnc.util import ceil_div
from cnnc.verify import verify, verifying
from cnnc.version import __version__

CONSTANT_LIMIT = 60 * 1024  # bytes of __constant__ data per module (the hardware has 64 KiB)
CONSTANT_MAX_PARAM = 16 * 1024  # bytes: larger parameters stay in global memory
SERIAL_UNROLL = 4  # how far the CUDA compiler may unroll a loop the schedule keeps serial
MAPPINGS = GPU_MAPPINGS

PRELUDE = """\
#define CNNC_INF __int_as_float(0x7f800000)
#define CNNC_NAN __int_as_float(0x7fc00000)
"""

# With `check_bounds`, every load and store goes through cnnc_at(), which checks the index
# against the buffer's size. The simulator's header defines it to report the access and
# carry on with a harmless one; on the GPU it prints the access and stops the kernel.
BOUNDS_HELPER = """\
#define CNNC_AT(base, index, size, kernel, buffer) \\
    (*cnnc_at((base), (long long)(index), (long long)(size), kernel, buffer, __LINE__))
#ifndef CNNC_CUDA_SIM
template <typename T>
static __device__ __forceinline__ T *cnnc_at(T *base, long long index, long long size,
                                             const char *kernel, const char *buffer, int line)
{
    if (index < 0 || index >= size) {
        printf("cnnc: kernel %s: index %lld out of bounds of %s (%lld floats) on line %d, "
               "block %u thread %u\\n", kernel, index, buffer, size, line, blockIdx.x,
               threadIdx.x);
        __trap();
    }
    return base + index;
}
#endif
"""

MAX_HELPER = """\
// NumPy's maximum: NaN if either operand is NaN (fmaxf would drop it).
static __device__ __forceinline__ float cnnc_max(float a, float b)
{
    return (a > b || a != a) ? a : b;
}

static __device__ __forceinline__ int cnnc_max(int a, int b)
{
    return a > b ? a : b;
}
"""


@dataclass
class KernelArgument:
    """A pointer argument: IR buffer `name`, bound to `tensor`, `floats` per image."""

    name: str
    tensor: str
    floats: int
    writes: bool


@dataclass
class Parameter:
    """A parameter array embedded in the module as `symbol`, in `space` "constant"/"global"."""

    symbol: str
    kernel: str
    buffer: str
    floats: int
    space: str


@dataclass
class KernelLaunch:
    """How one generated kernel is launched for a batch of N images.

    Its arguments are `arguments` (device pointers to the whole batch of each tensor) and then
    `int batch`. The grid has ceil(N * items_per_image / threads) blocks of `threads` threads;
    a block-per-image kernel has items_per_image == threads, so one block per image.
    """

    name: str
    layers: list[str]
    threads: int
    points: int  # parallel points per image
    mapping: str  # one of MAPPINGS
    arguments: list[KernelArgument]
    staged: list[str] = field(default_factory=list)  # buffers staged in shared memory
    shared_bytes: int = 0
    min_blocks: int = 1  # __launch_bounds__'s minimum blocks per SM

    @property
    def items_per_image(self) -> int:
        return self.threads if self.mapping == "block_per_image" else self.points

    @property
    def uses_barrier(self) -> bool:
        return bool(self.staged)

    def grid(self, batch: int) -> int:
        return ceil_div(batch * self.items_per_image, self.threads)


@dataclass
class CudaProgram:
    """The generated source, what a host needs to run it, and the GPU-bound kernels that the
    source was printed from."""

    name: str  # a C identifier: the file stem and the module's prefix
    source: str
    launches: list[KernelLaunch]
    parameters: list[Parameter]
    fast_math: bool
    check_bounds: bool = False
    kernels: list[Kernel] = field(default_factory=list)  # after gpu_bind, in launch order


def comment_text(name: str) -> str:
    """A layer or tensor name (free text) as it may appear in a `//` comment: as it is when
    it is plain, else as a JSON string, so that no newline, backslash or other control
    character in it can end the comment or continue it onto the next line of code."""
    if re.fullmatch(r"[A-Za-z0-9_.:+-]+", name):
        return name
    return json.dumps(name)


def generate(lowered: LoweredModel, name: str, arch: str, fast_math: bool = False,
             check_bounds: bool = False) -> CudaProgram:
    """The CUDA C of every compute kernel of `lowered` (the edge kernels become copies).
    With `check_bounds`, every load and store checks its index (see BOUNDS_HELPER)."""
    if lowered.images_per_block != 1:
        raise ValueError("the CUDA backend needs one image per batch block, got "
                         f"{lowered.images_per_block}")
    limits = gpu_arch(arch)
    kernels = [_bound(kernel, limits) for kernel in lowered.kernels if not kernel.uses_batch]
    parameters = _place_parameters(kernels)
    spaces = {(param.kernel, param.buffer): param for param in parameters}
    lines = [
        f"// {name}: generated by cnnc {__version__} for {arch}"
        f"{' with fast math' if fast_math else ''}"
        f"{', checking the bounds of every access' if check_bounds else ''}.",
        "// Each kernel runs the fused layers named above it on a batch of images; every",
        "// tensor argument points at the whole batch of that tensor, in NCHW order.",
        "",
        PRELUDE,
    ]
    if check_bounds:
        lines.append(BOUNDS_HELPER)
    launches = []
    body: list[str] = []
    uses_max = False
    for kernel in kernels:
        emitter = _KernelEmitter(kernel, lowered.bindings[kernel.name], spaces, fast_math,
                                 check_bounds)
        body += emitter.parameter_lines()
        launch, text = emitter.emit()
        body += text
        launches.append(launch)
        uses_max = uses_max or emitter.uses_max
    if uses_max:
        lines.append(MAX_HELPER)
    lines += body
    return CudaProgram(name, "\n".join(lines) + "\n", launches, parameters, fast_math,
                       check_bounds, kernels)


def _bound(kernel: Kernel, limits: GpuArch) -> Kernel:
    """`kernel` as bound to the GPU (as given when it is bound already), verified in tests."""
    bound = kernel if kernel.gpu is not None else bind_gpu(kernel, limits)
    if verifying():
        verify(bound)
    return bound


# --- parameters ------------------------------------------------------------------------------


def _place_parameters(kernels: list[Kernel]) -> list[Parameter]:
    """Constant memory for small parameters read uniformly by a warp, smallest first, while
    the module's constant bank has room; global memory for the rest."""
    candidates: list[tuple[int, Kernel, Buffer, bool]] = []
    for kernel in kernels:
        varying = _thread_varying_vars(kernel)
        nonuniform = {load.buffer for load in walk(kernel.body)
                      if isinstance(load, Load) and _vars_of(load.index) & varying}
        for buffer in kernel.buffers:
            if buffer.role == "param":
                candidates.append((buffer.size, kernel, buffer, buffer.name not in nonuniform))
    used = 0
    placed = []
    for size, kernel, buffer, uniform in sorted(candidates, key=lambda item: item[0]):
        space = "global"
        if uniform and size * 4 <= CONSTANT_MAX_PARAM and used + size * 4 <= CONSTANT_LIMIT:
            space = "constant"
            used += size * 4
        placed.append(Parameter(f"{kernel.name}_{buffer.name}", kernel.name, buffer.name, size,
                                space))
    order = {(kernel.name, buffer.name): index for index, (_, kernel, buffer, _) in
             enumerate(candidates)}
    return sorted(placed, key=lambda param: order[(param.kernel, param.buffer)])


def _thread_varying_vars(kernel: Kernel) -> set[str]:
    """Loop variables that differ between neighbouring threads of a warp."""
    if _binding(kernel).mapping == "image_minor":
        return set()  # neighbouring threads are neighbouring images at the same point
    return {loop.var for nest in kernel.body for loop in gpu_loops(nest)
            if loop.role == "spatial"}


def _binding(kernel: Kernel) -> GpuBinding:
    if kernel.gpu is None:
        raise ValueError(f"kernel {kernel.name} is not bound to a GPU (cnnc.gpu_bind)")
    return kernel.gpu


def _vars_of(expr: Expr) -> set[str]:
    return {node.name for node in walk(expr) if isinstance(node, Var)}


def format_floats(data: np.ndarray, per_line: int = 8) -> list[str]:
    """Float literals that parse back to exactly `data` (shortest float32 decimals)."""
    values = np.ascontiguousarray(data, dtype=np.float32).ravel()
    texts = []
    for value in values:
        if np.isfinite(value):
            text = str(value)
            texts.append(text + ("f" if ("." in text or "e" in text) else ".0f"))
        elif np.isnan(value):
            texts.append("CNNC_NAN")
        else:
            texts.append("CNNC_INF" if value > 0 else "-CNNC_INF")
    return ["    " + ", ".join(texts[start:start + per_line]) + ","
            for start in range(0, len(texts), per_line)]


class CudaPrinter(CStylePrinter):
    """The C-style printer with CUDA's spelling: 4-space blocks, `int` loops with unroll
    pragmas, the prelude's names for infinity and NaN, bracketed negative literals,
    `expf`/`__expf`, NumPy's maximum, and parameters read from their module symbols, every
    access through CNNC_AT with `check_bounds`."""

    indent = "    "
    infinity = "CNNC_INF"
    nan = "CNNC_NAN"

    def __init__(self, kernel: Kernel, symbols: dict[str, str], fast_math: bool,
                 check_bounds: bool) -> None:
        self.kernel = kernel
        self.symbols = symbols
        self.fast_math = fast_math
        self.check_bounds = check_bounds
        # Floats per image of each buffer (one lane: a buffer holds one image), or a C
        # expression of them.
        self.sizes: dict[str, int | str] = {buffer.name: buffer.size for buffer in kernel.buffers}
        self.uses_max = False  # whether the module needs MAX_HELPER

    def loop_header(self, loop: For, pad: str) -> list[str]:
        if loop.extent == 1:
            return [f"{pad}{{", f"{pad}{self.indent}const int {loop.var} = 0;"]
        lines = []
        if loop.kind == "unrolled":
            lines.append(f"{pad}#pragma unroll")
        elif loop.extent > SERIAL_UNROLL:
            # Some unrolling hides latency; full unrolling of a long reduction would hoist
            # its loads and run out of registers.
            lines.append(f"{pad}#pragma unroll {SERIAL_UNROLL}")
        lines.append(f"{pad}for (int {loop.var} = 0; {loop.var} < {loop.extent}; "
                     f"++{loop.var}) {{")
        return lines

    def signed(self, literal: str, value: int | float) -> str:
        return f"({literal})" if value < 0 else literal

    def access(self, buffer: str, index: str, size: int | str | None = None) -> str:
        """`buffer[index]`, or with `check_bounds` the same access through CNNC_AT, which
        checks `index` against the buffer's `size` (its floats per image by default)."""
        name = self.symbols.get(buffer, buffer)
        if not self.check_bounds:
            return f"{name}[{index}]"
        size = self.sizes[buffer] if size is None else size
        return f'CNNC_AT({name}, {index}, {size}, "{self.kernel.name}", "{buffer}")'

    def call(self, fn: str, arg: str) -> str:
        if fn == "sqrt":
            return f"sqrtf({arg})"
        if fn != "exp":
            raise ValueError(f"no CUDA function for {fn}")
        return f"{'__expf' if self.fast_math else 'expf'}({arg})"

    def maximum(self, left: str, right: str) -> str:
        self.uses_max = True
        return f"cnnc_max({left}, {right})"


class _KernelEmitter:
    """Writes one kernel: its parameter arrays, its signature and its body."""

    def __init__(self, kernel: Kernel, bindings: dict[str, str],
                 spaces: dict[tuple[str, str], Parameter], fast_math: bool,
                 check_bounds: bool = False) -> None:
        self.kernel = kernel
        self.bindings = bindings
        self.check_bounds = check_bounds
        self.symbols = {buffer.name: spaces[(kernel.name, buffer.name)].symbol
                        for buffer in kernel.buffers if buffer.role == "param"}
        self.spaces = {buffer.name: spaces[(kernel.name, buffer.name)].space
                       for buffer in kernel.buffers if buffer.role == "param"}
        self.nests = [(gpu_loops(stmt), inside_gpu_loops(stmt)) for stmt in kernel.body]
        self.printer = CudaPrinter(kernel, self.symbols, fast_math, check_bounds)
        self.access = self.printer.access

    @property
    def uses_max(self) -> bool:
        return self.printer.uses_max

    def parameter_lines(self) -> list[str]:
        lines = []
        for buffer in self.kernel.buffers:
            if buffer.role != "param":
                continue
            assert buffer.data is not None
            qualifier = "__constant__ float" if self.spaces[buffer.name] == "constant" \
                else "__device__ const float"
            lines.append(f"{qualifier} {self.symbols[buffer.name]}[{buffer.size}] = {{")
            lines += format_floats(buffer.data)
            lines += ["};", ""]
        return lines

    def launch(self) -> KernelLaunch:
        kernel = self.kernel
        binding = _binding(kernel)
        arguments = [KernelArgument(buffer.name, self.bindings[buffer.name], buffer.size,
                                    buffer.role == "output") for buffer in kernel.arguments]
        for argument in arguments:
            if argument.floats >= 2**31:
                raise ValueError(f"kernel {kernel.name}: buffer {argument.name} holds "
                                 f"{argument.floats} floats per image; the CUDA backend "
                                 "indexes an image with 32-bit integers")
        staged = [buffer.name for buffer in kernel.staged]
        shared = sum(buffer.size * 4 for buffer in kernel.staged)
        return KernelLaunch(kernel.name, list(kernel.layers), binding.threads, binding.points,
                            binding.mapping, arguments, staged, shared, binding.min_blocks)

    def emit(self) -> tuple[KernelLaunch, list[str]]:
        kernel = self.kernel
        launch = self.launch()
        params = [f"{'const ' if not argument.writes else ''}float* __restrict__ "
                  f"{argument.name}_batch" for argument in launch.arguments]
        params.append("int batch")
        layers = ", ".join(comment_text(layer) for layer in kernel.layers)
        how = {"image_major": "one thread per point, neighbouring threads on neighbouring "
                              "points of an image",
               "image_minor": "one thread per point, neighbouring threads on neighbouring "
                              "images",
               "block_per_image": "one block per image, inputs staged in shared memory"}
        lines = [
            f"// kernel {kernel.name}: layers {layers}",
            f"// schedule: {kernel.schedule.describe()}",
            f"// {launch.points} points per image; {how[launch.mapping]}",
            f'extern "C" __global__ void __launch_bounds__({launch.threads}, '
            f"{launch.min_blocks})",
            f"{kernel.name}({', '.join(params)})",
            "{",
        ]
        body: list[str] = []
        if launch.mapping == "block_per_image":
            body.append("const int image = blockIdx.x;")
        else:
            body.append("const long long thread = (long long)blockIdx.x * blockDim.x + "
                        "threadIdx.x;")
            body.append(f"if (thread >= (long long)batch * {launch.points}) return;")
            if launch.mapping == "image_major":
                body.append(f"const int image = (int)(thread / {launch.points});")
                body.append(f"const int point = (int)(thread % {launch.points});")
            else:
                body.append("const int image = (int)(thread % batch);")
                body.append("const int point = (int)(thread / batch);")
        for argument in launch.arguments:
            constness = "" if argument.writes else "const "
            pointer = f"{argument.name}_batch + (long long)image * {argument.floats}"
            if self.check_bounds:  # the image's first float must lie inside the batch
                pointer = "&" + self.access(f"{argument.name}_batch",
                                            f"(long long)image * {argument.floats}",
                                            f"(long long)batch * {argument.floats}")
            if argument.name in launch.staged:
                body.append(f"__shared__ float {argument.name}[{argument.floats}];")
                tensor = comment_text(argument.tensor)
                body.append(f"{{  // stage {argument.name} (tensor %{tensor}) for the block")
                body.append(f"    const float* __restrict__ source = {pointer};")
                body.append(f"    for (int i = threadIdx.x; i < {argument.floats}; "
                            "i += blockDim.x)")
                body.append(f"        {self.access(argument.name, 'i')} = "
                            f"{self.access('source', 'i', argument.floats)};")
                body.append("}")
            else:
                body.append(f"{constness}float* __restrict__ {argument.name} = {pointer};"
                            f"  // tensor %{comment_text(argument.tensor)}")
        if launch.staged:
            body.append("__syncthreads();")
        for loops, inner in self.nests:
            count = math.prod(loop.extent for loop in loops)
            nest = self._decode(loops) + self.printer.block(inner, 1)
            if launch.mapping == "block_per_image":
                body.append(f"for (int point = threadIdx.x; point < {count}; "
                            "point += blockDim.x) {")
                body += nest
                body.append("}")
            elif count < launch.points or len(self.nests) > 1:
                body.append(f"if (point < {count}) {{")
                body += nest
                body.append("}")
            else:
                body += [line[4:] for line in nest]
        lines += ["    " + line if line else line for line in body]
        lines += ["}", ""]
        return launch, lines

    def _decode(self, loops: list[For]) -> list[str]:
        """The loop variables of a point: the innermost loop varies fastest."""
        lines = []
        stride = 1
        for position, loop in reversed(list(enumerate(loops))):
            if loop.extent == 1:
                value = "0"
            elif position == 0:
                value = "point" if stride == 1 else f"point / {stride}"
            else:
                value = f"point % {loop.extent}" if stride == 1 else \
                    f"point / {stride} % {loop.extent}"
            lines.append(f"    const int {loop.var} = {value};")
            stride *= loop.extent
        return lines
