"""LLVM types and the lane analysis behind outer-loop vectorisation.

A loop marked `vectorized` runs as one LLVM vector when every branch is the same for all lanes
and every store writes consecutive lanes to consecutive addresses; this module decides that
from the kernel IR and holds the small vector helpers. It emits no code of its own.
"""

from __future__ import annotations

from llvmlite import ir

from cnnc.kernel import Bin, Const, Expr, If, Stmt, Store, Var, walk

F32 = ir.FloatType()
I64 = ir.IntType(64)
I32 = ir.IntType(32)
I8 = ir.IntType(8)
F32_PTR = F32.as_pointer()
LANE = "lane"


def lane_coefficient(expr: Expr) -> int | None:
    """How an integer expression changes per lane: c in `base + c * lane`, None if not affine."""
    if isinstance(expr, Var):
        return 1 if expr.name == LANE else 0
    if isinstance(expr, Const):
        return 0
    if not isinstance(expr, Bin):  # a load, call or select: affine only if lane-free
        return None if uses_lane(expr) else 0
    left, right = lane_coefficient(expr.left), lane_coefficient(expr.right)
    if left is None or right is None:
        return None
    if expr.op == "+":
        return left + right
    if expr.op == "-":
        return left - right
    if left == 0 and right == 0:
        return 0
    if expr.op == "*":
        constant = expr.right if left else expr.left
        if (left == 0 or right == 0) and isinstance(constant, Const):
            return (left or right) * int(constant.value)
    return None


def uses_lane(expr: Expr) -> bool:
    return any(isinstance(node, Var) and node.name == LANE for node in walk(expr))


def can_vectorize(body: list[Stmt]) -> bool:
    """Lanes may run as one vector when every branch is the same for all lanes and every
    store writes consecutive lanes to consecutive addresses."""
    return not any(isinstance(node, If) and uses_lane(node.cond)
                   or isinstance(node, Store) and lane_coefficient(node.index) != 1
                   for node in walk(body, expressions=False))


def splat_constant(type_: ir.Type, value: float | int, width: int) -> ir.Constant:
    """`value` as a constant of `type_`, or of a `width`-lane vector of it."""
    if width == 1:
        return ir.Constant(type_, value)
    return ir.Constant(ir.VectorType(type_, width), [value] * width)


def is_float(type_: ir.Type) -> bool:
    """A float or a vector of floats (else an integer or a vector of them)."""
    return isinstance(type_, ir.FloatType) or (
        isinstance(type_, ir.VectorType) and isinstance(type_.element, ir.FloatType))
