"""Lowering: every fused group becomes one kernel of the loop IR (`cnnc.kernel`).

Lowering writes what a group computes at each output point: the producer (a convolution, a
dense layer, or a load), the elementwise ops, the pooling window around it, and the store.
The group's schedule only shapes the loops (lane width, register tile, unrolling). Buffers
are per batch block in the layout `[C][H][W][lanes]`; kernels at the edges convert from and
to the user's NCHW arrays. Names in the IR are generated, never taken from layer names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph
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
    LoopKind,
    Schedule,
    Select,
    Stmt,
    Store,
    Var,
    all_of,
    less,
    maximum,
)
from cnnc.passes.fuse import Group, groups_of, tensor_of
from cnnc.passes.layout import LANE, Layout, layout_of
from cnnc.verify import verify, verifying

BLOCK = Var("block")
BATCH = Var("batch")
USER_INPUT = "@input"  # bindings of the edge kernels to the user's arrays
USER_OUTPUT = "@output"


@dataclass
class LoweredModel:
    """The kernels in launch order and what their buffers are bound to."""

    kernels: list[Kernel]
    bindings: dict[str, dict[str, str]]  # kernel -> buffer -> tensor node (or @input/@output)
    lanes: int  # images per block
    output_offsets: list[int] = field(default_factory=list)  # per output, floats per sample
    layout: Layout = field(default_factory=lambda: Layout("batch", 1))


def lower(graph: Graph) -> LoweredModel:
    layout = layout_of(graph)
    model = LoweredModel([], {}, layout.images_per_block, layout=layout)
    pack = _pack_input(graph, layout)
    model.kernels.append(pack)
    model.bindings[pack.name] = {"x": USER_INPUT, "packed": INPUT}
    for group in groups_of(graph):
        builder = _KernelBuilder(graph, group, layout)
        kernel = builder.build()
        model.kernels.append(kernel)
        model.bindings[kernel.name] = builder.bindings
    offset = 0
    for index, output in enumerate(graph.outputs):
        unpack = _unpack_output(graph, output, index, offset, layout)
        model.kernels.append(unpack)
        model.bindings[unpack.name] = {"packed": tensor_of(graph, output), "y": USER_OUTPUT}
        model.output_offsets.append(offset)
        offset += math.prod(graph.shape(output))
    if verifying():
        for kernel in model.kernels:
            verify(kernel)
    return model


# --- edge kernels ----------------------------------------------------------------------------


_POINT_VARS = ("c", "h", "w")


def _point_coords(shape: tuple[int, ...], first: int = 0) -> list[Expr]:
    """The coordinates (channel first) that `_point_loops` binds."""
    coords: list[Expr] = [Var(name) for name in _POINT_VARS[: len(shape)]]
    coords[0] = coords[0] + first
    return coords


def _point_loops(shape: tuple[int, ...], body: list[Stmt], first: int = 0) -> list[Stmt]:
    """Loops over every point of a per-image `shape`, channels from `first`, around `body`."""
    for name, extent in reversed(list(zip(_POINT_VARS, shape))):
        body = [For(name, extent - (first if name == "c" else 0), body, role="point")]
    return body


def _flat(shape: tuple[int, ...], coords: list[Expr]) -> Expr:
    """Row-major index of `coords` in an NCHW image of `shape`."""
    flat = coords[0]
    for dim, coord in zip(shape[1:], coords[1:]):
        flat = flat * dim + coord
    return flat


def _image(layout: Layout) -> Expr:
    """The batch index of the image the edge kernels' lane loop is at."""
    per_block = layout.images_per_block
    return BLOCK * per_block + LANE if per_block > 1 else BLOCK + LANE


def _pack_input(graph: Graph, layout: Layout) -> Kernel:
    """User NCHW images into one block; images past the batch and padding channels are 0."""
    shape = graph.input_shape
    size = math.prod(shape)
    image = _image(layout)
    coords = _point_coords(shape)
    stored = layout.index(shape, coords)
    body: list[Stmt] = [
        If(less(image, BATCH), _point_loops(shape, [
            Store("packed", stored, Load("x", image * size + _flat(shape, coords)))])),
        If(Bin("<=", BATCH, image), _point_loops(shape, [Store("packed", stored, Const(0.0))])),
    ]
    loops: list[Stmt] = [For("lane", layout.images_per_block, body, role="lane")]
    if layout.images_per_block > 1:
        # A full block (the common case) needs no per-image test, so its transpose runs as
        # vector stores of one element of every image.
        full = Bin("<=", BLOCK * layout.images_per_block + layout.images_per_block, BATCH)
        element = Var("i")
        transpose = For("i", size, [For("lane", layout.images_per_block, [
            Store("packed", element * layout.images_per_block + LANE,
                  Load("x", image * size + element))], "vectorized", role="lane")])
        loops = [If(full, [transpose]), If(less(BATCH, BLOCK * layout.images_per_block
                                                 + layout.images_per_block), loops)]
    floats = layout.floats(shape)
    if layout.kind == "channel" and shape[0] == 1 < layout.channels(1):
        # One channel: each pixel's vector is [value, 0, ..., 0], stored whole, instead of
        # zeroing the block and then copying the values one by one.
        width = layout.vector(1)
        pixel = Var("i")

        def every_pixel(value: Expr) -> list[Stmt]:
            return [For("i", size, [For("lane", width, [
                Store("packed", pixel * width + LANE, value)], "vectorized", role="lane")])]

        loops = [
            If(less(BLOCK, BATCH), every_pixel(
                Select(less(LANE, 1), Load("x", BLOCK * size + pixel), Const(0.0)))),
            If(Bin("<=", BATCH, BLOCK), every_pixel(Const(0.0))),
        ]
    elif layout.channels(shape[0]) > shape[0]:
        # Zero the padding channels with whole vectors first; the copy then fills the rest.
        element = Var("i")
        width = layout.vector(shape[0])
        loops.insert(0, For("i", floats // width, [
            For("lane", width, [Store("packed", element * width + LANE, Const(0.0))],
                "vectorized", role="lane")]))
    buffers = [Buffer("x", size * layout.images_per_block, "input", per_image=size),
               Buffer("packed", floats, "output")]
    return Kernel("pack_input", [INPUT], buffers, loops, Schedule(),
                  uses_batch=True)


def _unpack_output(graph: Graph, output: str, index: int, offset: int,
                   layout: Layout) -> Kernel:
    """One block of output `index` into the user's array; output k of a model with several
    starts at batch * (sizes of the outputs before it)."""
    shape = graph.shape(output)
    size = math.prod(shape)
    image = _image(layout)
    coords = _point_coords(shape)
    target = BATCH * offset + image * size + _flat(shape, coords)
    copy = _point_loops(shape, [Store("y", target, Load("packed", layout.index(shape, coords)))])
    body: list[Stmt] = [For("lane", layout.images_per_block, [If(less(image, BATCH), copy)],
                            role="lane")]
    buffers = [Buffer("packed", layout.floats(shape), "input"),
               Buffer("y", size * layout.images_per_block, "output", per_image=offset + size)]
    return Kernel(f"unpack_output_{index}", [output], buffers, body,
                  Schedule(), uses_batch=True)


# --- fused kernels ---------------------------------------------------------------------------


class _KernelBuilder:
    """Builds the kernel of one group; keeps its buffers and fresh local names."""

    def __init__(self, graph: Graph, group: Group, layout: Layout) -> None:
        self.graph = graph
        self.group = group
        self.layout = layout
        self.lanes = layout.lanes
        self.by_channel = layout.kind == "channel"
        self.schedule = group.schedule
        self.buffers: list[Buffer] = []
        self.bindings: dict[str, str] = {}
        self.counter = 0

    # buffers and names

    def input_buffer(self, node: str) -> str:
        tensor = tensor_of(self.graph, node)
        for name, bound in self.bindings.items():
            if bound == tensor:
                return name
        name = f"in{sum(1 for buffer in self.buffers if buffer.role == 'input')}"
        self.buffers.append(Buffer(name, self.layout.floats(self.graph.shape(tensor)), "input"))
        self.bindings[name] = tensor
        return name

    def param(self, data: np.ndarray) -> str:
        name = f"p{sum(1 for buffer in self.buffers if buffer.role == 'param')}"
        flat = np.ascontiguousarray(data, dtype=np.float32).ravel()
        self.buffers.append(Buffer(name, flat.size, "param", flat))
        return name

    def channel_param(self, values: np.ndarray) -> str:
        """A per-channel parameter, padded with zeros to the stored channel count."""
        padded = np.zeros(self.layout.channels(len(values)), np.float32)
        padded[: len(values)] = values
        return self.param(padded)

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def index(self, node: str, coords: list[Expr]) -> Expr:
        """Where point `coords` of `node`'s stored tensor is, in this kernel's layout."""
        return self.layout.index(self.graph.shape(tensor_of(self.graph, node)), coords)

    # the kernel

    def build(self) -> Kernel:
        group, graph = self.group, self.graph
        producer_op = graph.op(group.producer)
        if producer_op == "softmax":
            body = self.softmax()
        elif producer_op == "concat":
            body = self.concat()
        elif producer_op == "flatten":
            body = self.flatten()

        else:
            body = self.pointwise()
        floats = self.layout.floats(graph.shape(group.output))
        self.buffers.append(Buffer("out", floats, "output"))
        self.bindings["out"] = group.output
        return Kernel(group.name, list(group.nodes), self.buffers, body, self.schedule)

    def pointwise(self) -> list[Stmt]:
        """Loops over the output points; one iteration computes a register tile of
        `oc_block` channels (or channel vectors) by `x_block` neighbouring points of a row,
        each through producer -> elementwise -> window -> elementwise, then stores them."""
        graph, group = self.graph, self.group
        out_shape = graph.shape(group.output)
        # In the channel layout a "channel" of the loop is a vector of `lanes` channels.
        width = self.layout.vector(out_shape[0])
        steps = self.layout.channels(out_shape[0]) // width if self.by_channel \
            else out_shape[0]
        block = self.schedule.oc_block if graph.op(group.producer) in ("conv2d", "dense") else 1
        groups = graph.attrs(group.producer).get("groups", 1) if graph.op(group.producer) == \
            "conv2d" else 1
        if steps % block or (not self.by_channel and (out_shape[0] // groups) % block):
            block = 1  # a block must not straddle the end or, in the batch layout, a group
        channel_block = Var("cb")
        if self.by_channel:
            channels = [(channel_block * block + j) * width + LANE for j in range(block)]
        else:
            channels = [channel_block * block + j for j in range(block)]
        names = ["y", "x"][: len(out_shape) - 1]
        spatial: list[Expr] = [Var(name) for name in names]
        across = self.schedule.x_block if spatial and out_shape[-1] % self.schedule.x_block == 0 \
            and self._x_block_allowed() else 1
        spots = [spatial[:-1] + [spatial[-1] * across + i] for i in range(across)] if spatial \
            else [[]]
        outputs, inner = self.point_values(channels, spots)
        for (spot, channel), value in zip(_pairs(spots, channels), outputs):
            inner.append(Store("out", self.index(group.output, [channel, *spot]), value))
        body: list[Stmt] = [For("lane", width, inner, "vectorized", role="lane")]
        extents = list(out_shape[1:])
        if extents:
            extents[-1] //= across
        for name, extent in reversed(list(zip(names, extents))):
            body = [For(name, extent, body, role="spatial")]
        return [For("cb", steps // block, body, role="channel")]

    def _x_block_allowed(self) -> bool:
        """Points of a row share a pooling window's loops only when no window hangs over the
        edge of the input (else each point would need a check of its own)."""
        window = self.group.window
        if window is None or self.graph.op(window) == "global_avgpool2d":
            return True
        attrs = self.graph.attrs(window)
        (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
        _, height, width = self.graph.shape(self.graph.operands(window)[0])
        out_h, out_w = self.graph.shape(window)[1:]
        return not (any(attrs["padding"][0]) or any(attrs["padding"][1])
                    or (out_h - 1) * sh + kh > height or (out_w - 1) * sw + kw > width)

    def point_values(self, channels: list[Expr], spots: list[list[Expr]]
                     ) -> tuple[list[Expr], list[Stmt]]:
        """Statements computing the group's output at `spots` x `channels`, and the values
        (spot-major)."""
        group = self.group
        window = group.window
        split = group.nodes.index(window) if window else len(group.nodes)
        head, post = group.nodes[:split], group.nodes[split + 1:]
        stmts: list[Stmt] = []
        if window is None:
            values = self.produce(head, channels, spots, stmts)
        else:
            values = self.pool(window, head, channels, spots, stmts)
        return self.elementwise(post, values, channels, spots, stmts), stmts

    def produce(self, nodes: list[str], channels: list[Expr], spots: list[list[Expr]],
                stmts: list[Stmt]) -> list[Expr]:
        """The values of the last of `nodes` (a producer and elementwise ops) at the points."""
        producer = nodes[0]
        op = self.graph.op(producer)
        if op == "conv2d":
            values = self.conv2d(producer, channels, spots, stmts)
            rest = nodes[1:]
        elif op == "dense":
            values = self.dense(producer, channels, stmts)
            rest = nodes[1:]
        else:  # an elementwise op reading its first operand
            source = self.graph.operands(producer)[0]
            values = [Load(self.input_buffer(source), self.index(source, [channel, *spot]))
                      for spot, channel in _pairs(spots, channels)]
            rest = nodes
        return self.elementwise(rest, values, channels, spots, stmts)

    def conv2d(self, node: str, channels: list[Expr], spots: list[list[Expr]],
               stmts: list[Stmt]) -> list[Expr]:
        graph = self.graph
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
        if self.by_channel:
            # [ic][ky][kx][channels]: one vector load gives a tap for `lanes` channels.
            packed = np.zeros((per_group_in, kh, kw, self.layout.channels(out_channels)))
            packed[..., :out_channels] = weight.transpose(1, 2, 3, 0)
            weights = self.param(packed)
        else:
            weights = self.param(weight)
        bias = self.bias(params)
        source_buffer = self.input_buffer(source)

        accumulators = [self.fresh("acc") for _ in _pairs(spots, channels)]
        for (_, channel), acc in zip(_pairs(spots, channels), accumulators):
            stmts.append(Declare(acc, Load(bias, channel) if bias else Const(0.0)))
        ic, ky, kx = Var(self.fresh("ic")), Var(self.fresh("ky")), Var(self.fresh("kx"))
        row = spots[0][0] * sh + ky * dh - top  # one row for the whole tile
        # Each weight is loaded once and used at every point of the tile.
        taps = [self.fresh("w") for _ in channels]
        update: list[Stmt] = []
        for channel, tap in zip(channels, taps):
            if self.by_channel:
                index = ((ic * kh + ky) * kw + kx) * self.layout.channels(out_channels) + channel
            else:
                index = ((channel * per_group_in + ic) * kh + ky) * kw + kx
            update.append(Declare(tap, Load(weights, index)))
        for number, spot in enumerate(spots):
            col = spot[1] * sw + kx * dw - left
            # Which input channel a tap reads. In the batch layout a channel block never
            # straddles a group (oc_block divides out_channels / groups), so one load serves
            # the block; in the channel layout each lane may be in a group of its own.
            sources = channels if groups > 1 and self.by_channel else channels[:1]
            pixels = [self.fresh("v") for _ in sources]
            point: list[Stmt] = []
            for channel, pixel in zip(sources, pixels):
                in_channel: Expr = ic
                if groups > 1:
                    if self.by_channel:  # padding lanes read a real group's input, not past it
                        channel = Select(less(channel, out_channels), channel,
                                         Const(out_channels - 1))
                    group_index = channel if per_group_out == 1 else \
                        _floordiv(channel, per_group_out)
                    in_channel = group_index * per_group_in + ic
                if left or right:
                    # A tap in the padding reads a safe place and counts as zero: no branch
                    # per point (and adding 0 * w leaves the sum as skipping it would).
                    inside = _in_range(col, width)
                    safe = Select(inside, col, Const(0))
                    value: Expr = Select(inside, Load(source_buffer, self.index(
                        source, [in_channel, row, safe])), Const(0.0))
                else:  # the output size keeps every tap inside the input
                    value = Load(source_buffer, self.index(source, [in_channel, row, col]))
                point.append(Declare(pixel, value))
            for position, tap in enumerate(taps):
                pixel = pixels[position if len(pixels) > 1 else 0]
                acc = accumulators[number * len(channels) + position]
                point.append(Assign(acc, Local(acc) + Local(pixel) * Local(tap)))
            update += point
        row_loop = [For(kx.name, kw, update, self._reduce_kind(kw), role="reduce")]
        row_check = _in_range(row, height) if top or bottom else None
        stmts.append(For(ic.name, per_group_in, [
            For(ky.name, kh, _guarded(row_loop, row_check), self._reduce_kind(kh), role="reduce"),
        ], role="reduce"))
        return [Local(acc) for acc in accumulators]

    def bias(self, params: dict[str, np.ndarray]) -> str | None:
        if "bias" not in params:
            return None
        return self.channel_param(params["bias"]) if self.by_channel else self.param(
            params["bias"])

    def dense(self, node: str, channels: list[Expr], stmts: list[Stmt]) -> list[Expr]:
        params = self.graph.params(node)
        source = self.graph.operands(node)[0]
        features = self.graph.shape(source)[0]
        units = self.graph.shape(node)[0]
        bias = self.bias(params)
        source_buffer = self.input_buffer(source)
        accumulators = [self.fresh("acc") for _ in channels]
        for channel, acc in zip(channels, accumulators):
            stmts.append(Declare(acc, Load(bias, channel) if bias else Const(0.0)))
        pixel = self.fresh("v")
        if self.by_channel:
            # Weights [feature][units]: one vector load gives `lanes` units. The input is
            # read feature by feature in NCHW flatten order, skipping padding channels.
            stored = self.graph.shape(tensor_of(self.graph, source))
            area = math.prod(stored[1:])
            packed = np.zeros((features, self.layout.channels(units)))
            packed[:, :units] = params["weight"].T
            weights = self.param(packed)
            ci, point = Var(self.fresh("ci")), Var(self.fresh("p"))
            feature = ci * area + point
            update: list[Stmt] = [Declare(pixel, Load(source_buffer, point * self.layout.channels(
                stored[0]) + ci))]
            for channel, acc in zip(channels, accumulators):
                tap = feature * self.layout.channels(units) + channel
                update.append(Assign(acc, Local(acc) + Local(pixel) * Load(weights, tap)))
            stmts.append(For(ci.name, stored[0], [For(point.name, area, update, role="reduce")],
                             role="reduce"))
            return [Local(acc) for acc in accumulators]
        weights = self.param(params["weight"])
        k = Var(self.fresh("k"))
        # The flattened input is the same memory as the 4-D tensor it views.
        update = [Declare(pixel, Load(source_buffer, self.layout.index((features,), [k])))]
        for channel, acc in zip(channels, accumulators):
            update.append(Assign(acc, Local(acc) + Local(pixel) * Load(weights, channel * features
                                                                        + k)))
        stmts.append(For(k.name, features, update, role="reduce"))
        return [Local(acc) for acc in accumulators]

    def pool(self, window: str, head: list[str], channels: list[Expr], spots: list[list[Expr]],
             stmts: list[Stmt]) -> list[Expr]:
        """Max or average over the window of the values `head` computes around each point."""
        graph = self.graph
        op = graph.op(window)
        source = graph.operands(window)[0]
        _, height, width = graph.shape(source)
        attrs: dict[str, Any] = graph.attrs(window)
        if op == "global_avgpool2d":
            attrs = {"kernel_size": (height, width), "stride": (1, 1),
                     "padding": ((0, 0), (0, 0)), "count_include_pad": True}
        (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
        (top, _), (left, _) = attrs["padding"]
        is_max = op == "maxpool2d"
        results = [self.fresh("pool") for _ in _pairs(spots, channels)]
        for result in results:
            stmts.append(Declare(result, Const(-math.inf if is_max else 0.0)))
        wy, wx = Var(self.fresh("wy")), Var(self.fresh("wx"))
        inner_spots = [[spot[0] * sh + wy - top, spot[1] * sw + wx - left] for spot in spots]
        inner: list[Stmt] = []
        if head:
            values = self.produce(head, channels, inner_spots, inner)
        else:
            values = [Load(self.input_buffer(source), self.index(source, [channel, *spot]))
                      for spot, channel in _pairs(inner_spots, channels)]
        for result, value in zip(results, values):
            combined = maximum(Local(result), value) if is_max else Local(result) + value
            inner.append(Assign(result, combined))
        out_h, out_w = graph.shape(window)[1:]
        if not self._x_block_allowed():  # then there is one spot: guard it
            row, col = inner_spots[0]
            inner = _guarded(inner, all_of(_in_range(row, height), _in_range(col, width)))
        stmts.append(For(wy.name, kh, [For(wx.name, kw, inner, "serial", role="window")],
                         "serial", role="window"))
        if is_max:
            return [Local(result) for result in results]
        divisor = _avg_divisors(attrs, height, width, out_h, out_w)
        if np.all(divisor == divisor.flat[0]):
            return [Local(result) / float(divisor.flat[0]) for result in results]
        table = self.param(divisor.astype(np.float32))
        return [Local(result) / Load(table, spot[0] * out_w + spot[1])
                for result, (spot, _) in zip(results, _pairs(spots, channels))]

    def elementwise(self, nodes: list[str], values: list[Expr], channels: list[Expr],
                    spots: list[list[Expr]], stmts: list[Stmt]) -> list[Expr]:
        """Apply the elementwise `nodes` in order; each result is kept in a local."""
        for node in nodes:
            op = self.graph.op(node)
            if op == "batchnorm2d":
                scale, shift = ops.batchnorm_scale_shift(self.graph.attrs(node),
                                                         self.graph.params(node))
                scales, shifts = self.channel_param(scale), self.channel_param(shift)
            updated: list[Expr] = []
            for (spot, channel), value in zip(_pairs(spots, channels), values):
                if op == "sigmoid":
                    result = Const(1.0) / (Call("exp", Const(0.0) - value) + 1.0)
                elif op == "relu":
                    result = maximum(value, Const(0.0))
                elif op == "tanh":
                    # 1 - 2 / (e^2x + 1) saturates to +-1 instead of overflowing.
                    result = Const(1.0) - Const(2.0) / (Call("exp", value * 2.0) + 1.0)
                elif op == "batchnorm2d":
                    result = value * Load(scales, channel) + Load(shifts, channel)
                elif op == "add":
                    chain = self.group.nodes[self.group.nodes.index(node) - 1] \
                        if node != self.group.producer else None
                    result = value
                    operands = self.graph.operands(node)
                    skip = operands.index(chain) if chain in operands else 0
                    for position, operand in enumerate(operands):
                        if position != skip:
                            result = result + Load(self.input_buffer(operand),
                                                   self.index(operand, [channel, *spot]))
                else:
                    raise NotImplementedError(f"no lowering for elementwise op {op}")
                local = self.fresh("t")
                stmts.append(Declare(local, result))
                updated.append(Local(local))
            values = updated
        return values

    def softmax(self) -> list[Stmt]:
        """Softmax over channels at each point: max, sum of exponentials, then divide."""
        node = self.group.producer
        source = self.graph.operands(node)[0]
        shape = self.graph.shape(node)
        buffer = self.input_buffer(source)
        spatial = [Var("y"), Var("x")][: len(shape) - 1]
        channel = Var("c")
        value = Load(buffer, self.index(source, [channel, *spatial]))
        top, total = self.fresh("max"), self.fresh("sum")
        inner: list[Stmt] = [
            Declare(top, Const(-math.inf)),
            For("c", shape[0], [Assign(top, maximum(Local(top), value))], role="reduce"),
            Declare(total, Const(0.0)),
            For("c", shape[0], [Assign(total, Local(total) + Call("exp", value - Local(top)))],
                role="reduce"),
            For("c", shape[0], [Store("out", self.index(node, [channel, *spatial]),
                                      Call("exp", value - Local(top)) / Local(total))],
                role="channel"),
        ]
        # The sums run over channels, so only the batch layout has lanes to vectorise.
        body: list[Stmt] = [For("lane", self.layout.images_per_block, inner, "vectorized",
                                role="lane")]
        for var, extent in reversed(list(zip(spatial, shape[1:]))):
            body = [For(var.name, extent, body, role="spatial")]
        return body

    def concat(self) -> list[Stmt]:
        """Copy each operand's channels into its place in the output."""
        node = self.group.producer
        body: list[Stmt] = []
        start = 0
        for operand in self.graph.operands(node):
            shape = self.graph.shape(operand)
            buffer = self.input_buffer(operand)
            coords = _point_coords(shape)
            target = [coords[0] + start, *coords[1:]]
            copy = Store("out", self.index(node, target), Load(buffer, self.index(operand, coords)))
            lanes = For("lane", self.layout.images_per_block, [copy], "vectorized", role="lane")
            body += _point_loops(shape, [lanes])
            start += shape[0]
        return body

    def flatten(self) -> list[Stmt]:
        """A flattening copy, for the channel layout: element (c, h, w) of the image goes to
        feature (c * H + h) * W + w, as NumPy's reshape orders them."""
        node = self.group.producer
        source = self.graph.operands(node)[0]
        shape = self.graph.shape(source)
        coords = _point_coords(shape)
        copy = Store("out", self.index(node, [_flat(shape, coords)]),
                     Load(self.input_buffer(source), self.index(source, coords)))
        lanes = For("lane", self.layout.images_per_block, [copy], "vectorized", role="lane")
        return _point_loops(shape, [lanes])

    def _reduce_kind(self, extent: int) -> LoopKind:
        return "unrolled" if extent <= self.schedule.unroll_max else "serial"


def _pairs(spots: list[list[Expr]], channels: list[Expr]) -> list[tuple[list[Expr], Expr]]:
    """Every (spot, channel) of a register tile, spot-major: the order of its values."""
    return [(spot, channel) for spot in spots for channel in channels]


def _floordiv(expr: Expr, divisor: int) -> Expr:
    return Bin("//", expr, Const(divisor))


def _in_range(coord: Expr, size: int) -> Expr:
    """0 <= coord < size."""
    return Bin("and", less(Const(-1), coord), less(coord, size))


def _guarded(body: list[Stmt], cond: Expr | None) -> list[Stmt]:
    return body if cond is None else [If(cond, body)]


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
