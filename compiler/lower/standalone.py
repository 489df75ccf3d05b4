"""The lowering rules of the ops that make a kernel of their own (softmax, concat, and
flatten in the channel layout), registered by op name in `KERNELS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cnnc.kernel import Assign, Call, Const, Declare, For, Load, Local, Stmt, Store, Var, maximum
from cnnc.lower.context import KernelContext
from cnnc.lower.edges import flat_index, point_coords, point_loops


def softmax(ctx: KernelContext) -> list[Stmt]:
    """Softmax over channels at each point: max, sum of exponentials, then divide."""
    node = ctx.group.producer
    source = ctx.graph.operands(node)[0]
    shape = ctx.graph.shape(node)
    buffer = ctx.input_buffer(source)
    spatial = [Var("y"), Var("x")][: len(shape) - 1]
    channel = Var("c")
    value = Load(buffer, ctx.index(source, [channel, *spatial]))
    top, total = ctx.fresh("max"), ctx.fresh("sum")
    inner: list[Stmt] = [
        Declare(top, Const(-math.inf)),
        For("c", shape[0], [Assign(top, maximum(Local(top), value))], role="reduce"),
        Declare(total, Const(0.0)),
        For("c", shape[0], [Assign(total, Local(total) + Call("exp", value - Local(top)))],
            role="reduce"),
        For("c", shape[0], [Store("out", ctx.index(node, [channel, *spatial]),
                                  Call("exp", value - Local(top)) / Local(total))],
            role="channel"),
    ]
    # The sums run over channels, so only the batch layout has lanes to vectorise.
    body: list[Stmt] = [For("lane", ctx.layout.images_per_block, inner, "vectorized",
                            role="lane")]
    for var, extent in reversed(list(zip(spatial, shape[1:]))):
        body = [For(var.name, extent, body, role="spatial")]
    return body


def concat(ctx: KernelContext) -> list[Stmt]:
    """Copy each operand's channels into its place in the output."""
    node = ctx.group.producer
    body: list[Stmt] = []
    start = 0
    for operand in ctx.graph.operands(node):
        shape = ctx.graph.shape(operand)
        buffer = ctx.input_buffer(operand)
        coords = point_coords(shape)
        target = [coords[0] + start, *coords[1:]]
        copy = Store("out", ctx.index(node, target), Load(buffer, ctx.index(operand, coords)))
        lanes = For("lane", ctx.layout.images_per_block, [copy], "vectorized", role="lane")
        body += point_loops(shape, [lanes])
        start += shape[0]
    return body


def flatten(ctx: KernelContext) -> list[Stmt]:
    """A flattening copy, for the channel layout: element (c, h, w) of the image goes to
    feature (c * H + h) * W + w, as NumPy's reshape orders them."""
    node = ctx.group.producer
    source = ctx.graph.operands(node)[0]
    shape = ctx.graph.shape(source)
    coords = point_coords(shape)
    copy = Store("out", ctx.index(node, [flat_index(shape, coords)]),
                 Load(ctx.input_buffer(source), ctx.index(source, coords)))
    lanes = For("lane", ctx.layout.images_per_block, [copy], "vectorized", role="lane")
    return point_loops(shape, [lanes])


KERNELS: dict[str, Callable[[KernelContext], list[Stmt]]] = {
    "softmax": softmax, "concat": concat, "flatten": flatten,
}
