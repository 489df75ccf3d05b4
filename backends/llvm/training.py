"""A training program (`cnnc.training.program`) as native code for the host CPU.

Every kernel becomes a function of one LLVM module, as for inference; each stage becomes a
runner with the inference runners' ABI (`abi.RUNNER`): it runs the stage's kernels for blocks
or items [first, end), with the user's images as `x` and the store as `y`. Parameters and
constant tables are read through `cnnc.params`, which points at the store. A step is one
native call (`cnnc_sequence`, or `cnnc_pool_sequence` over the thread pool) that runs the
stages in order, each shared by the threads.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from cnnc import cache
from cnnc.backends.llvm import jit, runtime
from cnnc.backends.llvm.codegen import RUN_BLOCKS_ARGS, ModuleBuilder
from cnnc.backends.llvm.vectors import I32, I64
from cnnc.errors import CompileError
from cnnc.training.program import Place, Stage, TrainingProgram
from cnnc.version import __version__

_STAGE_ARGS = ("x", "y", "batch", "first", "end", "arena")


class LlvmTrainingCode:
    """The compiled stages of a program; `run(stages, x, batch)` runs some of them."""

    def __init__(self, program: TrainingProgram, threads: int, use_cache: bool = True) -> None:
        self.program = program
        self.threads = threads
        stages = program.step + program.evaluate
        offsets: dict[str, int] = {}
        kernels = {}
        for stage in stages:
            for launch in stage.launches:
                kernels[launch.kernel.name] = launch.kernel
                for buffer, offset in launch.params.items():
                    offsets[f"{launch.kernel.name}.{buffer}"] = offset
        self.symbols = {id(stage): f"cnnc_stage_{number}" for number, stage in
                        enumerate(stages)}
        parts = [jit.host().describe(), __version__, repr(sorted(offsets.items())),
                 str(program.block_floats), str(program.global_floats)]
        for stage in stages:
            parts.append(f"{self.symbols[id(stage)]} {stage.items} " + repr(
                [(launch.kernel.name, sorted(launch.places.items())) for launch in
                 stage.launches]))
        parts += [kernel.to_text() for kernel in kernels.values()]
        key = cache.key_of(*parts, jit._BACKEND_SOURCE, open(__file__).read())
        obj = cache.load(key) if use_cache else None
        if obj is None:
            machine = jit.target_machine()
            builder = ModuleBuilder("cnnc_training", machine.triple, str(machine.target_data),
                                    offsets)
            for kernel in kernels.values():
                builder.add_kernel(kernel)
            for stage in stages:
                self._add_stage(builder, stage)
            try:
                obj = jit.emit_object(jit.optimise(builder.text()))
            except RuntimeError as error:
                raise CompileError("LLVM failed to compile the training code",
                                   str(error)) from None
            if use_cache:
                cache.store(key, obj)
        self.library = jit.JitLibrary(obj)
        self.addresses = {id(stage): self.library.address(self.symbols[id(stage)])
                          for stage in stages}
        self._pool = runtime.ThreadPool(threads) if threads > 1 else None
        self._native = runtime.native()
        self._arena = np.zeros(16, np.float32)  # the kernels use none; the ABI passes one
        self._arenas = np.full(max(threads, 1), self._arena.ctypes.data, np.int64)
        self._slots = np.zeros(2, np.int64)

    def _add_stage(self, builder: ModuleBuilder, stage: Stage) -> None:
        program = self.program
        function = ir.Function(builder.module, ir.FunctionType(I32, RUN_BLOCKS_ARGS),
                               name=self.symbols[id(stage)])
        args = dict(zip(_STAGE_ARGS, function.args))
        for name, argument in args.items():
            argument.name = name
        entry = ir.IRBuilder(function.append_basic_block("entry"))
        counter = entry.alloca(I64, name="item.ptr")
        entry.store(args["first"], counter)
        header = function.append_basic_block("items")
        body = function.append_basic_block("item")
        done = function.append_basic_block("done")
        entry.branch(header)
        b = ir.IRBuilder(header)
        item = b.load(counter, name="item")
        b.cbranch(b.icmp_signed("<", item, args["end"]), body, done)
        b.position_at_end(body)
        block_base = b.add(b.mul(item, ir.Constant(I64, program.block_floats)),
                           ir.Constant(I64, program.global_floats))

        def pointer(place: Place) -> ir.Value:
            if place.region == "input":
                return args["x"]
            if place.region == "global":
                return b.gep(args["y"], [ir.Constant(I64, place.offset)])
            return b.gep(args["y"], [b.add(block_base, ir.Constant(I64, place.offset))])

        for launch in stage.launches:
            values = [pointer(launch.places[buffer.name]) for buffer in launch.kernel.arguments]
            b.call(builder.functions[launch.kernel.name], [*values, item, args["batch"]])
        b.store(b.add(item, ir.Constant(I64, 1)), counter)
        b.branch(header)
        b.position_at_end(done)
        b.ret(ir.Constant(I32, 0))

    def set_store(self, store: np.ndarray) -> None:
        """Point the code at `store` (the caller keeps it alive)."""
        self.library.set_params(store)
        self._slots[1] = store.ctypes.data

    def run(self, stages: list[Stage], x: np.ndarray, batch: int) -> None:
        """Run `stages` in order on images `x` (float32, C order) of a batch of `batch`."""
        width = self.program.width
        table = np.array([value for stage in stages for value in (
            self.addresses[id(stage)], stage.items if stage.items is not None
            else -(-batch // width))], np.int64)
        self._slots[0] = x.ctypes.data
        slots = self._slots.ctypes.data
        status = None
        if self._pool is not None:
            status = self._pool.try_sequence(table.ctypes.data, len(stages), slots, slots + 8,
                                             batch, self._arenas.ctypes.data)
        if status is None:
            status = int(self._native.sequence(self._arena.ctypes.data, table.ctypes.data,
                                               len(stages), slots, slots + 8, batch))
        if status:
            raise RuntimeError(f"training code failed with status {status}")
