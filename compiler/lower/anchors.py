"""The lowering rules of the anchor ops, conv2d and dense: the product-sum that starts a fused
kernel, over a register tile of output channels by points, into accumulators.

Registered by op name in `PRODUCERS`; what differs between layouts (weight packing, where a
tap's weight is) the layout answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cnnc.kernel import (
    Assign,
    Const,
    Declare,
    Expr,
    For,
    Load,
    Local,
    Select,
    Stmt,
    Var,
    substitute,
)
from cnnc.layouts import LANE, ChannelLayout
from cnnc.lower.context import KernelContext, floordiv, guarded, in_range, pairs
from cnnc.passes.fuse import tensor_of

# (context, node, channels of the tile, its points, statements so far) -> the tile's values
Producer = Callable[[KernelContext, str, list[Expr], list[list[Expr]], list[Stmt]], list[Expr]]


def _bias(ctx: KernelContext, node: str, params: dict[str, np.ndarray]) -> str | None:
    return ctx.channel_param(params["bias"], f"{node}.bias") if "bias" in params else None


def conv2d(ctx: KernelContext, node: str, channels: list[Expr], spots: list[list[Expr]],
           stmts: list[Stmt]) -> list[Expr]:
    graph, layout = ctx.graph, ctx.layout
    attrs = graph.attrs(node)
    params = graph.params(node)
    source = graph.operands(node)[0]
    in_channels, height, width = graph.shape(source)
    out_channels = graph.shape(node)[0]
    groups = attrs["groups"]
    per_group_in, per_group_out = in_channels // groups, out_channels // groups
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel_size"], attrs["stride"], attrs["dilation"]
    (top, bottom), (left, right) = attrs["padding"]
    weight = params["weight"]
    packed_weight = layout.conv_weights(weight)
    weights = ctx.param(packed_weight, f"{node}.weight" if packed_weight is weight else "")
    bias = _bias(ctx, node, params)
    source_buffer = ctx.input_buffer(source)

    accumulators = [ctx.fresh("acc") for _ in pairs(spots, channels)]
    for (_, channel), acc in zip(pairs(spots, channels), accumulators):
        stmts.append(Declare(acc, Load(bias, channel) if bias else Const(0.0)))
    ic, ky, kx = Var(ctx.fresh("ic")), Var(ctx.fresh("ky")), Var(ctx.fresh("kx"))
    row = spots[0][0] * sh + ky * dh - top  # one row for the whole tile
    # Each weight is loaded once and used at every point of the tile.
    taps = [ctx.fresh("w") for _ in channels]
    update: list[Stmt] = []
    for channel, tap in zip(channels, taps):
        index = layout.conv_weight_index(weight.shape, channel, ic, ky, kx)
        update.append(Declare(tap, Load(weights, index)))
    for number, spot in enumerate(spots):
        col = spot[1] * sw + kx * dw - left
        # Which input channel a tap reads: one load serves the tile unless its lanes may be
        # in groups of their own.
        sources = layout.tap_channels(channels, groups, in_channels, out_channels)
        pixels = [ctx.fresh("v") for _ in sources]
        point: list[Stmt] = []
        for channel, pixel in zip(sources, pixels):
            in_channel: Expr = ic
            if groups > 1:
                group_index = channel if per_group_out == 1 else floordiv(channel, per_group_out)
                in_channel = group_index * per_group_in + ic
            if left or right:
                # A tap in the padding reads a safe place and counts as zero: no branch
                # per point (and adding 0 * w leaves the sum as skipping it would).
                inside = in_range(col, width)
                safe = Select(inside, col, Const(0))
                value: Expr = Select(inside, Load(source_buffer, ctx.index(
                    source, [in_channel, row, safe])), Const(0.0))
            else:  # the output size keeps every tap inside the input
                value = Load(source_buffer, ctx.index(source, [in_channel, row, col]))
            point.append(Declare(pixel, value))
        for position, tap in enumerate(taps):
            pixel = pixels[position if len(pixels) > 1 else 0]
            acc = accumulators[number * len(channels) + position]
            point.append(Assign(acc, Local(acc) + Local(pixel) * Local(tap)))
        update += point
    row_loop = [For(kx.name, kw, update, ctx.reduce_kind(kw), role="reduce")]
    row_check = in_range(row, height) if top or bottom else None
    stmts.append(For(ic.name, per_group_in, [
        For(ky.name, kh, guarded(row_loop, row_check), ctx.reduce_kind(kh), role="reduce"),
    ], role="reduce"))
    return [Local(acc) for acc in accumulators]


def dense(ctx: KernelContext, node: str, channels: list[Expr], spots: list[list[Expr]],
          stmts: list[Stmt]) -> list[Expr]:
    graph, layout = ctx.graph, ctx.layout
    params = graph.params(node)
    source = graph.operands(node)[0]
    features = graph.shape(source)[0]
    units = graph.shape(node)[0]
    bias = _bias(ctx, node, params)
    source_buffer = ctx.input_buffer(source)
    accumulators = [ctx.fresh("acc") for _ in channels]
    for channel, acc in zip(channels, accumulators):
        stmts.append(Declare(acc, Load(bias, channel) if bias else Const(0.0)))
    pixel = ctx.fresh("v")
    if isinstance(layout, ChannelLayout):
        # Weights [feature][units]: one vector load gives a vector of units. The input is
        # read feature by feature in NCHW flatten order, skipping padding channels.
        stored = graph.shape(tensor_of(graph, source))
        area = math.prod(stored[1:])
        padded = layout.channels(units)
        packed = np.zeros((features, padded))
        packed[:, :units] = params["weight"].T
        # With several register tiles of units, each tile's weights are contiguous
        # ([tile][feature][units of the tile]): a tile reading a part of every [feature]
        # row had the prefetchers fetch the rest too (measured: 9216->128 at 2 and 4 tiles,
        # 1.9x slower than at one).
        span = len(channels) * layout.vector(units)
        if span < padded:
            packed = packed.reshape(features, padded // span, span).transpose(1, 0, 2)
        weights = ctx.param(packed)
        start = substitute(channels[0], {LANE.name: Const(0)})  # the tile's first unit
        ci, point = Var(ctx.fresh("ci")), Var(ctx.fresh("p"))
        feature = ci * area + point
        update: list[Stmt] = [Declare(pixel, Load(source_buffer, point * layout.channels(
            stored[0]) + ci))]
        for channel, acc in zip(channels, accumulators):
            tap = feature * padded + channel if span == padded else \
                feature * span + channel + start * (features - 1)
            update.append(Assign(acc, Local(acc) + Local(pixel) * Load(weights, tap)))
        stmts.append(For(ci.name, stored[0], [For(point.name, area, update, role="reduce")],
                         role="reduce"))
        return [Local(acc) for acc in accumulators]
    weights = ctx.param(params["weight"], f"{node}.weight")
    k = Var(ctx.fresh("k"))
    # The flattened input is the same memory as the 4-D tensor it views.
    update = [Declare(pixel, Load(source_buffer, layout.index((features,), [k])))]
    for channel, acc in zip(channels, accumulators):
        update.append(Assign(acc, Local(acc) + Local(pixel) * Load(weights, channel * features
                                                                    + k)))
    stmts.append(For(k.name, features, update, role="reduce"))
    return [Local(acc) for acc in accumulators]


PRODUCERS: dict[str, Producer] = {"conv2d": conv2d, "dense": dense}
