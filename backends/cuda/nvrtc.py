"""CUDA C -> PTX and cubin with NVRTC (cuda-bindings), and the resources ptxas reports.

No GPU or driver is needed. NVRTC runs ptxas with `-v`; its report in the program log gives
each kernel's registers, shared memory and spills. A failed compilation raises CompileError
with NVRTC's log and the generated line it points at. Results are kept in the compile cache.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from cnnc import cache as compile_cache
from cnnc.errors import CompileError
from cnnc.version import __version__

INSTALL_HINT = "install them with `pip install -e '.[cuda]'` (cuda-bindings and nvidia-cuda-nvrtc)"


@dataclass
class Binary:
    """What NVRTC made of one source."""

    arch: str
    ptx: str
    cubin: bytes
    log: str
    resources: dict[str, dict[str, int]]


def nvrtc_module() -> Any:
    """cuda.bindings.nvrtc, or CompileError saying how to install it."""
    try:
        from cuda.bindings import nvrtc
    except ImportError as error:
        raise CompileError(f"target 'cuda' needs NVRTC, which is not importable ({error}); "
                           f"{INSTALL_HINT}") from None
    return nvrtc


def available() -> str | None:
    """None when NVRTC can compile here, else why not (for skipping tests)."""
    try:
        version()
    except CompileError as error:
        return str(error)
    return None


@cache
def version() -> str:
    nvrtc = nvrtc_module()
    try:
        result, major, minor = nvrtc.nvrtcVersion()
    except Exception as error:  # the wheel is there but the library cannot be loaded
        raise CompileError(f"NVRTC cannot be loaded ({error}); {INSTALL_HINT}") from None
    _check(nvrtc, result, "nvrtcVersion")
    return f"{major}.{minor}"


@cache
def supported_archs() -> tuple[str, ...]:
    """The sm_XX this NVRTC compiles for."""
    nvrtc = nvrtc_module()
    result, count = nvrtc.nvrtcGetNumSupportedArchs()
    _check(nvrtc, result, "nvrtcGetNumSupportedArchs")
    result, archs = nvrtc.nvrtcGetSupportedArchs()
    _check(nvrtc, result, "nvrtcGetSupportedArchs")
    return tuple(f"sm_{arch}" for arch in archs[:count])


def options_for(arch: str, fast_math: bool) -> list[str]:
    options = [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v",
               "--generate-line-info"]
    if fast_math:
        options.append("--use_fast_math")
    return options


def compile_source(source: str, file_name: str, arch: str, fast_math: bool = False,
                   use_cache: bool = True) -> Binary:
    """PTX and cubin of `source` for `arch` (sm_XX); CompileError with the log on failure."""
    options = options_for(arch, fast_math)
    key = compile_cache.key_of("nvrtc", source, file_name, " ".join(options), version(),
                               __version__)
    if use_cache:
        stored = compile_cache.load(key)
        if stored is not None:
            record = json.loads(stored)
            log = record["log"]
            return Binary(arch, record["ptx"], base64.b64decode(record["cubin"]), log,
                          parse_resources(log))
    ptx, cubin, log = _run_nvrtc(source, file_name, options)
    if use_cache:
        record = {"ptx": ptx, "cubin": base64.b64encode(cubin).decode("ascii"), "log": log}
        compile_cache.store(key, json.dumps(record).encode())
    return Binary(arch, ptx, cubin, log, parse_resources(log))


def _run_nvrtc(source: str, file_name: str, options: list[str]) -> tuple[str, bytes, str]:
    nvrtc = nvrtc_module()
    result, program = nvrtc.nvrtcCreateProgram(source.encode(), file_name.encode(), 0, [], [])
    _check(nvrtc, result, "nvrtcCreateProgram")
    try:
        encoded = [option.encode() for option in options]
        (compiled,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        log = _program_log(nvrtc, program)
        if compiled != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            line, text = _first_error_line(log, file_name, source)
            where = f" at line {line}: {text.strip()}" if line is not None else ""
            raise CompileError(f"NVRTC failed to compile {file_name} "
                               f"({' '.join(options)}){where}", log, line=line,
                               source_line=text if line is not None else None)
        result, size = nvrtc.nvrtcGetPTXSize(program)
        _check(nvrtc, result, "nvrtcGetPTXSize")
        ptx = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetPTX(program, ptx)[0], "nvrtcGetPTX")
        result, size = nvrtc.nvrtcGetCUBINSize(program)
        _check(nvrtc, result, "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, cubin)[0], "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return ptx.rstrip(b"\0").decode(), cubin, log


def _program_log(nvrtc: Any, program: Any) -> str:
    result, size = nvrtc.nvrtcGetProgramLogSize(program)
    _check(nvrtc, result, "nvrtcGetProgramLogSize")
    log = b" " * size
    _check(nvrtc, nvrtc.nvrtcGetProgramLog(program, log)[0], "nvrtcGetProgramLog")
    return log.rstrip(b"\0").decode(errors="replace").strip()


def _first_error_line(log: str, file_name: str, source: str) -> tuple[int | None, str]:
    """The line of `source` that NVRTC's first error names (`lenet.cu(12): error: ...`)."""
    pattern = re.compile(re.escape(file_name) + r"\((\d+)\): (?:catastrophic )?error")
    match = pattern.search(log) or re.compile(re.escape(file_name) + r"\((\d+)\)").search(log)
    if match is None:
        return None, ""
    number = int(match.group(1))
    lines = source.splitlines()
    return number, lines[number - 1] if 0 < number <= len(lines) else ""


def _check(nvrtc: Any, result: Any, call: str) -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(result)
        raise CompileError(f"{call} failed: {text.decode() if isinstance(text, bytes) else text}")


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_resources(log: str) -> dict[str, dict[str, int]]:
    """Per kernel, from ptxas -v: registers, shared_bytes (static), spill_bytes (stored),
    spill_load_bytes and stack_bytes."""
    resources: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = {"registers": 0, "shared_bytes": 0, "spill_bytes": 0,
                       "spill_load_bytes": 0, "stack_bytes": 0}
            resources[entry.group(1)] = current
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current["stack_bytes"] = int(frame.group(1))
            current["spill_bytes"] = int(frame.group(2))
            current["spill_load_bytes"] = int(frame.group(3))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            smem = _SMEM.search(line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return resources
