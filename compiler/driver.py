"""`cnnc.compile`: a model in, a compiled model out, called on NumPy arrays.

The driver runs the pass pipeline, lowers the groups to kernels, asks the backend for code
(or takes it from the compile cache) and wraps it in a `CompiledModel`. Inputs are checked
here, in Python, before any native code runs: a kernel never sees a buffer of the wrong size.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnc import cache
from cnnc.errors import BoundsError, CompileError, InputError
from cnnc.frontend import load
from cnnc.graph import Graph
from cnnc.lower import LoweredModel, lower
from cnnc.passes import Options, groups_of, memory_of, run_pipeline
from cnnc.passes.plan_memory import MemoryPlan
from cnnc.reference import CHECKED_BYTES, check_input, check_memory
from cnnc.version import __version__

TARGETS = ("llvm", "cuda", "cuda-sim")
EMIT_KINDS = ("ll", "asm", "obj", "so")
_RUN_KERNEL = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p)
_RUN_BLOCKS = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)


def read_schedules(source: str | Path | dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Schedule overrides: a dict, a JSON object {kernel: {field: value}} or JSON lines
    {"kernel": name, "schedule": {...}} (what `cnnc tune` writes). "*" applies to all."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return {str(name): dict(fields) for name, fields in source.items()}
    text = Path(source).read_text()
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "schedule" not in data:  # not one tuner record
            return {str(name): dict(fields) for name, fields in data.items()}
    except json.JSONDecodeError:
        pass
    schedules: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                key = record.get("signature") or record["kernel"]
                schedule = dict(record["schedule"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{source}:{number}: not a schedule record: {error}") from None
            # A tuned record holds for the CPU and the cnnc it was measured with.
            if record.get("cpu") not in (None, _host_cpu()) or \
                    record.get("cnnc") not in (None, __version__):
                continue
            schedules[key] = schedule
    return schedules


def _host_cpu() -> str:
    from cnnc.backends.llvm import jit

    return jit.host().cpu


LAYOUTS = ("auto", "batch", "channel")


@dataclass
class Variant:
    """One compilation of the model for the CPU, in one layout."""

    layout: str
    graph: Graph  # after the passes
    lowered: LoweredModel
    memory: MemoryPlan

    @property
    def runner(self) -> str:
        return f"cnnc_run_{self.layout}"

    @property
    def images_per_block(self) -> int:
        return self.lowered.lanes


class _Plan:
    """How a call runs a variant: its runner's address, its free arenas (each an array and
    its address) and those of the thread pool."""

    __slots__ = ("runner", "images_per_block", "floats", "arenas", "_pool_table", "_lock")

    def __init__(self, variant: Variant, runner: int) -> None:
        self.runner = runner
        self.images_per_block = variant.images_per_block
        self.floats = variant.memory.floats
        self.arenas: list[tuple[np.ndarray, int]] = []
        self._pool_table: tuple[list[np.ndarray], np.ndarray] | None = None
        self._lock = threading.Lock()

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


def compile(  # noqa: A001 - the public name the users asked for
    model: str | Path | Graph,
    target: str = "llvm",
    fuse: bool = True,
    threads: int | None = None,
    schedule: str | Path | dict[str, Any] | None = None,
    disable_passes: tuple[str, ...] = (),
    dump_ir: str | Path | None = None,
    use_cache: bool = True,
    arch: str | None = None,
    layout: str = "auto",
    fast_math: bool = False,
    check_bounds: bool = False,
) -> Any:
    """Compile `model` (a path or a Graph) for `target`; returns a callable model: a
    `CompiledModel` for "llvm", the CUDA backend's model for "cuda" and "cuda-sim".

    On the CPU, `layout="auto"` compiles the model twice: batch-blocked for many images and
    channel-vectorised for a few; each call uses the one that suits its batch size.
    `check_bounds` (debug) makes every load and store check its index; an access out of
    bounds then raises `CnncError` instead of touching memory."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    graph = model if isinstance(model, Graph) else load(model)
    schedules = read_schedules(schedule)
    dump_dir = Path(dump_ir) if dump_ir is not None else None
    kinds = ("batch", "channel") if layout == "auto" or target != "llvm" else (layout,)
    if target != "llvm" and arch is None:
        from cnnc.backends.cuda import resolve_arch

        arch = resolve_arch(None)  # the GPU present, so that tiling and NVRTC agree
    variants = []
    for number, kind in enumerate(kinds if target == "llvm" else kinds[:1]):
        options = Options(target=target, fuse=fuse, schedules=schedules, arch=arch, layout=kind,
                          fast_math=fast_math, check_bounds=check_bounds)
        # The first variant's passes are dumped in DIR, a second one's in DIR/<layout>.
        where = dump_dir if dump_dir is None or number == 0 else dump_dir / f"{kind}_layout"
        compiled = run_pipeline(graph, options, disable_passes, where)
        lowered = lower(compiled)
        if where is not None:
            text = "\n\n".join(kernel.to_text() for kernel in lowered.kernels)
            (where / "99_kernels.txt").write_text(text + "\n")
        variants.append(Variant(kind, compiled, lowered, memory_of(compiled, options)))
    if target != "llvm":
        from cnnc.backends.cuda import compile_cuda

        only = variants[0]
        return compile_cuda(graph, only.graph, only.lowered, only.memory, options,
                            use_cache=use_cache)
    return CompiledModel(graph, variants, threads, use_cache, check_bounds)


class CompiledModel:
    """A model compiled for the host CPU. Call it on a float array (N, C, H, W)."""

    def __init__(self, graph: Graph, variants: list[Variant], threads: int | None,
                 use_cache: bool, check_bounds: bool = False) -> None:
        from cnnc.backends.llvm import jit, runtime

        self.graph = graph
        self.name = graph.name
        self.variants = variants
        primary = variants[0]
        self.lowered = primary.lowered
        self.memory = primary.memory
        self.lanes = primary.images_per_block
        self.threads = max(1, threads or runtime.cpus())
        self.kernels = [group.name for group in groups_of(primary.graph)]
        self.output_shapes = [graph.shape(name) for name in graph.outputs]
        self._jit_variants = [jit.Variant(variant.runner, variant.lowered,
                                          variant.memory.offsets) for variant in variants]
        # Parameters live in one array that the code reads through a pointer, so that the
        # LLVM IR stays small; the cache key covers them and everything else the code
        # depends on, which lets a cache hit skip LLVM altogether.
        self._params, self._param_offsets = jit.pack_params(self._jit_variants)
        self.check_bounds = check_bounds
        self._key = cache.key_of(*jit.fingerprint(self._jit_variants, self._params),
                                 jit.host().describe(), __version__,
                                 f"check_bounds={check_bounds}")
        self._ll_text: str | None = None
        obj = cache.load(self._key) if use_cache else None
        self.cache_hit = obj is not None
        if obj is None:
            try:
                obj = jit.emit_object(jit.optimise(self._ll))
            except RuntimeError as error:
                raise CompileError("LLVM failed to compile the generated code", str(error)) \
                    from None
            if use_cache:
                cache.store(self._key, obj)
        self._library = jit.JitLibrary(obj)
        self._library.set_params(self._params)
        self._bounds_flag = self._library.bounds_flag() if check_bounds else None
        self._plans = {variant.layout: _Plan(variant, self._library.address(variant.runner))
                       for variant in variants}
        self._large = self._plans[variants[0].layout]
        self._small = self._plans[self.variant_for(1).layout]
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

    def variant_for(self, batch: int) -> Variant:
        """The variant a call with `batch` images uses: one image per block below a full
        batch block, when the channel layout was compiled."""
        small = [variant for variant in self.variants if variant.images_per_block == 1]
        if small and batch < self.lanes:
            return small[0]
        return self.variants[0]

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
            plan = self._small if batch < self.lanes else self._large
            blocks = -(-batch // plan.images_per_block)
            if blocks == 1 or self._pool is None:
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
        one = _RUN_KERNEL(self._library.address(f"{variant.runner}_kernel"))
        x = np.random.default_rng(0).random((batch, *self._input_shape), dtype=np.float32)
        output = np.empty(batch * self._output_floats, np.float32)
        arena = _aligned_floats(variant.memory.floats)
        blocks = -(-batch // variant.images_per_block)
        addresses = (_address(x), _address(output), batch, 0, blocks, _address(arena))
        _RUN_BLOCKS(self._plans[variant.layout].runner)(*addresses)
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
                             self.kernel_runner(variant, batch), seconds)

    def memory_bytes(self, batch: int) -> int:
        """Bytes of intermediate memory (all threads' arenas) used at batch size `batch`."""
        if batch < 0:
            raise InputError("batch must be >= 0")
        variant = self.variant_for(batch)
        workers = min(self.threads, -(-batch // variant.images_per_block))
        return workers * variant.memory.bytes_per_block()

    # --- reading the generated code ----------------------------------------------------------

    @property
    def _ll(self) -> str:
        """The LLVM IR of the JIT-compiled module (made on first use: a cache hit has none)."""
        from cnnc.backends.llvm import jit

        if self._ll_text is None:
            self._ll_text = jit.build_module(_c_name(self.name), self._jit_variants,
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

    def export(self, directory: str | Path, emit: tuple[str, ...] = ("obj", "so")) -> list[Path]:
        """Write `NAME.h` and the asked-for files of `emit` ("ll", "asm", "obj", "so") for use
        without Python; the library's `NAME_forward` runs the model on the calling thread."""
        from cnnc.backends.llvm import jit

        unknown = set(emit) - set(EMIT_KINDS)
        if unknown:
            raise ValueError(f"unknown output kind {sorted(unknown)[0]!r}; kinds: "
                             f"{', '.join(EMIT_KINDS)}")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        name = _c_name(self.name)
        module = jit.build_module(name, self._jit_variants)
        arena = max(variant.memory.floats for variant in self.variants)
        runners = [(variant.runner, variant.images_per_block,
                    0 if variant is self.variant_for(0) else self.lanes)
                   for variant in sorted(self.variants, key=lambda v: -v.images_per_block)]
        module.add_forward(name, arena, runners)
        text = module.text()
        optimised = jit.optimise(text, shared_library=True)
        written = [out / f"{name}.h"]
        written[0].write_text(self._header(name))
        if "ll" in emit:
            written.append(out / f"{name}.ll")
            written[-1].write_text(text)
        if "asm" in emit:
            written.append(out / f"{name}.s")
            written[-1].write_text(jit.emit_assembly(optimised))
        if "obj" in emit or "so" in emit:
            obj_path = out / f"{name}.o"
            obj_path.write_bytes(jit.emit_object(optimised, shared_library=True))
            written.append(obj_path)
            if "so" in emit:
                written.append(_link_shared(obj_path, out / f"{name}.so"))
        return written

    def _header(self, name: str) -> str:
        guard = f"CNNC_{name.upper()}_H"
        lines = [
            f"/* {name}: generated by cnnc {__version__}. Weights are embedded. */",
            f"#ifndef {guard}", f"#define {guard}", "#include <stdint.h>", "",
            f"#define {name.upper()}_INPUT_SHAPE {{{', '.join(map(str, self.graph.input_shape))}}}",
            f"#define {name.upper()}_INPUT_SIZE {math.prod(self.graph.input_shape)}",
            f"#define {name.upper()}_OUTPUTS {len(self.output_shapes)}",
        ]
        for index, shape in enumerate(self.output_shapes):
            lines.append(f"#define {name.upper()}_OUTPUT{index}_SHAPE "
                         f"{{{', '.join(map(str, shape))}}}")
            lines.append(f"#define {name.upper()}_OUTPUT{index}_SIZE {math.prod(shape)}")
        lines += [
            "",
            "/* Runs the model on `batch` images in `input` (NCHW float32). `output` receives",
            "   each output in turn, output k as batch x OUTPUTk_SIZE floats after the ones",
            "   before it. Returns 0, or 1 when out of memory. Safe to call from many threads. */",
            f"int {name}_forward(const float *input, float *output, int64_t batch);",
            "",
            "/* Model-independent names, for programs built against one model. */",
            "#ifndef CNNC_NO_ALIASES",
            f"#define CNNC_MODEL_NAME \"{name}\"",
            f"#define CNNC_FORWARD {name}_forward",
            f"#define CNNC_INPUT_SIZE {name.upper()}_INPUT_SIZE",
            f"#define CNNC_OUTPUT_SIZE {sum(self._output_sizes)}",
            "#endif",
            "", f"#endif /* {guard} */", "",
        ]
        return "\n".join(lines)


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


def _c_name(name: str) -> str:
    """A C identifier from a model name (which is free text)."""
    cleaned = re.sub(r"\W", "_", name, flags=re.ASCII) or "model"
    return cleaned if not cleaned[0].isdigit() else f"m_{cleaned}"


def _link_shared(obj: Path, target: Path) -> Path:
    compiler = os.environ.get("CC", "cc")
    try:
        subprocess.run([compiler, "-shared", "-o", str(target), str(obj)], check=True,
                       capture_output=True, text=True)
    except FileNotFoundError:
        raise CompileError(f"no C compiler '{compiler}' to link {target.name}; "
                           "set CC or emit 'obj' only") from None
    except subprocess.CalledProcessError as error:
        raise CompileError(f"linking {target.name} failed", error.stderr) from None
    return target
