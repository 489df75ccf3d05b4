"""Winograd convolution F(m x m, 3 x 3) (Lavin and Gray, 2016) for a 3x3, stride-1, undilated,
ungrouped conv2d: a schedule choice (`Schedule.winograd`, m = 2 or 4), not another op.

Per output tile of m x m points and input channel, the (m + 2)^2 input patch d becomes
V = B^T d B once and serves every output channel of the register tile; the products
M += U ⊙ V, with U = G g G^T transformed here at compile time, then give Y = A^T M A. The
fusion template (`template.winograd_points`) loops over tiles and applies the epilogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnnc.kernel import (
    Assign,
    Const,
    Declare,
    Expr,
    For,
    Load,
    Local,
    Schedule,
    Select,
    Stmt,
    Var,
    all_of,
)
from cnnc.lower.context import KernelContext, in_range
from cnnc.passes.tile import WINOGRAD_TILES as TILE_SIZES

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
    source = graph.operands(node)[0]
    in_channels, height, width = graph.shape(source)
    (top, _), (left, _) = graph.attrs(node)["padding"]
    out_h, out_w = graph.shape(node)[1:]
    params = graph.params(node)
    n = m + 2
    packed = layout.conv_weights(transformed_weights(params["weight"], m))
    weights = ctx.param(packed)  # not the raw parameter: a trainer cannot bind it
    bias = ctx.channel_param(params["bias"]) if "bias" in params else None
    source_buffer = ctx.input_buffer(source)

    products = [[[ctx.fresh("m") for _ in range(n)] for _ in range(n)] for _ in channels]
    for grid in products:
        for row in grid:
            for name in row:
                stmts.append(Declare(name, Const(0.0)))
    ic = Var(ctx.fresh("ic"))
    update: list[Stmt] = []
    patch: list[list[Expr]] = []
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    for r in range(n):
        row = origin[0] + (r - top)
        # Check only the sides a row or column can leave: the first tile's top rows in the
        # padding, the last tile's bottom rows past the input.
        row_check = _inside(row, r - top, (tiles_h - 1) * m + r - top, height)
        patch_row: list[Expr] = []
        for c in range(n):
            col = origin[1] + (c - left)
            col_check = _inside(col, c - left, (tiles_w - 1) * m + c - left, width)
            inside = all_of(*(check for check in (row_check, col_check) if check is not None))
            if inside is None:
                value: Expr = Load(source_buffer, ctx.index(source, [ic, row, col]))
            else:
                safe = [Select(row_check, row, Const(0)) if row_check is not None else row,
                        Select(col_check, col, Const(0)) if col_check is not None else col]
                value = Select(inside, Load(source_buffer, ctx.index(source, [ic, *safe])),
                               Const(0.0))
            patch_row.append(_declared(ctx, value, update))
        patch.append(patch_row)
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
