"""Batch norm in training mode, as kernels of a training step: the only op whose value at one
image depends on the others, so it splits the step into stages.

Forward: a whole-batch kernel per channel (`statistics`) sums the batch's values, then the
squares of their distances from the mean (two passes: no cancellation), and moves the running
statistics as PyTorch does (momentum, unbiased variance); a per-block kernel (`normalise`)
applies them. Backward: a whole-batch kernel (`reduce_gradient`) sums g and g * x^ per channel,
which are the gradients of the bias and the weight, and a per-block kernel (`input_gradient`)
gives x's. Lanes past the batch are masked out of every sum and get no gradient (`valid`).
Eval mode (`evaluate`) reads the running statistics at run time, so the trained model can be
scored between epochs without compiling again.
"""

from __future__ import annotations

import math

from cnnc.kernel import (
    Assign,
    Buffer,
    Call,
    Const,
    Declare,
    Expr,
    For,
    Kernel,
    Load,
    Local,
    Stmt,
    Store,
    Var,
)
from cnnc.training.kernels import BATCH, ITEM, LANE, at, lanes

# hyper[COUNT] is the number of images of this step, as a float
COUNT = 2


def _channel_points(shape: tuple[int, ...]) -> tuple[int, int]:
    channels, height, width = shape
    return channels, height * width


def _over_batch(blocks: int, width: int, area: int, body: list[Stmt], sums: tuple[str, ...]
                ) -> list[Stmt]:
    """`body` at each point p of channel ITEM of each block b of the batch. Each of `sums`
    is summed per block first (`body` adds to "<sum>_block"), then over the blocks: sums of
    a few thousand terms, not of a whole batch's, which keeps batch norm's gradient, a
    difference of such sums, accurate for large batches."""
    from cnnc.kernel import If, less

    opened = [Declare(f"{name}_block", Const(0.0)) for name in sums]
    folded = [Assign(name, Local(name) + Local(f"{name}_block")) for name in sums]
    return [For("b", blocks, [If(less(Var("b") * width, BATCH), [
        *opened, For("p", area, body, role="reduce"), *folded])], role="reduce")]


def statistics(name: str, layer: str, shape: tuple[int, ...], eps: float, momentum: float,
               width: int, blocks: int, block_floats: int, x_offset: int, valid_offset: int
               ) -> Kernel:
    """Channel ITEM: mean and 1 / sqrt(biased variance + eps) into `stats`, and the running
    statistics moved towards the batch's."""
    _, area = _channel_points(shape)

    def value(offset: int, point: Expr) -> Expr:
        return Load("acts", Var("b") * block_floats + offset + at(point, width))

    x = value(x_offset, ITEM * area + Var("p"))
    valid = Load("acts", Var("b") * block_floats + valid_offset + Var(LANE))
    count = Load("hyper", Const(COUNT)) * float(area)
    body: list[Stmt] = [
        Declare("total", Const(0.0)),
        lanes(width, [Declare("sum", Const(0.0)),
                      *_over_batch(blocks, width, area, [
                          Assign("sum_block", Local("sum_block") + valid * x)], ("sum",)),
                      Assign("total", Local("total") + Local("sum"))]),
        Declare("mean", Local("total") / count),
        Declare("spread", Const(0.0)),
        lanes(width, [Declare("squares", Const(0.0)),
                      *_over_batch(blocks, width, area, [
                          Declare("d", x - Local("mean")),
                          Assign("squares_block", Local("squares_block")
                                 + valid * (Local("d") * Local("d")))], ("squares",)),
                      Assign("spread", Local("spread") + Local("squares"))]),
        Declare("var", Local("spread") / count),
        Store("stats", ITEM, Local("mean")),
        Store("stats", ITEM + shape[0], Const(1.0) / Call("sqrt", Local("var") + eps)),
        Store("running_mean", ITEM, Load("running_mean", ITEM) * (1 - momentum)
              + Local("mean") * momentum),
        Store("running_var", ITEM, Load("running_var", ITEM) * (1 - momentum)
              + Local("spread") / (count - 1.0) * momentum),
    ]
    buffers = [Buffer("acts", blocks * block_floats, "input"), Buffer("hyper", 3, "input"),
               Buffer("stats", 2 * shape[0], "output"),
               Buffer("running_mean", shape[0], "inout"),
               Buffer("running_var", shape[0], "inout")]
    return Kernel(name, [layer], buffers, body, uses_batch=True)


def _per_channel(shape: tuple[int, ...], width: int, head: list[Stmt], point: list[Stmt]
                 ) -> list[Stmt]:
    channels, area = _channel_points(shape)
    return [For("c", channels, head + [For("p", area, [lanes(width, point)], role="point")],
                role="channel")]


def _index(area: int, width: int) -> Expr:
    return at(Var("c") * area + Var("p"), width)


def normalise(name: str, layer: str, shape: tuple[int, ...], width: int,
              then: list[tuple[str, dict, int]] | None = None) -> Kernel:
    """y = (x - mean) * invstd * weight + bias, over this step's statistics; then each of
    `then` (op, attrs, how many more operands it reads: an add's "o0", "o1", ...) applied to
    that value, in the same pass."""
    from cnnc import ops

    channels, area = _channel_points(shape)
    c = Var("c")
    head: list[Stmt] = [Declare("scale", Load("stats", c + channels) * Load("weight", c)),
                        Declare("shift", Load("bias", c) - Load("stats", c) * Local("scale"))]
    index = _index(area, width)
    value: Expr = Load("x", index) * Local("scale") + Local("shift")
    extra = 0
    for op, attrs, count in then or []:
        spec = ops.OPS[op]
        assert spec.lower is not None
        operands = [value, *(Load(f"o{extra + k}", index) for k in range(count))]
        extra += count
        value = spec.lower(operands, attrs) if spec.lower_attrs else spec.lower(operands)
    body = _per_channel(shape, width, head, [Store("y", index, value)])
    buffers = _buffers(shape, width, layer, ("stats", 2 * channels))
    buffers += [Buffer(f"o{k}", math.prod(shape) * width, "input") for k in range(extra)]
    return Kernel(name, [layer], buffers, body)


def evaluate(name: str, layer: str, shape: tuple[int, ...], eps: float, width: int) -> Kernel:
    """Eval mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias."""
    channels, area = _channel_points(shape)
    c = Var("c")
    head: list[Stmt] = [
        Declare("scale", Load("weight", c) / Call("sqrt", Load("running_var", c) + eps)),
        Declare("shift", Load("bias", c) - Load("running_mean", c) * Local("scale"))]
    index = _index(area, width)
    body = _per_channel(shape, width, head, [
        Store("y", index, Load("x", index) * Local("scale") + Local("shift"))])
    buffers = _buffers(shape, width, layer, ("running_mean", channels),
                       ("running_var", channels))
    return Kernel(name, [layer], buffers, body)


def _buffers(shape: tuple[int, ...], width: int, layer: str, *extra: tuple[str, int]
             ) -> list[Buffer]:
    floats = math.prod(shape) * width
    channels = shape[0]
    return [Buffer("x", floats, "input"), Buffer("y", floats, "output"),
            Buffer("weight", channels, "input"), Buffer("bias", channels, "input"),
            *(Buffer(buffer, size, "input") for buffer, size in extra)]


def reduce_gradient(name: str, layer: str, shape: tuple[int, ...], width: int, blocks: int,
                    block_floats: int, x_offset: int, g_offset: int) -> Kernel:
    """Channel ITEM: grad_bias = sum of g, grad_weight = sum of g * x^ over the batch (the
    lanes past it have g = 0)."""
    channels, area = _channel_points(shape)

    def value(offset: int) -> Expr:
        return Load("acts", Var("b") * block_floats + offset + at(ITEM * area + Var("p"),
                                                                   width))

    normalised = (value(x_offset) - Load("stats", ITEM)) * Load("stats", ITEM + channels)
    body: list[Stmt] = [
        Declare("tb", Const(0.0)), Declare("tw", Const(0.0)),
        lanes(width, [Declare("gb", Const(0.0)), Declare("gw", Const(0.0)),
                      *_over_batch(blocks, width, area, [
                          Declare("g", value(g_offset)),
                          Assign("gb_block", Local("gb_block") + Local("g")),
                          Assign("gw_block", Local("gw_block") + Local("g") * normalised)],
                          ("gb", "gw")),
                      Assign("tb", Local("tb") + Local("gb")),
                      Assign("tw", Local("tw") + Local("gw"))]),
        Store("grad_bias", ITEM, Local("tb")), Store("grad_weight", ITEM, Local("tw"))]
    buffers = [Buffer("acts", blocks * block_floats, "input"),
               Buffer("stats", 2 * channels, "input"),
               Buffer("grad_weight", channels, "output"), Buffer("grad_bias", channels, "output")]
    return Kernel(name, [layer], buffers, body, uses_batch=True)


def input_gradient(name: str, layer: str, shape: tuple[int, ...], width: int) -> Kernel:
    """gx = valid * weight * invstd * (g - grad_bias / n - x^ * grad_weight / n), n the values
    per channel in the batch."""
    channels, area = _channel_points(shape)
    c = Var("c")
    count = Load("hyper", Const(COUNT)) * float(area)
    head: list[Stmt] = [
        Declare("invstd", Load("stats", c + channels)),
        Declare("scale", Load("weight", c) * Local("invstd")),
        Declare("mean_g", Load("grad_bias", c) / count),
        Declare("mean_gx", Load("grad_weight", c) / count)]
    index = _index(area, width)
    normalised = (Load("x", index) - Load("stats", c)) * Local("invstd")
    point: list[Stmt] = [Store("gx", index, Load("valid", Var(LANE)) * Local("scale") * (
        Load("g", index) - Local("mean_g") - normalised * Local("mean_gx")))]
    floats = math.prod(shape) * width
    buffers = [Buffer("x", floats, "input"), Buffer("g", floats, "input"),
               Buffer("gx", floats, "output"), Buffer("valid", width, "input"),
               Buffer("weight", channels, "input"), Buffer("stats", 2 * channels, "input"),
               Buffer("grad_weight", channels, "input"), Buffer("grad_bias", channels, "input"),
               Buffer("hyper", 3, "input")]
    return Kernel(name, [layer], buffers, _per_channel(shape, width, head, point))
