"""Kernel IR -> LLVM IR, with llvmlite.ir.

Each kernel becomes an internal function over its buffers; a loop marked `vectorized` is
emitted once with every lane-dependent value as an LLVM vector (outer-loop vectorisation: the
loops inside it stay scalar loops of vector code). `exp` is a polynomial in IR so that vector
code never calls the scalar libm. `cnnc_run_blocks` runs all kernels over a range of batch
blocks; `<name>_forward` is the C entry point of an exported library.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from llvmlite import ir

from cnnc.backends.llvm import abi
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
    walk,
)

F32 = ir.FloatType()
I64 = ir.IntType(64)
I32 = ir.IntType(32)
I8 = ir.IntType(8)
BOOL = ir.IntType(1)
F32_PTR = F32.as_pointer()
LANE = "lane"

# How a launch computes one argument's pointer from the entry point's arguments.
PointerOf = Callable[[ir.IRBuilder, dict[str, ir.Value]], ir.Value]

# The runner's arguments (abi.RUNNER): input, output, batch, first block, end block, arena.
RUN_BLOCKS_ARGS = abi.RUNNER.ir_arguments(F32_PTR)
PARAMS_GLOBAL = "cnnc.params"  # float *: where JIT-compiled kernels find their parameters
BOUNDS_GLOBAL = "cnnc.out_of_bounds"  # i32: 1 + the kernel that went out of bounds, or 0


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


class ModuleBuilder:
    """One LLVM module holding the kernels of a model and its entry points."""

    def __init__(self, name: str, triple: str = "", data_layout: str = "",
                 param_offsets: dict[str, int] | None = None, check_bounds: bool = False
                 ) -> None:
        """With `param_offsets` ("<symbol>.<buffer>" -> float offset), parameters are read
        at run time from the array that the global `cnnc.params` points to, instead of being
        embedded: the IR stays small and the JIT fast. Without, they are embedded."""
        self.module = ir.Module(name=name)
        self.param_offsets = param_offsets
        self.kernel_count = 0
        self.bounds_global: ir.GlobalVariable | None = None
        if check_bounds:
            # Debug mode: every access checks its index; a bad one is redirected to element 0
            # and recorded here for the caller, instead of touching memory it must not.
            self.bounds_global = ir.GlobalVariable(self.module, I32, name=BOUNDS_GLOBAL)
            self.bounds_global.initializer = ir.Constant(I32, 0)
        self.params_global: ir.GlobalVariable | None = None
        if param_offsets is not None:
            self.params_global = ir.GlobalVariable(self.module, F32_PTR, name=PARAMS_GLOBAL)
            self.params_global.initializer = ir.Constant(F32_PTR, None)
            self.params_global.align = 8
        if triple:
            self.module.triple = triple
        if data_layout:
            self.module.data_layout = data_layout
        self.functions: dict[str, ir.Function] = {}
        self.comments: dict[str, str] = {}  # function name -> comment line above it
        self._intrinsics: dict[str, ir.Function] = {}
        self._exp: dict[int, ir.Function] = {}

    # --- kernels -----------------------------------------------------------------------------

    def add_kernel(self, kernel: Kernel, symbol: str = "") -> ir.Function:
        """Add `kernel` as the internal function `symbol` (default: the kernel's name)."""
        symbol = symbol or kernel.name
        arguments = kernel.arguments
        fnty = ir.FunctionType(ir.VoidType(), [F32_PTR] * len(arguments) + [I64, I64])
        function = ir.Function(self.module, fnty, name=symbol)
        function.linkage = "internal"
        for index, buffer in enumerate(arguments):
            function.args[index].name = buffer.name
            function.args[index].add_attribute("noalias")
        function.args[-2].name = "block"
        function.args[-1].name = "batch"
        pointers = {buffer.name: function.args[index] for index, buffer in enumerate(arguments)}
        offsets: dict[str, int] = {}
        for buffer in kernel.buffers:
            if buffer.role != "param":
                continue
            key = f"{symbol}.{buffer.name}"
            if self.param_offsets is None:
                pointers[buffer.name] = self._constant(key, buffer)
            else:
                offsets[buffer.name] = self.param_offsets[key]
        self.kernel_count += 1
        limits = {buffer.name: buffer.per_image or buffer.size for buffer in kernel.buffers}
        scaled = {buffer.name for buffer in kernel.buffers if buffer.per_image}
        emitter = _FunctionEmitter(self, function, pointers, offsets)
        if self.bounds_global is not None:
            emitter.bounds = (self.kernel_count, limits, scaled)
        emitter.emit(kernel.body)
        self.functions[symbol] = function
        layers = ", ".join(json.dumps(layer) for layer in kernel.layers)
        self.comments[symbol] = f"; kernel {kernel.name}: layers {layers}; " \
            f"schedule {kernel.schedule.describe()}"
        return function

    def _constant(self, name: str, buffer: Buffer) -> ir.Value:
        """Parameters are embedded as raw bytes: fast to parse, exact to the bit."""
        assert buffer.data is not None
        raw = bytearray(buffer.data.astype("<f4").tobytes())
        variable = ir.GlobalVariable(self.module, ir.ArrayType(I8, len(raw)), name=name)
        variable.initializer = ir.Constant(ir.ArrayType(I8, len(raw)), raw)
        variable.global_constant = True
        variable.linkage = "internal"
        variable.align = 64
        return variable.bitcast(F32_PTR)

    # --- entry points ------------------------------------------------------------------------

    def add_run_blocks(self, name: str, launches: list[tuple[str, list[PointerOf]]]
                       ) -> ir.Function:
        """`name(x, y, batch, first, end, arena)`: every kernel, block by block; and, for
        profiling, `name_kernel(which, x, y, batch, first, end, arena)`: kernel `which` alone.

        `launches` pairs each kernel's symbol with one function per argument that computes
        its pointer from the entry's arguments (`x`, `y`, `arena`)."""
        function = self._block_loop(name, launches, None)
        self._block_loop(f"{name}_kernel", launches, I64)
        return function

    def _block_loop(self, name: str, launches: list[tuple[str, list[PointerOf]]],
                    selector: ir.Type | None) -> ir.Function:
        names = ("x", "y", "batch", "first", "end", "arena")
        arg_types = ((selector,) if selector else ()) + RUN_BLOCKS_ARGS
        function = ir.Function(self.module, ir.FunctionType(I32, arg_types), name=name)
        for argument, label in zip(function.args, (("which",) if selector else ()) + names):
            argument.name = label
        args = dict(zip(names, function.args[1:] if selector else function.args))
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        counter = builder.alloca(I64, name="block.ptr")
        builder.store(args["first"], counter)
        header = function.append_basic_block("blocks")
        body = function.append_basic_block("block")
        done = function.append_basic_block("done")
        builder.branch(header)
        builder.position_at_end(header)
        block = builder.load(counter, name="block")
        builder.cbranch(builder.icmp_signed("<", block, args["end"]), body, done)
        builder.position_at_end(body)
        for index, (symbol, pointers) in enumerate(launches):
            values = [pointer(builder, args) for pointer in pointers]
            if selector is None:
                builder.call(self.functions[symbol], [*values, block, args["batch"]])
                continue
            chosen = builder.icmp_signed("==", function.args[0], ir.Constant(I64, index))
            with builder.if_then(chosen):
                builder.call(self.functions[symbol], [*values, block, args["batch"]])
        builder.store(builder.add(block, ir.Constant(I64, 1)), counter)
        builder.branch(header)
        builder.position_at_end(done)
        builder.ret(ir.Constant(I32, 0))
        self.functions[name] = function
        return function

    def add_forward(self, name: str, arena_floats: int, runners: list[tuple[str, int, int]]
                    ) -> ir.Function:
        """`int NAME_forward(const float *input, float *output, int64_t batch)`: allocates
        the arena and runs every block on the calling thread; returns 0, or 1 when out of
        memory or when batch is negative. `runners` are (run function, images per block,
        smallest batch it is used for), the largest batch first. The run functions become
        internal: the forward function is the library's only exported symbol."""
        malloc = ir.Function(self.module, ir.FunctionType(I8.as_pointer(), [I64]), name="malloc")
        free = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer()]),
                           name="free")
        fnty = ir.FunctionType(I32, [F32_PTR, F32_PTR, I64])
        function = ir.Function(self.module, fnty, name=f"{name}_forward")
        x, y, batch = function.args
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        bad = function.append_basic_block("bad")
        run = function.append_basic_block("run")
        builder.cbranch(builder.icmp_signed("<", batch, ir.Constant(I64, 0)), bad, run)
        builder.position_at_end(bad)
        builder.ret(ir.Constant(I32, 1))
        builder.position_at_end(run)
        raw = builder.call(malloc, [ir.Constant(I64, max(arena_floats, 1) * 4)])
        is_null = builder.icmp_unsigned("==", raw, ir.Constant(I8.as_pointer(), None))
        ok = function.append_basic_block("ok")
        builder.cbranch(is_null, bad, ok)
        builder.position_at_end(ok)
        arena = builder.bitcast(raw, F32_PTR)
        status = builder.alloca(I32)
        for runner, per_block, smallest in runners:
            self.functions[runner].linkage = "internal"
            self.functions[f"{runner}_kernel"].linkage = "internal"
            chosen = function.append_basic_block(f"{runner}.use")
            following = function.append_basic_block(f"{runner}.next")
            builder.cbranch(builder.icmp_signed(">=", batch, ir.Constant(I64, smallest)),
                            chosen, following)
            builder.position_at_end(chosen)
            blocks = builder.sdiv(builder.add(batch, ir.Constant(I64, per_block - 1)),
                                  ir.Constant(I64, per_block))
            builder.store(builder.call(self.functions[runner],
                                       [x, y, batch, ir.Constant(I64, 0), blocks, arena]),
                          status)
            done = function.append_basic_block(f"{runner}.done")
            builder.branch(done)
            builder.position_at_end(done)
            builder.call(free, [raw])
            builder.ret(builder.load(status))
            builder.position_at_end(following)
        builder.call(free, [raw])
        builder.ret(ir.Constant(I32, 0))
        return function

    def text(self) -> str:
        """The module as LLVM assembly, each kernel preceded by a comment naming its layers."""
        lines = []
        for line in str(self.module).splitlines():
            if line.startswith("define "):
                name = line.split("@", 1)[1].split("(", 1)[0].strip('"')
                if name in self.comments:
                    lines.append(self.comments[name])
            lines.append(line)
        return "\n".join(lines) + "\n"

    # --- math --------------------------------------------------------------------------------

    def intrinsic(self, name: str, type_: ir.Type, arity: int) -> ir.Function:
        suffix = f"v{type_.count}f32" if isinstance(type_, ir.VectorType) else "f32"
        full = f"{name}.{suffix}"
        if full not in self._intrinsics:
            fnty = ir.FunctionType(type_, [type_] * arity)
            self._intrinsics[full] = ir.Function(self.module, fnty, name=full)
        return self._intrinsics[full]

    def exp(self, type_: ir.Type) -> ir.Function:
        """exp as a Cephes-style polynomial: range reduction by ln 2, a degree-5 polynomial,
        and the exponent built in the bits. About 2 ulp; NaN in, NaN out."""
        width = type_.count if isinstance(type_, ir.VectorType) else 1
        if width in self._exp:
            return self._exp[width]
        function = ir.Function(self.module, ir.FunctionType(type_, [type_]),
                               name=f"cnnc.exp.{width}")
        function.linkage = "internal"
        function.attributes.add("alwaysinline")
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        (x,) = function.args

        def const(value: float) -> ir.Value:
            return _splat_constant(F32, value, width)

        def fma(a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
            return builder.call(self.intrinsic("llvm.fma", type_, 3), [a, b, c])

        clamped = builder.call(self.intrinsic("llvm.minimum", type_, 2), [x, const(88.3)])
        clamped = builder.call(self.intrinsic("llvm.maximum", type_, 2), [clamped, const(-87.3)])
        whole = builder.call(self.intrinsic("llvm.floor", type_, 1),
                             [fma(clamped, const(1.44269504088896341), const(0.5))])
        reduced = fma(whole, const(-0.693359375), clamped)
        reduced = fma(whole, const(2.12194440e-4), reduced)
        poly = const(1.9875691500e-4)
        for coefficient in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                            1.6666665459e-1, 5.0000001201e-1):
            poly = fma(poly, reduced, const(coefficient))
        squared = builder.fmul(reduced, reduced)
        poly = fma(poly, squared, builder.fadd(reduced, const(1.0)))
        # poly * 2^whole, by adding whole to poly's exponent field: an integer add instead of
        # a multiply, which would compete with the polynomial's FMAs for the FMA pipes.
        # Exact: the clamps keep 2^whole * poly a normal number, as a multiply would give.
        int_type = ir.VectorType(I32, width) if width > 1 else I32
        exponent = builder.shl(builder.fptosi(whole, int_type), _splat_constant(I32, 23, width))
        result = builder.bitcast(builder.add(builder.bitcast(poly, int_type), exponent), type_)
        is_nan = builder.fcmp_unordered("uno", x, x)
        builder.ret(builder.select(is_nan, x, result))
        self._exp[width] = function
        return function


def _splat_constant(type_: ir.Type, value: float | int, width: int) -> ir.Constant:
    if width == 1:
        return ir.Constant(type_, value)
    return ir.Constant(ir.VectorType(type_, width), [value] * width)


class _FunctionEmitter:
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
                value = self.value(stmt.value)
                target = self.locals[stmt.local]
                self.builder.store(self.fit(value, target.type.pointee), target)
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

    def declare(self, stmt: Declare) -> None:
        if stmt.local not in self.locals:
            type_ = ir.VectorType(F32, self.width) if self.width else F32
            self.locals[stmt.local] = self.allocas.alloca(type_, name=stmt.local)
        target = self.locals[stmt.local]
        self.builder.store(self.fit(self.value(stmt.init), target.type.pointee), target)

    # --- memory ------------------------------------------------------------------------------

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
        raise _NotAffine()

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
        except _NotAffine:
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

    # --- values ------------------------------------------------------------------------------

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
            if _is_float(accumulator.type):
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
        if _is_float(left.type):
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


def _is_float(type_: ir.Type) -> bool:
    return isinstance(type_, ir.FloatType) or (
        isinstance(type_, ir.VectorType) and isinstance(type_.element, ir.FloatType))


class _NotAffine(Exception):
    pass
