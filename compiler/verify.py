"""The rules of the kernel IR, checked: `verify(kernel)` raises IRError on the first broken one.

Lowering runs it on every kernel when CNNC_VERIFY is set (the tests set it), so that a bug in
lowering or a pass shows as one clear message instead of wrong numbers or a backend's crash.
It reads kernels only; it never changes them.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from cnnc.kernel import (
    BUFFER_ROLES,
    GPU_LOOP_KINDS,
    GPU_MAPPINGS,
    LOOP_KINDS,
    LOOP_ROLES,
    Assign,
    Bin,
    Buffer,
    Call,
    Const,
    CStylePrinter,
    Declare,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Local,
    Node,
    Select,
    Stmt,
    Store,
    Var,
    children,
    walk,
)
from cnnc.target import GPU_MAX_THREADS_PER_BLOCK, GPU_STATIC_SHARED_LIMIT

VERIFY_ENV = "CNNC_VERIFY"  # set to anything but "" or "0" to verify every lowered kernel
BATCH_VARS = ("block", "batch")  # what a launch gives the kernels that read the batch
FUNCTIONS = ("exp", "sqrt")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Type = Literal["int", "float", "cond"]
_ARTICLE = {"int": "an int", "float": "a float", "cond": "a condition"}
# The operand types each binary operator takes (both operands alike); comparisons give a
# condition, the others their operands' type.
_OPERANDS: dict[str, tuple[Type, ...]] = {
    "+": ("int", "float"), "-": ("int", "float"), "*": ("int", "float"),
    "max": ("int", "float"), "/": ("float",), "//": ("int",), "<": ("int", "float"),
    "<=": ("int", "float"),
    "and": ("cond",),
}


class IRError(ValueError):
    """A kernel breaks a rule of the IR: a bug in lowering or in a pass, never a user's
    mistake. The message names the kernel and the rule."""


def verifying() -> bool:
    """Whether lowering verifies its kernels (CNNC_VERIFY=1: tests and debugging)."""
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


def verify(kernel: Kernel) -> None:
    """Check the rules that both backends rely on; raise IRError on the first broken one.

    Buffers have distinct names, a role, a positive size, and data exactly when they are
    parameters; a kernel writes at least one output. Loops have a kind, a role and at least
    one iteration, and never rebind the variable of a loop around them. Every variable is
    bound by an enclosing loop (`block` and `batch` are given to kernels that read the batch);
    every local is declared once, before it is used, in its block or one around it. Loads read
    inputs and parameters, stores write outputs, at integer indices. Arithmetic takes two ints
    or two floats (`/` floats, `//` ints), `<` and `<=` compare ints, `and` joins conditions,
    `If` and `Select` test conditions, and every stored or declared value is a float. Buffer,
    variable and local names are distinct C identifiers.

    A kernel bound to a GPU (`cnnc.gpu_bind`) does not read the batch; its GPU loops are the
    channel and spatial loops at the top of its statements, every one of those is bound, all
    of the kind its mapping takes ("gpu_thread" for one block per image, else "gpu_grid"),
    and no lane loop is left with more than one iteration; its `points` are its largest
    nest's and its threads within a block's limit. Only the inputs of a block-per-image kernel
    are staged, together within the static shared memory; an unbound kernel has neither GPU
    loops nor staged buffers."""
    _Verifier(kernel).run()


class _Verifier:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.buffers: dict[str, Buffer] = {}
        self.gpu_loops: set[int] = set()  # ids of the loops the GPU binding binds

    def fail(self, message: str) -> None:
        raise IRError(f"kernel {self.kernel.name}: {message}")

    def run(self) -> None:
        for buffer in self.kernel.buffers:
            self.buffer(buffer)
        if not any(buffer.role in ("output", "inout") for buffer in self.kernel.buffers):
            self.fail("no output buffer")
        self.gpu_loops = self.binding()
        bound = set(BATCH_VARS) if self.kernel.uses_batch else set()
        self.block(self.kernel.body, bound, set())

    def binding(self) -> set[int]:
        """Check the GPU binding's launch and staging; the ids of the loops it binds."""
        kernel, binding = self.kernel, self.kernel.gpu
        staged = kernel.staged
        if binding is None:
            if staged:
                self.fail(f"buffer {staged[0].name} is staged but the kernel is not bound "
                          "to a GPU")
            return set()
        if kernel.uses_batch:
            self.fail("a kernel that reads the batch is bound to a GPU")
        if binding.mapping not in GPU_MAPPINGS:
            self.fail(f"GPU mapping {binding.mapping!r}; mappings: {', '.join(GPU_MAPPINGS)}")
        if not 1 <= binding.threads <= GPU_MAX_THREADS_PER_BLOCK or binding.min_blocks < 1:
            self.fail(f"a GPU launch of {binding.threads} threads per block, at least "
                      f"{binding.min_blocks} blocks per SM")
        kind = "gpu_thread" if binding.mapping == "block_per_image" else "gpu_grid"
        loops: set[int] = set()
        points = 0
        for stmt in kernel.body:
            extents = 1
            while isinstance(stmt, For) and stmt.role in ("channel", "spatial"):
                if stmt.kind != kind:
                    self.fail(f"loop {stmt.var} at the top of the kernel is {stmt.kind}, not "
                              f"{kind} as its {binding.mapping} mapping binds it")
                loops.add(id(stmt))
                extents *= stmt.extent
                if len(stmt.body) != 1:
                    break
                stmt = stmt.body[0]
            points = max(points, extents)
        for loop in walk(kernel.body, expressions=False):
            if isinstance(loop, For) and loop.role == "lane" and loop.extent != 1:
                self.fail(f"lane loop {loop.var} of {loop.extent} iterations in a kernel "
                          "bound to a GPU (one thread is one lane)")
        if binding.points != points:
            self.fail(f"the GPU binding says {binding.points} points per image; its loops "
                      f"have {points}")
        for buffer in staged:
            if buffer.role != "input" or binding.mapping != "block_per_image":
                self.fail(f"{buffer.role} buffer {buffer.name} is staged, but only the "
                          "inputs of a block_per_image kernel may be (this one is "
                          f"{binding.mapping})")
        shared = sum(buffer.size * 4 for buffer in staged)
        if shared > GPU_STATIC_SHARED_LIMIT:
            self.fail(f"staged buffers take {shared} bytes of shared memory; a block has "
                      f"{GPU_STATIC_SHARED_LIMIT}")
        return loops

    def name(self, name: str, what: str) -> None:
        if not _IDENTIFIER.fullmatch(name):
            self.fail(f"{what} {name!r} is not a C identifier")
        if name in self.buffers:
            self.fail(f"two buffers are named {name}" if what == "buffer" else
                      f"{what} {name} has the name of a buffer")

    def buffer(self, buffer: Buffer) -> None:
        self.name(buffer.name, "buffer")
        self.buffers[buffer.name] = buffer
        if buffer.role not in BUFFER_ROLES:
            self.fail(f"buffer {buffer.name} has role {buffer.role!r}; roles: "
                      f"{', '.join(BUFFER_ROLES)}")
        if buffer.size < 1:
            self.fail(f"buffer {buffer.name} has size {buffer.size}")
        if (buffer.data is not None) != (buffer.role == "param"):
            self.fail(f"{buffer.role} buffer {buffer.name} "
                      f"{'lacks' if buffer.data is None else 'carries'} data")
        if buffer.data is not None and buffer.data.size != buffer.size:
            self.fail(f"parameter {buffer.name} holds {buffer.data.size} floats, not "
                      f"{buffer.size}")

    def block(self, body: list[Stmt], bound: set[str], visible: set[str]) -> None:
        """Check `body`, inside loops binding `bound` and with the locals `visible`. A
        block's scope is C's: its own declarations end with it."""
        visible = set(visible)
        for stmt in body:
            if isinstance(stmt, For):
                self.loop(stmt, bound)
                self.block(stmt.body, bound | {stmt.var}, visible)
            elif isinstance(stmt, Store):
                role = self.buffers[stmt.buffer].role if stmt.buffer in self.buffers else None
                if role not in ("output", "inout", "scratch"):
                    self.fail(f"a store writes {stmt.buffer}, "
                              f"{f'an {role} buffer' if role else 'which is no buffer'}")
                self.expect(stmt.index, "int", f"the index into {stmt.buffer}", bound, visible)
                self.expect(stmt.value, "float", f"the value stored in {stmt.buffer}", bound,
                            visible)
            elif isinstance(stmt, Declare):
                self.expect(stmt.init, "float", f"the value of {stmt.local}", bound, visible)
                self.name(stmt.local, "local")
                if stmt.local in visible:
                    self.fail(f"local {stmt.local} is declared twice")
                visible.add(stmt.local)
            elif isinstance(stmt, Assign):
                if stmt.local not in visible:
                    self.fail(f"local {stmt.local} is assigned before it is declared")
                self.expect(stmt.value, "float", f"the value of {stmt.local}", bound, visible)
            elif isinstance(stmt, If):
                self.expect(stmt.cond, "cond", "an if's test", bound, visible)
                self.block(stmt.body, bound, visible)
            else:
                self.fail(f"not a statement: {stmt!r}")

    def loop(self, loop: For, bound: set[str]) -> None:
        self.name(loop.var, "loop variable")
        if loop.var in bound:
            self.fail(f"a loop rebinds {loop.var}")
        if loop.kind not in LOOP_KINDS:
            self.fail(f"loop {loop.var} has kind {loop.kind!r}; kinds: {', '.join(LOOP_KINDS)}")
        if loop.role is not None and loop.role not in LOOP_ROLES:
            self.fail(f"loop {loop.var} has role {loop.role!r}; roles: {', '.join(LOOP_ROLES)}")
        if type(loop.extent) is not int or loop.extent < 1:
            self.fail(f"loop {loop.var} has extent {loop.extent!r}")
        if loop.kind in GPU_LOOP_KINDS and id(loop) not in self.gpu_loops:
            self.fail(f"loop {loop.var} is {loop.kind} but is not a channel or spatial loop "
                      "at the top of a kernel bound to a GPU")

    def expect(self, expr: Expr, wanted: Type, what: str, bound: set[str],
               visible: set[str]) -> None:
        """`expr` is of type `wanted`; its type comes from its parts' (a post-order walk)."""
        types: dict[int, Type] = {}
        for node in walk(expr):
            types[id(node)] = self.type_of(node, [types[id(part)] for part in children(node)],
                                           bound, visible)
        if types[id(expr)] != wanted:
            self.fail(f"{what} is {_ARTICLE[types[id(expr)]]}, not {_ARTICLE[wanted]}: "
                      f"{CStylePrinter().expr(expr)}")

    def type_of(self, node: Node, parts: list[Type], bound: set[str], visible: set[str]
                ) -> Type:
        if isinstance(node, Const):
            if type(node.value) not in (int, float):
                self.fail(f"constant {node.value!r} is neither an int nor a float")
            return "int" if type(node.value) is int else "float"
        if isinstance(node, Var):
            if node.name not in bound:
                self.fail(f"variable {node.name} is not bound by a loop around it")
            return "int"
        if isinstance(node, Local):
            if node.name not in visible:
                self.fail(f"local {node.name} is read before it is declared")
            return "float"
        if isinstance(node, Load):
            role = self.buffers[node.buffer].role if node.buffer in self.buffers else None
            if role not in ("input", "param", "inout", "scratch"):
                self.fail(f"a load reads {node.buffer}, "
                          f"{f'an {role} buffer' if role else 'which is no buffer'}")
            if parts[0] != "int":
                self.fail(f"the index into {node.buffer} is {_ARTICLE[parts[0]]}")
            return "float"
        if isinstance(node, Call):
            if node.fn not in FUNCTIONS or parts[0] != "float":
                self.fail(f"{node.fn} of {_ARTICLE[parts[0]]}; functions (of a float): "
                          f"{', '.join(FUNCTIONS)}")
            return "float"
        if isinstance(node, Select):
            if parts[0] != "cond" or parts[1] != parts[2] or parts[1] == "cond":
                self.fail(f"a select of {', '.join(_ARTICLE[part] for part in parts)}")
            return parts[1]
        if not isinstance(node, Bin):
            self.fail(f"a statement inside an expression: {node!r}")
        assert isinstance(node, Bin)
        left, right = parts
        if node.op not in _OPERANDS or left != right or left not in _OPERANDS[node.op]:
            self.fail(f"{node.op!r} of {_ARTICLE[left]} and {_ARTICLE[right]}")
        return "cond" if node.op in ("<", "<=") else left
