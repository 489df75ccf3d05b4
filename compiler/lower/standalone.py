"""The lowering rules of the ops that make a kernel of their own (softmax, log_softmax,
concat, pad, and flatten in the channel layout), registered by op name in `KERNELS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cnnc.kernel import (
    Assign,
    Bin,
    Call,
    Const,
    Declare,
    Expr,
    For,
    Load,
    Local,
    Select,
    Stmt,
    Store,
    Var,
    maximum,
)
from cnnc.lower.context import KernelContext, in_range
from cnnc.lower.edges import flat_index, point_coords, point_loops


def softmax(ctx: KernelContext, log: bool = False) -> list[Stmt]:
    """Softmax over channels at each point: max, sum of exponentials, then divide (or, for
    log_softmax, subtract the max and the log of the sum)."""
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
    ]
    if log:
        logarithm = ctx.fresh("log")
        inner += log_of_sum(Local(total), shape[0], logarithm)
        result: Expr = value - Local(top) - Local(logarithm)
    else:
        result = Call("exp", value - Local(top)) / Local(total)
    inner.append(For("c", shape[0], [Store("out", ctx.index(node, [channel, *spatial]), result)],
                     role="channel"))
    # The sums run over channels, so only the batch layout has lanes to vectorise.
    body: list[Stmt] = [For("lane", ctx.layout.images_per_block, inner, "vectorized",
                            role="lane")]
    for var, extent in reversed(list(zip(spatial, shape[1:]))):
        body = [For(var.name, extent, body, role="spatial")]
    return body


def log_of_sum(total: Expr, channels: int, name: str) -> list[Stmt]:
    """`name` = log(total) for a total in [1, channels] (a sum of exponentials whose largest
    term is 1), through exp only, as the IR has no log: Halley's iteration
    y += 2 (s - e^y) / (s + e^y), which moves y by less than 2 a step and then triples its
    correct digits. Starting from 2 (s - 1) / (s + 1), log(channels) / 2 + 3 steps reach
    float32's precision (a NaN or infinite total stays NaN or infinite)."""
    steps = math.ceil(math.log(max(channels, 1)) / 2) + 3
    stmts: list[Stmt] = [Declare(name, (total - 1.0) * 2.0 / (total + 1.0))]
    for _ in range(steps):
        power = Call("exp", Local(name))
        stmts.append(Assign(name, Local(name) + (total - power) * 2.0 / (total + power)))
    return stmts


def log_softmax(ctx: KernelContext) -> list[Stmt]:
    return softmax(ctx, log=True)


def pad(ctx: KernelContext) -> list[Stmt]:
    """Each output point reads its input point, or is the pad value outside the input: a
    safe place is read there (no branch per point), as conv2d's padding does."""
    node = ctx.group.producer
    source = ctx.graph.operands(node)[0]
    _, height, width = ctx.graph.shape(source)
    attrs = ctx.graph.attrs(node)
    (top, _), (left, _) = attrs["pads"]
    channel, row, col = point_coords(ctx.graph.shape(node))
    row, col = row - top, col - left
    inside = Bin("and", in_range(row, height), in_range(col, width))
    read = Load(ctx.input_buffer(source), ctx.index(source, [
        channel, Select(inside, row, Const(0)), Select(inside, col, Const(0))]))
    store = Store("out", ctx.index(node, point_coords(ctx.graph.shape(node))),
                  Select(inside, read, Const(float(attrs["value"]))))
    lanes = For("lane", ctx.layout.images_per_block, [store], "vectorized", role="lane")
    return point_loops(ctx.graph.shape(node), [lanes])


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
    "softmax": softmax, "concat": concat, "flatten": flatten, "log_softmax": log_softmax,
    "pad": pad,
}
