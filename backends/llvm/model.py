"""The LLVM backend's model: a model compiled for the host CPU, called on NumPy arrays.

Inputs are checked here, in Python, before any native code runs: a kernel never sees a buffer
of the wrong size. The call path is kept short and is measured (docs/performance.md): a
float32, C-ordered array of the right shape goes straight to native code. llvmlite is imported
only when a model is built (`import cnnc` does not import it); `.so`/`.h` export is export.py.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnc import cache, pickling
from cnnc.backends.llvm import abi
from cnnc.errors import BoundsError, CompileError, InputError
from cnnc.graph import Graph
from cnnc.model import Variant, c_name
from cnnc.reference import CHECKED_BYTES, check_input, check_memory
from cnnc.util import ceil_div
from cnnc.version import __version__

if TYPE_CHECKING:
    from cnnc.backends.llvm import split


def runner_symbol(variant: Variant) -> str:
    """The entry point that runs `variant`'s kernels over a range of batch blocks."""
    return f"cnnc_run_{variant.layout}"


class _Plan:
    """How a call runs a variant: its runner's address, its free arenas (each an array and
    its address) and those of the thread pool."""

    __slots__ = ("runner", "images_per_block", "floats", "arenas", "_pool_table", "_lock",
                 "stages", "stage_count", "_split_arena")

    def __init__(self, variant: Variant, runner: int) -> None:
        self.runner = runner
        self.images_per_block = variant.images_per_block
        self.floats = variant.memory.floats
        self.arenas: list[tuple[np.ndarray, int]] = []
        self._pool_table: tuple[list[np.ndarray], np.ndarray] | None = None
        self._lock = threading.Lock()
        self.stages: np.ndarray | None = None  # (runner address, items) per stage (`split`)
        self.stage_count = 0
        self._split_arena: tuple[np.ndarray, np.ndarray] | None = None

    def set_stages(self, runners: list[tuple[int, int]], threads: int) -> None:
        """Run a one-block call as these stages on the pool, every thread on one arena: that
        of the image the call computes. The pool runs one call at a time, so this arena is
        never shared by two calls."""
        self.stages = np.array([value for pair in runners for value in pair], np.int64)
        self.stage_count = len(runners)
        arena = _aligned_floats(self.floats)
        self._split_arena = (arena, np.full(threads, _address(arena), np.int64))

    @property
    def split_arenas(self) -> int:
        """The address of the table that gives every thread the split call's arena."""
        assert self._split_arena is not None
        return _address(self._split_arena[1])

    def new_arena(self) -> tuple[np.ndarray, int]:
        buffer = _aligned_floats(self.floats)
        return buffer, _address(buffer)

    def pool_arenas(self, threads: int) -> int:
        """The address of a table of one arena address per thread of the pool."""
        with self._lock:  # made once, by the first of concurrent first calls
            if self._pool_table is None:
                buffers = [_aligned_floats(self.floats) for _ in range(threads)]
                self._pool_table = (buffers,
                                    np.array([_address(b) for b in buffers], np.int64))
            return _address(self._pool_table[1])

class LlvmModel:
    """A model compiled for the host CPU (`cnnc.CompiledModel`). Call it on a float array
    (N, C, H, W)."""

    def __init__(self, graph: Graph, variants: list[Variant], threads: int | None,
                 use_cache: bool, check_bounds: bool = False) -> None:
        from cnnc import target
        from cnnc.backends.llvm import jit, measured, runtime, split

        self.graph = graph
        self.name = graph.name
        self.variants = variants
        primary = variants[0]
        self.lowered = primary.lowered
        self.memory = primary.memory
        self.images_per_block = primary.images_per_block
        self.threads = max(1, threads or runtime.cpus())
        self.kernels = [group.name for group in primary.graph.plan.groups]
        self.output_shapes = [graph.shape(name) for name in graph.outputs]
        self._large_variant = primary  # until the layout choice below
        # A call of one block on several threads runs as stages, its big kernels split.
        self._split_variant = self.variant_for(1) if self.threads > 1 else None
        self.split_stages: tuple[split.Stage, ...] = ()
        if self._split_variant is not None:
            cpu = target.host_cpu()
            self.split_stages = tuple(split.plan_stages(
                self._split_variant.graph, self._split_variant.lowered, self.threads,
                cpu.peak_gflops_per_core, split.host_barrier_us(self.threads),
                split.host_memory_gbps()))
        self._jit_variants = [jit.Variant(runner_symbol(variant), variant.lowered,
                                          variant.memory.offsets,
                                          self.split_stages if variant is self._split_variant
                                          else ()) for variant in variants]
        # Parameters live in one array that the code reads through a pointer, so that the
        # LLVM IR stays small; the cache key covers them and everything else the code
        # depends on, which lets a cache hit skip LLVM altogether.
        self._params, self._param_offsets = jit.pack_params(self._jit_variants)
        self.check_bounds = check_bounds
        code, stages = jit.fingerprint(self._jit_variants, self._params)
        self._key = cache.key_of(*code, *stages,
                                 jit.host().describe(), __version__,
                                 f"check_bounds={check_bounds}")
        self._ll_text: str | None = None
        stored = cache.load(self._key) if use_cache else None
        objects = _split(stored) if stored is not None else None
        self.cache_hit = objects is not None
        if objects is None:
            try:
                objects = jit.compile_objects(c_name(self.name), self._jit_variants,
                                              self._param_offsets, check_bounds)
            except RuntimeError as error:
                raise CompileError("LLVM failed to compile the generated code", str(error)) \
                    from None
            if use_cache:
                cache.store(self._key, _joined(objects))
        self._library = jit.JitLibrary(objects)
        self._library.set_params(self._params)
        self._bounds_flag = self._library.bounds_flag() if check_bounds else None
        self._plans = {variant.layout: _Plan(variant,
                                             self._library.address(runner_symbol(variant)))
                       for variant in variants}
        self._large = self._plans[variants[0].layout]
        self._small = self._plans[self.variant_for(1).layout]
        if self.split_stages:
            small = self._jit_variants[variants.index(self.variant_for(1))]
            self._small.set_stages([(self._library.address(jit.stage_symbol(small, number)),
                                     stage.items)
                                    for number, stage in enumerate(self.split_stages)],
                                   self.threads)
        self._input_shape = graph.input_shape
        self._input_rank = 1 + len(graph.input_shape)
        self._pool = runtime.ThreadPool(self.threads) if self.threads > 1 else None
        self._call = runtime.native().call
        self._output_sizes = [math.prod(shape) for shape in self.output_shapes]
        self._output_floats = sum(self._output_sizes)
        # The output array of a one-output model is made in its final shape.
        self._output_tail = tuple(self.output_shapes[0]) if len(self.output_shapes) == 1 \
            else None
        # Up to this batch the outputs surely fit in memory; above, `check_memory` asks.
        self._batch_unchecked = CHECKED_BYTES // (self._output_floats * 4)
        # Large batches run in the layout that ran them faster on this CPU, measured once
        # per model (`target.layout_ratio`); the layouts round alike, so the bits are the same.
        self.layout_ratio: float | None = None
        small = self.variant_for(1)
        if small is not primary:
            # keyed by the code without the batch-1 stages: the same for every thread count
            self.layout_ratio = target.layout_ratio(cache.key_of(*code, __version__), lambda: (
                measured.channel_over_batch(
                    self._timed_call(self._small, self.images_per_block),
                    self._timed_call(self._large, self.images_per_block))))
            if self.layout_ratio < 1:
                self._large, self._large_variant = self._small, small
        # The plan's estimate leaves out what moving tensors between the cores' caches
        # costs, which can outweigh the split: the plan is kept only if it is faster here.
        self.split_timing: tuple[float, float] | None = None
        if self.split_stages:
            self.split_timing = measured.time_calls(self._timed_call(self._small, 1, True),
                                                    self._timed_call(self._small, 1))
            if not split.split_pays(*self.split_timing):
                self._small.stage_count = 0

    def __reduce__(self) -> tuple[Any, ...]:
        """A pickle carries the model's graph, weights hash, options and schedule, never its
        code; unpickling rebuilds it once per process (`cnnc.pickling`)."""
        return pickling.reduce(self)

    def variant_for(self, batch: int) -> Variant:
        """The variant a call with `batch` images uses: one image per block below a full
        batch block, when the channel layout was compiled."""
        small = [variant for variant in self.variants if variant.images_per_block == 1]
        if small and batch < self.images_per_block:
            return small[0]
        return self._large_variant

    # --- running -----------------------------------------------------------------------------
    # The call path is kept short: a float32, C-ordered array of the right shape goes
    # straight to native code; anything else goes through `check_input` first.

    def __call__(self, x: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        if not (type(x) is np.ndarray and x.dtype is _FLOAT32 and x.flags.c_contiguous
                and x.shape[1:] == self._input_shape and x.ndim == self._input_rank):
            x = check_input(self.graph, x)
        batch = x.shape[0]
        if batch > self._batch_unchecked:  # a huge batch: is there memory for its outputs?
            check_memory(self.graph, batch, self._output_floats * 4)
        tail = self._output_tail
        output = np.empty((batch, *tail) if tail is not None else
                          batch * self._output_floats, np.float32)
        if batch:
            # Native code reads the arrays' data pointers from these slots.
            if _DATA_OFFSET is not None:
                x_slot, y_slot = id(x) + _DATA_OFFSET, id(output) + _DATA_OFFSET
            else:
                slots = np.array([x.ctypes.data, output.ctypes.data], np.int64)
                x_slot, y_slot = slots.ctypes.data, slots.ctypes.data + 8
            plan = self._small if batch < self.images_per_block else self._large
            blocks = ceil_div(batch, plan.images_per_block)
            if blocks == 1 and plan.stage_count:
                self._run_split(plan, x_slot, y_slot, batch)
            elif blocks == 1 or self._pool is None:
                self._run(plan, x_slot, y_slot, batch, 0, blocks)
            else:
                self._run_parallel(plan, x_slot, y_slot, batch, blocks)
        if tail is not None:
            return output
        outputs = []
        start = 0
        for size, shape in zip(self._output_sizes, self.output_shapes):
            outputs.append(output[batch * start: batch * (start + size)].reshape(batch, *shape))
            start += size
        return tuple(outputs)

    def _run_parallel(self, plan: _Plan, x_slot: int, y_slot: int, batch: int,
                      blocks: int) -> None:
        """All threads share the blocks; on the calling thread alone if another call is
        using the pool."""
        assert self._pool is not None
        table = plan.pool_arenas(self.threads)
        status = self._pool.try_call(plan.runner, x_slot, y_slot, batch, blocks, table)
        if status is None:
            self._run(plan, x_slot, y_slot, batch, 0, blocks)
        else:
            self._check_status(status, batch, 0, blocks)

    def _timed_call(self, plan: _Plan, batch: int, split: bool = False) -> Callable[[], None]:
        """A call of `batch` zero images through `plan`, on this thread or, with `split`,
        one image split on the pool (what `measured` times)."""
        x = np.zeros((batch, *self._input_shape), np.float32)
        y = np.empty(batch * self._output_floats, np.float32)
        slots = np.array([x.ctypes.data, y.ctypes.data], np.int64)
        x_slot, y_slot = int(slots.ctypes.data), int(slots.ctypes.data) + 8
        blocks = ceil_div(batch, plan.images_per_block)

        def call() -> None:
            keep = (x, y, slots)  # alive while the native code reads them
            if split:
                self._run_split(plan, x_slot, y_slot, batch)
            else:
                self._run(plan, x_slot, y_slot, batch, 0, blocks)
            del keep
        return call

    def _run_split(self, plan: _Plan, x_slot: int, y_slot: int, batch: int) -> None:
        """One block as stages on the pool, its big kernels shared by the threads; on the
        calling thread alone, unsplit, if another call is using the pool."""
        assert self._pool is not None and plan.stages is not None
        status = self._pool.try_sequence(_address(plan.stages), plan.stage_count, x_slot,
                                         y_slot, batch, plan.split_arenas)
        if status is None:
            self._run(plan, x_slot, y_slot, batch, 0, 1)
        else:
            self._check_status(status, batch, 0, 1)

    @property
    def split_plan(self) -> str:
        """How a call of one image runs on the threads: one line per stage, its kernels and
        the items they are shared in ("" when it runs on one thread)."""
        if not self.split_stages or self._split_variant is None:
            return ""
        from cnnc.backends.llvm import split

        return split.describe(self._split_variant.lowered, self.split_stages,
                              self.split_timing)

    def _run(self, plan: _Plan, x_slot: int, y_slot: int, batch: int, first: int,
             end: int) -> None:
        """Blocks [first, end) on this thread, with an arena no other call is using."""
        arenas = plan.arenas
        try:
            arena = arenas.pop()  # atomic: concurrent calls never share an arena
        except IndexError:
            arena = plan.new_arena()
        try:
            status = self._call(plan.runner, x_slot, y_slot, batch, first, end, arena[1])
        finally:
            arenas.append(arena)
        if status or self._bounds_flag is not None:
            self._check_status(status, batch, first, end)

    def _check_status(self, status: int, batch: int, first: int, end: int) -> None:
        if status != 0:
            raise RuntimeError(f"model '{self.name}' failed with status {status}")
        if self._bounds_flag is not None and self._bounds_flag.value:
            from cnnc.backends.llvm import jit

            kernel = jit.kernel_symbols(self._jit_variants)[self._bounds_flag.value - 1]
            self._bounds_flag.value = 0
            raise BoundsError(f"kernel {kernel} of model '{self.name}' indexed out of bounds "
                              f"(batch {batch}, blocks {first} to {end}); nothing outside its "
                              "buffers was touched")

    def kernel_runner(self, variant: Variant, batch: int) -> Callable[[int], int]:
        """A function that runs kernel k (counting the edge kernels) of `variant` alone over
        a batch of `batch` random images, after one full run has filled every tensor."""
        one = abi.RUNNER_KERNEL.function(self._library.address(f"{runner_symbol(variant)}_kernel"))
        x = np.random.default_rng(0).random((batch, *self._input_shape), dtype=np.float32)
        output = np.empty(batch * self._output_floats, np.float32)
        arena = _aligned_floats(variant.memory.floats)
        blocks = ceil_div(batch, variant.images_per_block)
        addresses = (_address(x), _address(output), batch, 0, blocks, _address(arena))
        abi.RUNNER.function(self._plans[variant.layout].runner)(*addresses)
        keep = (x, output, arena)  # alive as long as the runner

        def run(index: int) -> int:
            assert keep
            return int(one(index, *addresses))

        return run

    def profile(self, batch: int, seconds: float = 0.2) -> str:
        """Time each kernel of the variant used at `batch` alone, on one thread, and print a
        table: share of the time, GFLOP/s, fraction of the fp32 peak, bytes moved."""
        from cnnc.profile import profile_table

        variant = self.variant_for(batch)
        return profile_table(variant.graph, variant.lowered, batch,
                             self.kernel_runner(variant, batch), seconds, threads=self.threads)

    def memory_bytes(self, batch: int) -> int:
        """Bytes of intermediate memory (all threads' arenas) used at batch size `batch`."""
        if batch < 0:
            raise InputError("batch must be >= 0")
        variant = self.variant_for(batch)
        workers = min(self.threads, ceil_div(batch, variant.images_per_block))
        return workers * variant.memory.bytes_per_block()

    @property
    def resources(self) -> dict[str, dict[str, int]]:
        """Nothing: LLVM reports no per-kernel resources (the `Model` protocol asks)."""
        return {}

    # --- reading the generated code ----------------------------------------------------------

    @property
    def _ll(self) -> str:
        """The LLVM IR of the JIT-compiled module (made on first use: a cache hit has none)."""
        from cnnc.backends.llvm import jit

        if self._ll_text is None:
            self._ll_text = jit.build_module(c_name(self.name), self._jit_variants,
                                             self._param_offsets, self.check_bounds).text()
        return self._ll_text

    def source(self, kind: str = "kernel") -> str:
        """The generated code: "kernel" (the loop IR), "ll" (LLVM IR) or "asm"."""
        from cnnc.backends.llvm import jit

        if kind == "kernel":
            return "\n\n".join(kernel.to_text() for kernel in self.lowered.kernels) + "\n"
        if kind == "ll":
            return self._ll
        if kind == "asm":
            return jit.emit_assembly(jit.optimise(self._ll))
        raise ValueError(f"unknown source kind {kind!r}; kinds: kernel, ll, asm")

    def export(self, directory: str | Path, emit: Sequence[str] | None = None) -> list[Path]:
        """Write `NAME.h` and the files of `emit` (among "ll", "asm", "obj", "so"; None:
        "obj" and "so") for use without Python; the library's `NAME_forward` runs the model on
        the calling thread."""
        from cnnc.backends.llvm import export

        return export.write(self, directory, emit)


CompiledModel = LlvmModel  # the name user code knows it by


def _data_pointer_offset() -> int | None:
    """Where a NumPy array object keeps its data pointer (PyArrayObject.data, right after the
    object header), checked against NumPy's own answer; None if it is not there."""
    probe = np.zeros(4, np.float32)
    offset = 2 * ctypes.sizeof(ctypes.c_void_p)
    found = ctypes.c_void_p.from_address(id(probe) + offset).value
    return offset if found == probe.ctypes.data else None


_DATA_OFFSET = _data_pointer_offset()
_FLOAT32 = np.dtype(np.float32)  # arrays of float32 share this one instance


def _address(array: np.ndarray) -> int:
    """The address of `array`'s data. Reading it from the object is five times faster than
    `array.ctypes.data`, which costs more than running a small model."""
    if _DATA_OFFSET is None:
        return int(array.ctypes.data)
    return int(ctypes.c_void_p.from_address(id(array) + _DATA_OFFSET).value or 0)


def _aligned_floats(count: int) -> np.ndarray:
    """A float32 array of `count` elements starting on a 64-byte boundary."""
    raw = np.zeros(count + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start: start + count]




def _joined(objects: list[bytes]) -> bytes:
    """Objects as one cache entry: each preceded by its length (8 bytes, little-endian)."""
    return b"".join(len(obj).to_bytes(8, "little") + obj for obj in objects)


def _split(stored: bytes) -> list[bytes] | None:
    """The objects `_joined` made, or None for an entry not in that form (then the model
    compiles again)."""
    objects, at = [], 0
    while at < len(stored):
        size = int.from_bytes(stored[at: at + 8], "little")
        if size <= 0 or at + 8 + size > len(stored):
            return None
        objects.append(stored[at + 8: at + 8 + size])
        at += 8 + size
    return objects or None
