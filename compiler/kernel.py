"""The kernel IR: a small loop-nest language that both backends translate.

A kernel is buffers plus a body of `for` loops, loads, stores, float locals and arithmetic.
What it computes is fixed by lowering (`cnnc.lower`); how its loops run is recorded on the
loops (`kind`) and in the kernel's `Schedule`, which the tiling pass chose. Passes and backends
go through its one traversal layer (`children`, `walk`, `rewrite`, `substitute`),
`cnnc.verify` states its rules, and `CStylePrinter` prints it as readable pseudo-C (the CUDA
printer is a subclass). It must stay free of any backend's types.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, TypeVar, Union, get_args

import numpy as np

# --- expressions -----------------------------------------------------------------------------

Operand = Union["Expr", int, float]


class Expr:
    """Base of expressions; Python operators build `Bin` nodes so lowering reads like math."""

    def __add__(self, other: Operand) -> Expr:
        return arith("+", self, wrap(other))

    def __radd__(self, other: Operand) -> Expr:
        return arith("+", wrap(other), self)

    def __sub__(self, other: Operand) -> Expr:
        return arith("-", self, wrap(other))

    def __rsub__(self, other: Operand) -> Expr:
        return arith("-", wrap(other), self)

    def __mul__(self, other: Operand) -> Expr:
        return arith("*", self, wrap(other))

    def __rmul__(self, other: Operand) -> Expr:
        return arith("*", wrap(other), self)

    def __truediv__(self, other: Operand) -> Expr:
        return arith("/", self, wrap(other))


def arith(op: str, left: Expr, right: Expr) -> Expr:
    """`left op right`, with integer identities folded (x + 0, x * 1, 2 * 3) so that index
    expressions print short. Floats are never folded: 0 * NaN is not 0."""
    left_int, right_int = _int_value(left), _int_value(right)
    if left_int is not None and right_int is not None and op in "+-*":
        return Const({"+": left_int + right_int, "-": left_int - right_int,
                      "*": left_int * right_int}[op])
    if right_int == 0 and op in "+-" or right_int == 1 and op == "*":
        return left
    if left_int == 0 and op == "+" or left_int == 1 and op == "*":
        return right
    if (left_int == 0 or right_int == 0) and op == "*":
        return Const(0)
    return Bin(op, left, right)


def _int_value(expr: Expr) -> int | None:
    return expr.value if isinstance(expr, Const) and type(expr.value) is int else None


@dataclass(frozen=True, eq=False)
class Const(Expr):
    value: int | float

    @property
    def is_float(self) -> bool:
        return isinstance(self.value, float)


@dataclass(frozen=True, eq=False)
class Var(Expr):
    """A loop variable (a 64-bit integer)."""

    name: str


@dataclass(frozen=True, eq=False)
class Local(Expr):
    """A float variable declared with `Declare` and changed with `Assign`."""

    name: str


@dataclass(frozen=True, eq=False)
class Load(Expr):
    buffer: str
    index: Expr


@dataclass(frozen=True, eq=False)
class Bin(Expr):
    """Arithmetic (+ - * on ints or floats, / on floats, // on non-negative ints), `max`
    (NaN-propagating, as NumPy's maximum), comparisons (< <= of ints or floats, giving a
    condition; false when a float is NaN) and `and` of conditions."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False)
class Call(Expr):
    """A math function of floats: `exp`, `sqrt`."""

    fn: str
    arg: Expr


@dataclass(frozen=True, eq=False)
class Select(Expr):
    cond: Expr
    then: Expr
    otherwise: Expr


def wrap(value: Operand) -> Expr:
    return value if isinstance(value, Expr) else Const(value)


def maximum(left: Operand, right: Operand) -> Expr:
    return Bin("max", wrap(left), wrap(right))


def less(left: Operand, right: Operand) -> Expr:
    return Bin("<", wrap(left), wrap(right))


def all_of(*conds: Expr) -> Expr | None:
    """The conjunction of `conds` (None when there are none)."""
    result: Expr | None = None
    for cond in conds:
        result = cond if result is None else Bin("and", result, cond)
    return result


# --- statements ------------------------------------------------------------------------------

# How a loop runs: in order, as one vector of its iterations, or unrolled in the code; on a
# GPU (bound by `cnnc.gpu_bind`) one iteration per thread of the whole grid, which also spans
# the images of the batch ("gpu_grid"), or strided over the threads of the one block that
# holds an image ("gpu_thread").
LoopKind = Literal["serial", "vectorized", "unrolled", "gpu_grid", "gpu_thread"]
# What a loop walks, for schedules and for the CUDA backend's choice of parallel loops: the
# points of an edge kernel, the images of a batch block (or channels of a vector), channel
# blocks, rows and columns, a reduction, or a pooling window.
LoopRole = Literal["point", "lane", "channel", "spatial", "reduce", "window"]
LOOP_KINDS: tuple[LoopKind, ...] = get_args(LoopKind)
GPU_LOOP_KINDS: tuple[LoopKind, ...] = ("gpu_grid", "gpu_thread")
LOOP_ROLES: tuple[LoopRole, ...] = get_args(LoopRole)


class Stmt:
    """Base of statements."""


@dataclass(eq=False)
class For(Stmt):
    var: str
    extent: int
    body: list[Stmt]
    kind: LoopKind = "serial"
    role: LoopRole | None = None


@dataclass(eq=False)
class Store(Stmt):
    buffer: str
    index: Expr
    value: Expr


@dataclass(eq=False)
class Declare(Stmt):
    local: str
    init: Expr


@dataclass(eq=False)
class Assign(Stmt):
    local: str
    value: Expr


@dataclass(eq=False)
class If(Stmt):
    cond: Expr
    body: list[Stmt]


# --- traversal -------------------------------------------------------------------------------

Node = Expr | Stmt
N = TypeVar("N", bound=Node)

# The fields of each node type that hold its parts, in the order they are evaluated; a
# `body` (always last) holds a list of statements.
_PARTS: dict[type, tuple[str, ...]] = {
    Const: (), Var: (), Local: (), Load: ("index",), Bin: ("left", "right"), Call: ("arg",),
    Select: ("cond", "then", "otherwise"), For: ("body",), Store: ("index", "value"),
    Declare: ("init",), Assign: ("value",), If: ("cond", "body"),
}


def _fields_of(node: Node) -> tuple[str, ...]:
    try:
        return _PARTS[type(node)]
    except KeyError:
        raise TypeError(f"not a kernel IR node: {node!r}") from None


def children(node: Node) -> list[Node]:
    """The direct parts of `node` (operands, index, value, body statements), in the order
    they are evaluated."""
    names = _fields_of(node)
    if not names:
        return []
    parts = [getattr(node, name) for name in names]
    if isinstance(parts[-1], list):  # a body
        return parts[:-1] + parts[-1]
    return parts


def walk(root: Node | Sequence[Stmt], expressions: bool = True) -> list[Node]:
    """Every node of `root` (a node or a body of statements), each after its parts, left to
    right: a post-order visit, as TVM's `post_order_visit`. Without `expressions`, only the
    statements (a quick way through a large body when no expression matters)."""
    order: list[Node] = []

    def visit(node: Node) -> None:
        for part in children(node):
            if expressions or isinstance(part, Stmt):
                visit(part)
        order.append(node)

    for node in [root] if isinstance(root, (Expr, Stmt)) else root:
        visit(node)
    return order


def rewrite(root: N, change: Callable[[Node], Node | None]) -> N:
    """`root` rebuilt bottom-up: each node, once its parts are rewritten, is replaced by
    `change(node)` unless that is None. Nodes are never edited in place; a subtree that
    nothing changed is shared with `root`, not copied."""
    parts = children(root)
    new_parts = [rewrite(part, change) for part in parts] if parts else parts
    node: Node = root
    if any(map(operator.is_not, new_parts, parts)):
        changes: dict[str, object] = {}
        for position, name in enumerate(_fields_of(root)):
            changes[name] = new_parts[position:] if name == "body" else new_parts[position]
        node = replace(root, **changes)  # type: ignore[type-var]
    changed = change(node)
    return node if changed is None else changed  # type: ignore[return-value]


def substitute(root: N, values: Mapping[str, Expr]) -> N:
    """`root` with each loop variable named in `values` replaced by its expression (TVM's
    `substitute`), and the integer arithmetic around it refolded: `x * 4 + lane` with lane 0
    is `x * 4`. `values` must not name a variable that a loop inside `root` binds."""

    def replaced(node: Node) -> Node | None:
        if isinstance(node, Var):
            return values.get(node.name)
        if isinstance(node, Bin) and node.op in ("+", "-", "*") and (
                _int_value(node.left) is not None or _int_value(node.right) is not None):
            return arith(node.op, node.left, node.right)
        return None

    return rewrite(root, replaced)


# --- kernels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How a kernel's loops run; the tiling pass picks it, a schedule file may override it
    (`cnnc.schedule_file` checks such a file's fields).

    `unroll_max` is the largest reduction loop that is fully unrolled, `oc_block` how many
    output channels one iteration computes together (a register tile that reuses each input
    load), `x_block` how many neighbouring points of a row it computes together (reusing
    each weight load). The vector width and the images per block are the layout's, not the
    schedule's; threads always split a call's batch blocks. The GPU fields say how a CUDA
    kernel maps onto blocks and threads: `gpu_threads` threads per block, each computing
    `oc_block` output channels at one point; `gpu_batch_inner` puts the images of a batch on
    neighbouring threads (so a warp reads the same weights at once); `gpu_shared_tiles` gives
    each block one image and stages the inputs its threads share in `__shared__` memory.
    `winograd` computes a 3x3 stride-1 convolution by Winograd F(m x m, 3 x 3) with m = 2 or
    4 (`cnnc.lower.winograd`; 0, the direct convolution, and where it does not apply).
    """

    oc_block: int = 1
    x_block: int = 1
    unroll_max: int = 0
    gpu_threads: int = 128
    gpu_batch_inner: bool = False
    gpu_shared_tiles: bool = False
    winograd: int = 0

    def describe(self) -> str:
        """`field=value ...`; `winograd` only when on, so that a direct kernel's line reads
        as it did before the field existed."""
        return " ".join(f"{item.name}={getattr(self, item.name)}" for item in fields(self)
                        if item.name != "winograd" or self.winograd)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def replace(self, **changes: object) -> Schedule:
        known = {item.name for item in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown schedule fields {sorted(unknown)}; known: {sorted(known)}")
        values = asdict(self)
        values.update(changes)
        return Schedule(**values)


# A kernel reads its inputs and parameters and writes its outputs; it may read and write an
# "inout" buffer (a trainer's accumulated gradients, parameters updated in place). A
# "scratch" buffer is memory only this kernel uses, written before it is read (a staged
# Winograd convolution's tiles, `cnnc.scratch`).
BufferRole = Literal["input", "output", "param", "inout", "scratch"]
BUFFER_ROLES: tuple[BufferRole, ...] = get_args(BufferRole)


@dataclass(eq=False)
class Buffer:
    """A kernel argument. `size` counts floats per batch block (lanes included).

    Parameters (`role == "param"`) carry their data and are embedded in the generated code;
    `param_of` names the model parameter ("layer.param") a buffer holds unchanged, which a
    trainer binds to the parameter's live value instead.
    """

    name: str
    size: int
    role: BufferRole
    data: np.ndarray | None = None
    per_image: int = 0  # the user's arrays: batch * per_image floats, whatever the block
    staged: bool = False  # GPU (`cnnc.gpu_bind`): an input a block copies to shared memory
    param_of: str = ""
    parts: int = 1  # scratch: how many iterations of the top loop have a part of their own


# How a bound kernel's threads take the images and points of a batch: neighbouring threads
# on neighbouring points of an image, on neighbouring images at one point, or one block per
# image whose threads stride over its points.
GpuMapping = Literal["image_major", "image_minor", "block_per_image"]
GPU_MAPPINGS: tuple[GpuMapping, ...] = get_args(GpuMapping)


@dataclass(frozen=True)
class GpuBinding:
    """How a kernel bound to a GPU launches (`cnnc.gpu_bind` sets it): `threads` per block,
    `points` parallel points per image (the iterations of its largest nest of GPU loops) and
    `min_blocks`, the resident blocks per SM its launch bounds ask for."""

    mapping: GpuMapping
    threads: int
    points: int
    min_blocks: int

    def describe(self) -> str:
        return " ".join(f"{item.name}={getattr(self, item.name)}" for item in fields(self))


@dataclass(eq=False)
class Kernel:
    name: str
    layers: list[str]
    buffers: list[Buffer]
    body: list[Stmt]
    schedule: Schedule = field(default_factory=Schedule)
    # Edge kernels read the user's batch: they get the block index and the batch size.
    uses_batch: bool = False
    gpu: GpuBinding | None = None  # set when bound to a GPU's blocks and threads

    @property
    def staged(self) -> list[Buffer]:
        """The buffers a block stages in shared memory, in argument order."""
        return [buffer for buffer in self.arguments if buffer.staged]

    def buffer(self, name: str) -> Buffer:
        return next(buffer for buffer in self.buffers if buffer.name == name)

    @property
    def arguments(self) -> list[Buffer]:
        """The buffers passed at launch, in order (parameters are embedded, not passed)."""
        return [buffer for buffer in self.buffers if buffer.role != "param"]

    def to_text(self) -> str:
        args = ", ".join(
            f"{'staged ' if buffer.staged else ''}{'const ' if buffer.role == 'input' else ''}"
            f"float {buffer.name}[{buffer.size}]" for buffer in self.arguments)
        if self.uses_batch:
            args += ", int64 block, int64 batch"
        lines = [f"// layers: {', '.join(self.layers)}",
                 f"// schedule: {self.schedule.describe()}"]
        if self.gpu is not None:
            lines.append(f"// gpu: {self.gpu.describe()}")
        params = [buffer for buffer in self.buffers if buffer.role == "param"]
        for buffer in params:
            lines.append(f"const float {buffer.name}[{buffer.size}] = {{...}};")
        lines.append(f"kernel {self.name}({args}) {{")
        lines += CStylePrinter().block(self.body, 1)
        lines.append("}")
        return "\n".join(lines)


# --- printing --------------------------------------------------------------------------------


class CStylePrinter:
    """Prints kernel IR as C-like text: this base prints `Kernel.to_text`'s pseudo-C, and a
    backend's printer subclasses it to override the names and forms that differ (tinygrad's
    CStyleLanguage). Statements become lists of lines, expressions strings."""

    indent = "  "
    infinity = "INFINITY"  # C99's <math.h> names
    nan = "NAN"
    # C's binding strengths of the IR's infix operators, and their spelling in C.
    precedence = {"and": 1, "<": 2, "<=": 2, "+": 3, "-": 3, "*": 4, "/": 4, "//": 4}
    operators = {"and": "&&", "//": "/"}

    def block(self, body: Sequence[Stmt], depth: int) -> list[str]:
        pad = self.indent * depth
        lines: list[str] = []
        for stmt in body:
            if isinstance(stmt, For):
                lines += self.loop_header(stmt, pad)
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

    def loop_header(self, loop: For, pad: str) -> list[str]:
        """The lines that open `loop`'s block (the caller closes it)."""
        note = "" if loop.kind == "serial" else f"  // {loop.kind}"
        return [f"{pad}for ({loop.var} = 0; {loop.var} < {loop.extent}; {loop.var}++) "
                f"{{{note}"]

    def expr(self, expr: Expr, parent: int = 0) -> str:
        """`expr`, in parentheses when it binds less tightly than its `parent` operator."""
        if isinstance(expr, Const):
            return self.const(expr.value)
        if isinstance(expr, (Var, Local)):
            return expr.name
        if isinstance(expr, Load):
            return self.access(expr.buffer, self.expr(expr.index))
        if isinstance(expr, Call):
            return self.call(expr.fn, self.expr(expr.arg))
        if isinstance(expr, Select):
            return (f"({self.expr(expr.cond)} ? {self.expr(expr.then)} : "
                    f"{self.expr(expr.otherwise)})")
        if isinstance(expr, Bin):
            if expr.op == "max":
                return self.maximum(self.expr(expr.left), self.expr(expr.right))
            level = self.precedence[expr.op]
            op = self.operators.get(expr.op, expr.op)
            text = f"{self.expr(expr.left, level)} {op} {self.expr(expr.right, level + 1)}"
            return f"({text})" if level < parent else text
        raise TypeError(f"not an expression: {expr!r}")

    def const(self, value: int | float) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return self.nan
            if math.isinf(value):
                return self.signed(self.infinity if value > 0 else f"-{self.infinity}", value)
            return self.signed(repr(float(value)) + "f", value)  # repr keeps every bit
        return self.signed(str(value), value)

    def signed(self, literal: str, value: int | float) -> str:
        """How a literal of `value` is written; a subclass may bracket negative ones."""
        return literal

    def access(self, buffer: str, index: str) -> str:
        return f"{buffer}[{index}]"

    def call(self, fn: str, arg: str) -> str:
        return f"{fn}({arg})"

    def maximum(self, left: str, right: str) -> str:
        return f"max({left}, {right})"

