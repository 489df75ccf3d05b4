"""The fusion template: a fused group computes, at each output point, producer -> elementwise
ops -> window -> elementwise ops, and stores the result.

The producer is an anchor op's rule (`anchors.PRODUCERS`) or a load; elementwise ops and
windows lower by the rules in their specs (`OpSpec.lower`, `OpSpec.window`); ops that stand
alone use `standalone.KERNELS`. The group's schedule only shapes the loops.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.kernel import (
    Assign,
    Buffer,
    Const,
    Declare,
    Expr,
    For,
    Kernel,
    Load,
    Local,
    Select,
    Stmt,
    Store,
    Var,
    all_of,
    less,
)
from cnnc.lower import winograd
from cnnc.lower.anchors import PRODUCERS
from cnnc.lower.context import KernelContext, guarded, in_range, pairs
from cnnc.lower.standalone import KERNELS
from cnnc.passes.tile import (
    is_broadcast_conv,
    is_pointwise_conv,
    pool_factor,
    row_tiles_fit,
    window_rows_tiled,
)
from cnnc.scratch import WinogradScratch


def build(ctx: KernelContext) -> Kernel:
    """The kernel of the context's group."""
    group, graph = ctx.group, ctx.graph
    standalone = KERNELS.get(graph.op(group.producer))
    body = standalone(ctx) if standalone else pointwise(ctx)
    ctx.buffers.append(Buffer("out", ctx.layout.floats(graph.shape(group.output)), "output"))
    ctx.bindings["out"] = group.output
    return Kernel(group.name, list(group.nodes), ctx.buffers, body, ctx.schedule)


def pointwise(ctx: KernelContext) -> list[Stmt]:
    """Loops over the output points; one iteration computes a register tile of `oc_block`
    channels (or channel vectors) by `x_block` neighbouring points of a row, each through
    producer -> elementwise -> window -> elementwise, then stores them."""
    graph, group, layout, schedule = ctx.graph, ctx.group, ctx.layout, ctx.schedule
    out_shape = graph.shape(group.output)
    # In the channel layout a "channel" of the loop is a vector of channels.
    width = layout.vector(out_shape[0])
    steps = layout.channel_steps(out_shape[0])
    anchor = ops.OPS[graph.op(group.producer)].kind == "anchor"
    block = schedule.oc_block if anchor else 1
    groups = graph.attrs(group.producer).get("groups", 1)
    if steps % block or layout.tile_straddles_group(out_shape[0], groups, block):
        block = 1  # a block must not straddle the end, or a group where a tap serves a tile
    channels = layout.tile_channels(Var("cb"), block, width)
    tile = winograd.tile_size(schedule)
    if tile and ctx.group.scratch:
        return winograd_staged(ctx, tile)
    if tile:
        inner = winograd_points(ctx, channels, tile)
        return [For("cb", steps // block, inner, role="channel")]
    names = ["y", "x"][: len(out_shape) - 1]
    spatial: list[Expr] = [Var(name) for name in names]
    across = schedule.x_block if spatial and out_shape[-1] % schedule.x_block == 0 \
        and row_tiles_fit(ctx.graph, ctx.group) else 1
    spots = [spatial[:-1] + [spatial[-1] * across + i] for i in range(across)] if spatial \
        else [[]]
    outputs, inner = point_values(ctx, channels, spots)
    for (spot, channel), value in zip(pairs(spots, channels), outputs):
        inner.append(Store("out", ctx.index(group.output, [channel, *spot]), value))
    body: list[Stmt] = [For("lane", width, inner, "vectorized", role="lane")]
    extents = list(out_shape[1:])
    if extents:
        extents[-1] //= across
    if _rows_outside(ctx):
        body = [For(names[1], extents[1], body, role="spatial")]
        body = [For("cb", steps // block, body, role="channel")]
        return [For(names[0], extents[0], body, role="spatial")]
    if _points_outside(ctx):
        body = [For("cb", steps // block, body, role="channel")]
        for name, extent in reversed(list(zip(names, extents))):
            body = [For(name, extent, body, role="spatial")]
        return body
    for name, extent in reversed(list(zip(names, extents))):
        body = [For(name, extent, body, role="spatial")]
    return [For("cb", steps // block, body, role="channel")]


def _rows_outside(ctx: KernelContext) -> bool:
    """A convolution of the batch layout (`tile.is_broadcast_conv`) loops over rows outside
    its channel blocks and over the points of a row inside them: the input rows that one
    output row reads (a few hundred KB) then stay in L2 while every block of output channels
    reads them, and one block's weights stay in L1 (measured: vgg_bn's 32x32 convolution of
    32 channels, whose input and output pass L2, from 86 % to 90 % of the peak)."""
    shape = ctx.graph.shape(ctx.group.output)
    return len(shape) == 3 and is_broadcast_conv(ctx.graph, ctx.group.producer, ctx.layout)


def _points_outside(ctx: KernelContext) -> bool:
    """A 1x1 convolution in the batch layout loops over points outside its channel blocks:
    a point's input (every input channel of a block's images, a few KB) then stays in L1
    while every block of output channels reads it, instead of the whole image block's input
    (MBs, past L2) being read again for each (measured: NiN's 1x1 layers at batch 64 ran at
    15-20 % of the peak with the channel blocks outside)."""
    layout, group = ctx.layout, ctx.group
    return (layout.kind == "batch" and layout.images_per_block > 1
            and group.window is None and is_pointwise_conv(ctx.graph, group.producer))


def winograd_staged(ctx: KernelContext, m: int) -> list[Stmt]:
    """A Winograd kernel on the CPU, row by row of tiles: the inputs' transforms, their
    products with the weights' (both into the kernel's scratch), then each tile's output
    transform and epilogue (`winograd_points`), a vector of channels at a time."""
    graph, layout = ctx.graph, ctx.layout
    scratch = winograd.staged_scratch(ctx, m)
    ty = Var("ty")
    strip = ty if scratch.strips > 1 else Const(0)
    body = winograd.transform_inputs(ctx, scratch, ty, strip)
    body += winograd.multiply(ctx, scratch, strip)
    out_channels = graph.shape(ctx.group.output)[0]
    channels = layout.tile_channels(Var("cb"), 1, layout.vector(out_channels))
    body.append(For("cb", layout.channel_steps(out_channels),
                    winograd_points(ctx, channels, m, (scratch, strip)), role="channel"))
    return [For(ty.name, scratch.tiles_h, body, role="spatial")]


def winograd_points(ctx: KernelContext, channels: list[Expr], m: int,
                    staged: tuple[WinogradScratch, Expr] | None = None) -> list[Stmt]:
    """The loops over the output tiles of a Winograd kernel (`winograd.tile_size` is m): one
    iteration computes the convolution's m x m tile for the channels, then the elementwise
    ops, the pooling window (which tiles it: `tile.pool_factor`) and the elementwise ops
    after it at each point. Tiles that overhang the output's edge store only their points
    inside; the epilogue's loads there read the edge's points instead, as the stores skip
    them. `staged` (the scratch and its strip): the tiles of one row, from the sums there."""
    graph, group = ctx.graph, ctx.group
    conv_h, conv_w = graph.shape(group.producer)[1:]
    out_h, out_w = graph.shape(group.output)[1:]
    factor = pool_factor(graph, group)
    side = m // factor  # points of the group's output per tile side
    ty, tx = Var("ty"), Var("tx")
    stmts: list[Stmt] = []
    if staged is None:
        values = winograd.conv2d_tile(ctx, group.producer, channels, [ty * m, tx * m], m,
                                      stmts)
    else:
        values = winograd.staged_tile(ctx, *staged, tx, channels, stmts)
    conv_spots = [[_clamped(ty * m + i, conv_h, m), _clamped(tx * m + j, conv_w, m)]
                  for i in range(m) for j in range(m)]
    window = group.window
    split = group.nodes.index(window) if window else len(group.nodes)
    head, post = group.nodes[1:split], group.nodes[split + 1:]
    values = elementwise(ctx, head, values, channels, conv_spots, stmts)
    if window is not None:
        rule = ops.OPS[graph.op(window)].window
        assert rule is not None  # `pool_factor` checked it
        results: dict[tuple[int, int, int], Expr] = {}
        for i, j, number in itertools.product(range(side), range(side), range(len(channels))):
            result: Expr = Const(rule.init)
            # In the window's order, as the direct kernel combines them: the same sum.
            for wy in range(factor):
                for wx in range(factor):
                    spot = (i * factor + wy) * m + j * factor + wx
                    result = rule.combine(result, values[spot * len(channels) + number])
            if rule.average:
                result = result / float(factor * factor)
            local = ctx.fresh("pool")
            stmts.append(Declare(local, result))
            results[(i, j, number)] = Local(local)
        values = [results[(i, j, number)] for i in range(side) for j in range(side)
                  for number in range(len(channels))]
    spots = [[ty * side + i, tx * side + j] for i in range(side) for j in range(side)]
    safe = [[_clamped(row, out_h, side), _clamped(col, out_w, side)] for row, col in spots]
    values = elementwise(ctx, post, values, channels, safe, stmts)
    for ((spot, channel), value, (row, col)) in zip(pairs(safe, channels), values,
                                                    [s for s in spots for _ in channels]):
        store: list[Stmt] = [Store("out", ctx.index(group.output, [channel, *spot]), value)]
        stmts += guarded(store, all_of(*_overhang(row, col, out_h, out_w, side)))
    body: list[Stmt] = [For("lane", ctx.layout.vector(graph.shape(group.output)[0]), stmts,
                            "vectorized", role="lane")]
    body = [For(tx.name, -(-out_w // side), body, role="spatial")]
    if staged is not None:
        return body
    return [For(ty.name, -(-out_h // side), body, role="spatial")]


def _clamped(coord: Expr, size: int, side: int) -> Expr:
    """`coord`, or the last point where it may be past it (a tile of `side` points that
    overhangs a size that is not a whole number of tiles)."""
    return coord if size % side == 0 else Select(less(coord, size), coord, Const(size - 1))


def _overhang(row: Expr, col: Expr, out_h: int, out_w: int, side: int) -> list[Expr]:
    """The checks a tile's store needs: on the sides whose size is not a whole number of
    tiles."""
    return [less(coord, size) for coord, size in ((row, out_h), (col, out_w)) if size % side]


def _window_attrs(ctx: KernelContext, window: str) -> dict[str, Any]:
    """The window's attributes; a whole-image window as the pooling window it is."""
    if ops.OPS[ctx.graph.op(window)].window.whole_image:  # type: ignore[union-attr]
        _, height, width = ctx.graph.shape(ctx.graph.operands(window)[0])
        return {"kernel_size": (height, width), "stride": (1, 1),
                "padding": ((0, 0), (0, 0)), "count_include_pad": True}
    return ctx.graph.attrs(window)


def window_block(ctx: KernelContext, window: str, spots: int) -> int:
    """Points of a window row computed together: in a kernel that pools its whole image into
    one point, `x_block` tiles the rows of the pooled image instead (a register tile of
    channels by points of the producer, as in a kernel without a window); a whole window
    row where the schedule's tile holds them (`tile.window_rows_tiled`); else 1."""
    if window_rows_tiled(ctx.graph, ctx.group, ctx.layout):
        return int(ctx.graph.attrs(window)["kernel_size"][1])
    if spots != 1 or not ops.OPS[ctx.graph.op(window)].window.whole_image:  # type: ignore[union-attr]
        return 1
    width = ctx.graph.shape(ctx.graph.operands(window)[0])[-1]
    return ctx.schedule.x_block if width % ctx.schedule.x_block == 0 else 1


def point_values(ctx: KernelContext, channels: list[Expr], spots: list[list[Expr]]
                 ) -> tuple[list[Expr], list[Stmt]]:
    """Statements computing the group's output at `spots` x `channels`, and the values
    (spot-major)."""
    group = ctx.group
    window = group.window
    split = group.nodes.index(window) if window else len(group.nodes)
    head, post = group.nodes[:split], group.nodes[split + 1:]
    stmts: list[Stmt] = []
    if window is None:
        values = produce(ctx, head, channels, spots, stmts)
    else:
        values = pool(ctx, window, head, channels, spots, stmts)
    return elementwise(ctx, post, values, channels, spots, stmts), stmts


def produce(ctx: KernelContext, nodes: list[str], channels: list[Expr], spots: list[list[Expr]],
            stmts: list[Stmt]) -> list[Expr]:
    """The values of the last of `nodes` (a producer and elementwise ops) at the points."""
    producer = nodes[0]
    rule = PRODUCERS.get(ctx.graph.op(producer))
    if rule is not None:
        values = rule(ctx, producer, channels, spots, stmts)
        rest = nodes[1:]
    else:  # an elementwise op reading its first operand
        source = ctx.graph.operands(producer)[0]
        values = [Load(ctx.input_buffer(source), ctx.index(source, [channel, *spot]))
                  for spot, channel in pairs(spots, channels)]
        rest = nodes
    return elementwise(ctx, rest, values, channels, spots, stmts)


def pool(ctx: KernelContext, window: str, head: list[str], channels: list[Expr],
         spots: list[list[Expr]], stmts: list[Stmt]) -> list[Expr]:
    """The window op's reduction over the values `head` computes around each point."""
    graph = ctx.graph
    rule = ops.OPS[graph.op(window)].window
    if rule is None:
        raise NotImplementedError(f"no window rule for op {graph.op(window)}")
    source = graph.operands(window)[0]
    _, height, width = graph.shape(source)
    attrs = _window_attrs(ctx, window)
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    (top, _), (left, _) = attrs["padding"]
    results = [ctx.fresh("pool") for _ in pairs(spots, channels)]
    for result in results:
        stmts.append(Declare(result, Const(rule.init)))
    wy, wx = Var(ctx.fresh("wy")), Var(ctx.fresh("wx"))
    across = window_block(ctx, window, len(spots))
    inner_spots = [[spot[0] * sh + wy - top, spot[1] * sw + wx * across + step - left]
                   for spot in spots for step in range(across)]
    inner: list[Stmt] = []
    if head:
        values = produce(ctx, head, channels, inner_spots, inner)
    else:
        values = [Load(ctx.input_buffer(source), ctx.index(source, [channel, *spot]))
                  for spot, channel in pairs(inner_spots, channels)]
    # The window's points are combined in the order of the plain loop: the same sum.
    for number, value in enumerate(values):
        spot, channel = divmod(number, len(channels))
        result = results[spot // across * len(channels) + channel]
        inner.append(Assign(result, rule.combine(Local(result), value)))
    out_h, out_w = graph.shape(window)[1:]
    if not row_tiles_fit(ctx.graph, ctx.group):  # then there is one spot: guard it
        row, col = inner_spots[0]
        inner = guarded(inner, all_of(in_range(row, height), in_range(col, width)))
    stmts.append(For(wy.name, kh, [For(wx.name, kw // across, inner, "serial", role="window")],
                     "serial", role="window"))
    if not rule.average:
        return [Local(result) for result in results]
    divisor = _avg_divisors(attrs, height, width, out_h, out_w)
    if np.all(divisor == divisor.flat[0]):
        return [Local(result) / float(divisor.flat[0]) for result in results]
    table = ctx.param(divisor.astype(np.float32))
    return [Local(result) / Load(table, spot[0] * out_w + spot[1])
            for result, (spot, _) in zip(results, pairs(spots, channels))]


def elementwise(ctx: KernelContext, nodes: list[str], values: list[Expr], channels: list[Expr],
                spots: list[list[Expr]], stmts: list[Stmt]) -> list[Expr]:
    """Apply the elementwise `nodes` in order, each by its spec's rule over the fused value,
    its other operands and its per-channel parameters; each result is kept in a local."""
    graph, group = ctx.graph, ctx.group
    for node in nodes:
        spec = ops.OPS[graph.op(node)]
        if spec.lower is None:
            raise NotImplementedError(f"no lowering for elementwise op {spec.name}")
        per_channel = [] if spec.channel_params is None else [
            ctx.channel_param(values) for values in spec.channel_params(graph.attrs(node),
                                                                         graph.params(node))]
        # The operand that is the fused value comes first; the others are loaded.
        chain = group.nodes[group.nodes.index(node) - 1] if node != group.producer else None
        operands = graph.operands(node)
        skip = operands.index(chain) if chain in operands else 0
        others = [operand for position, operand in enumerate(operands) if position != skip]
        updated: list[Expr] = []
        for (spot, channel), value in zip(pairs(spots, channels), values):
            loaded = [Load(ctx.input_buffer(operand), ctx.index(operand, [channel, *spot]))
                      for operand in others]
            operands = [value, *loaded, *(Load(name, channel) for name in per_channel)]
            result = spec.lower(operands, graph.attrs(node)) if spec.lower_attrs \
                else spec.lower(operands)
            local = ctx.fresh("t")
            stmts.append(Declare(local, result))
            updated.append(Local(local))
        values = updated
    return values


def _avg_divisors(attrs: dict[str, Any], height: int, width: int, out_h: int,
                  out_w: int) -> np.ndarray:
    """PyTorch's divisor of each average-pooling window: the window clipped to the padded
    input (count_include_pad) or to the input itself."""
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    (top, bottom), (left, right) = attrs["padding"]
    divisors = np.zeros((out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            y0, x0 = oy * sh - top, ox * sw - left
            y1, x1 = min(y0 + kh, height + bottom), min(x0 + kw, width + right)
            if not attrs["count_include_pad"]:
                y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
            divisors[oy, ox] = (y1 - y0) * (x1 - x0)
    return divisors
