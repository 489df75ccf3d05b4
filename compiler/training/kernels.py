"""The kernels a training step adds to the forward ones, in the kernel IR: the loss, each op
family's backward rule, the weight gradients and the optimizer's update.

Everything is in the batch layout (`cnnc.layouts.BatchLayout`): the images of one batch block
are the lanes of a vector, so a per-block kernel vectorises over images exactly as the forward
kernels do. A weight gradient sums over every image: its kernel runs once per output channel
(an "item"), reads all blocks, keeps one vector accumulator per weight and adds its lanes in a
fixed order at the end (`Assign` of a scalar inside the lane loop). No sum depends on how the
blocks or items were shared among threads, so every thread count gives the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cnnc.kernel import (
    Assign,
    Bin,
    Buffer,
    Call,
    Const,
    Declare,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Local,
    Select,
    Stmt,
    Store,
    Var,
    all_of,
    less,
    maximum,
    walk,
)
from cnnc.lower.context import in_range
from cnnc.lower.standalone import log_of_sum

LANE = "lane"  # the name of a lane loop's variable (`cnnc.layouts`)
ITEM = Var("block")  # a whole-batch kernel's item: the launch passes it as the block
BATCH = Var("batch")
OPTIMIZER_CHUNK = 1024  # floats of parameters per item of the optimizer's kernel


def lanes(width: int, body: list[Stmt]) -> For:
    return For(LANE, width, body, "vectorized", role="lane")


def at(point: Expr, width: int) -> Expr:
    """Where a point of a per-block tensor is: its images side by side."""
    return point * width + Var(LANE)


def _points(name: str, count: int, width: int, body: list[Stmt]) -> list[Stmt]:
    return [For(name, count, [lanes(width, body)], role="point")]


# --- per block: loss, elementwise, dense, convolution, pooling -------------------------------

def loss_kernel(name: str, loss: str, classes: int, width: int) -> Kernel:
    """The loss of each image (times its weight: 1/N for a mean, 1 for a sum, 0 for a lane
    past the batch) and the gradient of the scores. cross_entropy: log-softmax fused in,
    stable for any score size, against target probabilities (one-hot labels);
    squared_error: (score - target)^2 summed over the scores."""
    z = [Load("scores", at(Const(k), width)) for k in range(classes)]
    t = [Load("target", at(Const(k), width)) for k in range(classes)]
    weight = Load("weight", Var(LANE))
    body: list[Stmt] = []
    if loss == "cross_entropy":
        body.append(Declare("top", z[0]))
        for k in range(1, classes):
            body.append(Assign("top", maximum(Local("top"), z[k])))
        body.append(Declare("total", Const(0.0)))
        for k in range(classes):
            body.append(Declare(f"e{k}", Call("exp", z[k] - Local("top"))))
            body.append(Assign("total", Local("total") + Local(f"e{k}")))
        body += log_of_sum(Local("total"), classes, "lse")
        body += [Declare("mass", Const(0.0)), Declare("dot", Const(0.0))]
        for k in range(classes):
            body.append(Assign("mass", Local("mass") + t[k]))
            body.append(Assign("dot", Local("dot") + t[k] * (z[k] - Local("top"))))
        body.append(Store("loss", Var(LANE),
                          weight * (Local("mass") * Local("lse") - Local("dot"))))
        for k in range(classes):
            probability = Local(f"e{k}") / Local("total")
            body.append(Store("grad", at(Const(k), width),
                              weight * (probability * Local("mass") - t[k])))
    elif loss == "squared_error":
        body.append(Declare("sum", Const(0.0)))
        for k in range(classes):
            body.append(Declare(f"d{k}", z[k] - t[k]))
            body.append(Assign("sum", Local("sum") + Local(f"d{k}") * Local(f"d{k}")))
            body.append(Store("grad", at(Const(k), width), weight * (Local(f"d{k}") * 2.0)))
        body.append(Store("loss", Var(LANE), weight * Local("sum")))
    else:
        raise ValueError(f"unknown loss {loss!r}")
    floats = classes * width
    buffers = [Buffer("scores", floats, "input"), Buffer("target", floats, "input"),
               Buffer("weight", width, "input"), Buffer("loss", width, "output"),
               Buffer("grad", floats, "output")]
    return Kernel(name, ["loss"], buffers, [lanes(width, body)])


# The input gradient of an elementwise op at a point: (input, output, gradient, attrs) -> value
PointRule = Callable[[Expr, Expr, Expr, dict], Expr]


def pointwise_backward(name: str, layer: str, floats: int, width: int, rule: PointRule,
                       attrs: dict, extra: str = "", parts: int = 1) -> Kernel:
    """gx = rule(x, y, g) at every point; `extra` names one more per-point input the rule
    reads as its input value instead of x (dropout's mask). With several `parts`, g is the
    sum of "c0", "c1", ... added in order (the contributions of the value's readers)."""
    p = Var("p")
    index = at(p, width)
    x = Load("extra" if extra else "x", index)
    grad: Expr = Load("g" if parts == 1 else "c0", index)
    for number in range(1, parts):
        grad = grad + Load(f"c{number}", index)
    value = rule(x, Load("y", index), grad, attrs)
    read = {node.buffer for node in walk(value) if isinstance(node, Load)}
    inputs = ("extra" if extra else "x", "y", "g", *(f"c{number}" for number in range(parts)))
    buffers = [Buffer(buffer, floats * width, "input") for buffer in inputs if buffer in read]
    buffers.append(Buffer("gx", floats * width, "output"))
    return Kernel(name, [layer], buffers, _points(p.name, floats, width,
                                                  [Store("gx", index, value)]))


def sum_kernel(name: str, layer: str, floats: int, width: int, count: int) -> Kernel:
    """The gradient of a value read by several ops: their contributions, added in order."""
    p = Var("p")
    index = at(p, width)
    total: Expr = Load("c0", index)
    for number in range(1, count):
        total = total + Load(f"c{number}", index)
    buffers = [Buffer(f"c{number}", floats * width, "input") for number in range(count)]
    buffers.append(Buffer("gx", floats * width, "output"))
    return Kernel(name, [layer], buffers, _points(p.name, floats, width,
                                                  [Store("gx", index, total)]))


def conv_input_backward(name: str, layer: str, attrs: dict, in_shape: tuple[int, ...],
                        out_shape: tuple[int, ...], weight: np.ndarray, width: int) -> Kernel:
    """gx[c, y, x] = sum over the outputs that read (c, y, x) of W * g: the forward's taps
    gathered backwards, each output row oy = (y + top - ky * dh) / sh when that is whole."""
    channels, height, wide = in_shape
    outs, out_h, out_w = out_shape
    groups = attrs["groups"]
    per_in, per_out = channels // groups, outs // groups
    (kh, kw), (sh, sw), (dh, dw) = attrs["kernel_size"], attrs["stride"], attrs["dilation"]
    (top, _), (left, _) = attrs["padding"]
    c, y, x, oo, ky, kx = (Var(name) for name in ("c", "y", "x", "oo", "ky", "kx"))
    group = Bin("//", c, Const(per_in))
    o = group * per_out + oo
    ci = c - group * per_in

    def source(coord: Var, pad: int, tap: Var, dilation: int, stride: int, size: int
               ) -> tuple[Expr, Expr]:
        """The output coordinate a tap sends to `coord`, and when it exists."""
        shifted = coord + pad - tap * dilation
        if stride == 1:
            return shifted, in_range(shifted, size)
        # shifted >= 0 first: // is only defined on non-negative ints
        quotient = Bin("//", Select(less(Const(-1), shifted), shifted, Const(0)), Const(stride))
        exact = all_of(less(Const(-1), shifted), less(shifted, quotient * stride + 1),
                       less(quotient, size))
        assert exact is not None
        return quotient, exact

    oy, row_ok = source(y, top, ky, dh, sh, out_h)
    ox, col_ok = source(x, left, kx, dw, sw, out_w)
    tap = Load("w", ((o * per_in + ci) * kh + ky) * kw + kx) * \
        Load("g", at((o * out_h + oy) * out_w + ox, width))
    inner = [For(kx.name, kw, [If(col_ok, [Assign("acc", Local("acc") + tap)])], role="reduce")]
    body: list[Stmt] = [
        Declare("acc", Const(0.0)),
        For(oo.name, per_out, [For(ky.name, kh, [If(row_ok, inner)], role="reduce")],
            role="reduce"),
        Store("gx", at((c * height + y) * wide + x, width), Local("acc"))]
    loops: list[Stmt] = [lanes(width, body)]
    for var, extent in ((x, wide), (y, height), (c, channels)):
        loops = [For(var.name, extent, loops, role="spatial")]
    buffers = [Buffer("w", weight.size, "param", weight.ravel(), param_of=f"{layer}.weight"),
               Buffer("g", math.prod(out_shape) * width, "input"),
               Buffer("gx", math.prod(in_shape) * width, "output")]
    return Kernel(name, [layer], buffers, loops)


def pool_backward(name: str, layer: str, op: str, attrs: dict, in_shape: tuple[int, ...],
                  out_shape: tuple[int, ...], divisors: np.ndarray | None, width: int,
                  then: tuple[PointRule, dict] | None = None) -> Kernel:
    """Each window sends its gradient back to its input points: an average pool a share to
    each (over PyTorch's divisor), a max pool all of it to the window's first maximum in
    row-major order (PyTorch's choice), found by comparing with the saved output.

    `then` (the rule of the activation before the pool, which reads only its output, the
    pool's input) is applied to the gradient as it is stored, when the windows tile the input
    exactly (each point in one window): the two backward rules are then one pass."""
    channels, height, wide = in_shape
    _, out_h, out_w = out_shape
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    (top, _), (left, _) = attrs["padding"]
    c, p, oy, ox, wy, wx = (Var(name) for name in ("c", "p", "oy", "ox", "wy", "wx"))
    zero = [For(p.name, channels * height * wide, [lanes(width, [
        Store("gx", at(p, width), Const(0.0))])], role="point")]
    iy, ix = oy * sh + wy - top, ox * sw + wx - left
    target = at((c * height + iy) * wide + ix, width)
    out_index = at((c * out_h + oy) * out_w + ox, width)
    grad = Load("g", out_index)
    buffers = [Buffer("g", math.prod(out_shape) * width, "input")]
    tap: list[Stmt]
    head: list[Stmt] = []
    if op in ("avgpool2d", "global_avgpool2d"):
        assert divisors is not None
        if np.all(divisors == divisors.flat[0]):
            share: Expr = grad / float(divisors.flat[0])
        else:
            buffers.append(Buffer("div", divisors.size, "param",
                                  divisors.astype(np.float32).ravel()))
            share = grad / Load("div", oy * out_w + ox)
        tap = [Store("gx", target, share if then else Load("gx", target) + share)]
    else:
        buffers += [Buffer("x", math.prod(in_shape) * width, "input"),
                    Buffer("y", math.prod(out_shape) * width, "input")]
        # hit: this tap holds the window's maximum (is not below it) and no earlier one did
        hit = Select(less(Load("x", target), Load("y", out_index)), Const(0.0),
                     Const(1.0) - Local("found"))
        head = [Declare("found", Const(0.0))]
        tap = [Declare("hit", hit),
               Store("gx", target, Local("hit") * grad if then else
                     Load("gx", target) + Local("hit") * grad),
               Assign("found", Local("found") + Local("hit"))]
    if then is not None:  # the activation's rule, at the store
        rule, rule_attrs = then
        stored = next(stmt for stmt in tap if isinstance(stmt, Store))
        stored.value = rule(Load("none", Const(0)), Load("x", target), stored.value, rule_attrs)
        if not any(buffer.name == "x" for buffer in buffers):
            buffers.append(Buffer("x", math.prod(in_shape) * width, "input"))
        zero = []
    padded = top or left or attrs["padding"][0][1] or attrs["padding"][1][1]
    inside = all_of(in_range(iy, height), in_range(ix, wide)) if padded or \
        out_h * sh + kh - sh > height or out_w * sw + kw - sw > wide else None
    window: list[Stmt] = [For(wy.name, kh, [For(wx.name, kw, [If(inside, tap)] if inside
                                                 is not None else tap, role="window")],
                              role="window")]
    body = [lanes(width, head + window)]
    for var, extent in ((ox, out_w), (oy, out_h), (c, channels)):
        body = [For(var.name, extent, body, role="spatial")]
    buffers.append(Buffer("gx", math.prod(in_shape) * width, "output" if then else "inout"))
    return Kernel(name, [layer], buffers, zero + body)


# --- whole batch: weight gradients -----------------------------------------------------------

def _over_blocks(blocks: int, width: int, body: list[Stmt]) -> list[Stmt]:
    """`body` for each block that holds an image of the batch (the lanes past the batch have
    zero gradients, so a partly filled block needs no other care)."""
    return [For("b", blocks, [If(less(Var("b") * width, BATCH), body)], role="reduce")]


def _block_at(block_floats: int, offset: int, point: Expr, width: int) -> Expr:
    return Var("b") * block_floats + offset + at(point, width)


def dense_weight_backward(name: str, layer: str, features: int, units: int, has_bias: bool,
                          width: int, blocks: int, block_floats: int, x_offset: int,
                          g_offset: int) -> Kernel:
    """Unit `item`'s row of gW = sum over images of g[o] x[i] (and gb[o] = sum of g[o]),
    a register tile of several features at a time."""
    tile = max(d for d in range(1, 9) if features % d == 0)
    i = Var("i")
    g = Load("acts", _block_at(block_floats, g_offset, ITEM, width))
    body: list[Stmt] = []
    if has_bias:
        body += [Declare("tb", Const(0.0)), lanes(width, [
            Declare("ab", Const(0.0)),
            *_over_blocks(blocks, width, [Assign("ab", Local("ab") + g)]),
            Assign("tb", Local("tb") + Local("ab"))]), Store("gb", ITEM, Local("tb"))]
    feature = [i * tile + j for j in range(tile)]
    update: list[Stmt] = [Declare("gv", g)]
    update += [Assign(f"a{j}", Local(f"a{j}") + Local("gv") * Load(
        "acts", _block_at(block_floats, x_offset, feature[j], width))) for j in range(tile)]
    inner: list[Stmt] = [Declare(f"t{j}", Const(0.0)) for j in range(tile)]
    inner.append(lanes(width, [*(Declare(f"a{j}", Const(0.0)) for j in range(tile)),
                               *_over_blocks(blocks, width, update),
                               *(Assign(f"t{j}", Local(f"t{j}") + Local(f"a{j}"))
                                 for j in range(tile))]))
    inner += [Store("gw", ITEM * features + feature[j], Local(f"t{j}")) for j in range(tile)]
    body.append(For(i.name, features // tile, inner, role="channel"))
    buffers = [Buffer("acts", blocks * block_floats, "input"),
               Buffer("gw", units * features, "output")]
    if has_bias:
        buffers.append(Buffer("gb", units, "output"))
    return Kernel(name, [layer], buffers, body, uses_batch=True)


def weight_tile(per_out: int, taps: int) -> int:
    """Output channels per item of a conv's weight gradient: as many as share one load of
    each input value while their accumulators (one per channel and tap) stay in registers."""
    return max(tile for tile in range(1, 5) if per_out % tile == 0 and tile * taps <= 24
               or tile == 1)


# --- whole batch: the optimizer --------------------------------------------------------------

def sgd_kernel(name: str, floats: int, lr: float, momentum: float, weight_decay: float,
               nesterov: bool, width: int) -> Kernel:
    """torch.optim.SGD's update (dampening 0) of chunk `item` of the parameters."""
    j = Var("j")
    index = (ITEM * (OPTIMIZER_CHUNK // width) + j) * width + Var(LANE)
    body: list[Stmt] = [Declare("grad", Load("grads", index))]
    if weight_decay:
        body.append(Assign("grad", Local("grad") + Load("params", index) * weight_decay))
    buffers = [Buffer("params", floats, "inout"), Buffer("grads", floats, "input")]
    if momentum:
        # The buffer starts at zero: momentum * 0 + grad is grad, PyTorch's first step.
        body.append(Declare("buf", Load("momentum", index) * momentum + Local("grad")))
        body.append(Store("momentum", index, Local("buf")))
        body.append(Assign("grad", Local("grad") + Local("buf") * momentum if nesterov
                           else Local("buf")))
        buffers.append(Buffer("momentum", floats, "inout"))
    body.append(Store("params", index, Load("params", index) + Local("grad") * (-lr)))
    return Kernel(name, ["sgd"], buffers, [For(j.name, OPTIMIZER_CHUNK // width, [
        lanes(width, body)], role="point")], uses_batch=True)


def adam_kernel(name: str, floats: int, betas: tuple[float, float], eps: float,
                weight_decay: float, width: int) -> Kernel:
    """torch.optim.Adam's update of chunk `item`; minus the step size, -lr / (1 - beta1^t),
    and sqrt(1 - beta2^t) change every step and are read from `hyper`."""
    beta1, beta2 = betas
    j = Var("j")
    index = (ITEM * (OPTIMIZER_CHUNK // width) + j) * width + Var(LANE)
    body: list[Stmt] = [Declare("grad", Load("grads", index))]
    if weight_decay:
        body.append(Assign("grad", Local("grad") + Load("params", index) * weight_decay))
    body += [
        Declare("m", Load("first", index) + (Local("grad") - Load("first", index)) * (1 - beta1)),
        Declare("v", Load("second", index) * beta2 + Local("grad") * Local("grad") * (1 - beta2)),
        Store("first", index, Local("m")), Store("second", index, Local("v")),
        Declare("denominator", Call("sqrt", Local("v")) / Load("hyper", Const(1)) + eps),
        # hyper[0] is minus the step size: param + (-step) * (m / denominator), as addcdiv_
        Store("params", index, Load("params", index) + Local("m") / Local("denominator")
              * Load("hyper", Const(0))),
    ]
    buffers = [Buffer("params", floats, "inout"), Buffer("grads", floats, "input"),
               Buffer("first", floats, "inout"), Buffer("second", floats, "inout"),
               Buffer("hyper", 2, "input")]
    return Kernel(name, ["adam"], buffers, [For(j.name, OPTIMIZER_CHUNK // width, [
        lanes(width, body)], role="point")], uses_batch=True)
