"""Input gradients that are forward ops: a stride-1 convolution's is the convolution of the
output's gradient with the kernel flipped and its channels swapped, and a dense layer's is a
dense layer of the transposed weights. Lowered by the forward lowering and tiling pass, they
get the forward kernels' register tiles (the gather in `kernels.conv_input_backward` keeps one
accumulator per point and runs at a fifth of the speed). A strided convolution's is one such
convolution per phase of the input (the points y = sh * i + py, x = sw * j + px, which only
the taps ky = py + top (mod sh) reach), whose results `interleave` puts in place.

The flipped or transposed weights change with every step: a small kernel (`rearrange`) makes
them from the live parameters at the start of each step, into a scratch region of the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph
from cnnc.kernel import Buffer, Const, For, Kernel, Load, Stmt, Store, Var
from cnnc.lower import USER_INPUT, USER_OUTPUT, lower
from cnnc.passes import Options, run_pipeline

LAYER = "t"  # the one layer of the graph an input gradient is lowered from


def conv_padding(attrs: dict) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The padding of the transposed convolution, or None when it is not one of stride 1
    (a stride leaves holes) or when a side would be negative."""
    if attrs["stride"] != (1, 1):
        return None
    (kh, kw), (dh, dw) = attrs["kernel_size"], attrs["dilation"]
    (top, bottom), (left, right) = attrs["padding"]
    sides = ((dh * (kh - 1) - top, dh * (kh - 1) - bottom),
             (dw * (kw - 1) - left, dw * (kw - 1) - right))
    if min(min(side) for side in sides) < 0:
        return None
    return sides


def input_gradient_kernel(name: str, op: str, attrs: dict, in_shape: tuple[int, ...],
                          out_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> Kernel:
    """The forward kernel computing the input's gradient from the output's; its weights are a
    param buffer whose `param_of` is "t.weight" (the caller binds it to the rearranged ones)."""
    if op == "conv2d":
        padding = conv_padding(attrs)
        assert padding is not None
        return _conv_kernel(name, attrs, in_shape[0], out_shape, attrs["kernel_size"],
                            padding)
    graph = Graph("gradient", out_shape)
    raw = {"units": in_shape[0], "bias": False}
    graph.add(LAYER, op, [INPUT], ops.OPS["dense"].check_attrs(raw),
              {"weight": np.zeros((weight_shape[1], weight_shape[0]), np.float32)})
    return _lowered(name, graph)


def _conv_kernel(name: str, attrs: dict, channels: int, out_shape: tuple[int, ...],
                 kernel_size: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]
                 ) -> Kernel:
    """The forward kernel of a convolution of the output's gradient (`out_shape`) into
    `channels` channels, with the layer's groups and dilation."""
    graph = Graph("gradient", out_shape)
    raw = {"out_channels": channels, "kernel_size": list(kernel_size),
           "dilation": list(attrs["dilation"]), "groups": attrs["groups"],
           "padding": [list(padding[0]), list(padding[1])], "bias": False}
    shape = (channels, out_shape[0] // attrs["groups"], *kernel_size)
    graph.add(LAYER, "conv2d", [INPUT], ops.OPS["conv2d"].check_attrs(raw),
              {"weight": np.zeros(shape, np.float32)})
    return _lowered(name, graph)


def _lowered(name: str, graph: Graph) -> Kernel:
    graph.outputs = [LAYER]
    compiled = run_pipeline(graph, Options(layout="batch", winograd=False), ("fold_batchnorm",))
    lowered = lower(compiled)
    (kernel,) = [kernel for kernel in lowered.kernels
                 if not {USER_INPUT, USER_OUTPUT} & set(lowered.bindings[kernel.name].values())]
    kernel.name = name
    return kernel


@dataclass(frozen=True)
class Phase:
    """The input points (first row, first column) + (sh * i, sw * j) of a strided conv, and
    the taps that reach them, in increasing order (none: their gradient is zero). Its
    convolution of the gradient gives `computed` rows and columns, of which the `skip`
    first are outside the input (where it would need negative padding) and `counts` are its
    points."""

    first: tuple[int, int]
    counts: tuple[int, int]
    taps: tuple[tuple[int, ...], tuple[int, ...]]
    padding: tuple[tuple[int, int], tuple[int, int]]
    skip: tuple[int, int]
    computed: tuple[int, int]

    @property
    def reached(self) -> bool:
        return bool(self.taps[0] and self.taps[1])


def phases(attrs: dict, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
           ) -> list[Phase] | None:
    """A strided conv's input gradient as one stride-1 convolution of the output's gradient
    per phase, or None when that does not fit (no stride, a dilation, or an input narrower
    than the stride)."""
    if attrs["stride"] == (1, 1) or attrs["dilation"] != (1, 1):
        return None
    found = []
    for first_y in range(attrs["stride"][0]):
        for first_x in range(attrs["stride"][1]):
            sides = []
            for axis, first in ((0, first_y), (1, first_x)):
                stride, pad = attrs["stride"][axis], attrs["padding"][axis][0]
                size, out = in_shape[1 + axis], out_shape[1 + axis]
                count = -(-(size - first) // stride)
                if count <= 0:  # an input narrower than the stride: a phase of no points
                    return None
                taps = tuple(k for k in range(attrs["kernel_size"][axis])
                             if (first + pad - k) % stride == 0)
                # tap taps[n] reads the gradient's row i + (first + pad - taps[n]) / stride
                before = len(taps) - 1 - (first + pad - taps[0]) // stride if taps else 0
                after = count - out - before + len(taps) - 1 if taps else 0
                skip, extra = max(0, -before), max(0, -after)
                sides.append((count, taps, (before + skip, after + extra), skip,
                              count + skip + extra))
            (rows, taps_y, pad_y, skip_y, computed_y), (cols, taps_x, pad_x, skip_x,
                                                        computed_x) = sides
            found.append(Phase((first_y, first_x), (rows, cols), (taps_y, taps_x),
                               (pad_y, pad_x), (skip_y, skip_x), (computed_y, computed_x)))
    return found


def phase_kernel(name: str, attrs: dict, channels: int, out_shape: tuple[int, ...],
                 phase: Phase) -> Kernel:
    """The forward kernel giving one phase's gradient, from weights `rearrange_phase` makes."""
    return _conv_kernel(name, attrs, channels, out_shape,
                        (len(phase.taps[0]), len(phase.taps[1])), phase.padding)


def rearrange_phase(name: str, layer: str, weight_shape: tuple[int, ...], groups: int,
                    phase: Phase) -> Kernel:
    """The phase's weights from the layer's: W'[g*cg + c, o, ty, tx] = W[g*og + o, c,
    taps_y[-1 - ty], taps_x[-1 - tx]] (a correlation reads the taps in reverse)."""
    outs, per_in, kh, kw = weight_shape
    per_out = outs // groups
    taps_y, taps_x = phase.taps
    g, o, c = Var("g"), Var("o"), Var("c")
    copies: list[Stmt] = []
    for ty, ky in enumerate(reversed(taps_y)):
        for tx, kx in enumerate(reversed(taps_x)):
            source = (((g * per_out + o) * per_in + c) * kh + ky) * kw + kx
            target = (((g * per_in + c) * per_out + o) * len(taps_y) + ty) * len(taps_x) + tx
            copies.append(Store("wt", target, Load("w", source)))
    body = [For(g.name, groups, [For(o.name, per_out, [For(c.name, per_in, copies)])])]
    size = outs * per_in * len(taps_y) * len(taps_x)
    buffers = [Buffer("w", int(np.prod(weight_shape)), "input"), Buffer("wt", size, "output")]
    return Kernel(name, [layer], buffers, body, uses_batch=True)


def interleave(name: str, layer: str, in_shape: tuple[int, ...], stride: tuple[int, int],
               found: list[Phase], width: int) -> Kernel:
    """gx from its phases' gradients, which lie one after the other in `phases` (channel,
    row, column, image): each point from its phase, zero where no tap reaches."""
    from cnnc.training.kernels import at, lanes

    channels, height, wide = in_shape
    c, i, j = Var("c"), Var("i"), Var("j")
    body: list[Stmt] = []
    start = 0
    for phase in found:
        (rows, cols), (skip_y, skip_x), (_, computed_x) = phase.counts, phase.skip, phase.computed
        (first_y, first_x), (sh, sw) = phase.first, stride
        point = (c * height + i * sh + first_y) * wide + j * sw + first_x
        source = start + (c * phase.computed[0] + i + skip_y) * computed_x + j + skip_x
        value = Load("phases", at(source, width)) if phase.reached else Const(0.0)
        body.append(For(i.name, rows, [For(j.name, cols, [lanes(width, [
            Store("gx", at(point, width), value)])], role="point")], role="spatial"))
        if phase.reached:
            start += channels * phase.computed[0] * computed_x
    buffers = [Buffer("phases", max(start, 1) * width, "input"),
               Buffer("gx", channels * height * wide * width, "output")]
    return Kernel(name, [layer], buffers, [For(c.name, channels, body, role="channel")])


def rearrange(name: str, layer: str, op: str, weight_shape: tuple[int, ...], groups: int
              ) -> Kernel:
    """The weights of the input gradient from the layer's: conv2d W'[g*cg + c, o, ky, kx] =
    W[g*og + o, c, kh-1-ky, kw-1-kx]; dense W' = W transposed."""
    size = int(np.prod(weight_shape))
    if op == "dense":
        units, features = weight_shape
        o, i = Var("o"), Var("i")
        body = [For(o.name, units, [For(i.name, features, [
            Store("wt", i * units + o, Load("w", o * features + i))])])]
    else:
        outs, per_in, kh, kw = weight_shape
        per_out = outs // groups
        g, o, c, ky, kx = Var("g"), Var("o"), Var("c"), Var("ky"), Var("kx")
        source = (((g * per_out + o) * per_in + c) * kh + ky) * kw + kx
        target = ((((g * per_in + c) * per_out + o) * kh + (kh - 1 - ky)) * kw + (kw - 1 - kx))
        body = [For(g.name, groups, [For(o.name, per_out, [For(c.name, per_in, [
            For(ky.name, kh, [For(kx.name, kw, [Store("wt", target, Load("w", source))])])])])])]
    buffers = [Buffer("w", size, "input"), Buffer("wt", size, "output")]
    return Kernel(name, [layer], buffers, body, uses_batch=True)
