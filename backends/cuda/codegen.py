"""Kernel IR -> CUDA C: one `__global__` function per fused kernel, and how to launch it.

With the GPU layout (one lane) a buffer holds one image in plain NCHW order. The parallel
loops of a kernel (its channel-block and spatial loops) are flattened into "points"; each
thread runs the kernel's body at one point of one image, as its schedule maps images and
points onto blocks and threads. Parameters become `__constant__` arrays when they are small
and every thread of a warp reads the same element at once, else read-only global arrays. The
model's input and outputs are copied, not packed: the edge kernels are not generated.
This module writes text only; it never calls NVRTC, the driver or a host compiler.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np

from cnnc.kernel import (
    Assign,
    Bin,
    Buffer,
    Call,
    Const,
    Declare,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Local,
    Select,
    Stmt,
    Store,
    Var,
    arith,
)
from cnnc.lower import LoweredModel
from cnnc.passes.tile import GPU_STATIC_SHARED_LIMIT
from cnnc.version import __version__

PARALLEL_ROLES = ("channel", "spatial")
CONSTANT_LIMIT = 60 * 1024  # bytes of __constant__ data per module (the hardware has 64 KiB)
CONSTANT_MAX_PARAM = 16 * 1024  # bytes: larger parameters stay in global memory
MAX_MIN_BLOCKS = 16  # resident blocks per SM that every architecture since sm_75 allows
SERIAL_UNROLL = 4  # how far the CUDA compiler may unroll a loop the schedule keeps serial
MAPPINGS = ("image_major", "image_minor", "block_per_image")

_PRECEDENCE = {"and": 1, "<": 2, "<=": 2, "+": 3, "-": 3, "*": 4, "/": 4, "//": 4}

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
        return -(-batch * self.items_per_image // self.threads)


@dataclass
class CudaProgram:
    """The generated source and what a host needs to run it."""

    name: str  # a C identifier: the file stem and the module's prefix
    source: str
    launches: list[KernelLaunch]
    parameters: list[Parameter]
    fast_math: bool
    check_bounds: bool = False


def c_name(name: str) -> str:
    """A C identifier from a model name (which is free text)."""
    cleaned = re.sub(r"\W", "_", name, flags=re.ASCII) or "model"
    return cleaned if not cleaned[0].isdigit() else f"m_{cleaned}"


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
    if lowered.lanes != 1:
        raise ValueError(f"the CUDA backend needs the one-lane layout, got {lowered.lanes} lanes")
    kernels = [kernel for kernel in lowered.kernels if not kernel.uses_batch]
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
                       check_bounds)


# --- parameters ------------------------------------------------------------------------------


def _place_parameters(kernels: list[Kernel]) -> list[Parameter]:
    """Constant memory for small parameters read uniformly by a warp, smallest first, while
    the module's constant bank has room; global memory for the rest."""
    candidates: list[tuple[int, Kernel, Buffer, bool]] = []
    for kernel in kernels:
        varying = _thread_varying_vars(kernel)
        nonuniform = _nonuniform_buffers(kernel.body, varying)
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
    if kernel.schedule.gpu_batch_inner:
        return set()  # neighbouring threads are neighbouring images at the same point
    names: set[str] = set()
    for nest in kernel.body:
        loops, _ = _parallel_loops(nest)
        names |= {loop.var for loop in loops if loop.role == "spatial"}
    return names


def _nonuniform_buffers(body: list[Stmt], varying: set[str]) -> set[str]:
    found: set[str] = set()

    def visit_expr(expr: Expr) -> None:
        if isinstance(expr, Load):
            if _vars_of(expr.index) & varying:
                found.add(expr.buffer)
            visit_expr(expr.index)
        elif isinstance(expr, Bin):
            visit_expr(expr.left)
            visit_expr(expr.right)
        elif isinstance(expr, Call):
            visit_expr(expr.arg)
        elif isinstance(expr, Select):
            for part in (expr.cond, expr.then, expr.otherwise):
                visit_expr(part)

    for stmt in _walk(body):
        if isinstance(stmt, Store):
            visit_expr(stmt.index)
            visit_expr(stmt.value)
        elif isinstance(stmt, (Declare, Assign)):
            visit_expr(stmt.init if isinstance(stmt, Declare) else stmt.value)
        elif isinstance(stmt, If):
            visit_expr(stmt.cond)
    return found


def _walk(body: list[Stmt]) -> list[Stmt]:
    stmts: list[Stmt] = []
    for stmt in body:
        stmts.append(stmt)
        if isinstance(stmt, (For, If)):
            stmts += _walk(stmt.body)
    return stmts


def _vars_of(expr: Expr) -> set[str]:
    if isinstance(expr, Var):
        return {expr.name}
    if isinstance(expr, Bin):
        return _vars_of(expr.left) | _vars_of(expr.right)
    if isinstance(expr, Load):
        return _vars_of(expr.index)
    if isinstance(expr, Call):
        return _vars_of(expr.arg)
    if isinstance(expr, Select):
        return _vars_of(expr.cond) | _vars_of(expr.then) | _vars_of(expr.otherwise)
    return set()


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


# --- the loops of a kernel -------------------------------------------------------------------


def _parallel_loops(stmt: Stmt) -> tuple[list[For], list[Stmt]]:
    """The perfectly nested channel/spatial loops at the top of `stmt`, and the body inside
    them (with the one-lane loop removed): what one thread runs at one point."""
    loops: list[For] = []
    body: list[Stmt] = [stmt]
    while len(body) == 1 and isinstance(body[0], For) and body[0].role in PARALLEL_ROLES:
        loops.append(body[0])
        body = body[0].body
    if len(body) == 1 and isinstance(body[0], For) and body[0].role == "lane":
        if body[0].extent != 1:
            raise ValueError("the CUDA backend needs the one-lane layout")
        body = body[0].body
    return loops, body


def _without_lane(expr: Expr) -> Expr:
    """`expr` with the lane variable replaced by 0 and the integer arithmetic refolded."""
    if isinstance(expr, Var):
        return Const(0) if expr.name == "lane" else expr
    if isinstance(expr, Bin):
        left, right = _without_lane(expr.left), _without_lane(expr.right)
        return arith(expr.op, left, right) if expr.op in "+-*" else Bin(expr.op, left, right)
    if isinstance(expr, Load):
        return Load(expr.buffer, _without_lane(expr.index))
    if isinstance(expr, Call):
        return Call(expr.fn, _without_lane(expr.arg))
    if isinstance(expr, Select):
        return Select(_without_lane(expr.cond), _without_lane(expr.then),
                      _without_lane(expr.otherwise))
    return expr


class _KernelEmitter:
    """Writes one kernel: its parameter arrays, its signature and its body."""

    def __init__(self, kernel: Kernel, bindings: dict[str, str],
                 spaces: dict[tuple[str, str], Parameter], fast_math: bool,
                 check_bounds: bool = False) -> None:
        self.kernel = kernel
        self.bindings = bindings
        self.fast_math = fast_math
        self.check_bounds = check_bounds
        # Floats per image of each buffer (one lane: a buffer holds one image).
        self.sizes = {buffer.name: buffer.size for buffer in kernel.buffers}
        self.symbols = {buffer.name: spaces[(kernel.name, buffer.name)].symbol
                        for buffer in kernel.buffers if buffer.role == "param"}
        self.spaces = {buffer.name: spaces[(kernel.name, buffer.name)].space
                       for buffer in kernel.buffers if buffer.role == "param"}
        self.nests = [_parallel_loops(stmt) for stmt in kernel.body]
        self.uses_max = False

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
        kernel, schedule = self.kernel, self.kernel.schedule
        points = max(math.prod(loop.extent for loop in loops) for loops, _ in self.nests)
        mapping = "block_per_image" if schedule.gpu_shared_tiles else \
            "image_minor" if schedule.gpu_batch_inner else "image_major"
        threads = max(1, min(schedule.gpu_threads, 1024))
        arguments = [KernelArgument(buffer.name, self.bindings[buffer.name], buffer.size,
                                    buffer.role == "output") for buffer in kernel.arguments]
        for argument in arguments:
            if argument.floats >= 2**31:
                raise ValueError(f"kernel {kernel.name}: buffer {argument.name} holds "
                                 f"{argument.floats} floats per image; the CUDA backend "
                                 "indexes an image with 32-bit integers")
        staged: list[str] = []
        shared = 0
        if mapping == "block_per_image":
            reused = _reused_buffers(kernel.body)
            for argument in arguments:
                if argument.name in reused and not argument.writes and \
                        shared + argument.floats * 4 <= GPU_STATIC_SHARED_LIMIT:
                    staged.append(argument.name)
                    shared += argument.floats * 4
        # Enough resident blocks for 1024 threads per SM: at most 64 registers a thread.
        min_blocks = min(MAX_MIN_BLOCKS, -(-1024 // threads))
        return KernelLaunch(kernel.name, list(kernel.layers), threads, points, mapping,
                            arguments, staged, shared, min_blocks)

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
            nest = self._decode(loops) + self.block(inner, 1)
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

    def access(self, buffer: str, index: str, size: int | str | None = None) -> str:
        """`buffer[index]`, or with `check_bounds` the same access through CNNC_AT, which
        checks `index` against the buffer's `size` (its floats per image by default)."""
        name = self.symbols.get(buffer, buffer)
        if not self.check_bounds:
            return f"{name}[{index}]"
        size = self.sizes[buffer] if size is None else size
        return f'CNNC_AT({name}, {index}, {size}, "{self.kernel.name}", "{buffer}")'

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

    # --- statements and expressions ----------------------------------------------------------

    def block(self, body: list[Stmt], depth: int) -> list[str]:
        pad = "    " * depth
        lines: list[str] = []
        for stmt in body:
            if isinstance(stmt, For):
                if stmt.extent == 1:
                    lines.append(f"{pad}{{")
                    lines.append(f"{pad}    const int {stmt.var} = 0;")
                else:
                    if stmt.kind == "unrolled":
                        lines.append(f"{pad}#pragma unroll")
                    elif stmt.extent > SERIAL_UNROLL:
                        # Some unrolling hides latency; full unrolling of a long reduction
                        # would hoist its loads and run out of registers.
                        lines.append(f"{pad}#pragma unroll {SERIAL_UNROLL}")
                    lines.append(f"{pad}for (int {stmt.var} = 0; {stmt.var} < {stmt.extent}; "
                                 f"++{stmt.var}) {{")
                lines += self.block(stmt.body, depth + 1)
                lines.append(f"{pad}}}")
            elif isinstance(stmt, Store):
                lines.append(f"{pad}{self.access(stmt.buffer, self.expr(stmt.index))} = "
                             f"{self.expr(stmt.value)};")
            elif isinstance(stmt, Declare):
                lines.append(f"{pad}float {stmt.local} = {self.expr(stmt.init)};")
            elif isinstance(stmt, Assign):
                lines.append(f"{pad}{stmt.local} = {self.expr(stmt.value)};")
            elif isinstance(stmt, If):
                lines.append(f"{pad}if ({self.expr(stmt.cond)}) {{")
                lines += self.block(stmt.body, depth + 1)
                lines.append(f"{pad}}}")
            else:
                raise TypeError(f"not a statement: {stmt!r}")
        return lines

    def expr(self, expr: Expr, parent: int = 0) -> str:
        return self._print(_without_lane(expr), parent)

    def _print(self, expr: Expr, parent: int = 0) -> str:
        if isinstance(expr, Const):
            if isinstance(expr.value, float):
                if np.isnan(expr.value):
                    return "CNNC_NAN"
                if np.isinf(expr.value):
                    return "CNNC_INF" if expr.value > 0 else "(-CNNC_INF)"
                text = repr(expr.value)
                text = text + "f" if ("." in text or "e" in text) else text + ".0f"
                return f"({text})" if expr.value < 0 else text
            return f"({expr.value})" if expr.value < 0 else str(expr.value)
        if isinstance(expr, (Var, Local)):
            return expr.name
        if isinstance(expr, Load):
            return self.access(expr.buffer, self._print(expr.index))
        if isinstance(expr, Call):
            if expr.fn != "exp":
                raise ValueError(f"no CUDA function for {expr.fn}")
            return f"{'__expf' if self.fast_math else 'expf'}({self._print(expr.arg)})"
        if isinstance(expr, Select):
            return (f"({self._print(expr.cond)} ? {self._print(expr.then)} : "
                    f"{self._print(expr.otherwise)})")
        if isinstance(expr, Bin):
            if expr.op == "max":
                self.uses_max = True
                return f"cnnc_max({self._print(expr.left)}, {self._print(expr.right)})"
            level = _PRECEDENCE[expr.op]
            op = {"and": "&&", "//": "/"}.get(expr.op, expr.op)
            text = f"{self._print(expr.left, level)} {op} {self._print(expr.right, level + 1)}"
            return f"({text})" if level < parent else text
        raise TypeError(f"not an expression: {expr!r}")


def _reused_buffers(body: list[Stmt]) -> set[str]:
    """Buffers loaded inside a reduction or window loop: neighbouring points read them again."""
    found: set[str] = set()

    def loads(expr: Expr) -> set[str]:
        if isinstance(expr, Load):
            return {expr.buffer} | loads(expr.index)
        if isinstance(expr, Bin):
            return loads(expr.left) | loads(expr.right)
        if isinstance(expr, Call):
            return loads(expr.arg)
        if isinstance(expr, Select):
            return loads(expr.cond) | loads(expr.then) | loads(expr.otherwise)
        return set()

    def visit(stmts: list[Stmt], inside: bool) -> None:
        for stmt in stmts:
            if isinstance(stmt, For):
                visit(stmt.body, inside or stmt.role in ("reduce", "window"))
            elif isinstance(stmt, If):
                visit(stmt.body, inside)
            elif inside:
                if isinstance(stmt, Store):
                    found.update(loads(stmt.value) | loads(stmt.index))
                elif isinstance(stmt, Declare):
                    found.update(loads(stmt.init))
                elif isinstance(stmt, Assign):
                    found.update(loads(stmt.value))

    visit(body, False)
    return found
