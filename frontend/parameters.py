"""Parameters of a model: read from a `.npz` weights file or drawn from a seed.

Weights files are read with `allow_pickle=False`: a file is data, never code. Every array is
checked (present, float32, the right shape, finite) and every key must belong to a layer.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

ParamShapes = dict[str, dict[str, tuple[int, ...]]]  # layer name -> parameter -> shape
Fail = Callable[[str, str | None], Exception]  # (message, layer) -> the error to raise


def read_weights(path: Path, shapes: ParamShapes, fail: Fail) -> dict[str, dict[str, np.ndarray]]:
    """The parameters named `<layer>.<parameter>` in the archive at `path`."""
    if not path.exists():
        raise fail(f"weights file '{path}' does not exist", None)
    if path.is_dir():
        raise fail(f"weights file '{path}' is a directory, expected a .npz archive", None)
    if not zipfile.is_zipfile(path):  # np.load would try a lone .npy array or a pickle instead
        raise fail(f"weights file '{path}' is not a .npz archive (a zip of named arrays)", None)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise fail(f"weights file '{path}' holds one array, expected a .npz archive "
                           "of named arrays", None)
            arrays = {key: archive[key] for key in archive.files}
    except ValueError as error:  # object arrays need pickle, which we refuse
        raise fail(f"weights file '{path}' cannot be read safely: {error}", None) from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise fail(f"weights file '{path}' is not a readable .npz archive: {error}", None) from None

    params: dict[str, dict[str, np.ndarray]] = {}
    for layer, expected in shapes.items():
        params[layer] = {}
        for param, shape in expected.items():
            key = f"{layer}.{param}"
            if key not in arrays:
                raise fail(f"weights file '{path.name}' lacks '{key}' (float32 {list(shape)})",
                           layer)
            array = arrays.pop(key)
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
        bound = 1 / math.sqrt(math.prod(expected["weight"][1:]))
        params[layer] = {
            param: rng.uniform(-bound, bound, shape).astype(np.float32)
            for param, shape in expected.items()
        }
    return params
