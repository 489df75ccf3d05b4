"""Winograd convolution F(m x m, 3 x 3) (Lavin and Gray, 2016) for a 3x3, stride-1, undilated,
ungrouped conv2d: a schedule choice (`Schedule.winograd`, m = 2 or 4), not another op.

Each input tile d of (m + 2)^2 points becomes V = B^T d B, is multiplied entry by entry with
the weights' U = G g G^T (transformed here at compile time) and summed over the input
channels into M, and Y = A^T M A gives the m x m outputs; the fusion template
(`template.winograd_points`) then applies the epilogue at each point.

On the CPU it runs staged, a row of tiles at a time: every input channel's V once into the
kernel's scratch (`cnnc.scratch`), then the sums M, a matrix product per entry with a register
tile of `x_block` tiles by `oc_block` channel steps, then each output tile. (Per tile, as the
GPU does, the transforms are repeated for every block of output channels, and in the
channel layout each V is computed in every lane of a vector.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnnc.kernel import (
    Assign,
    Buffer,
    Const,
    Declare,
    Expr,
    For,
    Load,
    Local,
    Schedule,
    Select,
    Stmt,
    Store,
    Var,
    all_of,
)
from cnnc.lower.context import KernelContext, in_range
from cnnc.passes.tile import WINOGRAD_TILES as TILE_SIZES
from cnnc.passes.tile import winograd_grid
from cnnc.scratch import WinogradScratch, winograd_scratch

# The transforms of Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks"
# (input B^T, weight G, output A^T), for each output tile size m.
_INPUT: dict[int, list[list[float]]] = {
    2: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    4: [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
}
_WEIGHT: dict[int, list[list[float]]] = {
    2: [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
    4: [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
}
_OUTPUT: dict[int, list[list[float]]] = {
    2: [[1, 1, 1, 0], [0, 1, -1, -1]],
    4: [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
}


def tile_size(schedule: Schedule) -> int:
    """The output tile side m of a kernel's Winograd convolution, 0 for the direct one. The
    tiling pass keeps `winograd` at 0 wherever it does not apply (`tile.winograd_tiles`)."""
    return schedule.winograd if schedule.winograd in TILE_SIZES else 0


def transformed_weights(weight: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T of each (output, input) channel pair: [out][in][m + 2][m + 2], in float64
    before the one rounding to float32."""
    g = np.asarray(_WEIGHT[m], dtype=np.float64)
    return np.einsum("ai,koij,bj->koab", g, weight.astype(np.float64), g)


def _combine(row: Sequence[float], values: Sequence[Expr]) -> Expr:
    """sum(row[i] * values[i]) without the zero terms, +-1 as additions and subtractions."""
    result: Expr | None = None
    for coefficient, value in zip(row, values):
        if coefficient == 0:
            continue
        if result is None:
            result = value if coefficient == 1 else Const(float(coefficient)) * value
        elif coefficient == 1:
            result = result + value
        elif coefficient == -1:
            result = result - value
        else:
            result = result + Const(float(coefficient)) * value
    return result if result is not None else Const(0.0)


def _sandwich(ctx: KernelContext, matrix: list[list[float]], values: list[list[Expr]],
              stmts: list[Stmt]) -> list[list[Expr]]:
    """matrix @ values @ matrix^T, each entry kept in a local (rows first: 2 n^3 terms, not
    n^4)."""
    half = [[_declared(ctx, _combine(row, [values[r][c] for r in range(len(values))]), stmts)
             for c in range(len(values[0]))] for row in matrix]
    return [[_declared(ctx, _combine(col, half[i]), stmts) for col in matrix]
            for i in range(len(matrix))]


def _declared(ctx: KernelContext, value: Expr, stmts: list[Stmt]) -> Expr:
    local = ctx.fresh("wg")
    stmts.append(Declare(local, value))
    return Local(local)


def conv2d_tile(ctx: KernelContext, node: str, channels: list[Expr], origin: list[Expr],
                m: int, stmts: list[Stmt]) -> list[Expr]:
    """The convolution's values at the m x m points from `origin` (row, column) for
    `channels`, spot-major (row by row, then channel), as the template's tiles are. Points
    past the output's edge are computed from zeros and must not be stored."""
    graph, layout = ctx.graph, ctx.layout
    in_channels = graph.shape(graph.operands(node)[0])[0]
    out_h, out_w = graph.shape(node)[1:]
    params = graph.params(node)
    n = m + 2
    packed = layout.conv_weights(transformed_weights(params["weight"], m))
    weights = ctx.param(packed)  # not the raw parameter: a trainer cannot bind it
    bias = ctx.channel_param(params["bias"]) if "bias" in params else None

    products = [[[ctx.fresh("m") for _ in range(n)] for _ in range(n)] for _ in channels]
    for grid in products:
        for row in grid:
            for name in row:
                stmts.append(Declare(name, Const(0.0)))
    ic = Var(ctx.fresh("ic"))
    update: list[Stmt] = []
    patch = _patch(ctx, ic, origin, m, (-(-out_h // m), -(-out_w // m)), update)
    transformed = _sandwich(ctx, _INPUT[m], patch, update)
    for channel, grid in zip(channels, products):
        for a in range(n):
            for b in range(n):
                index = layout.conv_weight_index(packed_shape(params["weight"], m), channel,
                                                 ic, Const(a), Const(b))
                update.append(_accumulate(grid[a][b], Load(weights, index), transformed[a][b]))
    stmts.append(For(ic.name, in_channels, update, role="reduce"))

    outputs: list[list[Expr]] = []
    for channel, grid in zip(channels, products):
        tile = _sandwich(ctx, _OUTPUT[m], [[Local(name) for name in row] for row in grid],
                         stmts)
        if bias is not None:
            tile = [[value + Load(bias, channel) for value in row] for row in tile]
        outputs.append([value for row in tile for value in row])
    return [outputs[number][spot] for spot in range(m * m) for number in range(len(channels))]


def _patch(ctx: KernelContext, ic: Expr, origin: list[Expr], m: int, grid: tuple[int, int],
           stmts: list[Stmt]) -> list[list[Expr]]:
    """The input tile of channel `ic` under the output tile at `origin` (of a `grid` of
    tiles), zero in the padding, each point declared as a local."""
    graph = ctx.graph
    node = ctx.group.producer
    source = graph.operands(node)[0]
    _, height, width = graph.shape(source)
    (top, _), (left, _) = graph.attrs(node)["padding"]
    source_buffer = ctx.input_buffer(source)
    patch: list[list[Expr]] = []
    for r in range(m + 2):
        row = origin[0] + (r - top)
        # Check only the sides a row or column can leave: the first tile's top rows in the
        # padding, the last tile's bottom rows past the input.
        row_check = _inside(row, r - top, (grid[0] - 1) * m + r - top, height)
        patch_row: list[Expr] = []
        for c in range(m + 2):
            col = origin[1] + (c - left)
            col_check = _inside(col, c - left, (grid[1] - 1) * m + c - left, width)
            inside = all_of(*(check for check in (row_check, col_check) if check is not None))
            if inside is None:
                value: Expr = Load(source_buffer, ctx.index(source, [ic, row, col]))
            else:
                safe = [Select(row_check, row, Const(0)) if row_check is not None else row,
                        Select(col_check, col, Const(0)) if col_check is not None else col]
                value = Select(inside, Load(source_buffer, ctx.index(source, [ic, *safe])),
                               Const(0.0))
            patch_row.append(_declared(ctx, value, stmts))
        patch.append(patch_row)
    return patch


# --- staged, on the CPU ------------------------------------------------------------------------

def staged_scratch(ctx: KernelContext, m: int) -> WinogradScratch:
    """The kernel's scratch (the tiling pass sized `Group.scratch` by the same geometry)."""
    graph, group = ctx.graph, ctx.group
    scratch = winograd_scratch(graph, group, ctx.layout, winograd_grid(graph, group, m))
    assert scratch.floats == group.scratch, (scratch.floats, group.scratch)
    ctx.buffers.append(Buffer(SCRATCH, scratch.floats, "scratch", parts=scratch.strips))
    ctx.bindings[SCRATCH] = group.scratch_tensor
    return scratch


SCRATCH = "ws"


def transform_inputs(ctx: KernelContext, scratch: WinogradScratch, ty: Expr,
                     strip: Expr) -> list[Stmt]:
    """V = B^T d B for every tile of row `ty` and every input channel, into the strip."""
    graph, layout = ctx.graph, ctx.layout
    in_channels = graph.shape(graph.operands(ctx.group.producer)[0])[0]
    m, n = scratch.m, scratch.m + 2
    tx, step = Var(ctx.fresh("vx")), Var(ctx.fresh("vc"))
    width = layout.vector(in_channels)
    ic = layout.tile_channels(step, 1, width)[0]
    stmts: list[Stmt] = []
    patch = _patch(ctx, ic, [ty * m, tx * m], m, (scratch.tiles_h, scratch.tiles_w), stmts)
    transformed = _sandwich(ctx, _INPUT[m], patch, stmts)
    for a in range(n):
        for b in range(n):
            stmts.append(Store(SCRATCH, scratch.transformed(strip, a * n + b, tx, ic),
                               transformed[a][b]))
    body: list[Stmt] = [For("lane", width, stmts, "vectorized", role="lane")]
    body = [For(step.name, layout.channel_steps(in_channels), body, role="channel")]
    return [For(tx.name, scratch.tiles_w, body, role="spatial")]


def multiply(ctx: KernelContext, scratch: WinogradScratch, strip: Expr) -> list[Stmt]:
    """M = sum over input channels of U * V, entry by entry: a matrix product (tiles x input
    channels by input channels x output channels) per entry, `x_block` tiles by `oc_block`
    channel steps a register tile, in the order of the direct convolution's sum."""
    graph, layout, schedule = ctx.graph, ctx.layout, ctx.schedule
    node = ctx.group.producer
    weight = graph.params(node)["weight"]
    out_channels, in_channels = weight.shape[:2]
    width = layout.vector(out_channels)
    steps = layout.channel_steps(out_channels)
    across = schedule.oc_block if steps % schedule.oc_block == 0 else 1
    tiles = schedule.x_block if scratch.tiles_w % schedule.x_block == 0 else 1
    # U as the loop reads it: entry, then input channel, then the (padded) output channels
    # in the channel layout, whose lanes are output channels; entry, output channel, input
    # channel in the batch layout, whose lanes are images.
    u = transformed_weights(weight, scratch.m).reshape(out_channels, in_channels, -1)
    if layout.images_per_block == 1:
        packed = np.zeros((u.shape[2], in_channels, scratch.out_channels))
        packed[:, :, :out_channels] = u.transpose(2, 1, 0)
    else:
        packed = u.transpose(2, 0, 1)
    weights = ctx.param(packed)  # not the raw parameter: a trainer cannot bind it

    def u_index(entry: Expr, ic: Expr, channel: Expr) -> Expr:
        if layout.images_per_block == 1:
            return (entry * in_channels + ic) * scratch.out_channels + channel
        return (entry * out_channels + channel) * in_channels + ic

    entry, tile_step, channel_step = (Var(ctx.fresh(stem)) for stem in ("e", "vt", "vo"))
    ic = Var(ctx.fresh("ic"))
    channels = layout.tile_channels(channel_step, across, width)
    points = [tile_step * tiles + j for j in range(tiles)]
    sums = [[ctx.fresh("acc") for _ in channels] for _ in points]
    stmts: list[Stmt] = [Declare(name, Const(0.0)) for row in sums for name in row]
    update: list[Stmt] = []
    taps = [_declared(ctx, Load(weights, u_index(entry, ic, channel)), update)
            for channel in channels]
    for point, row in zip(points, sums):
        value = _declared(ctx, Load(SCRATCH, scratch.transformed(strip, entry, point, ic)),
                          update)
        for name, tap in zip(row, taps):
            update.append(_accumulate(name, tap, value))
    stmts.append(For(ic.name, in_channels, update, role="reduce"))
    for point, row in zip(points, sums):
        for name, channel in zip(row, channels):
            stmts.append(Store(SCRATCH, scratch.product(strip, entry, point, channel),
                               Local(name)))
    body: list[Stmt] = [For("lane", width, stmts, "vectorized", role="lane")]
    body = [For(channel_step.name, steps // across, body, role="channel")]
    body = [For(tile_step.name, scratch.tiles_w // tiles, body, role="spatial")]
    return [For(entry.name, scratch.positions, body, role="spatial")]


def staged_tile(ctx: KernelContext, scratch: WinogradScratch, strip: Expr, tx: Expr,
                channels: list[Expr], stmts: list[Stmt]) -> list[Expr]:
    """The convolution's values at tile `tx` of the strip for `channels`, spot-major as
    `conv2d_tile`'s: Y = A^T M A plus the bias."""
    params = ctx.graph.params(ctx.group.producer)
    bias = ctx.channel_param(params["bias"]) if "bias" in params else None
    n = scratch.m + 2
    outputs: list[list[Expr]] = []
    for channel in channels:
        grid = [[_declared(ctx, Load(SCRATCH, scratch.product(strip, a * n + b, tx, channel)),
                           stmts) for b in range(n)] for a in range(n)]
        tile = _sandwich(ctx, _OUTPUT[scratch.m], grid, stmts)
        if bias is not None:
            tile = [[value + Load(bias, channel) for value in row] for row in tile]
        outputs.append([value for row in tile for value in row])
    return [outputs[number][spot] for spot in range(scratch.m ** 2)
            for number in range(len(channels))]


def packed_shape(weight: np.ndarray, m: int) -> tuple[int, int, int, int]:
    """The shape of the transformed weights, as `Layout.conv_weight_index` reads them."""
    return (weight.shape[0], weight.shape[1], m + 2, m + 2)


def _accumulate(name: str, weight: Expr, value: Expr) -> Stmt:
    return Assign(name, Local(name) + value * weight)


def _inside(coord: Expr, lowest: int, highest: int, size: int) -> Expr | None:
    """0 <= coord < size where `coord` ranges over [lowest, highest]; None when it cannot
    leave."""
    if lowest >= 0 and highest < size:
        return None
    return in_range(coord, size)
