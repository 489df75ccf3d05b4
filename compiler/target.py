"""What a target is, as data: for the host CPU its vector registers (`CpuIsa`, read from LLVM's
feature string: what the tiling heuristic reads) and its measured fp32 peak and FMA pipes (what
reports read), for an NVIDIA GPU its `sm_XX` limits. Passes and backends read these facts from
here; nothing else hard-codes one machine, and nothing here imports a pass.

The CPU peak is measured once per CPU model (a JIT-compiled loop of independent FMAs, a few
milliseconds) and kept in the cache directory, as is the cost of one barrier of the thread
pool (`pool_barrier_us`, which splitting one image across threads reads). llvmlite is
imported only when the host CPU is asked for, never by `import cnnc`.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cnnc.cache import cache_dir

PEAK_FILE = "cpu-peak.json"  # in the cache directory: {cpu key: measured facts}
FMA_CHAINS = 12  # independent accumulators: more than FMA pipes x FMA latency on any x86 core
FMA_LATENCY = 4  # cycles of one fp32 FMA on current x86 cores (Skylake on, Zen 3 on)
PEAK_SECONDS = 0.003  # per timed run of the loop; the best of PEAK_RUNS is kept
PEAK_RUNS = 5
BARRIER_FILE = "pool-barrier.json"  # in the cache directory: {cpu key | threads: microseconds}

DEFAULT_GPU_ARCH = "sm_90"
GPU_BLOCKS_PER_SM = 8  # blocks a staged kernel should fit on one SM, for latency hiding
GPU_STATIC_SHARED_LIMIT = 48 * 1024  # bytes of static __shared__ memory a block may declare
GPU_MAX_THREADS_PER_BLOCK = 1024  # every architecture since sm_20
GPU_RESIDENT_BLOCKS = 16  # blocks per SM that every architecture since sm_75 can hold
L1_DEFAULT_BYTES = 32 << 10  # an L1 data cache the OS does not report: the smallest of ours


@dataclass(frozen=True)
class CpuIsa:
    """The vector registers of a CPU, from LLVM's feature string (deterministic: the same
    features give the same code), and its L1 data cache as the OS reports it. `vector_width`
    counts float32 lanes of the widest vector register the code generator uses,
    `vector_registers` how many of them there are."""

    vector_width: int
    vector_registers: int
    l1_bytes: int = L1_DEFAULT_BYTES

    @property
    def accumulators(self) -> int:
        """Vector accumulators one point's channels may take: a quarter of the registers, the
        rest holding inputs, weights and addresses (8 of AVX-512's 32)."""
        return self.vector_registers // 4

    @property
    def register_tile(self) -> int:
        """Accumulators of a channels x points register tile: 7/16 of the registers, the rest
        holding a row of weights and the broadcast inputs (14 of AVX-512's 32)."""
        return self.vector_registers * 7 // 16

    @property
    def broadcast_tile(self) -> int:
        """Accumulators of a channels x points register tile whose weights are broadcast
        scalars (the batch layout's convolutions): half the registers, the rest holding one
        broadcast weight per channel and the input vectors of the points (16 of AVX-512's
        32; measured: 24 spilled, 8-12 left the FMA pipes waiting on their latency)."""
        return self.vector_registers // 2

    @classmethod
    def from_features(cls, features: str, l1_bytes: int = L1_DEFAULT_BYTES) -> CpuIsa:
        return cls(vector_width(features), vector_registers(features), l1_bytes)


@dataclass(frozen=True)
class CpuTarget:
    """The host CPU. `vector_width` counts float32 lanes of the widest vector register the
    code generator uses; `fma_pipes` is estimated from the peak and the nominal clock (None
    when the clock is unknown); `peak_source` says whether the peak was measured by this
    process or read from the cache."""

    model: str  # the CPU's model name, e.g. "AMD Ryzen 9 7950X"
    llvm_cpu: str  # LLVM's name for it, e.g. "znver4"
    features: str
    vector_width: int
    peak_gflops_per_core: float
    fma_pipes: int
    peak_source: Literal["measured", "cached"]

    @property
    def isa(self) -> CpuIsa:
        return CpuIsa.from_features(self.features, l1_data_bytes())

    def describe_peak(self) -> str:
        return (f"peak: {self.peak_gflops_per_core:.0f} GFLOP/s/core, {self.peak_source} "
                f"({self.model}, {self.llvm_cpu}, {self.vector_width} fp32 lanes, "
                f"{self.fma_pipes} FMA pipes)")


@dataclass(frozen=True)
class GpuArch:
    """What the GPU heuristic needs to know about an architecture."""

    threads_per_sm: int
    shared_per_sm: int  # bytes of shared memory the blocks on one SM can share
    max_threads_per_block: int = GPU_MAX_THREADS_PER_BLOCK
    static_shared_limit: int = GPU_STATIC_SHARED_LIMIT  # bytes of static __shared__ a block has
    resident_blocks: int = GPU_RESIDENT_BLOCKS  # the most __launch_bounds__ may ask for

    def shared_budget(self) -> int:
        """Bytes one staged block may use so that GPU_BLOCKS_PER_SM of them fit on an SM."""
        return min(self.static_shared_limit, self.shared_per_sm // GPU_BLOCKS_PER_SM)


# By compute capability; an architecture not listed takes the nearest older one.
GPU_ARCHS = {
    75: GpuArch(1024, 64 * 1024),  # Turing (T4)
    80: GpuArch(2048, 164 * 1024),  # A100
    86: GpuArch(1536, 100 * 1024),  # Ampere consumer, A10
    89: GpuArch(1536, 100 * 1024),  # Ada (L4, L40)
    90: GpuArch(2048, 228 * 1024),  # Hopper (H100, H200)
    100: GpuArch(2048, 228 * 1024),  # Blackwell (B200)
    120: GpuArch(1536, 100 * 1024),  # Blackwell consumer
}


def gpu_arch(name: str) -> GpuArch:
    """The properties of `name` ("sm_90", "sm_90a"); ValueError when it is not sm_XX."""
    match = re.fullmatch(r"sm_(\d+)[af]?", name)
    if match is None:
        raise ValueError(f"unknown CUDA architecture {name!r}; expected sm_XX, e.g. sm_90")
    capability = int(match.group(1))
    known = [key for key in GPU_ARCHS if key <= capability] or [min(GPU_ARCHS)]
    return GPU_ARCHS[max(known)]


_HOST: CpuTarget | None = None


def host_cpu() -> CpuTarget:
    """The host CPU, its peak read from the cache or, the first time on this CPU model,
    measured (and then stored for the next process)."""
    global _HOST
    if _HOST is not None:
        return _HOST
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm_cpu, features = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    model = cpu_model_name()
    width = vector_width(features)
    key = f"{model} | {llvm_cpu} | {features}"
    cached = _read_peaks().get(key)
    if isinstance(cached, dict) and isinstance(cached.get("peak_gflops_per_core"), float) \
            and isinstance(cached.get("fma_pipes"), int):
        target = CpuTarget(model, llvm_cpu, features, width, cached["peak_gflops_per_core"],
                           cached["fma_pipes"], "cached")
    else:
        peak, pipes = measure_peak(width)
        target = CpuTarget(model, llvm_cpu, features, width, peak, pipes, "measured")
        _store_peak(key, target)
    # Later calls in this process reuse the figure: they say "cached".
    _HOST = CpuTarget(**{**asdict(target), "peak_source": "cached"})
    return target


_HOST_ISA: CpuIsa | None = None


def host_isa() -> CpuIsa:
    """The host CPU's vector registers; cheap (reads LLVM's feature string, measures nothing),
    what the compile path asks for."""
    global _HOST_ISA
    if _HOST_ISA is None:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        _HOST_ISA = CpuIsa.from_features(llvm.get_host_cpu_features().flatten(),
                                         l1_data_bytes())
    return _HOST_ISA


def l1_data_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The L1 data cache of one core, as Linux reports it (48 KiB on Zen 5 and recent Intel
    cores, 32 KiB on Zen 4); L1_DEFAULT_BYTES where the OS does not say."""
    for index in sorted(sysfs.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if level == "1" and kind in ("Data", "Unified") and size[:-1].isdigit():
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1])
            if scale is not None:
                return int(size[:-1]) * scale
    return L1_DEFAULT_BYTES


def llvm_cpu_name() -> str:
    """LLVM's name for the host CPU ("znver4"), what tuned schedules are keyed by; cheap,
    measures nothing."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return str(llvm.get_host_cpu_name())


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def vector_width(features: str) -> int:
    """float32 lanes of the widest vector the code generator uses, from LLVM's feature
    string: AVX-512 16, AVX 8, else (SSE, NEON) 4."""
    enabled = {item[1:] for item in features.split(",") if item.startswith("+")}
    if "avx512f" in enabled:
        return 16
    if "avx" in enabled:
        return 8
    return 4


def vector_registers(features: str) -> int:
    """Vector registers the code generator can use, from LLVM's feature string: AVX-512 has
    32, AVX and SSE on x86-64 16, NEON 32."""
    enabled = {item[1:] for item in features.split(",") if item.startswith("+")}
    return 32 if enabled & {"avx512f", "neon"} else 16


def measure_peak(width: int) -> tuple[float, int]:
    """GFLOP/s of one core running FMA_CHAINS independent `width`-lane FMA chains (the fp32
    ceiling a kernel is compared with), and the FMA pipes that implies: one chain waits
    FMA_LATENCY cycles per FMA, so many chains run pipes * FMA_LATENCY times as fast."""
    engine, loops = _fma_loops(width, (FMA_CHAINS, 1))
    assert engine
    peak = _gflops(loops[FMA_CHAINS], width, FMA_CHAINS)
    one_chain = _gflops(loops[1], width, 1)
    return peak, max(1, round(peak / one_chain / FMA_LATENCY))


def _gflops(loop: Any, width: int, chains: int) -> float:
    """The best of PEAK_RUNS runs of `loop`, each grown to last PEAK_SECONDS."""
    data = (ctypes.c_float * 4)(0.999, 0.001, 1.0, 0.0)  # acc * a + b: no overflow, no denormals
    steps = 1 << 10
    while True:
        start = time.perf_counter()
        loop(steps, data)
        elapsed = time.perf_counter() - start
        if elapsed >= PEAK_SECONDS or steps >= 1 << 30:
            break
        steps *= 2
    best = elapsed
    for _ in range(PEAK_RUNS - 1):
        start = time.perf_counter()
        loop(steps, data)
        best = min(best, time.perf_counter() - start)
    return 2.0 * width * chains * steps / best / 1e9


def _fma_loops(width: int, chain_counts: tuple[int, ...]) -> tuple[Any, dict[int, Any]]:
    """The JIT engine and, per chain count, `void fma_loop_N(i64 steps, float* data)`: N
    accumulators, each updated by one `width`-lane FMA per step, their sum stored in data[3]
    so that none is dead. The engine must outlive the functions."""
    import llvmlite.binding as llvm

    vector = f"<{width} x float>"
    fma = f"@llvm.fma.v{width}f32"
    lines = [f"declare {vector} {fma}({vector}, {vector}, {vector})",
             # 512-bit vectors stay whole even where LLVM tunes the CPU for 256-bit ones.
             f'attributes #0 = {{ "min-legal-vector-width"="{width * 32}" }}']
    for chains in chain_counts:
        lines += [f"define void @fma_loop_{chains}(i64 %steps, ptr %data) #0 {{", "entry:"]
        for index, name in enumerate(("a", "b", "c")):
            lines += [f"  %p{name} = getelementptr float, ptr %data, i64 {index}",
                      f"  %{name}0 = load float, ptr %p{name}",
                      f"  %{name}1 = insertelement {vector} poison, float %{name}0, i32 0",
                      f"  %{name} = shufflevector {vector} %{name}1, {vector} poison, "
                      f"<{width} x i32> zeroinitializer"]
        lines += ["  br label %loop", "loop:", "  %i = phi i64 [ 0, %entry ], [ %next, %loop ]"]
        lines += [f"  %acc{chain} = phi {vector} [ %c, %entry ], [ %new{chain}, %loop ]"
                  for chain in range(chains)]
        lines += [f"  %new{chain} = call {vector} {fma}({vector} %acc{chain}, {vector} %a, "
                  f"{vector} %b)" for chain in range(chains)]
        lines += ["  %next = add i64 %i, 1", "  %more = icmp slt i64 %next, %steps",
                  "  br i1 %more, label %loop, label %done", "done:", "  %sum0 = fadd "
                  f"{vector} %new0, zeroinitializer"]
        lines += [f"  %sum{chain} = fadd {vector} %sum{chain - 1}, %new{chain}"
                  for chain in range(1, chains)]
        lines += [f"  %lane = extractelement {vector} %sum{chains - 1}, i32 0",
                  "  %pd = getelementptr float, ptr %data, i64 3",
                  "  store float %lane, ptr %pd", "  ret void", "}"]
    module = llvm.parse_assembly("\n".join(lines))
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=2,
        codemodel="jitdefault")
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    signature = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.POINTER(ctypes.c_float))
    return engine, {chains: signature(engine.get_function_address(f"fma_loop_{chains}"))
                    for chains in chain_counts}


def pool_barrier_us(threads: int, measure: Callable[[], float]) -> float:
    """What one barrier of the LLVM backend's thread pool costs on `threads` threads of this
    CPU, in microseconds: read from the cache or, the first time on this CPU model, taken
    from `measure` (the backend times its pool: this module imports no backend) and stored."""
    return _measured_fact(BARRIER_FILE, f"{cpu_model_name()} | {os.cpu_count()} cpus | "
                          f"{threads} threads", measure)


MEMORY_FILE = "memory-bandwidth.json"  # in the cache directory: {cpu key: GB/s}


def memory_gbps(measure: Callable[[], float]) -> float:
    """How fast one core of this CPU streams data from main memory, in GB/s: read from the
    cache or, the first time on this CPU model, taken from `measure` and stored. What a
    kernel whose weights do not fit in the caches (a big dense layer at batch 1) is bound by."""
    return _measured_fact(MEMORY_FILE, f"{cpu_model_name()} | {os.cpu_count()} cpus",
                          measure)


LAYOUT_FILE = "layout-choice.json"  # in the cache directory: {cpu | model key: time ratio}


def layout_ratio(model_key: str, measure: Callable[[], float]) -> float:
    """A full batch block of a model in the channel layout, one image at a time, against the
    same images in the batch layout, as a ratio of times on one core of this CPU (below 1:
    the channel layout is faster): taken from `measure` the first time and stored, so that
    later builds of the model on this CPU pick the same layout without timing it again (the
    two layouts round alike: the choice changes the speed, not the bits)."""
    return _measured_fact(LAYOUT_FILE, f"{cpu_model_name()} | {model_key}", measure)


def _measured_fact(name: str, key: str, measure: Callable[[], float]) -> float:
    """Fact `key` of the cache directory's file `name`: from this process's memo, else the
    file, else `measure` (then stored in both)."""
    if (name, key) in _FACTS:
        return _FACTS[name, key]
    cached = _read_facts(name).get(key)
    if not isinstance(cached, float):
        cached = float(measure())
        facts = _read_facts(name)
        facts[key] = cached
        _write_facts(name, facts)
    _FACTS[name, key] = cached
    return cached


_FACTS: dict[tuple[str, str], float] = {}  # (file, key) -> value, once read in this process


def _read_facts(name: str) -> dict[str, Any]:
    """The JSON object kept in the cache directory's file `name` (empty when unreadable)."""
    try:
        data = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_facts(name: str, facts: dict[str, Any]) -> None:
    """Write `facts` whole to the cache directory's file `name` and rename it into place; a
    cache that cannot be written is skipped, since it only saves a measurement."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(facts, file, indent=1, sort_keys=True)
        os.replace(temporary, directory / name)
    except OSError:
        pass


def _read_peaks() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / PEAK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_peak(key: str, target: CpuTarget) -> None:
    """Add the measurement to the peak file (written whole and renamed into place); a cache
    that cannot be written is skipped, since it only saves a measurement."""
    peaks = _read_peaks()
    peaks[key] = {"model": target.model, "llvm_cpu": target.llvm_cpu,
                  "vector_width": target.vector_width,
                  "peak_gflops_per_core": target.peak_gflops_per_core,
                  "fma_pipes": target.fma_pipes, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".cpu-peak.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(peaks, file, indent=1, sort_keys=True)
        os.replace(temporary, directory / PEAK_FILE)
    except OSError:
        pass
