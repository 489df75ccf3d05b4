"""Parameters of a model: read from a `.npz` weights file or drawn from a seed.

Weights files are read with `allow_pickle=False`: a file is data, never code. Every array is
checked (present, float32, the right shape, finite) and every key must belong to a layer.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.errors import CnncError

ParamShapes = dict[str, dict[str, tuple[int, ...]]]  # layer name -> parameter -> shape
Fail = Callable[[str, str | None], Exception]  # (message, layer) -> the error to raise


def read_weights(path: Path, shapes: ParamShapes, fail: Fail) -> dict[str, dict[str, np.ndarray]]:
    """The parameters named `<layer>.<parameter>` in the archive at `path`.

    Every member's .npy header is read and checked (dtype, shape) before its data, so that a
    header claiming a huge array, or an object array that needs pickle, is refused before any
    memory is allocated for it."""
    if not path.exists():
        raise fail(f"weights file '{path}' does not exist", None)
    if path.is_dir():
        raise fail(f"weights file '{path}' is a directory, expected a .npz archive", None)
    if not path.is_file() or not zipfile.is_zipfile(path):
        # np.load would try a lone .npy array or a pickle instead
        raise fail(f"weights file '{path}' is not a .npz archive (a zip of named arrays)", None)
    try:
        with zipfile.ZipFile(path) as archive:
            headers = _read_headers(archive, path, fail)
            arrays = _read_arrays(archive, headers, shapes, path, fail)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as error:
        if isinstance(error, CnncError):  # already says what is wrong
            raise
        raise fail(f"weights file '{path}' is not a readable .npz archive: {error}", None) \
            from None

    params: dict[str, dict[str, np.ndarray]] = {}
    for layer, expected in shapes.items():
        params[layer] = {}
        for param, shape in expected.items():
            key = f"{layer}.{param}"
            if key not in arrays:
                raise fail(f"weights file '{path.name}' lacks '{key}' (float32 {list(shape)})",
                           layer)
            array = arrays.pop(key)
            if isinstance(array, _Header):
                array = array.refuse(key, path, shape, fail, layer)
            if array.dtype != np.float32:
                raise fail(f"'{key}' in '{path.name}' has dtype {array.dtype}, expected float32",
                           layer)
            if array.shape != shape:
                raise fail(f"'{key}' in '{path.name}' has shape {list(array.shape)}, "
                           f"expected {list(shape)}", layer)
            if not np.isfinite(array).all():
                raise fail(f"'{key}' in '{path.name}' holds NaN or infinite values", layer)
            params[layer][param] = np.ascontiguousarray(array)
    if arrays:
        unused = ", ".join(f"'{key}'" for key in sorted(arrays))
        raise fail(f"weights file '{path.name}' has keys that no layer uses: {unused}", None)
    return params


@dataclass
class _Header:
    """A member's .npy header: what the array would be, before any of its data is read."""

    member: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool

    def refuse(self, key: str, path: Path, shape: tuple[int, ...], fail: Fail,
               layer: str) -> np.ndarray:
        """Raise the error for a member that was not read because it does not fit."""
        if self.dtype != np.float32:
            raise fail(f"'{key}' in '{path.name}' has dtype {self.dtype}, expected float32",
                       layer)
        raise fail(f"'{key}' in '{path.name}' has shape {list(self.shape)}, expected "
                   f"{list(shape)}", layer)


def _read_headers(archive: zipfile.ZipFile, path: Path, fail: Fail) -> dict[str, _Header]:
    headers: dict[str, _Header] = {}
    for member in archive.namelist():
        if member.endswith("/"):
            continue
        key = member[:-4] if member.endswith(".npy") else member
        with archive.open(member) as file:
            try:
                version = np.lib.format.read_magic(file)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
                elif version == (2, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
                else:
                    raise ValueError(f".npy format version {version[0]}.{version[1]} is not "
                                     "supported")
            except (ValueError, EOFError) as error:
                raise ValueError(f"member '{member}' is not a .npy array ({error})") from None
        if dtype.hasobject:
            raise fail(f"weights file '{path}' cannot be read safely: Object arrays cannot be "
                       f"loaded when allow_pickle=False ('{key}' holds Python objects, which "
                       "only pickle can read)", None)
        headers[key] = _Header(member, dtype, tuple(shape), fortran_order)
    return headers


def _read_arrays(archive: zipfile.ZipFile, headers: dict[str, _Header], shapes: ParamShapes,
                 path: Path, fail: Fail) -> dict[str, np.ndarray | _Header]:
    """The data of the members a layer expects with the dtype and shape it expects; the
    header alone for the others (they are reported without being read)."""
    expected = {f"{layer}.{param}": shape for layer, params in shapes.items()
                for param, shape in params.items()}
    arrays: dict[str, np.ndarray | _Header] = {}
    for key, header in headers.items():
        if header.dtype != np.float32 or header.shape != expected.get(key, header.shape) \
                or key not in expected:
            arrays[key] = header
            continue
        with archive.open(header.member) as file:
            arrays[key] = np.lib.format.read_array(file, allow_pickle=False)
    return arrays


def init_from_seed(seed: int, shapes: ParamShapes) -> dict[str, dict[str, np.ndarray]]:
    """Parameters drawn as PyTorch initialises them: uniform in ±1/sqrt(fan_in) for weights
    and biases, and the identity (1, 0, mean 0, variance 1) for batch norm."""
    rng = np.random.default_rng(seed)
    params: dict[str, dict[str, np.ndarray]] = {}
    for layer, expected in shapes.items():
        if "running_var" in expected:
            channels = expected["weight"]
            params[layer] = {
                "weight": np.ones(channels, np.float32),
                "bias": np.zeros(channels, np.float32),
                "running_mean": np.zeros(channels, np.float32),
                "running_var": np.ones(channels, np.float32),
            }
            continue
        # a layer without a weight (channel_mul, channel_add) draws its values in ±1
        bound = 1 / math.sqrt(math.prod(expected["weight"][1:])) if "weight" in expected else 1
        params[layer] = {
            param: rng.uniform(-bound, bound, shape).astype(np.float32)
            for param, shape in expected.items()
        }
    return params
