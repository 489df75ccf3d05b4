"""A stand-in for cuda.bindings.driver, so that the CUDA backend's driver-API path (streams,
stream capture, CUDA graphs, the failures of each) runs on a machine without a GPU; its
kernels run in the simulator. Tests only: nothing in cnnc imports it.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import itertools
from typing import Any

import numpy as np
import pytest

import cnnc
from cnnc.backends.cuda import driver_api, nvrtc
from cnnc.backends.cuda.model import CudaModel
from cnnc.backends.cuda.simulator import SimLibrary, SimMemory
from cnnc.graph import Graph


class FakeDriver:
    """The calls of cuda.bindings.driver that the backend makes, with its return convention
    (a tuple led by a CUresult), over host memory; kernels run in the simulator.

    Streams, stream capture and graphs behave as the driver documents them: between
    cuStreamBeginCapture and cuStreamEndCapture, copies and launches on the capturing stream
    are recorded (a launch's argument values are copied then, as into a kernel node), not run;
    cuGraphLaunch replays them. Calls that stream capture forbids (synchronous copies, launches
    on the legacy stream, allocation) invalidate the capture and fail, and an asynchronous copy
    captured from or to pageable memory fails. `fail` names one call to fail ("cuLaunchKernel
    @capture": a launch while capturing), returning an error, or with ":raise" raising as a
    binding called wrongly would; `calls` counts the calls made."""

    class CUresult(enum.IntEnum):
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1
        CUDA_ERROR_NO_BINARY_FOR_GPU = 209
        CUDA_ERROR_NOT_SUPPORTED = 801
        CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900
        CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901

    class CUdevice_attribute(enum.IntEnum):
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76

    class CUstream_flags(enum.IntEnum):
        CU_STREAM_DEFAULT = 0
        CU_STREAM_NON_BLOCKING = 1

    class CUstreamCaptureMode(enum.IntEnum):
        CU_STREAM_CAPTURE_MODE_GLOBAL = 0
        CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1
        CU_STREAM_CAPTURE_MODE_RELAXED = 2

    def __init__(self) -> None:
        self.ok = self.CUresult.CUDA_SUCCESS
        self.memory: dict[int, np.ndarray] = {}
        self.host: dict[int, np.ndarray] = {}  # page-locked host memory
        self.launches: list[tuple[str, int, int]] = []  # kernels run outside graphs
        self.library: SimLibrary | None = None
        self.fail: str | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        self.streams: dict[int, int] = {}  # handle: flags
        self.capturing: dict[int, list[tuple[Any, ...]] | None] = {}  # None: invalidated
        self.graphs: dict[int, list[tuple[Any, ...]]] = {}
        self.executables: dict[int, list[tuple[Any, ...]]] = {}
        self.graph_launches = 0
        self._handles = itertools.count(0x1000)

    def _failing(self, call: str) -> bool:
        self.calls[call] += 1
        if self.fail == f"{call}:raise":
            raise TypeError(f"{call}: an argument of the wrong type")
        return self.fail == call

    def _forbidden_while_capturing(self) -> bool:
        """A call stream capture forbids: it invalidates every capture in progress."""
        if not self.capturing:
            return False
        for stream in self.capturing:
            self.capturing[stream] = None
        return True

    def _pinned(self, address: int, size: int) -> bool:
        return any(block.ctypes.data <= address and address + size <= block.ctypes.data
                   + block.nbytes for block in self.host.values())

    def _record(self, stream: int, step: tuple[Any, ...]) -> object:
        steps = self.capturing[stream]
        if steps is None:
            return self.CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
        steps.append(step)
        return self.ok

    def _run_kernel(self, function: str, grid: int, block: int, params: int) -> None:
        assert self.library is not None
        self.library.launch(self.library.names.index(function), grid, block, params)

    def cuInit(self, flags: int) -> tuple[object, ...]:
        return (self.ok,)

    def cuDeviceGetCount(self) -> tuple[object, ...]:
        return self.ok, 1

    def cuDeviceGet(self, ordinal: int) -> tuple[object, ...]:
        return self.ok, ordinal

    def cuDeviceGetAttribute(self, attribute: object, device: int) -> tuple[object, ...]:
        major = attribute == self.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        return self.ok, 9 if major else 0

    def cuDeviceGetName(self, length: int, device: int) -> tuple[object, ...]:
        return self.ok, b"Stand-in GPU".ljust(length, b"\0")

    def cuDevicePrimaryCtxRetain(self, device: int) -> tuple[object, ...]:
        return self.ok, "context"

    def cuCtxSetCurrent(self, context: object) -> tuple[object, ...]:
        return (self.ok,)

    def cuModuleLoadData(self, image: bytes) -> tuple[object, ...]:
        assert image[:4] == b"\x7fELF"
        return self.ok, "module"

    def cuModuleGetFunction(self, module: object, name: bytes) -> tuple[object, ...]:
        return self.ok, name.decode()

    def cuMemAlloc(self, size: int) -> tuple[object, ...]:
        if self._forbidden_while_capturing():
            return self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, None
        block = np.full(size // 4, np.nan, np.float32)
        self.memory[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cuMemFree(self, pointer: int) -> tuple[object, ...]:
        if self._forbidden_while_capturing():
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        del self.memory[pointer]
        return (self.ok,)

    def cuMemAllocHost(self, size: int) -> tuple[object, ...]:
        if self._failing("cuMemAllocHost"):
            return self.CUresult.CUDA_ERROR_NOT_SUPPORTED, None
        if self._forbidden_while_capturing():
            return self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, None
        block = np.full(-(-size // 4), np.nan, np.float32)  # stale data shows as NaN
        self.host[block.ctypes.data] = block
        return self.ok, block.ctypes.data

    def cuMemFreeHost(self, pointer: int) -> tuple[object, ...]:
        del self.host[pointer]
        return (self.ok,)

    def cuMemcpyHtoD(self, device: int, host: int, size: int) -> tuple[object, ...]:
        if self._forbidden_while_capturing():
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        ctypes.memmove(device, host, size)
        return (self.ok,)

    def cuMemcpyDtoH(self, host: int, device: int, size: int) -> tuple[object, ...]:
        if self._forbidden_while_capturing():
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        ctypes.memmove(host, device, size)
        return (self.ok,)

    def _copy_async(self, call: str, destination: int, source: int, host: int, size: int,
                    stream: int) -> tuple[object, ...]:
        assert stream in self.streams, f"{call} on a stream nobody created"
        if self._failing(call):
            return (self.CUresult.CUDA_ERROR_INVALID_VALUE,)
        if stream not in self.capturing:
            ctypes.memmove(destination, source, size)
            return (self.ok,)
        if not self._pinned(host, size):
            self.capturing[stream] = None
            return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
        return (self._record(stream, ("copy", destination, source, size)),)

    def cuMemcpyHtoDAsync(self, device: int, host: int, size: int,
                          stream: int) -> tuple[object, ...]:
        return self._copy_async("cuMemcpyHtoDAsync", device, host, host, size, stream)

    def cuMemcpyDtoHAsync(self, host: int, device: int, size: int,
                          stream: int) -> tuple[object, ...]:
        return self._copy_async("cuMemcpyDtoHAsync", host, device, host, size, stream)

    def cuLaunchKernel(self, function: str, grid_x: int, grid_y: int, grid_z: int,
                       block_x: int, block_y: int, block_z: int, shared: int, stream: int,
                       params: int, extra: int) -> tuple[object, ...]:
        assert (grid_y, grid_z, block_y, block_z, shared, extra) == (1, 1, 1, 1, 0, 0)
        assert self.library is not None
        if stream == 0:  # the legacy stream
            if self._forbidden_while_capturing():
                return (self.CUresult.CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,)
            self._run_kernel(function, grid_x, block_x, params)
            self.launches.append((function, grid_x, block_x))
            return (self.ok,)
        assert stream in self.streams
        if stream not in self.capturing:
            self._run_kernel(function, grid_x, block_x, params)
            self.launches.append((function, grid_x, block_x))
            return (self.ok,)
        if self._failing("cuLaunchKernel@capture"):
            self.capturing[stream] = None
            return (self.CUresult.CUDA_ERROR_INVALID_VALUE,)
        # A kernel node keeps the argument values, not the caller's array of pointers to them.
        kinds = self.library.kernels[self.library.names.index(function)].argument_types
        pointers = (ctypes.c_void_p * len(kinds)).from_address(params)
        values: list[Any] = [
            ctypes.c_int.from_address(pointer).value if kind == "int"
            else ctypes.c_void_p.from_address(pointer).value
            for kind, pointer in zip(kinds, pointers)]
        copied, holders = driver_api.pack_params(
            [value or 0 for value in values],
            ["int" if kind == "int" else "pointer" for kind in kinds])
        return (self._record(stream, ("launch", function, grid_x, block_x, copied, holders)),)

    def cuStreamCreate(self, flags: int) -> tuple[object, ...]:
        if self._failing("cuStreamCreate"):
            return self.CUresult.CUDA_ERROR_NOT_SUPPORTED, None
        handle = next(self._handles)
        self.streams[handle] = flags
        return self.ok, handle

    def cuStreamBeginCapture(self, stream: int, mode: enum.IntEnum) -> tuple[object, ...]:
        assert stream in self.streams, "capture may not begin on the legacy stream"
        assert isinstance(mode, self.CUstreamCaptureMode)  # the binding reads mode.value
        if self._failing("cuStreamBeginCapture"):
            return (self.CUresult.CUDA_ERROR_NOT_SUPPORTED,)
        if stream in self.capturing:
            return (self.CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.capturing[stream] = []
        return (self.ok,)

    def cuStreamEndCapture(self, stream: int) -> tuple[object, ...]:
        if stream not in self.capturing:
            return self.CUresult.CUDA_ERROR_INVALID_VALUE, None
        steps = self.capturing.pop(stream)  # capture ends, whether it succeeded or not
        if self._failing("cuStreamEndCapture") or steps is None:
            return self.CUresult.CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, None
        handle = next(self._handles)
        self.graphs[handle] = steps
        return self.ok, handle

    def cuGraphInstantiate(self, graph: int, flags: int) -> tuple[object, ...]:
        assert graph in self.graphs and flags == 0
        if self._failing("cuGraphInstantiate"):
            return self.CUresult.CUDA_ERROR_NOT_SUPPORTED, None
        handle = next(self._handles)
        self.executables[handle] = list(self.graphs[graph])
        return self.ok, handle

    def cuGraphDestroy(self, graph: int) -> tuple[object, ...]:
        del self.graphs[graph]
        return (self.ok,)

    def cuGraphExecDestroy(self, executable: int) -> tuple[object, ...]:
        del self.executables[executable]
        return (self.ok,)

    def cuGraphLaunch(self, executable: int, stream: int) -> tuple[object, ...]:
        assert stream in self.streams and stream not in self.capturing
        if self._failing("cuGraphLaunch"):
            return (self.CUresult.CUDA_ERROR_INVALID_VALUE,)
        for step in self.executables[executable]:
            if step[0] == "copy":
                ctypes.memmove(step[1], step[2], step[3])
            else:
                self._run_kernel(*step[1:5])
        self.graph_launches += 1
        return (self.ok,)

    def cuStreamSynchronize(self, stream: int) -> tuple[object, ...]:
        assert stream in self.streams
        return (self.ok,)

    def captured(self) -> list[str]:
        """What the executable graphs do, in order: "copy" or the kernel's name."""
        return [step[1] if step[0] == "launch" else "copy"
                for steps in self.executables.values() for step in steps]


def stand_in_model(fake: FakeDriver, graph: Graph, monkeypatch: pytest.MonkeyPatch) -> CudaModel:
    """The simulator's model, turned into a "cuda" one whose cubin the stand-in accepts."""
    model = cnnc.compile(graph, target="cuda-sim")
    assert isinstance(model, CudaModel) and isinstance(model._runner, SimMemory)
    fake.library = model._runner.library
    monkeypatch.setattr(model, "_binary", nvrtc.Binary("sm_90", "", b"\x7fELF", "", {}))
    monkeypatch.setattr(model, "target", "cuda")
    monkeypatch.setattr(model, "_runner", None)
    return model


def assert_all_freed(fake: FakeDriver) -> None:
    assert not fake.memory and not fake.host
    assert not fake.graphs and not fake.executables and not fake.capturing


def install(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    """A new stand-in driver in place of cuda.bindings.driver, until `monkeypatch` undoes it;
    the caller clears `driver_api.probe`'s cache again when done."""
    fake = FakeDriver()
    monkeypatch.setattr(driver_api, "_driver", lambda: fake)
    monkeypatch.setattr(driver_api.Device, "_instance", None)
    driver_api.probe.cache_clear()
    return fake
