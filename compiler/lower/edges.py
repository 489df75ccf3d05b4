"""The edge kernels: user NCHW images into the first block's layout (`pack_input`), and each
output back into the user's array (`unpack_output`). Only they see the user's arrays.
"""

from __future__ import annotations

import math

from cnnc.graph import INPUT, Graph
from cnnc.kernel import (
    Bin,
    Buffer,
    Const,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Schedule,
    Select,
    Stmt,
    Store,
    Var,
    less,
)
from cnnc.layouts import LANE, Layout

BLOCK = Var("block")
BATCH = Var("batch")
_POINT_VARS = ("c", "h", "w")


def point_coords(shape: tuple[int, ...], first: int = 0) -> list[Expr]:
    """The coordinates (channel first) that `point_loops` binds."""
    coords: list[Expr] = [Var(name) for name in _POINT_VARS[: len(shape)]]
    coords[0] = coords[0] + first
    return coords


def point_loops(shape: tuple[int, ...], body: list[Stmt], first: int = 0) -> list[Stmt]:
    """Loops over every point of a per-image `shape`, channels from `first`, around `body`."""
    for name, extent in reversed(list(zip(_POINT_VARS, shape))):
        body = [For(name, extent - (first if name == "c" else 0), body, role="point")]
    return body


def flat_index(shape: tuple[int, ...], coords: list[Expr]) -> Expr:
    """Row-major index of `coords` in an NCHW image of `shape`."""
    flat = coords[0]
    for dim, coord in zip(shape[1:], coords[1:]):
        flat = flat * dim + coord
    return flat


def _image(layout: Layout) -> Expr:
    """The batch index of the image the edge kernels' lane loop is at."""
    per_block = layout.images_per_block
    return BLOCK * per_block + LANE if per_block > 1 else BLOCK + LANE


def pack_input(graph: Graph, layout: Layout) -> Kernel:
    """User NCHW images into one block; images past the batch and padding channels are 0."""
    shape = graph.input_shape
    size = math.prod(shape)
    image = _image(layout)
    per_block = layout.images_per_block
    coords = point_coords(shape)
    stored = layout.index(shape, coords)
    body: list[Stmt] = [
        If(less(image, BATCH), point_loops(shape, [
            Store("packed", stored, Load("x", image * size + flat_index(shape, coords)))])),
        If(Bin("<=", BATCH, image), point_loops(shape, [Store("packed", stored, Const(0.0))])),
    ]
    loops: list[Stmt] = [For("lane", per_block, body, role="lane")]
    if per_block > 1:
        # A full block (the common case) needs no per-image test, so its transpose runs as
        # vector stores of one element of every image.
        full = Bin("<=", BLOCK * per_block + per_block, BATCH)
        element = Var("i")
        transpose = For("i", size, [For("lane", per_block, [
            Store("packed", element * per_block + LANE,
                  Load("x", image * size + element))], "vectorized", role="lane")])
        loops = [If(full, [transpose]), If(less(BATCH, BLOCK * per_block + per_block), loops)]
    floats = layout.floats(shape)
    if shape[0] == 1 < layout.channels(1):
        # One channel padded to a vector (so one image per block): each pixel's vector is
        # [value, 0, ..., 0], stored whole, instead of zeroing the block and then copying the
        # values one by one.
        width = layout.vector(1)
        pixel = Var("i")

        def every_pixel(value: Expr) -> list[Stmt]:
            return [For("i", size, [For("lane", width, [
                Store("packed", pixel * width + LANE, value)], "vectorized", role="lane")])]

        loops = [
            If(less(BLOCK, BATCH), every_pixel(
                Select(less(LANE, 1), Load("x", BLOCK * size + pixel), Const(0.0)))),
            If(Bin("<=", BATCH, BLOCK), every_pixel(Const(0.0))),
        ]
    elif layout.channels(shape[0]) > shape[0]:
        # Zero the padding channels with whole vectors first; the copy then fills the rest.
        element = Var("i")
        width = layout.vector(shape[0])
        loops.insert(0, For("i", floats // width, [
            For("lane", width, [Store("packed", element * width + LANE, Const(0.0))],
                "vectorized", role="lane")]))
    buffers = [Buffer("x", size * per_block, "input", per_image=size),
               Buffer("packed", floats, "output")]
    return Kernel("pack_input", [INPUT], buffers, loops, Schedule(), uses_batch=True)


def unpack_output(graph: Graph, output: str, index: int, offset: int, layout: Layout) -> Kernel:
    """One block of output `index` into the user's array; output k of a model with several
    starts at batch * (sizes of the outputs before it)."""
    shape = graph.shape(output)
    size = math.prod(shape)
    image = _image(layout)
    coords = point_coords(shape)
    target = BATCH * offset + image * size + flat_index(shape, coords)
    copy = point_loops(shape, [Store("y", target, Load("packed", layout.index(shape, coords)))])
    body: list[Stmt] = [For("lane", layout.images_per_block, [If(less(image, BATCH), copy)],
                            role="lane")]
    buffers = [Buffer("packed", layout.floats(shape), "input"),
               Buffer("y", size * layout.images_per_block, "output", per_image=offset + size)]
    return Kernel(f"unpack_output_{index}", [output], buffers, body, Schedule(), uses_batch=True)
