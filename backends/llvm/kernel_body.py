"""One kernel's body -> LLVM instructions: loops, loads and stores, and expressions.

Inside a loop that `vectors.can_vectorize` accepts, every lane-dependent value is an LLVM
vector and the loops inside it stay scalar loops of vector code. The module that holds the
function, its parameters and the math routines (`exp`, intrinsics) is `codegen.ModuleBuilder`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llvmlite import ir

from cnnc.backends.llvm.vectors import (
    F32,
    I32,
    I64,
    LANE,
    can_vectorize,
    is_float,
    lane_coefficient,
)
from cnnc.kernel import (
    Assign,
    Bin,
    Call,
    Const,
    Declare,
    Expr,
    For,
    If,
    Load,
    Local,
    Select,
    Stmt,
    Store,
    Var,
)

if TYPE_CHECKING:
    from cnnc.backends.llvm.codegen import ModuleBuilder


class KernelBodyEmitter:
    """Emits one kernel body. Inside a vectorised lane loop, `self.width` is its width and
    values that depend on the lane are vectors."""

    def __init__(self, owner: ModuleBuilder, function: ir.Function,
                 pointers: dict[str, ir.Value], param_offsets: dict[str, int]) -> None:
        self.owner = owner
        self.function = function
        self.pointers = dict(pointers)
        entry = function.append_basic_block("entry")
        self.allocas = ir.IRBuilder(entry)
        if param_offsets:
            assert owner.params_global is not None
            base = self.allocas.load(owner.params_global, name="params")
            for name, offset in param_offsets.items():
                self.pointers[name] = self.allocas.gep(base, [ir.Constant(I64, offset)],
                                                       name=name)
        self.builder = ir.IRBuilder(function.append_basic_block("body"))
        self.vars: dict[str, ir.Value] = {}
        self.locals: dict[str, ir.Value] = {}
        self.width = 0
        self.scalar_lane = False  # emit lane-dependent expressions for lane 0 only
        # With check_bounds: (kernel number, buffer -> floats, buffers scaled by the batch).
        self.bounds: tuple[int, dict[str, int], set[str]] | None = None

    def emit(self, body: list[Stmt]) -> None:
        self.block(body)
        self.builder.ret_void()
        self.allocas.branch(self.function.blocks[1])

    def block(self, body: list[Stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, For):
                self.loop(stmt)
            elif isinstance(stmt, Store):
                self.store(stmt)
            elif isinstance(stmt, Declare):
                self.declare(stmt)
            elif isinstance(stmt, Assign):
                self.assign(stmt)
            elif isinstance(stmt, If):
                with self.builder.if_then(self.value(stmt.cond)):
                    self.block(stmt.body)
            else:
                raise TypeError(f"cannot emit {stmt!r}")

    def loop(self, stmt: For) -> None:
        if stmt.kind == "vectorized" and not self.width and stmt.extent > 1 and \
                can_vectorize(stmt.body):
            self.width = stmt.extent
            self.block(stmt.body)
            self.width = 0
            return
        if stmt.kind == "unrolled" or stmt.extent == 1:
            for value in range(stmt.extent):
                self.vars[stmt.var] = ir.Constant(I64, value)
                self.block(stmt.body)
            return
        counter = self.allocas.alloca(I64, name=f"{stmt.var}.ptr")
        self.builder.store(ir.Constant(I64, 0), counter)
        header = self.function.append_basic_block(f"{stmt.var}.head")
        body = self.function.append_basic_block(f"{stmt.var}.body")
        done = self.function.append_basic_block(f"{stmt.var}.done")
        self.builder.branch(header)
        self.builder.position_at_end(header)
        current = self.builder.load(counter, name=stmt.var)
        self.builder.cbranch(self.builder.icmp_signed("<", current, ir.Constant(I64, stmt.extent)),
                             body, done)
        self.builder.position_at_end(body)
        self.vars[stmt.var] = current
        self.block(stmt.body)
        self.builder.store(self.builder.add(current, ir.Constant(I64, 1)), counter)
        self.builder.branch(header)
        self.builder.position_at_end(done)

    def assign(self, stmt: Assign) -> None:
        target = self.locals[stmt.local]
        if self.width and not isinstance(target.type.pointee, ir.VectorType):
            # A scalar declared outside the lane loop, summing a lane value: `s = s + v` adds
            # lane 0's v, then lane 1's, ... as the scalar loop would. LLVM's ordered (not
            # reassociated) reduction does exactly that, so the bits do not depend on the
            # vector width.
            value = stmt.value
            if not (isinstance(value, Bin) and value.op == "+" and
                    isinstance(value.left, Local) and value.left.name == stmt.local):
                raise TypeError(f"a lane loop assigns {stmt.local}, declared outside it, "
                                "other than by a sum")
            lanes = self.fit(self.value(value.right), ir.VectorType(F32, self.width))
            total = self.builder.call(self.owner.lane_sum(self.width),
                                      [self.builder.load(target), lanes])
            self.builder.store(total, target)
            return
        self.builder.store(self.fit(self.value(stmt.value), target.type.pointee), target)

    def declare(self, stmt: Declare) -> None:
        if stmt.local not in self.locals:
            type_ = ir.VectorType(F32, self.width) if self.width else F32
            self.locals[stmt.local] = self.allocas.alloca(type_, name=stmt.local)
        target = self.locals[stmt.local]
        self.builder.store(self.fit(self.value(stmt.init), target.type.pointee), target)

    def address(self, buffer: str, index: Expr) -> tuple[ir.Value, bool]:
        """The address of `buffer[index]` and whether it is the first of `width` consecutive
        lanes (else the index is the same for every lane, or not affine)."""
        coefficient = lane_coefficient(index) if self.width else 0
        if coefficient == 1:
            self.scalar_lane = True
            offset = self.value(index)
            self.scalar_lane = False
            offset = self.checked(buffer, offset, self.width)
            return self.builder.gep(self.pointers[buffer], [offset]), True
        if coefficient == 0:
            offset = self.checked(buffer, self.value(index), 1)
            return self.builder.gep(self.pointers[buffer], [offset]), False
        raise NotAffine()

    def checked(self, buffer: str, first: ir.Value, span: int) -> ir.Value:
        """`first` when [first, first + span) lies inside `buffer`; else, in check_bounds
        mode, record the kernel and return 0 so that nothing out of bounds is touched."""
        if self.bounds is None:
            return first
        number, limits, scaled = self.bounds
        builder = self.builder
        limit: ir.Value = ir.Constant(I64, limits[buffer])
        if buffer in scaled:
            limit = builder.mul(self.function.args[-1], limit)  # batch * floats per image
        last = builder.add(first, ir.Constant(I64, span))
        inside = builder.and_(builder.icmp_signed(">=", first, ir.Constant(I64, 0)),
                              builder.icmp_signed("<=", last, limit))
        with builder.if_then(builder.not_(inside), likely=False):
            assert self.owner.bounds_global is not None
            builder.store(ir.Constant(I32, number), self.owner.bounds_global)
        return builder.select(inside, first, ir.Constant(I64, 0))

    def load(self, expr: Load) -> ir.Value:
        try:
            address, consecutive = self.address(expr.buffer, expr.index)
        except NotAffine:
            return self.gather(expr)
        if consecutive:
            vector = ir.VectorType(F32, self.width)
            return self.builder.load(self.builder.bitcast(address, vector.as_pointer()), align=4)
        return self.builder.load(address)

    def gather(self, expr: Load) -> ir.Value:
        """Lane by lane, for the rare index that is not affine in the lane."""
        indices = self.value(expr.index)
        result: ir.Value = ir.Constant(ir.VectorType(F32, self.width), None)
        for lane in range(self.width):
            index = self.builder.extract_element(indices, ir.Constant(I32, lane))
            index = self.checked(expr.buffer, index, 1)
            element = self.builder.load(self.builder.gep(self.pointers[expr.buffer], [index]))
            result = self.builder.insert_element(result, element, ir.Constant(I32, lane))
        return result

    def store(self, stmt: Store) -> None:
        value = self.value(stmt.value)
        address, consecutive = self.address(stmt.buffer, stmt.index)
        if consecutive:
            vector = ir.VectorType(F32, self.width)
            self.builder.store(self.fit(value, vector),
                               self.builder.bitcast(address, vector.as_pointer()), align=4)
        else:
            self.builder.store(value, address)

    def fit(self, value: ir.Value, type_: ir.Type) -> ir.Value:
        """`value` broadcast to `type_` when a scalar meets a vector."""
        if isinstance(type_, ir.VectorType) and not isinstance(value.type, ir.VectorType):
            undef = ir.Constant(type_, None)
            first = self.builder.insert_element(undef, value, ir.Constant(I32, 0))
            mask = ir.Constant(ir.VectorType(I32, type_.count), [0] * type_.count)
            return self.builder.shuffle_vector(first, undef, mask)
        return value

    def pair(self, expr: Bin) -> tuple[ir.Value, ir.Value]:
        left, right = self.value(expr.left), self.value(expr.right)
        if isinstance(left.type, ir.VectorType):
            right = self.fit(right, left.type)
        elif isinstance(right.type, ir.VectorType):
            left = self.fit(left, right.type)
        return left, right

    def value(self, expr: Expr) -> ir.Value:
        builder = self.builder
        if isinstance(expr, Const):
            if isinstance(expr.value, float):
                return ir.Constant(F32, expr.value)
            return ir.Constant(I64, expr.value)
        if isinstance(expr, Var):
            if expr.name == LANE and self.width:
                if self.scalar_lane:
                    return ir.Constant(I64, 0)
                return ir.Constant(ir.VectorType(I64, self.width), list(range(self.width)))
            if expr.name == LANE and LANE not in self.vars:
                return ir.Constant(I64, 0)
            if expr.name in ("block", "batch") and expr.name not in self.vars:
                return self.function.args[-2 if expr.name == "block" else -1]
            return self.vars[expr.name]
        if isinstance(expr, Local):
            return builder.load(self.locals[expr.name])
        if isinstance(expr, Load):
            return self.load(expr)
        if isinstance(expr, Call):
            argument = self.value(expr.arg)
            if expr.fn == "exp":
                return builder.call(self.owner.exp(argument.type), [argument])
            if expr.fn == "sqrt":
                return builder.call(self.owner.intrinsic("llvm.sqrt", argument.type, 1),
                                    [argument])
            raise ValueError(f"unknown function {expr.fn}")
        if isinstance(expr, Select):
            cond = self.value(expr.cond)
            then, otherwise = self.pair(Bin("+", expr.then, expr.otherwise))
            if isinstance(cond.type, ir.VectorType) and \
                    not isinstance(then.type, ir.VectorType):  # a lane's choice of scalars
                vector = ir.VectorType(then.type, cond.type.count)
                then, otherwise = self.fit(then, vector), self.fit(otherwise, vector)
            return builder.select(cond, then, otherwise)
        if isinstance(expr, Bin):
            return self.binary(expr)
        raise TypeError(f"cannot emit {expr!r}")

    def binary(self, expr: Bin) -> ir.Value:
        builder = self.builder
        # acc + a * b is always one fused multiply-add (llvm.fma, never "fuse if profitable"),
        # so every layout and vector width rounds alike: results do not depend on the batch.
        if expr.op == "+" and isinstance(expr.right, Bin) and expr.right.op == "*":
            accumulator = self.value(expr.left)
            if is_float(accumulator.type):
                left, right = self.pair(expr.right)
                type_ = left.type
                if isinstance(accumulator.type, ir.VectorType) or isinstance(type_, ir.VectorType):
                    type_ = accumulator.type if isinstance(accumulator.type, ir.VectorType) \
                        else type_
                    left, right = self.fit(left, type_), self.fit(right, type_)
                    accumulator = self.fit(accumulator, type_)
                fma = self.owner.intrinsic("llvm.fma", type_, 3)
                return builder.call(fma, [left, right, accumulator])
        left, right = self.pair(expr)
        if expr.op == "and":
            return builder.and_(left, right)
        if is_float(left.type):
            if expr.op in ("<", "<="):
                return builder.fcmp_ordered(expr.op, left, right)
            if expr.op == "max":
                return builder.call(self.owner.intrinsic("llvm.maximum", left.type, 2),
                                    [left, right])
            operation = {"+": builder.fadd, "-": builder.fsub, "*": builder.fmul,
                         "/": builder.fdiv}[expr.op]
            return operation(left, right)
        if expr.op in ("<", "<="):
            return builder.icmp_signed(expr.op, left, right)
        if expr.op == "max":
            return builder.select(builder.icmp_signed(">", left, right), left, right)
        operation = {"+": builder.add, "-": builder.sub, "*": builder.mul,
                     "//": builder.sdiv}[expr.op]
        return operation(left, right)


class NotAffine(Exception):
    """An index that is not `base + c * lane`: loaded lane by lane instead."""
