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
from cnnc.backends.llvm.codegen import ModuleBuilder, PointerOf
from cnnc.backends.llvm.vectors import I64
from cnnc.errors import CompileError
from cnnc.training.program import Place, Stage, TrainingProgram
from cnnc.version import __version__


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
        """The stage's runner: its kernels for each block or item, with pointers into the
        store (`y`) or the user's images (`x`)."""
        program = self.program

        def pointer(place: Place) -> PointerOf:
            if place.region == "input":
                return lambda b, args: args["x"]
            if place.region == "global":
                return lambda b, args: b.gep(args["y"], [ir.Constant(I64, place.offset)])
            return lambda b, args: b.gep(args["y"], [b.add(b.mul(args["block"], ir.Constant(
                I64, program.block_floats)), ir.Constant(I64, program.global_floats
                                                         + place.offset))])

        builder.add_run_blocks(self.symbols[id(stage)], [
            (launch.kernel.name, [pointer(launch.places[buffer.name])
                                  for buffer in launch.kernel.arguments])
            for launch in stage.launches], profiled=False)

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
