"""Kernel IR -> one LLVM module, with llvmlite.ir: kernels, runners, parameters, math.

Each kernel becomes an internal function over its buffers (its body is emitted by
`kernel_body`); `cnnc_run_blocks` runs all kernels over a range of batch blocks;
`<name>_forward` is the C entry point of an exported library. `exp` is a polynomial in IR so
that vector code never calls the scalar libm.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from llvmlite import ir

from cnnc.backends.llvm import abi
from cnnc.backends.llvm.kernel_body import KernelBodyEmitter
from cnnc.backends.llvm.vectors import F32, F32_PTR, I8, I32, I64, splat_constant
from cnnc.kernel import Buffer, Kernel

# How a launch computes one argument's pointer from the entry point's arguments.
PointerOf = Callable[[ir.IRBuilder, dict[str, ir.Value]], ir.Value]

# The runner's arguments (abi.RUNNER): input, output, batch, first block, end block, arena.
RUN_BLOCKS_ARGS = abi.RUNNER.ir_arguments(F32_PTR)
PARAMS_GLOBAL = "cnnc.params"  # float *: where JIT-compiled kernels find their parameters
BOUNDS_GLOBAL = "cnnc.out_of_bounds"  # i32: 1 + the kernel that went out of bounds, or 0


class ModuleBuilder:
    """One LLVM module holding the kernels of a model and its entry points."""

    def __init__(self, name: str, triple: str = "", data_layout: str = "",
                 param_offsets: dict[str, int] | None = None, check_bounds: bool = False,
                 external_globals: bool = False) -> None:
        """With `param_offsets` ("<symbol>.<buffer>" -> float offset), parameters are read
        at run time from the array that the global `cnnc.params` points to, instead of being
        embedded: the IR stays small and the JIT fast. Without, they are embedded. With
        `external_globals` that global and the bounds flag are another module's."""
        self.module = ir.Module(name=name)
        self.param_offsets = param_offsets
        self.kernel_count = 0
        self.bounds_global: ir.GlobalVariable | None = None
        if check_bounds:
            # Debug mode: every access checks its index; a bad one is redirected to element 0
            # and recorded here for the caller, instead of touching memory it must not.
            self.bounds_global = ir.GlobalVariable(self.module, I32, name=BOUNDS_GLOBAL)
            if not external_globals:
                self.bounds_global.initializer = ir.Constant(I32, 0)
        self.params_global: ir.GlobalVariable | None = None
        if param_offsets is not None:
            self.params_global = ir.GlobalVariable(self.module, F32_PTR, name=PARAMS_GLOBAL)
            if not external_globals:
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
        emitter = KernelBodyEmitter(self, function, pointers, offsets)
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

    def add_run_blocks(self, name: str, launches: list[tuple[str, list[PointerOf]]],
                       profiled: bool = True, shares: dict[str, int] | None = None
                       ) -> ir.Function:
        """`name(x, y, batch, first, end, arena)`: every kernel, block by block; and, for
        profiling (unless not `profiled`), `name_kernel(which, x, y, batch, first, end,
        arena)`: kernel `which` alone.

        `launches` pairs each kernel's symbol with one function per argument that computes
        its pointer from the entry's arguments (`x`, `y`, `arena`) and the `block`. A kernel
        in `shares` is a split kernel (`split.split_kernel`): it runs once per share, the
        share as its block argument, for each block."""
        function = self._block_loop(name, launches, None, shares or {})
        if profiled:
            self._block_loop(f"{name}_kernel", launches, I64, shares or {})
        return function

    def add_stage(self, name: str, launches: list[tuple[str, list[PointerOf]]]) -> ir.Function:
        """`name(x, y, batch, first, end, arena)`: a stage of a one-block call on the thread
        pool (`split`), whose kernels run for each item in [first, end), getting the item as
        their `block` argument: a split kernel's share, 0 for the others."""
        return self._block_loop(name, launches, None, {})

    def _block_loop(self, name: str, launches: list[tuple[str, list[PointerOf]]],
                    selector: ir.Type | None, shares: dict[str, int]) -> ir.Function:
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
            values = [pointer(builder, {**args, "block": block}) for pointer in pointers]
            calls = [[*values, ir.Constant(I64, share), args["batch"]]
                     for share in range(shares[symbol])] if symbol in shares else \
                [[*values, block, args["batch"]]]
            if selector is None:
                for arguments in calls:
                    builder.call(self.functions[symbol], arguments)
                continue
            chosen = builder.icmp_signed("==", function.args[0], ir.Constant(I64, index))
            with builder.if_then(chosen):
                for arguments in calls:
                    builder.call(self.functions[symbol], arguments)
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

    def intrinsic(self, name: str, type_: ir.Type, arity: int) -> ir.Function:
        suffix = f"v{type_.count}f32" if isinstance(type_, ir.VectorType) else "f32"
        full = f"{name}.{suffix}"
        if full not in self._intrinsics:
            fnty = ir.FunctionType(type_, [type_] * arity)
            self._intrinsics[full] = ir.Function(self.module, fnty, name=full)
        return self._intrinsics[full]

    def lane_sum(self, width: int) -> ir.Function:
        """`llvm.vector.reduce.fadd(start, lanes)`: start + lane 0 + lane 1 + ..., in order."""
        name = f"llvm.vector.reduce.fadd.v{width}f32"
        if name not in self._intrinsics:
            fnty = ir.FunctionType(F32, [F32, ir.VectorType(F32, width)])
            self._intrinsics[name] = ir.Function(self.module, fnty, name=name)
        return self._intrinsics[name]

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
            return splat_constant(F32, value, width)

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
        exponent = builder.shl(builder.fptosi(whole, int_type), splat_constant(I32, 23, width))
        result = builder.bitcast(builder.add(builder.bitcast(poly, int_type), exponent), type_)
        is_nan = builder.fcmp_unordered("uno", x, x)
        builder.ret(builder.select(is_nan, x, result))
        self._exp[width] = function
        return function
