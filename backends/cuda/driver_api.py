"""Running on a GPU through the CUDA driver API (cuda.bindings.driver).

`probe()` says whether a driver and a GPU are here without raising. `Device` holds the
primary context of GPU 0 (the one PyTorch uses too); `DeviceModule` loads a model's cubin (or
its PTX, when the cubin is for another architecture), allocates and copies device memory and
launches kernels on the legacy default stream, so a copy back waits for the kernels.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache
from typing import Any

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
