"""`cnnc.dask.predict(model, x)`: a compiled model mapped over a Dask array of images.

Each block of `x` (chunked along N) becomes one task calling the model; the tasks carry the
model's recipe (`cnnc.pickling.ModelRef`), so each worker process compiles it once, at its
first task, with `threads` threads (1: Dask runs one task per worker thread). No scheduling
of cnnc's own: this is `map_blocks` with the output's chunks and dtype filled in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from cnnc.errors import InputError
from cnnc.graph import Graph
from cnnc.pickling import ModelRef
from cnnc.reference import check_dtype_and_shape


def predict(model: Any, x: da.Array, *, threads: int = 1) -> da.Array:
    """The model's output over `x` (N, C, H, W), a lazy float32 array chunked along N as `x`
    is. `model` is a compiled model, or a model file or Graph to compile here first (which
    checks it before any task is sent)."""
    if isinstance(model, (str, Path, Graph)):
        from cnnc.driver import compile as compile_model

        model = compile_model(model, threads=1)
    graph = model.graph
    if not isinstance(x, da.Array):
        raise InputError(f"cnnc.dask.predict expects a dask array, got {type(x).__name__}; "
                         "call the model itself on a NumPy array")
    check_dtype_and_shape(graph, x.dtype, x.shape)
    if len(model.output_shapes) != 1:
        raise InputError(f"cnnc.dask.predict maps a model with one output; '{graph.name}' has "
                         f"{len(model.output_shapes)}: map_blocks a function that picks one")
    if any(len(chunks) > 1 for chunks in x.chunks[1:]):
        x = x.rechunk({axis: -1 for axis in range(1, x.ndim)})  # a block holds whole images
    shape = tuple(model.output_shapes[0])
    rank = 1 + len(shape)
    axes: dict[str, Any] = {}
    if rank < x.ndim:
        axes["drop_axis"] = list(range(rank, x.ndim))
    elif rank > x.ndim:
        axes["new_axis"] = list(range(x.ndim, rank))
    # `meta` keeps Dask from calling the model on an empty block here to learn the output.
    return x.map_blocks(ModelRef.of(model, threads), dtype=np.float32,
                        chunks=(x.chunks[0], *((size,) for size in shape)),
                        meta=np.empty((0,) * rank, np.float32), token=f"cnnc-{graph.name}",
                        **axes)
