"""Running on a GPU through the CUDA driver API (cuda.bindings.driver).

`probe()` says whether a driver and a GPU are here without raising. `Device` holds the
primary context of GPU 0 (the one PyTorch uses too); `DeviceModule` loads a model's cubin (or
its PTX, when the cubin is for another architecture), allocates and copies device memory and
launches kernels on the legacy default stream, so a copy back waits for the kernels.

`DeviceModule.capture` records a sequence of copies and launches into a CUDA graph on a stream
of its own (stream capture, thread-local mode) and `launch_graph` replays it. Any failure of
capture or instantiation returns None and turns graphs off for that module: the caller keeps
using plain launches.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeAlias

from cnnc.errors import DeviceError

SIM_HINT = ('compile with target="cuda-sim" (`--target cuda-sim`) to run the same generated '
            "CUDA C on the CPU")


def _driver() -> Any:
    from cuda.bindings import driver

    return driver


@cache
def probe() -> tuple[str | None, str]:
    """(arch of GPU 0 as sm_XX, its name), or (None, why there is none)."""
    try:
        driver = _driver()
    except ImportError as error:
        return None, f"cuda-bindings is not installed: {error}"
    try:
        (result,) = driver.cuInit(0)
    except RuntimeError as error:  # libcuda.so cannot be loaded: no driver
        return None, f"the driver library cannot be loaded: {error}"
    if result != driver.CUresult.CUDA_SUCCESS:
        return None, f"cuInit failed: {_error_text(driver, result)}"
    result, count = driver.cuDeviceGetCount()
    if result != driver.CUresult.CUDA_SUCCESS or count == 0:
        return None, "the CUDA driver sees no GPU"
    result, device = driver.cuDeviceGet(0)
    if result != driver.CUresult.CUDA_SUCCESS:
        return None, f"cuDeviceGet failed: {_error_text(driver, result)}"
    attribute = driver.CUdevice_attribute
    _, major = driver.cuDeviceGetAttribute(
        attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    _, minor = driver.cuDeviceGetAttribute(
        attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    _, raw_name = driver.cuDeviceGetName(64, device)
    name = raw_name.split(b"\0", 1)[0].decode(errors="replace")
    return f"sm_{major}{minor}", name


def device_missing() -> str | None:
    """None when a GPU can run kernels here, else a sentence saying why not and what to do."""
    arch, reason = probe()
    if arch is not None:
        return None
    return f"no CUDA driver or GPU was found ({reason}); {SIM_HINT}"


def _error_text(driver: Any, result: Any) -> str:
    try:
        _, name = driver.cuGetErrorName(result)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the driver cannot even name its error
        return str(result)


class Device:
    """GPU 0 and its primary context, shared by every model of the process."""

    _instance: Device | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        arch, name = probe()
        if arch is None:
            raise DeviceError(str(device_missing()))
        self.driver = _driver()
        self.arch = arch
        self.name = name
        self.device = self.check(self.driver.cuDeviceGet(0), "cuDeviceGet")
        self.context = self.check(self.driver.cuDevicePrimaryCtxRetain(self.device),
                                  "cuDevicePrimaryCtxRetain")
        self.make_current()

    @classmethod
    def get(cls) -> Device:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Device()
            return cls._instance

    def make_current(self) -> None:
        self.check(self.driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def check(self, returned: Any, call: str) -> Any:
        """The value of a driver call's (result, value...) tuple, or DeviceError."""
        result, *values = returned if isinstance(returned, tuple) else (returned,)
        if result != self.driver.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"{call} failed on {self.name}: {_error_text(self.driver, result)}")
        return values[0] if len(values) == 1 else tuple(values) or None


@dataclass(frozen=True)
class CopyIn:
    """A graph step: `size` bytes from pinned host memory `host` to device memory `pointer`."""

    pointer: int
    host: int
    size: int


@dataclass(frozen=True)
class CopyOut:
    """A graph step: `size` bytes from device memory `pointer` to pinned host memory `host`."""

    host: int
    pointer: int
    size: int


@dataclass(frozen=True)
class Launch:
    """A graph step: kernel number `kernel` on `grid` blocks of `block` threads; `params` is
    the address of its argument array (the values are copied when the launch is captured)."""

    kernel: int
    grid: int
    block: int
    params: int


GraphStep: TypeAlias = CopyIn | CopyOut | Launch


class DeviceModule:
    """A compiled model's kernels loaded on the GPU; device memory and launches."""

    def __init__(self, cubin: bytes, ptx: str, kernel_names: list[str]) -> None:
        self.device = Device.get()
        driver = self.device.driver
        self.device.make_current()
        result, module = driver.cuModuleLoadData(cubin)
        if result != driver.CUresult.CUDA_SUCCESS:
            # A cubin for another architecture: let the driver compile the PTX instead.
            module = self.device.check(driver.cuModuleLoadData(ptx.encode() + b"\0"),
                                       "cuModuleLoadData (PTX)")
        self.module = module
        self.functions = [self.device.check(driver.cuModuleGetFunction(module, name.encode()),
                                            f"cuModuleGetFunction({name})")
                          for name in kernel_names]
        self.graphs_available = True  # False once a capture failed: plain launches from then
        self._stream: Any = None  # the stream graphs are captured on and replayed in

    def prepare(self) -> None:
        """Make the context current on the calling thread."""
        self.device.make_current()

    def allocate(self, size: int) -> int:
        return int(self.device.check(self.device.driver.cuMemAlloc(max(size, 4)),
                                     f"cuMemAlloc({size} bytes)"))

    def free(self, pointer: int) -> None:
        self.device.check(self.device.driver.cuMemFree(pointer), "cuMemFree")

    def copy_in(self, pointer: int, host: int, size: int) -> None:
        if size:
            self.device.check(self.device.driver.cuMemcpyHtoD(pointer, host, size),
                              "cuMemcpyHtoD")

    def copy_out(self, host: int, pointer: int, size: int) -> None:
        if size:
            self.device.check(self.device.driver.cuMemcpyDtoH(host, pointer, size),
                              "cuMemcpyDtoH")

    def launch(self, kernel: int, grid: int, block: int, params: int) -> None:
        if grid <= 0:
            return
        self.device.check(self.device.driver.cuLaunchKernel(
            self.functions[kernel], grid, 1, 1, block, 1, 1, 0, 0, params, 0),
            f"cuLaunchKernel({kernel})")

    def synchronize(self) -> None:
        self.device.check(self.device.driver.cuCtxSynchronize(), "cuCtxSynchronize")

    # --- CUDA graphs -----------------------------------------------------------------------------

    def allocate_host(self, size: int) -> int:
        """Page-locked host memory (the fixed staging buffers a graph copies from and to)."""
        return int(self.device.check(self.device.driver.cuMemAllocHost(max(size, 4)),
                                     f"cuMemAllocHost({size} bytes)"))

    def free_host(self, pointer: int) -> None:
        self.device.check(self.device.driver.cuMemFreeHost(pointer), "cuMemFreeHost")

    def capture(self, steps: Sequence[GraphStep]) -> Any | None:
        """An executable CUDA graph (CUgraphExec) of `steps`, captured on this module's stream;
        None, with graphs turned off for this module, when anything fails. Every pointer a
        step names is baked into the graph: replays copy from and to the same buffers."""
        if not self.graphs_available:
            return None
        driver = self.device.driver
        graph: Any = None
        capturing = False
        try:
            if self._stream is None:
                # Non-blocking: no implicit synchronisation with the legacy stream, so another
                # thread's work there can neither join nor invalidate this capture.
                flags = int(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
                self._stream = self.device.check(driver.cuStreamCreate(flags), "cuStreamCreate")
            stream = self._stream
            mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
            self.device.check(driver.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
            capturing = True
            for step in steps:
                self._enqueue(step, stream)
            capturing = False
            graph = self.device.check(driver.cuStreamEndCapture(stream), "cuStreamEndCapture")
            if graph is None or not int(graph):
                raise DeviceError("stream capture returned no graph")
            executable = self.device.check(driver.cuGraphInstantiate(graph, 0),
                                           "cuGraphInstantiate")
            if executable is None or not int(executable):
                raise DeviceError("cuGraphInstantiate returned no graph")
            return executable
        except Exception:  # no graph: plain launches instead, quietly
            self.graphs_available = False
            if capturing:  # end the capture, or this thread's later calls would be refused
                with suppress(Exception):
                    _, broken = driver.cuStreamEndCapture(self._stream)
                    if broken is not None and int(broken):
                        driver.cuGraphDestroy(broken)
            return None
        finally:
            if graph is not None:  # the executable graph does not need its template
                with suppress(Exception):
                    driver.cuGraphDestroy(graph)

    def _enqueue(self, step: GraphStep, stream: Any) -> None:
        driver = self.device.driver
        if isinstance(step, CopyIn):
            self.device.check(driver.cuMemcpyHtoDAsync(step.pointer, step.host, step.size,
                                                       stream), "cuMemcpyHtoDAsync")
        elif isinstance(step, CopyOut):
            self.device.check(driver.cuMemcpyDtoHAsync(step.host, step.pointer, step.size,
                                                       stream), "cuMemcpyDtoHAsync")
        elif step.grid > 0:
            self.device.check(driver.cuLaunchKernel(
                self.functions[step.kernel], step.grid, 1, 1, step.block, 1, 1, 0, stream,
                step.params, 0), f"cuLaunchKernel({step.kernel})")

    def launch_graph(self, executable: Any) -> None:
        """Replay a graph from `capture` and wait for it; DeviceError if it fails."""
        driver = self.device.driver
        self.device.check(driver.cuGraphLaunch(executable, self._stream), "cuGraphLaunch")
        self.device.check(driver.cuStreamSynchronize(self._stream), "cuStreamSynchronize")

    def destroy_graph(self, executable: Any) -> None:
        with suppress(Exception):  # freeing: nothing to do about a failure
            self.device.driver.cuGraphExecDestroy(executable)

    def event_seconds(self, run: Any, repeats: int) -> float:
        """Seconds per call of `run()` (which launches kernels), timed with CUDA events."""
        driver = self.device.driver
        start = self.device.check(driver.cuEventCreate(0), "cuEventCreate")
        stop = self.device.check(driver.cuEventCreate(0), "cuEventCreate")
        try:
            self.device.check(driver.cuEventRecord(start, 0), "cuEventRecord")
            for _ in range(repeats):
                run()
            self.device.check(driver.cuEventRecord(stop, 0), "cuEventRecord")
            self.device.check(driver.cuEventSynchronize(stop), "cuEventSynchronize")
            milliseconds = self.device.check(driver.cuEventElapsedTime(start, stop),
                                             "cuEventElapsedTime")
        finally:
            driver.cuEventDestroy(start)
            driver.cuEventDestroy(stop)
        return float(milliseconds) / 1000 / max(repeats, 1)


def pack_params(values: list[int], kinds: list[str]) -> tuple[int, list[Any]]:
    """A `void**` array for cuLaunchKernel (and the simulator): one pointer per argument to
    its value. Returns its address and the ctypes objects that keep it alive."""
    holders: list[Any] = [ctypes.c_void_p(value) if kind == "pointer" else ctypes.c_int(value)
                          for value, kind in zip(values, kinds)]
    array = (ctypes.c_void_p * max(len(holders), 1))(
        *[ctypes.addressof(holder) for holder in holders])
    holders.append(array)
    return ctypes.addressof(array), holders
