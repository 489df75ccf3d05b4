"""Input gradients that are forward ops: a stride-1 convolution's is the convolution of the
output's gradient with the kernel flipped and its channels swapped, and a dense layer's is a
dense layer of the transposed weights. Lowered by the forward lowering and tiling pass, they
get the forward kernels' register tiles (the gather in `kernels.conv_input_backward` keeps one
accumulator per point and runs at a fifth of the speed).

The flipped or transposed weights change with every step: a small kernel (`rearrange`) makes
them from the live parameters at the start of each step, into a scratch region of the store.
"""

from __future__ import annotations

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph
from cnnc.kernel import Buffer, For, Kernel, Load, Store, Var
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
    graph = Graph("gradient", out_shape)
    if op == "conv2d":
        padding = conv_padding(attrs)
        assert padding is not None
        spec = ops.OPS["conv2d"]
        raw = {"out_channels": in_shape[0], "kernel_size": list(attrs["kernel_size"]),
               "dilation": list(attrs["dilation"]), "groups": attrs["groups"],
               "padding": [list(padding[0]), list(padding[1])], "bias": False}
        groups = attrs["groups"]
        shape = (in_shape[0], out_shape[0] // groups, *attrs["kernel_size"])
    else:
        spec = ops.OPS["dense"]
        raw = {"units": in_shape[0], "bias": False}
        shape = (weight_shape[1], weight_shape[0])
    graph.add(LAYER, op, [INPUT], spec.check_attrs(raw),
              {"weight": np.zeros(shape, np.float32)})
    graph.outputs = [LAYER]
    compiled = run_pipeline(graph, Options(layout="batch"), ("fold_batchnorm",))
    lowered = lower(compiled)
    (kernel,) = [kernel for kernel in lowered.kernels
                 if not {USER_INPUT, USER_OUTPUT} & set(lowered.bindings[kernel.name].values())]
    kernel.name = name
    return kernel


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
