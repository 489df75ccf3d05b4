"""The NumPy reference: runs an op graph op by op, the oracle every compiled target must match.

It is written to be obviously right, not fast: each op is computed in float64 by the registry's
reference function and the outputs are rounded to float32 once, at the end. It never fuses or
tiles, and it imports nothing from the passes or the backends. `evaluate` is the one loop that
interprets a graph; the fuzzer hooks into it to round or perturb what each op reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from cnnc import ops
from cnnc.errors import BatchMemoryError, InputError
from cnnc.graph import INPUT, Graph, format_shape


def check_dtype_and_shape(graph: Graph, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """InputError unless an array of `dtype` and `shape` is a batch of the model's input (any
    real or boolean type converts to float32)."""
    if dtype.kind not in "fiub":
        raise InputError(f"model '{graph.name}' expects a float array "
                         f"{format_shape(graph.input_shape)}, got dtype {dtype}")
    if len(shape) != 1 + len(graph.input_shape) or tuple(shape[1:]) != graph.input_shape:
        raise InputError(f"model '{graph.name}' expects input {format_shape(graph.input_shape)}"
                         f", got shape ({', '.join(map(str, shape))})")


def check_input(graph: Graph, x: object, bytes_per_image: int | None = None) -> np.ndarray:
    """`x` as a C-contiguous float32 array of shape (N, *graph.input_shape), or InputError.

    `bytes_per_image` is what the caller will allocate per image besides (by default, the
    outputs): with the copy of `x` this makes, a batch that needs more memory than the
    machine has available raises BatchMemoryError before anything is allocated."""
    try:
        array = np.asarray(x)
    except (ValueError, TypeError) as error:  # a ragged nested list, an odd object
        raise InputError(f"model '{graph.name}' expects a float array "
                         f"{format_shape(graph.input_shape)}, got {type(x).__name__} that is "
                         f"not an array ({error})") from None
    check_dtype_and_shape(graph, array.dtype, array.shape)
    copies = not (array.dtype == np.float32 and array.flags.c_contiguous)
    per_image = (4 * math.prod(graph.input_shape) if copies else 0) + (
        output_bytes(graph) if bytes_per_image is None else bytes_per_image)
    check_memory(graph, len(array), per_image)
    with np.errstate(over="ignore"):  # values beyond float32's range become ±inf
        return np.ascontiguousarray(array, dtype=np.float32)


def output_bytes(graph: Graph) -> int:
    """Bytes of the outputs of one image."""
    return 4 * sum(math.prod(graph.shape(name)) for name in graph.outputs)


CHECKED_BYTES = 1 << 26  # smaller needs are not worth reading /proc/meminfo for


def check_memory(graph: Graph, batch: int, bytes_per_image: int) -> None:
    """BatchMemoryError, before anything is allocated, when `batch` images at
    `bytes_per_image` need more memory than is available."""
    needed = batch * bytes_per_image
    if needed <= CHECKED_BYTES:
        return
    available = available_memory()
    if available is not None and needed > available:
        raise BatchMemoryError(
            f"model '{graph.name}': a batch of {batch} images needs {needed / 2**30:.1f} GiB "
            f"({bytes_per_image} bytes per image), more than the {available / 2**30:.1f} GiB "
            "of memory available; run it in smaller batches")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for text in info:
                if text.startswith("MemAvailable:"):
                    return int(text.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def reference(model: Graph | str | os.PathLike[str], x: object
              ) -> np.ndarray | tuple[np.ndarray, ...]:
    """Run `model` (a Graph, or the path of a model file) on `x` (N, C, H, W); one output
    gives an array, several a tuple."""
    if isinstance(model, Graph):
        graph = model
    elif isinstance(model, (str, os.PathLike)):
        from cnnc.frontend import load  # a frontend reads files; the oracle only runs graphs

        graph = load(model)
    else:
        raise TypeError(f"reference() takes a Graph or the path of a model file, got "
                        f"{type(model).__name__}")
    # Every value is kept, in float64: that is what a batch costs here.
    per_image = 8 * sum(math.prod(graph.shape(name)) for name in graph.order())
    array = check_input(graph, x, per_image)
    if len(array) == 0:  # nothing to compute; some ops' NumPy code cannot reshape nothing
        outputs = tuple(np.empty((0, *graph.shape(name)), np.float32) for name in graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs
    outputs64 = evaluate(graph, array.astype(np.float64))
    with np.errstate(over="ignore"):  # a float64 result beyond float32's range is ±inf
        outputs = tuple(output.astype(np.float32) for output in outputs64)
    return outputs[0] if len(outputs) == 1 else outputs


Adjust = Callable[[str, np.ndarray], np.ndarray]


def evaluate(graph: Graph, x64: np.ndarray, each: Adjust | None = None
             ) -> tuple[np.ndarray, ...]:
    """The outputs of `graph` on the float64 batch `x64`, each op computed in float64.

    `each(key, value)`, when given, sees every value an op reads, at each read, and returns
    the value to use instead: an operand under its node's name (the input as INPUT), a
    parameter (as float64) as "node.param". The fuzzer rounds or perturbs them there to
    see what float32 arithmetic could fairly give; `reference()` passes none."""
    values: dict[str, np.ndarray] = {INPUT: x64}
    for name in graph.order():
        if name == INPUT:
            continue
        spec = ops.OPS[graph.op(name)]
        with np.errstate(over="ignore", invalid="ignore"):
            operands = [values[operand] for operand in graph.operands(name)]
            params = graph.params(name)
            if each is not None:
                operands = [each(operand, value)
                            for operand, value in zip(graph.operands(name), operands)]
                params = {key: each(f"{name}.{key}", value.astype(np.float64))
                          for key, value in params.items()}
            values[name] = spec.compute(graph.attrs(name), params, operands)
    return tuple(values[name] for name in graph.outputs)
