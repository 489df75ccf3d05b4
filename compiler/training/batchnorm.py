"""Batch norm in training mode, as kernels of a training step: the only op whose value at one
image depends on the others, so it splits the step into stages.

Forward: each block's share of the statistics (`block_statistics`: per channel and image,
the mean and the spread about it, two passes over values still in cache) right after the
kernel that made x; a whole-batch kernel per channel (`statistics`) merges the shares in block
order and moves the running statistics as PyTorch does; a per-block kernel (`normalise`)
applies them. Backward: each block's share of the sums of g and g * x^ (`block_gradient_sums`)
right after g is made, merged per channel (`reduce_gradient`: the bias's and the weight's
gradients), then x's gradient per block (`input_gradient`); a relu (or other activation whose
rule reads only its output) right after batch norm runs inside those two kernels. Lanes past
the batch are masked out of every sum and get no gradient (`valid`).
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


def _over_batch(blocks: int, width: int, body: list[Stmt]) -> list[Stmt]:
    """`body` for each block b that holds an image of the batch, in block order."""
    from cnnc.kernel import If, less

    return [For("b", blocks, [If(less(Var("b") * width, BATCH), body)], role="reduce")]


def _part(channel: Expr, width: int) -> Expr:
    """Where a channel's per-lane partial is in a block's partials (two rows of channels)."""
    return channel * width + Var(LANE)


def block_statistics(name: str, layer: str, shape: tuple[int, ...], width: int) -> Kernel:
    """This block's share of the statistics, per channel and lane (one image), 0 in the
    lanes past the batch: the mean m of its values, the mean of their distances from m (m's
    rounding, which the merge adds back: each image's mean then stays exact to float32
    for values far from 0), and their spread about the image's mean (two passes over
    values still in cache: no cancellation)."""
    channels, area = _channel_points(shape)
    c = Var("c")
    x = Load("x", _index(area, width))
    valid = Load("valid", Var(LANE))
    body = [For("c", channels, [lanes(width, [
        Declare("sum", Const(0.0)),
        For("p", area, [Assign("sum", Local("sum") + x)], role="reduce"),
        Declare("mean", Local("sum") / float(area)),
        Declare("off", Const(0.0)), Declare("squares", Const(0.0)),
        For("p", area, [Declare("d", x - Local("mean")),
                        Assign("off", Local("off") + Local("d")),
                        Assign("squares", Local("squares") + Local("d") * Local("d"))],
            role="reduce"),
        Store("part", _part(c, width), valid * Local("mean")),
        Store("part", _part(c + channels, width), valid * (Local("off") / float(area))),
        Store("part", _part(c + 2 * channels, width), valid * (
            Local("squares") - Local("off") * Local("off") / float(area)))])],
        role="channel")]
    buffers = [Buffer("x", math.prod(shape) * width, "input"), Buffer("valid", width, "input"),
               Buffer("part", 3 * channels * width, "output")]
    return Kernel(name, [layer], buffers, body)


def statistics(name: str, layer: str, shape: tuple[int, ...], eps: float, momentum: float,
               width: int, blocks: int, block_floats: int, part_offset: int, valid_offset: int
               ) -> Kernel:
    """Channel ITEM: the blocks' shares (`block_statistics`) merged in block and lane order
    into mean and 1 / sqrt(biased variance + eps) in `stats`, and the running statistics
    moved towards the batch's. The spread is each image's own plus its count times the
    square of its mean's distance from the batch's (the law of total variance)."""
    channels, area = _channel_points(shape)

    def part(row: int) -> Expr:
        return Load("acts", Var("b") * block_floats + part_offset
                    + _part(ITEM + row * channels, width))

    valid = Load("acts", Var("b") * block_floats + valid_offset + Var(LANE))
    images = Load("hyper", Const(COUNT))
    count = images * float(area)
    body: list[Stmt] = [
        Declare("total", Const(0.0)),
        lanes(width, [Declare("sum", Const(0.0)),
                      *_over_batch(blocks, width, [
                          Assign("sum", Local("sum") + (part(0) + part(1)))]),
                      Assign("total", Local("total") + Local("sum"))]),
        Declare("mean", Local("total") / images),
        Declare("spread", Const(0.0)),
        lanes(width, [Declare("squares", Const(0.0)),
                      *_over_batch(blocks, width, [
                          Declare("d", (part(0) - Local("mean")) + part(1)),
                          Assign("squares", Local("squares") + part(2)
                                 + valid * (Local("d") * Local("d") * float(area)))]),
                      Assign("spread", Local("spread") + Local("squares"))]),
        Declare("var", Local("spread") / count),
        Store("stats", ITEM, Local("mean")),
        Store("stats", ITEM + channels, Const(1.0) / Call("sqrt", Local("var") + eps)),
        Store("running_mean", ITEM, Load("running_mean", ITEM) * (1 - momentum)
              + Local("mean") * momentum),
        Store("running_var", ITEM, Load("running_var", ITEM) * (1 - momentum)
              + Local("spread") / (count - 1.0) * momentum),
    ]
    buffers = [Buffer("acts", blocks * block_floats, "input"), Buffer("hyper", 3, "input"),
               Buffer("stats", 2 * channels, "output"),
               Buffer("running_mean", channels, "inout"),
               Buffer("running_var", channels, "inout")]
    return Kernel(name, [layer], buffers, body, uses_batch=True)


def _per_channel(shape: tuple[int, ...], width: int, head: list[Stmt], point: list[Stmt]
                 ) -> list[Stmt]:
    channels, area = _channel_points(shape)
    return [For("c", channels, head + [For("p", area, [lanes(width, point)], role="point")],
                role="channel")]


def _index(area: int, width: int) -> Expr:
    return at(Var("c") * area + Var("p"), width)


def _normalised(channels: int, index: Expr) -> tuple[list[Stmt], Expr]:
    """The statements at the head of channel c and the normalised value at `index`: the
    same expression wherever it is computed, so the same bits."""
    c = Var("c")
    head: list[Stmt] = [Declare("scale", Load("stats", c + channels) * Load("weight", c)),
                        Declare("shift", Load("bias", c) - Load("stats", c) * Local("scale"))]
    return head, Load("x", index) * Local("scale") + Local("shift")


def _then(value: Expr, then: list[tuple[str, dict, int]], index: Expr) -> tuple[Expr, int]:
    """`value` through each of `then` (op, attrs, how many more operands it reads: an add's
    "o0", "o1", ...); and how many operands they read."""
    from cnnc import ops

    extra = 0
    for op, attrs, count in then:
        spec = ops.OPS[op]
        assert spec.lower is not None
        operands = [value, *(Load(f"o{extra + k}", index) for k in range(count))]
        extra += count
        value = spec.lower(operands, attrs) if spec.lower_attrs else spec.lower(operands)
    return value, extra


def normalise(name: str, layer: str, shape: tuple[int, ...], width: int,
              then: list[tuple[str, dict, int]] | None = None) -> Kernel:
    """y = (x - mean) * invstd * weight + bias, over this step's statistics; then each of
    `then` (`_then`) applied to that value, in the same pass."""
    channels, area = _channel_points(shape)
    index = _index(area, width)
    head, value = _normalised(channels, index)
    value, extra = _then(value, then or [], index)
    body = _per_channel(shape, width, head, [Store("y", index, value)])
    buffers = _buffers(shape, width, layer, ("stats", 2 * channels))
    buffers += [Buffer(f"o{k}", math.prod(shape) * width, "input") for k in range(extra)]
    return Kernel(name, [layer], buffers, body)


# An activation right after batch norm whose rule needs only its output: (op, attrs, how
# many gradients its readers send, "c0", "c1", ...)
Activation = tuple[str, dict, int]


def _incoming(shape: tuple[int, ...], width: int, activation: Activation | None
              ) -> tuple[list[Stmt], Expr, list[Buffer]]:
    """The gradient g of batch norm's output at a point: read from "g"; or, through
    `activation`, its rule applied to the sum of "c0", "c1", ... at its output, which is
    computed again from x as the forward kernel computed it (the same bits): neither g
    nor the activation's output is read from memory. Also the statements at the head of
    each channel and the buffers g needs."""
    from cnnc import ops

    channels, area = _channel_points(shape)
    index = _index(area, width)
    floats = math.prod(shape) * width
    if activation is None:
        return [], Load("g", index), [Buffer("g", floats, "input")]
    op, attrs, parts = activation
    rule = ops.OPS[op].gradient
    assert rule is not None and rule.lower is not None
    head, value = _normalised(channels, index)
    output, _ = _then(value, [(op, attrs, 0)], index)
    grad: Expr = Load("c0", index)
    for part in range(1, parts):
        grad = grad + Load(f"c{part}", index)
    buffers = [Buffer(f"c{part}", floats, "input") for part in range(parts)]
    buffers += [Buffer("weight", channels, "input"), Buffer("bias", channels, "input")]
    return head, rule.lower(Load("none", Const(0)), output, grad, attrs), buffers


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


def block_gradient_sums(name: str, layer: str, shape: tuple[int, ...], width: int,
                        activation: Activation | None = None) -> Kernel:
    """This block's share of the sums of g and g * x^ per channel and lane, right after its g
    is made (in cache; `_incoming`); the lanes past the batch have g = 0."""
    channels, area = _channel_points(shape)
    c = Var("c")
    index = _index(area, width)
    head, grad, buffers = _incoming(shape, width, activation)
    normalised = (Load("x", index) - Load("stats", c)) * Load("stats", c + channels)
    body = [For("c", channels, [*head, lanes(width, [
        Declare("gb", Const(0.0)), Declare("gw", Const(0.0)),
        For("p", area, [Declare("gv", grad),  # not "g": a buffer's name in CUDA C
                        Assign("gb", Local("gb") + Local("gv")),
                        Assign("gw", Local("gw") + Local("gv") * normalised)], role="reduce"),
        Store("part", _part(c, width), Local("gb")),
        Store("part", _part(c + channels, width), Local("gw"))])], role="channel")]
    buffers += [Buffer("x", math.prod(shape) * width, "input"),
                Buffer("stats", 2 * channels, "input"),
                Buffer("part", 2 * channels * width, "output")]
    return Kernel(name, [layer], buffers, body)


def reduce_gradient(name: str, layer: str, shape: tuple[int, ...], width: int, blocks: int,
                    block_floats: int, part_offset: int) -> Kernel:
    """Channel ITEM: grad_bias = sum of g, grad_weight = sum of g * x^ over the batch, the
    blocks' shares (`block_gradient_sums`) added in block and lane order."""
    channels = shape[0]

    def part(row: int) -> Expr:
        return Load("acts", Var("b") * block_floats + part_offset
                    + _part(ITEM + row * channels, width))

    body: list[Stmt] = [
        Declare("tb", Const(0.0)), Declare("tw", Const(0.0)),
        lanes(width, [Declare("gb", Const(0.0)), Declare("gw", Const(0.0)),
                      *_over_batch(blocks, width, [Assign("gb", Local("gb") + part(0)),
                                                   Assign("gw", Local("gw") + part(1))]),
                      Assign("tb", Local("tb") + Local("gb")),
                      Assign("tw", Local("tw") + Local("gw"))]),
        Store("grad_bias", ITEM, Local("tb")), Store("grad_weight", ITEM, Local("tw"))]
    buffers = [Buffer("acts", blocks * block_floats, "input"),
               Buffer("grad_weight", channels, "output"), Buffer("grad_bias", channels, "output")]
    return Kernel(name, [layer], buffers, body, uses_batch=True)


def input_gradient(name: str, layer: str, shape: tuple[int, ...], width: int,
                   activation: Activation | None = None) -> Kernel:
    """gx = valid * weight * invstd * (g - grad_bias / n - x^ * grad_weight / n), n the values
    per channel in the batch, g as `_incoming` gives it."""
    channels, area = _channel_points(shape)
    c = Var("c")
    count = Load("hyper", Const(COUNT)) * float(area)
    head, grad, buffers = _incoming(shape, width, activation)
    head += [
        Declare("invstd", Load("stats", c + channels)),
        Declare("gain", Load("weight", c) * Local("invstd")),
        Declare("mean_g", Load("grad_bias", c) / count),
        Declare("mean_gx", Load("grad_weight", c) / count)]
    index = _index(area, width)
    normalised = (Load("x", index) - Load("stats", c)) * Local("invstd")
    point: list[Stmt] = [Store("gx", index, Load("valid", Var(LANE)) * Local("gain") * (
        grad - Local("mean_g") - normalised * Local("mean_gx")))]
    floats = math.prod(shape) * width
    buffers = [buffer for buffer in buffers if buffer.name != "weight"]
    buffers += [Buffer("x", floats, "input"), Buffer("gx", floats, "output"),
                Buffer("valid", width, "input"), Buffer("weight", channels, "input"),
                Buffer("stats", 2 * channels, "input"),
                Buffer("grad_weight", channels, "input"), Buffer("grad_bias", channels, "input"),
                Buffer("hyper", 3, "input")]
    return Kernel(name, [layer], buffers, _per_channel(shape, width, head, point))
