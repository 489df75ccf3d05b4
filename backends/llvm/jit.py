"""LLVM for the host CPU: build a model's module, optimise it, JIT it with MCJIT, emit objects.

The target machine is made for the host CPU's name and features (AVX-512 on our machines) and
the module goes through llvmlite's new pass manager at O3. Object code can be handed back to
the engine from the compile cache, which skips optimisation and code generation.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir

from cnnc.backends.llvm import abi, codegen, split
from cnnc.backends.llvm.codegen import ModuleBuilder, PointerOf
from cnnc.kernel import Kernel
from cnnc.lower import USER_INPUT, USER_OUTPUT, LoweredModel
from cnnc.util import ceil_div

_LOCK = threading.Lock()
# The code generator's own source (and the ABI it builds to) is part of every cache key: a
# changed backend never loads code that an older one generated.
_BACKEND_SOURCE = "".join(Path(module.__file__ or "").read_text()
                          for module in (codegen, abi, split)) + Path(__file__).read_text()
_READY = False


def _initialise() -> None:
    global _READY
    with _LOCK:
        if not _READY:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _READY = True


@dataclass(frozen=True)
class HostTarget:
    triple: str
    cpu: str
    features: str

    def describe(self) -> str:
        return f"{self.triple} {self.cpu} llvmlite-{llvmlite.__version__}"


def host() -> HostTarget:
    _initialise()
    return HostTarget(llvm.get_process_triple(), llvm.get_host_cpu_name(),
                      llvm.get_host_cpu_features().flatten())


def target_machine(shared_library: bool = False) -> llvm.TargetMachine:
    """A target machine for this CPU; position-independent code for a shared library."""
    machine = host()
    target = llvm.Target.from_triple(machine.triple)
    return target.create_target_machine(cpu=machine.cpu, features=machine.features, opt=3,
                                        reloc="pic" if shared_library else "default",
                                        codemodel="default" if shared_library else "jitdefault")


@dataclass(frozen=True)
class Variant:
    """One lowering of a model (a layout), run by the entry point `runner`; with `stages`,
    also by one runner per stage for a call of one block on the thread pool (`split`)."""

    runner: str
    lowered: LoweredModel
    offsets: dict[str, int]
    stages: tuple[split.Stage, ...] = ()


def stage_symbol(variant: Variant, number: int) -> str:
    """The runner of stage `number` of `variant`'s one-block call."""
    return f"{variant.runner}_stage_{number}"


def split_kernels(variant: Variant) -> list[Kernel]:
    """The split kernels of `variant`'s stages, in the order `build_module` adds them."""
    return [split.split_kernel(variant.lowered.kernels[stage.kernels[0]], stage.items)
            for stage in variant.stages if stage.items > 1]


def symbol_of(variant: Variant, kernel: Kernel, variants: list[Variant]) -> str:
    return f"{variant.runner}.{kernel.name}" if len(variants) > 1 else kernel.name


def pack_params(variants: list[Variant]) -> tuple[np.ndarray, dict[str, int]]:
    """Every kernel's parameters in one float32 array, each 64-byte aligned, and where each
    starts ("<symbol>.<buffer>" -> float offset)."""
    offsets: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    size = 0
    for variant in variants:
        for kernel in variant.lowered.kernels:
            for buffer in kernel.buffers:
                if buffer.role == "param" and buffer.data is not None:
                    offsets[f"{symbol_of(variant, kernel, variants)}.{buffer.name}"] = size
                    padded = ceil_div(buffer.data.size, 16) * 16
                    chunk = np.zeros(padded, np.float32)
                    chunk[: buffer.data.size] = buffer.data
                    chunks.append(chunk)
                    size += padded
    packed = np.concatenate(chunks) if chunks else np.zeros(16, np.float32)
    # The offsets are 64-byte aligned only if the array is; else every vector load of a
    # weight splits two cache lines (measured: the 1x1 conv + global pooling of the zoo's
    # MobileNet 1.6x slower at batch 1).
    raw = np.zeros(packed.size + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    aligned = raw[start: start + packed.size]
    aligned[:] = packed
    return aligned, offsets


def kernel_symbols(variants: list[Variant]) -> list[str]:
    """Every kernel's symbol, in the order `build_module` adds (and numbers) them when it
    places the parameters (a JIT module: a split kernel in place of the whole one)."""
    symbols = []
    for variant in variants:
        parts = dict(_split_parts(variant))
        for index, kernel in enumerate(variant.lowered.kernels):
            symbols.append(symbol_of(variant, parts[index][0] if index in parts else kernel,
                                     variants))
    return symbols


def fingerprint(variants: list[Variant], params: np.ndarray
                ) -> tuple[list[str | bytes], list[str]]:
    """Everything the generated code depends on, for the compile cache's key, in two parts:
    the kernels (loops, schedules, buffers), how launches bind them, the parameters and this
    backend's own source; then the batch-1 stages, the one part a thread count changes."""
    parts: list[str | bytes] = [_BACKEND_SOURCE, params.tobytes()]
    for variant in variants:
        parts.append(f"{variant.runner} {sorted(variant.offsets.items())} "
                     f"{sorted(variant.lowered.bindings.items())}")
        parts += [kernel.to_text() for kernel in variant.lowered.kernels]
    return parts, [f"stages {variant.stages}" for variant in variants]


def build_module(name: str, variants: list[Variant],
                 param_offsets: dict[str, int] | None = None,
                 check_bounds: bool = False) -> ModuleBuilder:
    """The LLVM module of a model: the kernels of every variant, and each variant's entry
    point `runner(x, y, batch, first_block, end_block, arena)`. Parameters are embedded
    unless `param_offsets` places them in the array behind `cnnc.params`; only then (a JIT
    module, with a thread pool) are the variants' stage runners added, each
    `stage(x, y, batch, first_item, end_item, arena)`."""
    machine = target_machine()
    if param_offsets is not None:
        param_offsets = dict(param_offsets)  # the split kernels' entries are added to a copy
    builder = ModuleBuilder(name, machine.triple, str(machine.target_data), param_offsets,
                            check_bounds)
    for variant in variants:
        _add_variant(builder, variant, variants, param_offsets)
    if param_offsets is not None:
        for variant in variants:
            _add_stages(builder, variant, variants)
    return builder


def compile_objects(name: str, variants: list[Variant], param_offsets: dict[str, int],
                    check_bounds: bool = False) -> list[bytes]:
    """The JIT module of `build_module` as one object per variant, which `JitLibrary` links:
    while a worker thread has LLVM optimise and emit one variant's module (llvmlite's calls
    release the GIL), Python builds the next one's IR. The first module defines the globals
    the others read; kernels are numbered across the modules as in `kernel_symbols`."""
    machine = target_machine()
    offsets = dict(param_offsets)
    count = 0
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = []
        for number, variant in enumerate(variants):
            builder = ModuleBuilder(f"{name}_{number}", machine.triple,
                                    str(machine.target_data), offsets, check_bounds,
                                    external_globals=number > 0)
            builder.kernel_count = count
            _add_variant(builder, variant, variants, offsets)
            _add_stages(builder, variant, variants)
            count = builder.kernel_count
            pending.append(worker.submit(_object_of, builder.text()))
        return [future.result() for future in pending]


def _object_of(text: str) -> bytes:
    return emit_object(optimise(text))


def _add_variant(builder: ModuleBuilder, variant: Variant, variants: list[Variant],
                 param_offsets: dict[str, int] | None) -> None:
    """`variant`'s kernels and runner. A kernel that a stage splits is compiled once, split:
    the variant's runner runs every share of it in turn, the stage one share per item."""
    launches: list[tuple[str, list[PointerOf]]] = []
    parts = dict(_split_parts(variant)) if param_offsets is not None else {}
    shares: dict[str, int] = {}
    for index, kernel in enumerate(variant.lowered.kernels):
        symbol = symbol_of(variant, kernel, variants)
        if index not in parts:
            builder.add_kernel(kernel, symbol)
            launches.append(_launch(variant, kernel, symbol))
            continue
        assert param_offsets is not None
        part, items = parts[index]
        part_symbol = symbol_of(variant, part, variants)
        for buffer in part.buffers:
            if buffer.role == "param" and buffer.data is not None:
                param_offsets[f"{part_symbol}.{buffer.name}"] = \
                    param_offsets[f"{symbol}.{buffer.name}"]
        builder.add_kernel(part, part_symbol)
        launches.append(_launch(variant, part, part_symbol, kernel.name))
        shares[part_symbol] = items
    builder.add_run_blocks(variant.runner, launches, shares=shares)


def _split_parts(variant: Variant) -> list[tuple[int, tuple[Kernel, int]]]:
    """(kernel index, (its split kernel, shares)) for each kernel a stage of `variant` splits."""
    return [(stage.kernels[0], (part, stage.items)) for stage, part in
            zip([stage for stage in variant.stages if stage.items > 1], split_kernels(variant))]


def _add_stages(builder: ModuleBuilder, variant: Variant, variants: list[Variant]) -> None:
    """The stage runners of `variant`: a split stage runs the split kernel that
    `build_module` compiled in place of the whole one, one share per item."""
    kernels = variant.lowered.kernels
    parts = dict(_split_parts(variant))
    for number, stage in enumerate(variant.stages):
        launches = []
        for index in stage.kernels:
            kernel = kernels[index]
            bound = kernel.name
            if stage.items > 1:
                kernel = parts[index][0]
            launches.append(_launch(variant, kernel, symbol_of(variant, kernel, variants),
                                    bound))
        builder.add_stage(stage_symbol(variant, number), launches)


def _launch(variant: Variant, kernel: Kernel, symbol: str, bound: str = ""
            ) -> tuple[str, list[PointerOf]]:
    """How a runner calls `kernel` (as `symbol`, bound as the kernel named `bound`, default
    its own name): a pointer for each of its arguments."""
    bindings = variant.lowered.bindings[bound or kernel.name]
    return symbol, [_pointer(bindings[buffer.name], variant.offsets)
                    for buffer in kernel.arguments]


def _pointer(binding: str, offsets: dict[str, int]) -> PointerOf:
    """How a launch finds one argument: the user's arrays, or a place in the arena."""
    if binding == USER_INPUT:
        return lambda builder, args: args["x"]
    if binding == USER_OUTPUT:
        return lambda builder, args: args["y"]
    offset = offsets[binding]
    return lambda builder, args: builder.gep(args["arena"], [ir.Constant(ir.IntType(64), offset)])


def optimise(text: str, shared_library: bool = False) -> llvm.ModuleRef:
    """Parse LLVM assembly, verify it and optimise it at O3 for the host CPU."""
    _initialise()
    module = llvm.parse_assembly(text)
    module.verify()
    machine = target_machine(shared_library)
    tuning = llvm.create_pipeline_tuning_options(speed_level=3)
    # Our kernels are vectorised already, explicitly (lane loops). What LLVM's loop
    # vectoriser adds is the copy loops of the edge kernels, as gathers and scatters,
    # which on our Zen 4 run slower than the scalar loop (pack_input at batch 1: 1.2 us
    # against 0.8 us).
    tuning.loop_vectorization = False
    tuning.slp_vectorization = True
    tuning.loop_unrolling = True
    passes = llvm.create_pass_builder(machine, tuning)
    passes.getModulePassManager().run(module, passes)
    return module


def emit_object(module: llvm.ModuleRef, shared_library: bool = False) -> bytes:
    return bytes(target_machine(shared_library).emit_object(module))


def emit_assembly(module: llvm.ModuleRef) -> str:
    return str(target_machine().emit_assembly(module))


class JitLibrary:
    """Object code loaded into an MCJIT engine, which links the objects' symbols to each
    other; `address(name)` finds a function in it."""

    def __init__(self, obj: bytes | list[bytes]) -> None:
        _initialise()
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target_machine())
        for part in [obj] if isinstance(obj, bytes) else obj:
            self.engine.add_object_file(llvm.ObjectFileRef.from_data(part))
        self.engine.finalize_object()

    def address(self, name: str) -> int:
        address = int(self.engine.get_function_address(name))
        if not address:
            raise RuntimeError(f"symbol {name} not found in the compiled code")
        return address

    def set_params(self, params: np.ndarray) -> None:
        """Point the code's `cnnc.params` at `params` (which the caller keeps alive)."""
        address = int(self.engine.get_global_value_address(codegen.PARAMS_GLOBAL))
        ctypes.c_void_p.from_address(address).value = params.ctypes.data

    def bounds_flag(self) -> ctypes.c_int32:
        """The `check_bounds` flag: 1 + the number of the kernel that went out of bounds."""
        address = int(self.engine.get_global_value_address(codegen.BOUNDS_GLOBAL))
        return ctypes.c_int32.from_address(address)


__all__ = ["HostTarget", "JitLibrary", "Variant", "build_module", "compile_objects",
           "emit_assembly",
           "emit_object", "host", "optimise"]
