"""Target "cuda-sim": the generated CUDA C, compiled by the host C++ compiler, run on the CPU.

The source is included unchanged after `cnnc_cuda_sim.h`, which supplies the CUDA built-ins;
a small generated wrapper gives every kernel one entry point that ctypes can call with the
same grid, block sizes and argument array as `cuLaunchKernel`. Libraries are kept in the
compile cache. It tests numerics and barriers, not speed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from cnnc import cache as compile_cache
from cnnc.errors import BoundsError, CompileError, DeviceError
from cnnc.version import __version__

HEADER = Path(__file__).with_name("cnnc_cuda_sim.h")
FLAGS = ("-std=c++17", "-O1", "-shared", "-fPIC", "-w")
ERROR_SIZE = 1024
OUT_OF_BOUNDS = 2  # cnnc_sim_launch's status when a checked access missed its buffer


@dataclass(frozen=True)
class SimKernel:
    """What the wrapper needs to call a kernel: its name, the C types of its arguments in
    order, and whether it has barriers (then its threads run as fibers)."""

    name: str
    argument_types: tuple[str, ...]
    cooperative: bool


def compiler() -> str:
    """The host C++ compiler: `$CXX`, else g++, else c++."""
    chosen = os.environ.get("CXX")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise CompileError(f"target 'cuda-sim': CXX is '{chosen}', which is not an "
                               "executable C++ compiler; fix CXX or unset it to use g++")
        return found
    found = shutil.which("g++") or shutil.which("c++")
    if not found:
        raise CompileError("target 'cuda-sim' needs a host C++ compiler: install g++ or set CXX")
    return found


@cache
def _compiler_version(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True,
                              check=False).stdout
    except OSError:
        return ""


def wrapper_source(file_name: str, kernels: list[SimKernel]) -> str:
    """C++ that includes the header and the CUDA source and exports `cnnc_sim_launch`."""
    lines = ['#include "cnnc_cuda_sim.h"', f'#include "{file_name}"', ""]
    for index, kernel in enumerate(kernels):
        casts = ", ".join(f"*({kind}*)args[{position}]"
                          for position, kind in enumerate(kernel.argument_types))
        lines += [f"static void cnnc_sim_body_{index}(void **args)", "{",
                  f"    {kernel.name}({casts});", "}", ""]
    bodies = ", ".join(f"cnnc_sim_body_{index}" for index in range(len(kernels))) or "0"
    cooperative = ", ".join("true" if kernel.cooperative else "false" for kernel in kernels) \
        or "false"
    lines += [
        'extern "C" int cnnc_sim_launch(int kernel, unsigned int grid_x, unsigned int block_x,',
        "                               void **args, char *error, int error_size)",
        "{",
        f"    static const cnnc_sim::Body bodies[] = {{{bodies}}};",
        f"    static const bool cooperative[] = {{{cooperative}}};",
        f"    if (kernel < 0 || kernel >= {len(kernels)}) {{",
        '        snprintf(error, (size_t)error_size, "no kernel %d", kernel);',
        "        return 1;",
        "    }",
        "    dim3 grid = {grid_x, 1, 1}, block = {block_x, 1, 1};",
        "    return cnnc_sim::launch(bodies[kernel], args, grid, block, cooperative[kernel],",
        "                            error, error_size);",
        "}",
        "",
    ]
    return "\n".join(lines)


class SimLibrary:
    """The CUDA source of a model built for the CPU; `launch` runs one kernel."""

    def __init__(self, name: str, source: str, kernels: list[SimKernel],
                 use_cache: bool = True) -> None:
        self.kernels = kernels
        self.names = [kernel.name for kernel in kernels]
        file_name = f"{name}.cu"
        wrapper = wrapper_source(file_name, kernels)
        cxx = compiler()
        key = compile_cache.key_of("cuda-sim", source, wrapper, HEADER.read_text(),
                                   _compiler_version(cxx), " ".join(FLAGS), __version__)
        binary = compile_cache.load(key) if use_cache else None
        self.cache_hit = binary is not None
        with tempfile.TemporaryDirectory(prefix="cnnc-sim-") as folder:
            work = Path(folder)
            library = work / f"{name}.so"
            if binary is None:
                (work / file_name).write_text(source)
                (work / "wrapper.cpp").write_text(wrapper)
                shutil.copy(HEADER, work / HEADER.name)
                command = [cxx, *FLAGS, "-I", str(work), "-o", str(library),
                           str(work / "wrapper.cpp")]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise CompileError(f"the host C++ compiler failed on {file_name} for "
                                       "cuda-sim", result.stderr[-20000:])
                binary = library.read_bytes()
                if use_cache:
                    compile_cache.store(key, binary)
            else:
                library.write_bytes(binary)
            # dlopen keeps the mapping after the file is gone.
            self._library = ctypes.CDLL(str(library))
        self._launch = self._library.cnnc_sim_launch
        self._launch.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p,
                                 ctypes.c_char_p, ctypes.c_int]
        self._launch.restype = ctypes.c_int
        self._error = ctypes.create_string_buffer(ERROR_SIZE)

    def launch(self, kernel: int, grid: int, block: int, params: int) -> None:
        """Run kernel number `kernel` on `grid` blocks of `block` threads; `params` is the
        address of an array of pointers to the argument values, as for cuLaunchKernel."""
        if grid <= 0:
            return
        status = self._launch(kernel, grid, block, params, self._error, ERROR_SIZE)
        if status != 0:
            message = self._error.value.decode(errors="replace")
            if status == OUT_OF_BOUNDS:
                raise BoundsError(f"cuda-sim: {message}")
            raise DeviceError(f"cuda-sim: kernel {self.names[kernel]} failed: {message}")


class SimMemory:
    """The simulator's stand-in for device memory and launches (the model's `runner`)."""

    def __init__(self, library: SimLibrary) -> None:
        self.library = library
        self._blocks: dict[int, np.ndarray] = {}

    def prepare(self) -> None:
        pass

    def allocate(self, size: int) -> int:
        # NaN everywhere: a kernel that reads memory nobody wrote shows it in its outputs.
        block = np.full(max(size, 4) // 4 + 1, np.nan, np.float32)
        pointer = int(block.ctypes.data)
        self._blocks[pointer] = block
        return pointer

    def free(self, pointer: int) -> None:
        self._blocks.pop(pointer, None)

    def copy_in(self, pointer: int, host: int, size: int) -> None:
        ctypes.memmove(pointer, host, size)

    def copy_out(self, host: int, pointer: int, size: int) -> None:
        ctypes.memmove(host, pointer, size)

    def launch(self, kernel: int, grid: int, block: int, params: int) -> None:
        self.library.launch(kernel, grid, block, params)

    def synchronize(self) -> None:
        pass
