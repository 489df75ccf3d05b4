"""A convolution's weight gradient and the sum of the blocks' shares of it, in the kernel IR.

gW[o, c, ky, kx] sums g[o, y, x] * x[c, y * sh + ky * dh - top, x * sw + kx * dw - left] over
every image and output point. Where an image has many output points, or the conv is strided
(its input is larger than its output), each block computes its share in the backward stage
right after its g is made (x and g are then in cache, and each input is read once per block,
not once per output channel); `block_sum` then adds the shares in block order. Elsewhere one
whole-batch kernel per `weight_tile` of output channels reads every block: each weight's
lanes are then added once per batch, not once per block. Either way no sum depends on the
threads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnnc.kernel import (
    Assign,
    Bin,
    Buffer,
    Const,
    Declare,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Local,
    Stmt,
    Store,
    Var,
    less,
)
from cnnc.training.kernels import BATCH, ITEM, LANE, OPTIMIZER_CHUNK, at, lanes, weight_tile

# Output points per image from which a block's share pays for adding its lanes per block
SHARE_POINTS = 256
ACROSS = 2  # output points of a row that one step of the loop takes
# a block's share reads x and g from these buffers (not named as the loops' variables)
BUFFERS = {"x": "source", "g": "grad"}


@dataclass(frozen=True)
class Batch:
    """A whole-batch kernel's view of the blocks: x and g at these offsets in each."""

    blocks: int
    block_floats: int
    x_offset: int
    g_offset: int


def per_block(attrs: dict, out_shape: tuple[int, ...]) -> bool:
    """Whether each block computes its share of the gradient (else one whole-batch kernel)."""
    return attrs["stride"] != (1, 1) or out_shape[1] * out_shape[2] >= SHARE_POINTS


def _segments(size: int, out: int, stride: int, kernel: int, dilation: int, pad: int
              ) -> list[tuple[int, int, tuple[int, ...]]]:
    """The output coordinates as runs [first, end) in which the same taps stay inside the
    input, with those taps: a run needs no guard and skips the taps that read padding."""
    runs: list[tuple[int, int, tuple[int, ...]]] = []
    for coord in range(out):
        taps = tuple(k for k in range(kernel) if 0 <= coord * stride + k * dilation - pad < size)
        if runs and runs[-1][2] == taps:
            runs[-1] = (runs[-1][0], coord + 1, taps)
        else:
            runs.append((coord, coord + 1, taps))
    return runs


def conv_weight_gradient(name: str, layer: str, attrs: dict, in_shape: tuple[int, ...],
                         out_shape: tuple[int, ...], has_bias: bool, width: int,
                         batch: Batch | None = None) -> Kernel:
    """With `batch` None, one block's share (buffers source, grad, gw, gb; its output channels in a
    loop); else item `item`'s `weight_tile` output channels over every block (buffer acts).
    Every tap of one input channel at once: one load of each g and each x serves the whole
    tile, with one accumulator per channel and tap (enough independent sums to fill the FMA
    pipes); the border runs of points leave out the taps that read padding."""
    channels, height, wide = in_shape
    outs, out_h, out_w = out_shape
    groups = attrs["groups"]
    per_in, per_out = channels // groups, outs // groups
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel_size"], attrs["stride"], attrs["dilation"]
    (top, _), (left, _) = attrs["padding"]
    taps = [(ky, kx) for ky in range(kh) for kx in range(kw)]
    tile = weight_tile(per_out, len(taps))
    y, x, ci = Var("y"), Var("x"), Var("ci")
    first: Expr = ITEM * tile if batch else Var("o") * tile  # the tile's first output channel
    c = Bin("//", first, Const(per_out)) * per_in + ci
    # a block's sums apart from the batch's (accurate for large batches) where registers allow
    part = "_b" if batch and tile * len(taps) <= 24 else ""

    def load(tensor: str, point: Expr) -> Expr:
        if batch is None:
            return Load(BUFFERS[tensor], at(point, width))
        offset = batch.x_offset if tensor == "x" else batch.g_offset
        return Load("acts", Var("b") * batch.block_floats + offset + at(point, width))

    def over_blocks(body: list[Stmt]) -> list[Stmt]:
        if batch is None:
            return body
        return [For("b", batch.blocks, [If(less(Var("b") * width, BATCH), body)],
                    role="reduce")]

    def points(rows: tuple[int, int, tuple[int, ...]], cols: tuple[int, int, tuple[int, ...]]
               ) -> list[Stmt]:
        """The run's points, `across` neighbours in a row at a time when the taps overlap
        (kw > sw): an input value two of them read is loaded once."""
        (row0, row1, taps_y), (col0, col1, taps_x) = rows, cols
        across = ACROSS if len(taps_x) * dw > sw and col1 - col0 >= ACROSS else 1
        pairs, rest = divmod(col1 - col0, across)
        loops: list[Stmt] = []
        for count, step, start in ((pairs, across, col0), (rest, 1, col0 + pairs * across)):
            if not count:
                continue
            row, col = y + row0, x * step + start
            update: list[Stmt] = [
                Declare(f"gv{t}_{n}", load("g", ((first + t) * out_h + row) * out_w + col + n))
                for n in range(step) for t in range(tile)]
            loaded: set[tuple[int, int]] = set()
            for ky in taps_y:
                for n in range(step):
                    for kx in taps_x:
                        column = n * sw + kx * dw  # from the first point's leftmost tap
                        if (ky, column) not in loaded:
                            loaded.add((ky, column))
                            iy, ix = row * sh + ky * dh - top, col * sw + column - left
                            update.append(Declare(f"xv{ky}_{column}",
                                                  load("x", (c * height + iy) * wide + ix)))
                        for t in range(tile):
                            acc = f"a{t}_{ky}_{kx}{part}"
                            update.append(Assign(acc, Local(acc) + Local(f"gv{t}_{n}")
                                                 * Local(f"xv{ky}_{column}")))
            loops.append(For(y.name, row1 - row0, [For(x.name, count, update, role="reduce")],
                             role="reduce"))
        return loops

    runs_y = _segments(height, out_h, sh, kh, dh, top)
    runs_x = _segments(wide, out_w, sw, kw, dw, left)
    # the inside first: the accumulators' sums start with the bulk of their terms
    order_y = sorted(runs_y, key=lambda run: -len(run[2]))
    order_x = sorted(runs_x, key=lambda run: -len(run[2]))
    spatial = [stmt for rows in order_y for cols in order_x if rows[2] and cols[2]
               for stmt in points(rows, cols)]
    sums = [(t, ky, kx) for t in range(tile) for ky, kx in taps]
    if part:
        spatial = [*(Declare(f"a{t}_{ky}_{kx}{part}", Const(0.0)) for t, ky, kx in sums),
                   *spatial,
                   *(Assign(f"a{t}_{ky}_{kx}", Local(f"a{t}_{ky}_{kx}") +
                            Local(f"a{t}_{ky}_{kx}{part}")) for t, ky, kx in sums)]
    inner: list[Stmt] = [Declare(f"t{t}_{ky}_{kx}", Const(0.0)) for t, ky, kx in sums]
    inner.append(lanes(width, [*(Declare(f"a{t}_{ky}_{kx}", Const(0.0)) for t, ky, kx in sums),
                               *over_blocks(spatial),
                               *(Assign(f"t{t}_{ky}_{kx}", Local(f"t{t}_{ky}_{kx}") +
                                        Local(f"a{t}_{ky}_{kx}")) for t, ky, kx in sums)]))
    inner += [Store("gw", (((first + t) * per_in + ci) * kh + ky) * kw + kx,
                    Local(f"t{t}_{ky}_{kx}")) for t, ky, kx in sums]
    body: list[Stmt] = []
    if has_bias:
        for t in range(tile):
            g = load("g", ((first + t) * out_h + y) * out_w + x)
            body += [Declare(f"tb{t}", Const(0.0)), lanes(width, [
                Declare(f"ab{t}", Const(0.0)),
                *over_blocks([For(y.name, out_h, [For(x.name, out_w, [
                    Assign(f"ab{t}", Local(f"ab{t}") + g)], role="reduce")], role="reduce")]),
                Assign(f"tb{t}", Local(f"tb{t}") + Local(f"ab{t}"))]),
                Store("gb", first + t, Local(f"tb{t}"))]
    body.append(For(ci.name, per_in, inner, role="channel"))
    if batch is None:
        buffers = [Buffer(BUFFERS["x"], math.prod(in_shape) * width, "input"),
                   Buffer(BUFFERS["g"], math.prod(out_shape) * width, "input")]
        body = [For("o", outs // tile, body, role="channel")]
    else:
        buffers = [Buffer("acts", batch.blocks * batch.block_floats, "input")]
    buffers.append(Buffer("gw", outs * per_in * kh * kw, "output"))
    if has_bias:
        buffers.append(Buffer("gb", outs, "output"))
    return Kernel(name, [layer], buffers, body, uses_batch=batch is not None)


def block_sum(name: str, floats: int, width: int, blocks: int, block_floats: int,
              offset: int) -> Kernel:
    """Chunk `item` of the gradients that the blocks computed shares of (at `offset` in each
    block, laid out as the gradients): the shares added in block order, so that no sum
    depends on which thread computed which block."""
    j = Var("j")
    index = (ITEM * (OPTIMIZER_CHUNK // width) + j) * width + Var(LANE)
    body: list[Stmt] = [
        Declare("total", Const(0.0)),
        For("b", blocks, [If(less(Var("b") * width, BATCH), [Assign("total", Local("total") + Load(
            "acts", Var("b") * block_floats + offset + index))])], role="reduce"),
        Store("grads", index, Local("total"))]
    buffers = [Buffer("acts", blocks * block_floats, "input"),
               Buffer("grads", floats, "output")]
    return Kernel(name, ["gradients"], buffers, [For(j.name, OPTIMIZER_CHUNK // width, [
        lanes(width, body)], role="point")], uses_batch=True)
