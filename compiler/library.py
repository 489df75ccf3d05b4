"""`cnnc.load_library(DIR)`: run a library written by `cnnc compile -o DIR` from Python.

The way to ship a model to machines without LLVM: the library's `NAME_forward` is called
through ctypes, and every call is checked against the shapes in `NAME.h` first, so the
library never sees a buffer of the wrong size. It pickles as its directory and the SHA-256
of its `.so`: a worker loads the same file from the same path, or fails clearly.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.errors import CnncError, InputError


def load_library(directory: str | Path, name: str | None = None) -> LibraryModel:
    """The model exported into `directory` (NAME.so and NAME.h); `name` picks one where the
    directory holds several."""
    folder = Path(directory)
    if not folder.is_dir():
        raise CnncError(f"'{folder}' is not a directory written by `cnnc compile -o`")
    if name is None:
        names = sorted(path.stem for path in folder.glob("*.h")
                       if (folder / f"{path.stem}.so").is_file())
        if len(names) != 1:
            found = ", ".join(names) or "none"
            raise CnncError(f"'{folder}' must hold exactly one NAME.so with its NAME.h "
                            f"(found: {found}); pass name=")
        name = names[0]
    return LibraryModel(folder, name)


class LibraryModel:
    """An exported model called like a compiled one on a float array (N, C, H, W); it runs
    on the calling thread (ctypes releases the GIL, so threads run calls side by side)."""

    def __init__(self, directory: Path, name: str, sha256: str | None = None) -> None:
        header, library = directory / f"{name}.h", directory / f"{name}.so"
        for path in (header, library):
            if not path.is_file():
                raise CnncError(f"'{path}' does not exist: write it with "
                                f"`cnnc compile MODEL --target llvm -o {directory}`")
        self.directory = directory
        self.name = name
        self.sha256 = hashlib.sha256(library.read_bytes()).hexdigest()
        if sha256 is not None and sha256 != self.sha256:
            raise CnncError(f"'{library}' is not the library that was pickled (sha256 "
                            f"{sha256[:12]}... expected, {self.sha256[:12]}... found)")
        self.input_shape, self.output_shapes = _read_header(header, name)
        self._sizes = [math.prod(shape) for shape in self.output_shapes]
        try:
            forward = getattr(ctypes.CDLL(str(library.resolve())), f"{name}_forward")
        except (OSError, AttributeError) as error:
            raise CnncError(f"cannot load '{library}': {error}") from None
        forward.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
        forward.restype = ctypes.c_int
        self._forward = forward

    def __call__(self, x: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        array = np.asarray(x)
        expected = "(N, " + ", ".join(map(str, self.input_shape)) + ")"
        if array.dtype.kind not in "fiub":
            raise InputError(f"library '{self.name}' expects a float array {expected}, got "
                             f"dtype {array.dtype}")
        if array.shape[1:] != self.input_shape or array.ndim != 1 + len(self.input_shape):
            raise InputError(f"library '{self.name}' expects input {expected}, got shape "
                             f"({', '.join(map(str, array.shape))})")
        array = np.ascontiguousarray(array, dtype=np.float32)
        batch = len(array)
        output = np.empty(batch * sum(self._sizes), np.float32)
        if batch and self._forward(array.ctypes.data, output.ctypes.data, batch) != 0:
            raise MemoryError(f"library '{self.name}' ran out of memory at batch {batch}")
        outputs, start = [], 0
        for size, shape in zip(self._sizes, self.output_shapes):
            outputs.append(output[start: start + batch * size].reshape(batch, *shape))
            start += batch * size
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __reduce__(self) -> tuple[Any, ...]:
        return LibraryModel, (self.directory, self.name, self.sha256)

    def __repr__(self) -> str:
        return f"LibraryModel('{self.directory / self.name}.so', input {self.input_shape})"


def _read_header(header: Path, name: str) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The input shape and output shapes that `NAME.h` declares."""
    text = header.read_text(errors="replace")
    macro = name.upper()

    def shape(what: str) -> tuple[int, ...]:
        found = re.search(rf"#define {macro}_{what}_SHAPE \{{([\d, ]*)\}}", text)
        if found is None:
            raise CnncError(f"'{header}' lacks {macro}_{what}_SHAPE: not a header cnnc wrote")
        return tuple(int(dim) for dim in found.group(1).split(",") if dim.strip())

    count = re.search(rf"#define {macro}_OUTPUTS (\d+)", text)
    if count is None:
        raise CnncError(f"'{header}' lacks {macro}_OUTPUTS: not a header cnnc wrote")
    return shape("INPUT"), [shape(f"OUTPUT{index}") for index in range(int(count.group(1)))]
