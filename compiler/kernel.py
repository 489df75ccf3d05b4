"""The kernel IR: a small loop-nest language that both backends translate.

A kernel is buffers plus a body of `for` loops, loads, stores, float locals and arithmetic.
What it computes is fixed by lowering (`cnnc.lower`); how its loops run is recorded on the
loops (`kind`) and in the kernel's `Schedule`, which the tiling pass chose. The IR prints as
readable pseudo-C. It must stay free of any backend's types.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Union

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
    left_int = left.value if isinstance(left, Const) and type(left.value) is int else None
    right_int = right.value if isinstance(right, Const) and type(right.value) is int else None
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
    """Arithmetic (+ - * / on ints or floats, // on non-negative ints), `max` (NaN-propagating,
    as NumPy's maximum), comparisons (< <= of ints, giving a condition), `and` and `or`."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, eq=False)
class Call(Expr):
    """A math function of floats: `exp`."""

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

LOOP_KINDS = ("serial", "vectorized", "unrolled", "parallel", "gpu_block", "gpu_thread")


class Stmt:
    """Base of statements."""


@dataclass(eq=False)
class For(Stmt):
    var: str
    extent: int
    body: list[Stmt]
    kind: str = "serial"
    role: str = ""  # what the loop walks ("channel", "lane", "reduce", ...), for schedules


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


# --- kernels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """How a kernel's loops run; the tiling pass picks it, a JSON file may override it.

    `lanes` is the width of the vectorised lane loop (one lane per image of a batch block),
    `unroll_max` the largest reduction loop that is fully unrolled, `oc_block` how many output
    channels one iteration computes together (a register tile that reuses each input load),
    `x_block` how many neighbouring points of a row it computes together (reusing each
    weight load),
    `parallel` the loop split across threads. The GPU fields say how a CUDA kernel maps onto
    blocks and threads: `gpu_threads` threads per block, each computing `oc_block` output
    channels at one point; `gpu_batch_inner` puts the images of a batch on neighbouring
    threads (so a warp reads the same weights at once); `gpu_shared_tiles` gives each block
    one image and stages the inputs its threads share in `__shared__` memory.
    """

    lanes: int = 1
    oc_block: int = 1
    x_block: int = 1
    unroll_max: int = 0
    parallel: str = "batch_block"
    gpu_threads: int = 128
    gpu_batch_inner: bool = False
    gpu_shared_tiles: bool = False

    def describe(self) -> str:
        return " ".join(f"{item.name}={getattr(self, item.name)}" for item in fields(self))

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


@dataclass(eq=False)
class Buffer:
    """A kernel argument. `size` counts floats per batch block (lanes included).

    Parameters (`role == "param"`) carry their data and are embedded in the generated code.
    """

    name: str
    size: int
    role: str  # "input", "output" or "param"
    data: np.ndarray | None = None
    per_image: int = 0  # the user's arrays: batch * per_image floats, whatever the block


@dataclass(eq=False)
class Kernel:
    name: str
    layers: list[str]
    buffers: list[Buffer]
    body: list[Stmt]
    schedule: Schedule = field(default_factory=Schedule)
    # Edge kernels read the user's batch: they get the block index and the batch size.
    uses_batch: bool = False

    def buffer(self, name: str) -> Buffer:
        return next(buffer for buffer in self.buffers if buffer.name == name)

    @property
    def arguments(self) -> list[Buffer]:
        """The buffers passed at launch, in order (parameters are embedded, not passed)."""
        return [buffer for buffer in self.buffers if buffer.role != "param"]

    def to_text(self) -> str:
        args = ", ".join(
            f"{'const ' if buffer.role == 'input' else ''}float {buffer.name}[{buffer.size}]"
            for buffer in self.arguments)
        if self.uses_batch:
            args += ", int64 block, int64 batch"
        lines = [f"// layers: {', '.join(self.layers)}",
                 f"// schedule: {self.schedule.describe()}"]
        params = [buffer for buffer in self.buffers if buffer.role == "param"]
        for buffer in params:
            lines.append(f"const float {buffer.name}[{buffer.size}] = {{...}};")
        lines.append(f"kernel {self.name}({args}) {{")
        lines += print_block(self.body, 1)
        lines.append("}")
        return "\n".join(lines)


# --- printing --------------------------------------------------------------------------------

_PRECEDENCE = {"or": 0, "and": 1, "<": 2, "<=": 2, "+": 3, "-": 3, "*": 4, "/": 4, "//": 4}


def print_expr(expr: Expr, parent: int = 0) -> str:
    if isinstance(expr, Const):
        if isinstance(expr.value, float):
            return repr(expr.value) + "f" if np.isfinite(expr.value) else (
                "-INFINITY" if expr.value < 0 else "INFINITY")
        return str(expr.value)
    if isinstance(expr, (Var, Local)):
        return expr.name
    if isinstance(expr, Load):
        return f"{expr.buffer}[{print_expr(expr.index)}]"
    if isinstance(expr, Call):
        return f"{expr.fn}({print_expr(expr.arg)})"
    if isinstance(expr, Select):
        return (f"({print_expr(expr.cond)} ? {print_expr(expr.then)} : "
                f"{print_expr(expr.otherwise)})")
    if isinstance(expr, Bin):
        if expr.op == "max":
            return f"max({print_expr(expr.left)}, {print_expr(expr.right)})"
        level = _PRECEDENCE[expr.op]
        op = {"and": "&&", "or": "||", "//": "/"}.get(expr.op, expr.op)
        text = f"{print_expr(expr.left, level)} {op} {print_expr(expr.right, level + 1)}"
        return f"({text})" if level < parent else text
    raise TypeError(f"not an expression: {expr!r}")


def print_block(body: list[Stmt], depth: int) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    for stmt in body:
        if isinstance(stmt, For):
            note = "" if stmt.kind == "serial" else f"  // {stmt.kind}"
            lines.append(f"{pad}for ({stmt.var} = 0; {stmt.var} < {stmt.extent}; "
                         f"{stmt.var}++) {{{note}")
            lines += print_block(stmt.body, depth + 1)
            lines.append(f"{pad}}}")
        elif isinstance(stmt, Store):
            lines.append(f"{pad}{stmt.buffer}[{print_expr(stmt.index)}] = "
                         f"{print_expr(stmt.value)};")
        elif isinstance(stmt, Declare):
            lines.append(f"{pad}float {stmt.local} = {print_expr(stmt.init)};")
        elif isinstance(stmt, Assign):
            lines.append(f"{pad}{stmt.local} = {print_expr(stmt.value)};")
        elif isinstance(stmt, If):
            lines.append(f"{pad}if ({print_expr(stmt.cond)}) {{")
            lines += print_block(stmt.body, depth + 1)
            lines.append(f"{pad}}}")
        else:
            raise TypeError(f"not a statement: {stmt!r}")
    return lines
