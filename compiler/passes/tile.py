"""Pick each kernel's schedule: a deterministic heuristic over the shapes and the target.

The schedule says how many output channels and points share each load (a register tile, sized
by the CPU's vector registers), which reduction loops are unrolled and, for the CUDA targets,
how images and points map onto threads and whether a block takes one whole image (from the GPU
architecture). Target facts come from `options` (`cnnc.target`); which buffers a block stages
in shared memory is decided on the kernel IR by `cnnc.gpu_bind`. A user's schedule file
replaces fields of the one picked here, each checked against the kernel it is for.
"""

from __future__ import annotations

import hashlib
import math

from cnnc import ops
from cnnc.graph import Graph
from cnnc.kernel import Schedule
from cnnc.layouts import Layout
from cnnc.passes.fuse import tensor_of
from cnnc.passes.layout import layout_of
from cnnc.passes.options import GPU_TARGETS, Options
from cnnc.plan import Group
from cnnc.schedule_file import (
    EVERY_KERNEL,
    KernelFacts,
    as_schedules,
    check_fits,
    check_names,
)
from cnnc.scratch import winograd_scratch
from cnnc.target import DEFAULT_GPU_ARCH, CpuIsa, GpuArch, gpu_arch
from cnnc.util import ceil_div

GPU_MAX_OUTPUTS_PER_THREAD = 8  # accumulators per thread: registers stay well under 64
GPU_DENSE_OUTPUTS_PER_THREAD = 4  # a dense thread also keeps its input row's address live
HEAVY_PADDING_X_BLOCK = 2  # points a row's tile takes where the padding is heavy
GPU_UNROLL_MAX = 8  # reduction loops up to this long are fully unrolled on the GPU
GPU_MIN_POINTS = 64  # threads wanted per image, so that a small batch still fills warps
GPU_MAX_BLOCK = 256
WINOGRAD_TILES = (2, 4)  # F(2x2,3x3) and F(4x4,3x3); 0 is the direct convolution
# The heuristic's Winograd on the CPU: F(4x4) is faster still, but rounds up to the float32
# tolerance (docs/performance.md); schedule files and `cnnc tune` may pick it.
WINOGRAD_HEURISTIC = 2
WINOGRAD_MIN_CHANNELS = 16  # narrower: the transforms outweigh the products (vgg_bn's 3 -> 32)
STREAMED_WEIGHT_BYTES = 1 << 20  # a dense layer's weights past this stream from memory
DENSE_CHANNEL_BLOCKS = 4  # channel blocks kept by such a layer, for batch 1's threads
FEW_INPUT_CHANNELS = 4  # a channel-layout conv this narrow unrolls its padded window
STREAMED_LOAD_COST = 3  # loads of L1 that one vector load streamed from L2 weighs as


def tile(graph: Graph, options: Options) -> Graph:
    layout = layout_of(graph)
    schedules = as_schedules(options.schedules)
    for every in schedules.lines_for(EVERY_KERNEL):
        check_fits(every, None)
    kernels, signatures = [], set()
    for group in graph.plan.groups:
        producer = group.producer
        channels = 1
        if is_anchor(graph, producer):
            out = graph.shape(producer)[0]
            channels = out // graph.attrs(producer).get("groups", 1)
            if layout.kind == "channel":  # accumulators hold whole vectors of channels
                channels = layout.channels(out) // layout.vector(out)
        # A GPU target has no CPU registers to fill: its oc_block is picked below.
        accumulators = options.cpu.accumulators if options.cpu is not None else 1
        oc_block = _largest_divisor(channels, accumulators)
        picked = group.schedule.replace(
            oc_block=oc_block,
            x_block=_x_block(graph, group.output, oc_block, layout.kind, options.cpu),
            unroll_max=0,  # measured: LLVM schedules the rolled loops better, and sooner
            gpu_threads=128,
        )
        if options.target in GPU_TARGETS:
            picked = _gpu_schedule(graph, group, picked, channels,
                                   gpu_arch(options.arch or DEFAULT_GPU_ARCH))
        elif options.cpu is not None and is_depthwise(graph, producer):
            picked = _depthwise_schedule(graph, group, picked, layout, options.cpu)
        elif options.cpu is not None and is_pointwise_conv(graph, producer):
            picked = _pointwise_schedule(graph, group, picked, layout, options.cpu)
        elif options.cpu is not None and is_broadcast_conv(graph, producer, layout):
            picked = _broadcast_schedule(graph, group, picked, channels, layout, options.cpu)
        elif options.cpu is not None and layout.kind == "channel" \
                and graph.op(producer) == "conv2d":
            picked = _channel_conv_schedule(graph, group, picked, layout, options.cpu)
        elif options.cpu is not None and layout.kind == "channel" \
                and graph.op(producer) == "dense":
            picked = _channel_dense_schedule(graph, group, picked, layout, options.cpu)
        direct = picked
        if options.cpu is not None and options.winograd and winograd_pays(graph, group):
            picked = _winograd_schedule(graph, group, picked, layout, options.cpu)
        facts = kernel_facts(graph, group)
        kernels.append(facts)
        # Overrides: for every kernel ("*"), by name, then a tuned record for exactly this
        # kernel (its signature), the most specific last.
        tuned = signature(graph, group, layout.kind)
        signatures.add(tuned)
        overrides = dict(schedules.get(EVERY_KERNEL, {}))
        for key in (group.name, tuned):
            for line in schedules.lines_for(key):
                check_fits(line, facts)
            overrides.update(schedules.get(key, {}))
        group.schedule = picked.replace(**overrides)
        if picked.winograd and not group.schedule.winograd:  # switched off: the direct tile
            group.schedule = direct.replace(**overrides)
        if group.schedule.winograd not in (0, *facts.winograd):
            # Asked of every kernel ("*"): those Winograd does not compute stay direct.
            group.schedule = group.schedule.replace(winograd=0)
        group.scratch = 0
        m = group.schedule.winograd
        if m and options.target not in GPU_TARGETS:
            # On the CPU, Winograd runs staged, through memory of the kernel's own.
            grid = winograd_grid(graph, group, m)
            group.scratch = winograd_scratch(graph, group, layout, grid).floats
    check_names(schedules, kernels, signatures, layout.kind, graph.name)
    return graph


def is_anchor(graph: Graph, name: str) -> bool:
    """Whether node `name` is an anchor op (the registry's kind: conv2d, dense), whose output
    channels a schedule's `oc_block` splits."""
    return ops.OPS[graph.op(name)].kind == "anchor"


def is_depthwise(graph: Graph, name: str) -> bool:
    """Whether node `name` is a depthwise convolution: one input and one output channel a
    group, so that no sum runs across channels."""
    if graph.op(name) != "conv2d":
        return False
    groups = graph.attrs(name)["groups"]
    source = graph.operands(name)[0]
    return groups > 1 and groups == graph.shape(name)[0] == graph.shape(source)[0]


def _depthwise_schedule(graph: Graph, group: Group, picked: Schedule, layout: Layout,
                        cpu: CpuIsa) -> Schedule:
    """A depthwise convolution's accumulator sums only its kh x kw taps: one chain of
    dependent FMAs, which alone leaves the FMA pipes idle. Its register tile runs along the
    row first (`x_block` points, each weight load serving all of them), then over channel
    steps (whose accumulators are independent chains too), as many as the CPU's register
    tile holds; the window loops are unrolled so that neighbouring points share input loads
    and the taps' weight offsets are constants."""
    x_block = _largest_divisor(_tiled_rows(graph, group), cpu.register_tile)
    steps = layout.channel_steps(graph.shape(group.producer)[0])
    oc_block = _largest_divisor(steps, max(1, cpu.register_tile // x_block))
    kh, kw = graph.attrs(group.producer)["kernel_size"]
    return picked.replace(oc_block=oc_block, x_block=x_block, unroll_max=max(kh, kw))


def is_pointwise_conv(graph: Graph, name: str) -> bool:
    """Whether node `name` is a 1x1 convolution without groups: a matrix product at every
    point, channels by input channels."""
    if graph.op(name) != "conv2d":
        return False
    attrs = graph.attrs(name)
    return attrs["groups"] == 1 and tuple(attrs["kernel_size"]) == (1, 1)


def _pointwise_schedule(graph: Graph, group: Group, picked: Schedule, layout: Layout,
                        cpu: CpuIsa) -> Schedule:
    """A 1x1 convolution is a matrix product: its register tile of `oc_block` channel steps
    by `x_block` points reads oc_block + x_block values (weights, inputs) for oc_block x
    x_block FMAs, so the tile is the one of the CPU's register tile with the most FMAs per
    load. Fused with a global pooling the points are those of the pooled rows, and each
    channel step keeps a pooling sum in a register as well. In the batch layout a weight is
    a broadcast scalar, as in `_broadcast_schedule`, so the accumulators may take
    `cpu.broadcast_tile` (16 with AVX-512: 4 x 4, 2 FMAs a load) rather than the channel
    layout's `register_tile` (14: 4 x 2). A point's input channels lie a multiple of 4 KB
    apart there, in one L1 set, so each channel block reads them again from L2: more
    channels or points a tile is what pays (measured on NiN's 1x1 layers at batch 64: 45-63
    % of the peak at 4 x 2, 49-69 % at 4 x 4 or 8 x 2, 19-42 % past 16 accumulators).
    In the channel layout the input is the broadcast operand, as in `_channel_conv_schedule`,
    and the tile takes `cpu.broadcast_tile` as well, the pooling sums, which the loop over
    the input channels does not touch, left uncounted (measured on mobilenet at batch 1:
    its 1x1 layers from 52-69 % of the peak at 4 x 2 and 2 x 4 to 65-79 % at 4 x 4 and
    2 x 8, the whole net 71 -> 60 us)."""
    rows = _tiled_rows(graph, group)
    steps = layout.channel_steps(graph.shape(group.producer)[0])
    pooled = group.window is not None
    batch = layout.kind == "batch" and layout.images_per_block > 1
    channel = layout.kind == "channel"
    limit = cpu.broadcast_tile if batch or channel else cpu.register_tile
    best = (1, 1)
    for oc_block in _divisors(steps):
        for x_block in _divisors(rows):
            registers = oc_block * x_block + (oc_block if pooled and not channel else 0)
            if registers > limit:
                continue
            if _per_load(oc_block, x_block) > _per_load(*best):
                best = (oc_block, x_block)
    return picked.replace(oc_block=best[0], x_block=best[1])


def _is_direct_conv(graph: Graph, name: str) -> bool:
    """Whether node `name` is a convolution neither depthwise nor 1x1 (those have schedules
    of their own)."""
    return graph.op(name) == "conv2d" and not is_depthwise(graph, name) \
        and not is_pointwise_conv(graph, name)


def is_broadcast_conv(graph: Graph, name: str, layout: Layout) -> bool:
    """Whether node `name` is a convolution that `_broadcast_schedule` tiles: a direct one
    in the batch layout with images in the vector lanes (not the GPU's one image a thread)."""
    return layout.kind == "batch" and layout.images_per_block > 1 \
        and _is_direct_conv(graph, name)


def window_rows_tiled(graph: Graph, group: Group, layout: Layout) -> bool:
    """Whether each output point of `group`'s register tile computes a whole row of its
    pooling window at once: for a direct convolution of the batch layout's broadcast tile
    (`is_broadcast_conv`) or the channel layout's tile whose window tiles its output
    (`pool_factor`), so that the tile's convolution points are neighbours, whose taps share
    input loads, rather than a window's stride apart."""
    tiled = is_broadcast_conv(graph, group.producer, layout) or \
        (layout.kind == "channel" and _is_direct_conv(graph, group.producer))
    return tiled and pool_factor(graph, group) > 1


def _broadcast_schedule(graph: Graph, group: Group, picked: Schedule, channels: int,
                        layout: Layout, cpu: CpuIsa) -> Schedule:
    """A convolution in the batch layout: a point's input is one vector of images and a
    weight one scalar, broadcast. A tile of `oc_block` channels by `x_block` points loads
    oc_block weights and x_block inputs per tap for oc_block x x_block FMAs; with points
    alone (x_block 1) that is more than one load per FMA, past what the load ports give two
    FMA pipes. So the tile is the one with the most FMAs per load among those whose
    accumulators fit the registers (`cpu.broadcast_tile`: 4 x 4 with AVX-512), a fused
    pooling window's row counting as its points (`window_rows_tiled`). Measured on the
    zoo's 3x3 convolutions at batch 64: 80-95 % of the peak, 60-73 % at 8 x 1. Where the
    padding of a row is half its input or more (the input gradient of a 5x5 convolution of
    a 10x10 image, padded by 4) nearly every tile of a row reaches into it and checks its
    taps: there at most HEAVY_PADDING_X_BLOCK points (LeNet's: 2 x 7 ran at 43 %, 6 x 2 at
    76 %)."""
    rows = _tiled_rows(graph, group) if row_tiles_fit(graph, group) else 1
    if _heavily_padded(graph, group.producer):
        rows = _largest_divisor(rows, HEAVY_PADDING_X_BLOCK)
    across = pool_factor(graph, group) if window_rows_tiled(graph, group, layout) else 1
    best = (1, 1)
    for oc_block in _divisors(channels):
        for x_block in _divisors(rows):
            points = x_block * across
            if oc_block * points > cpu.broadcast_tile:
                continue
            if _per_load(oc_block, points) > _per_load(best[0], best[1] * across):
                best = (oc_block, x_block)
    return picked.replace(oc_block=best[0], x_block=best[1])


def _heavily_padded(graph: Graph, name: str) -> bool:
    """Whether conv `name` pads its rows by half their width or more, left and right."""
    (_, _), (left, right) = graph.attrs(name)["padding"]
    return 2 * (left + right) >= graph.shape(graph.operands(name)[0])[2]


def row_tiles_fit(graph: Graph, group: Group) -> bool:
    """Whether neighbouring points of a row may share a fused pooling window's loops: only
    when no window hangs over the edge of the input (else each point would need a check of
    its own). Always without a window, and for a window over the whole image."""
    window = group.window
    if window is None or ops.OPS[graph.op(window)].window.whole_image:  # type: ignore[union-attr]
        return True
    attrs = graph.attrs(window)
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    _, height, width = graph.shape(graph.operands(window)[0])
    out_h, out_w = graph.shape(window)[1:]
    return not (any(attrs["padding"][0]) or any(attrs["padding"][1])
                or (out_h - 1) * sh + kh > height or (out_w - 1) * sw + kw > width)


def winograd_tiles(graph: Graph, group: Group) -> tuple[int, ...]:
    """The Winograd output tiles (`Schedule.winograd`, `cnnc.lower.winograd`) that can
    compute `group`'s kernel: its producer is a 3x3, stride-1, undilated, ungrouped conv2d and
    a fused pooling window, if any, tiles the tile (`pool_factor` divides it)."""
    producer = group.producer
    if graph.op(producer) != "conv2d":
        return ()
    attrs = graph.attrs(producer)
    if (tuple(attrs["kernel_size"]) != (3, 3) or tuple(attrs["stride"]) != (1, 1)
            or tuple(attrs["dilation"]) != (1, 1) or attrs["groups"] != 1):
        return ()
    factor = pool_factor(graph, group)
    return tuple(m for m in WINOGRAD_TILES if factor and m % factor == 0)


def winograd_pays(graph: Graph, group: Group) -> bool:
    """Whether the CPU heuristic computes `group`'s convolution by F(2x2, 3x3): where it
    applies and both channel counts are at least WINOGRAD_MIN_CHANNELS. It depends on the
    shapes alone, so that both layouts compute the kernel alike (the same bits)."""
    if WINOGRAD_HEURISTIC not in winograd_tiles(graph, group):
        return False
    producer = group.producer
    in_channels = graph.shape(graph.operands(producer)[0])[0]
    return min(in_channels, graph.shape(producer)[0]) >= WINOGRAD_MIN_CHANNELS


def _winograd_schedule(graph: Graph, group: Group, picked: Schedule, layout: Layout,
                       cpu: CpuIsa) -> Schedule:
    """F(2x2, 3x3), staged: its products' register tile, `x_block` tiles by `oc_block`
    channel steps, holds `broadcast_tile` accumulators, up to half of them tiles with one
    image a block, a quarter in the batch layout (the best of 16 shapes on vgg_bn)."""
    m = WINOGRAD_HEURISTIC
    budget = cpu.broadcast_tile
    most = budget // 2 if layout.images_per_block == 1 else budget // 4
    x_block = _largest_divisor(winograd_grid(graph, group, m)[1], most)
    steps = layout.channel_steps(graph.shape(group.producer)[0])
    oc_block = _largest_divisor(steps, max(1, budget // x_block))
    return picked.replace(winograd=m, oc_block=oc_block, x_block=x_block)


def winograd_grid(graph: Graph, group: Group, m: int) -> tuple[int, int]:
    """The rows and columns of F(m x m) tiles that `group`'s kernel computes: as many as
    cover its output, each tile giving m / `pool_factor` points of it a side."""
    side = m // pool_factor(graph, group)
    out_h, out_w = graph.shape(group.output)[1:]
    return ceil_div(out_h, side), ceil_div(out_w, side)


def pool_factor(graph: Graph, group: Group) -> int:
    """The side of the group's pooling window when it tiles the convolution's output
    (kernel = stride, no padding, no window hanging over the edge as `ceil_mode` may, not
    the whole image); 1 without a window; 0 when the window does not tile it."""
    window = group.window
    if window is None:
        return 1
    spec = ops.OPS[graph.op(window)].window
    if spec is None or spec.whole_image:
        return 0
    attrs = graph.attrs(window)
    (kh, kw), stride = attrs["kernel_size"], tuple(attrs["stride"])
    if kh != kw or stride != (kh, kw) or any(attrs["padding"][0]) or any(attrs["padding"][1]):
        return 0
    _, height, width = graph.shape(graph.operands(window)[0])
    out_h, out_w = graph.shape(window)[1:]
    if out_h * kh > height or out_w * kw > width:
        return 0
    return int(kh)


def _channel_conv_schedule(graph: Graph, group: Group, picked: Schedule, layout: Layout,
                           cpu: CpuIsa) -> Schedule:
    """A convolution in the channel layout (neither depthwise nor 1x1): a tile of `oc_block`
    channel vectors by `x_block` points of a row loads oc_block weight vectors and x_block
    broadcast inputs per tap for oc_block x x_block FMAs. The weights of a block of channels
    (oc_block x 64 B per input channel and tap: 147-295 KB for 128 input channels) pass L1
    and stream from L2 once per tile, so the tile is the one with the most FMAs per load,
    then the most points, among those whose accumulators fit `cpu.broadcast_tile` (the
    inputs are the broadcast operand here). Where all the weights overflow L1 (the OS's
    `cpu.l1_bytes`), a weight load counts STREAMED_LOAD_COST loads: it comes from L2, an
    input's from L1; a fused pooling window's points count so too. Measured on
    vgg_bn at batch 1 (AVX-512): the 64->128 and 128->128 convolutions on 8x8 at 4 x 4 run
    at 80 % of the peak, 38 % at the 8 x 1 that filling the channels first gave, 35-55 % by
    Winograd F(2x2); the heuristic no longer picks Winograd (schedule files and `cnnc tune`
    still may). The unpooled 128->128 on 8x8 at 2 x 8, half the weight loads: 101 %
    (47.7 -> 38.8 us), its 32->64 on 16x16 79 -> 87 %; pooled, 2 x 4 pooled points (2 x 8
    of the convolution), its 128->128 from 74 to 88 %, its 64->64 74 -> 79 % (its 32->32,
    36 KB of weights in a 48 KB L1, ran 8 % slower so)."""
    rows = _tiled_rows(graph, group) if row_tiles_fit(graph, group) else 1
    steps = layout.channel_steps(graph.shape(group.producer)[0])
    window = group.window
    whole_image = window is not None \
        and ops.OPS[graph.op(window)].window.whole_image  # type: ignore[union-attr]
    attrs = graph.attrs(group.producer)
    kh, kw = attrs["kernel_size"]
    per_group_in = graph.shape(graph.operands(group.producer)[0])[0] // attrs["groups"]
    weight_bytes = 4 * per_group_in * kh * kw * layout.channels(graph.shape(group.producer)[0])
    weight_cost = STREAMED_LOAD_COST if weight_bytes > cpu.l1_bytes else 1
    across = pool_factor(graph, group) if window_rows_tiled(graph, group, layout) else 1
    best = (1, 1)
    for oc_block in _divisors(steps):
        for x_block in _divisors(rows):
            # A whole-image pooling keeps one sum per channel vector in a register as well.
            registers = oc_block * x_block * across + (oc_block if whole_image else 0)
            if registers > cpu.broadcast_tile:
                continue
            if _per_load_points(oc_block, x_block * across, weight_cost) > \
                    _per_load_points(best[0], best[1] * across, weight_cost):
                best = (oc_block, x_block)
    # With few input channels and padded columns the rolled window loops were the slow part
    # (measured: NiN's 3->32 5x5 at 2 x 8, 49 % of the peak rolled, 83 % unrolled; without
    # padding, LeNet's 1->6 5x5 lost by unrolling).
    few = per_group_in <= FEW_INPUT_CHANNELS and attrs["groups"] == 1 \
        and any(attrs["padding"][1])
    return picked.replace(oc_block=best[0], x_block=best[1],
                          unroll_max=max(kh, kw) if few else picked.unroll_max)


def _per_load_points(oc_block: int, x_block: int, weight_cost: int = 1) -> tuple[float, int]:
    """FMAs per load of a channel-layout tile, a weight vector's load counting `weight_cost`
    loads, then the more points (fewer weight streams)."""
    return (oc_block * x_block / (oc_block * weight_cost + x_block), x_block)


def _channel_dense_schedule(graph: Graph, group: Group, picked: Schedule, layout: Layout,
                            cpu: CpuIsa) -> Schedule:
    """A dense layer in the channel layout: at batch 1 its weights are read once, so past
    STREAMED_WEIGHT_BYTES (more than most cores' L2) it runs at the memory's speed, far
    below the FMA pipes' (mnist_cnn's 9216->128, 4.7 MB: 6 % of the peak). Such a layer
    keeps DENSE_CHANNEL_BLOCKS blocks of channels where its units allow, so that batch 1
    on several threads can share them out (`backends/llvm/split.py`: each core streams its
    share; `lower.anchors.dense` stores each block's weights contiguously). Each output's
    sum runs over the features in the same order whatever the block: the same bits."""
    steps = layout.channel_steps(graph.shape(group.producer)[0])
    oc_block = _largest_divisor(steps, cpu.accumulators)
    params = graph.params(group.producer)
    if params["weight"].size * 4 > STREAMED_WEIGHT_BYTES:
        oc_block = _largest_divisor(steps, max(1, min(oc_block, steps // DENSE_CHANNEL_BLOCKS)))
    return picked.replace(oc_block=oc_block, x_block=1)


def _per_load(oc_block: int, x_block: int) -> tuple[float, int, int]:
    """FMAs per load of a tile, then the larger tile, then the more channels."""
    return (oc_block * x_block / (oc_block + x_block), oc_block * x_block, oc_block)


def _divisors(number: int) -> list[int]:
    return [divisor for divisor in range(1, number + 1) if number % divisor == 0]


def _tiled_rows(graph: Graph, group: Group) -> int:
    """The width of the rows a kernel's `x_block` tiles: its output rows, or in a kernel that
    pools its whole image into one point the rows of that image (`lower.template`); 1 when
    the output has no rows."""
    window = group.window
    if window is not None and ops.OPS[graph.op(window)].window.whole_image:  # type: ignore[union-attr]
        return int(graph.shape(graph.operands(window)[0])[-1])
    shape = graph.shape(group.output)
    return int(shape[-1]) if len(shape) == 3 else 1


def kernel_facts(graph: Graph, group: Group) -> KernelFacts:
    """What a schedule file's values for `group` must fit: the output channels of its
    convolution or dense layer (the most `oc_block` can take), the width of its output rows
    (the most `x_block` can take)."""
    producer = group.producer
    channels = graph.shape(producer)[0] if is_anchor(graph, producer) else None
    rows = _tiled_rows(graph, group)
    shape = graph.shape(group.output)
    return KernelFacts(group.name, channels, rows if len(shape) == 3 else None,
                       winograd_tiles(graph, group))


def signature(graph: Graph, group: Group, layout: str) -> str:
    """What a tuned schedule is valid for: the layout and every op of the kernel with its
    attributes and shapes, hashed. Layer names and weights do not count."""
    parts = [layout]
    for node in group.nodes:
        operands = [graph.shape(operand) for operand in graph.operands(node)]
        parts.append(f"{graph.op(node)} {sorted(graph.attrs(node).items())} {operands} "
                     f"-> {graph.shape(node)}")
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{layout}/{digest}"


def _x_block(graph: Graph, output: str, oc_block: int, kind: str, cpu: CpuIsa | None) -> int:
    """Points of a row per iteration: in the channel layout, where one image's channels fill
    few vectors, neighbouring points share each weight load."""
    shape = graph.shape(output)
    if kind != "channel" or len(shape) < 3 or cpu is None:
        return 1
    return _largest_divisor(shape[-1], max(1, cpu.register_tile // oc_block))


def _largest_divisor(number: int, limit: int) -> int:
    return max(divisor for divisor in range(1, min(number, limit) + 1) if number % divisor == 0)


def _gpu_schedule(graph: Graph, group: Group, picked: Schedule, channels: int,
                  arch: GpuArch) -> Schedule:
    """A CUDA schedule. A thread computes `oc_block` channels at one point of one image.

    Where a point has no spatial extent (dense layers, vectors) neighbouring threads take
    neighbouring images: a warp then reads each weight once, as a broadcast. Otherwise they
    take neighbouring pixels of one image, so loads and stores are coalesced; when the inputs
    are reused across pixels (a convolution or pooling window) and would fit the
    architecture's shared-memory budget, a block takes one whole image, so that it can stage
    them (which buffers it stages is the binding's decision, on the kernel IR: `gpu_bind`).
    """
    # Unrolled kernel windows give the CUDA compiler constant weight offsets.
    picked = picked.replace(unroll_max=GPU_UNROLL_MAX)
    out_shape = graph.shape(group.output)
    computes_channels = is_anchor(graph, group.producer)
    spatial = math.prod(out_shape[1:])
    if spatial == 1:
        block = _largest_divisor(channels, GPU_DENSE_OUTPUTS_PER_THREAD) \
            if computes_channels else 1
        return picked.replace(oc_block=block, gpu_batch_inner=True, gpu_shared_tiles=False,
                              gpu_threads=128)
    block = _largest_divisor(channels, GPU_MAX_OUTPUTS_PER_THREAD) if computes_channels else 1
    while block > 1 and out_shape[0] // block * spatial < GPU_MIN_POINTS:
        block = _largest_divisor(channels, block - 1)
    points = out_shape[0] // block * spatial
    staged = _reused_input_floats(graph, group)
    if staged and staged * 4 <= arch.shared_budget() and points >= 32:
        passes = ceil_div(points, GPU_MAX_BLOCK)
        threads = ceil_div(ceil_div(points, passes), 32) * 32
        return picked.replace(oc_block=block, gpu_batch_inner=False, gpu_shared_tiles=True,
                              gpu_threads=threads)
    threads = 256 if arch.threads_per_sm % 256 == 0 and points >= 1024 else 128
    return picked.replace(oc_block=block, gpu_batch_inner=False, gpu_shared_tiles=False,
                          gpu_threads=threads)


def _reused_input_floats(graph: Graph, group: Group) -> int:
    """Floats per image of the inputs that neighbouring output points read again: the input
    of a convolution wider than 1x1 or of a pooling window. 0 when there is none. An estimate
    from the graph, before any kernel exists, of what staging would hold: whether one block per
    image pays."""
    floats = 0
    for node in group.nodes:
        op = graph.op(node)
        if op != "conv2d" and ops.OPS[op].kind != "window":
            continue
        operand = tensor_of(graph, graph.operands(node)[0])
        if op == "conv2d" and tuple(graph.attrs(node)["kernel_size"]) == (1, 1):
            continue
        if operand in group.nodes:
            continue  # computed in the kernel (the convolution before a fused pooling)
        floats += math.prod(graph.shape(operand))
    return floats
