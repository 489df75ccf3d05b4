"""The backward half of a training program: the graph walked from the loss back to the input,
each op's rule placed as kernels (`cnnc.training.kernels`, `cnnc.training.batchnorm`).

A value's gradient is the sum of what each op reading it sends back; views, `add` and
`identity` send their own gradient unchanged (no kernel, the same memory). Values before the
first trained parameter get no gradient. Weight gradients are whole-batch kernels, made when
every block's size is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from cnnc import ops
from cnnc.graph import Graph
from cnnc.kernel import Kernel
from cnnc.lower.template import _avg_divisors
from cnnc.passes.fuse import is_view
from cnnc.training import batchnorm, kernels, transposed, weights
from cnnc.training.program import Builder, Launch, Place, WholeBatch, reads_input

# The ops whose backward rules are kernels of their own kind (or none), not a pointwise rule.
WITH_KERNELS = ("add", "identity", "dense", "conv2d", "batchnorm2d", "avgpool2d", "maxpool2d",
                "global_avgpool2d", "dropout")


def backward(plan: Builder, output: str, grad_output: int
             ) -> tuple[list[Launch | WholeBatch], list[Launch | WholeBatch]]:
    """The per-block backward sequence, in reverse order (batch norm's sums inside it), and
    the weight-gradient kernels."""
    graph, width, order = plan.graph, plan.width, plan.order
    trained = {name for name in order if graph.params(name)}
    needs: set[str] = set()
    for name in order:  # a value needs a gradient when a trained parameter comes before it
        if name in trained or any(operand in needs for operand in graph.operands(name)):
            needs.add(name)
    contributions: dict[str, list[int]] = {output: [grad_output]}
    items: list[Launch | WholeBatch] = []
    jobs: list[Launch | WholeBatch] = []
    inline: dict[str, tuple[str, dict, list[int]]] = {}  # batch norm -> the activation after it

    def grads_of(key: str) -> Place:
        return Place("global", plan.grads_offset + plan.params[key][0])

    for name in reversed(order):
        parts = contributions.pop(name, [])
        if not parts:
            continue  # the loss does not depend on it
        op, attrs = graph.op(name), graph.attrs(name)
        shape = graph.shape(name)
        floats = math.prod(shape)
        # a plain elementwise rule adds its parts itself, as it reads them
        plain = not is_view(graph, name) and op not in WITH_KERNELS and len(parts) > 1
        if len(parts) == 1 or plain:
            grad = parts[0]
        else:
            grad = plan.block.take(floats * width)
            adder = kernels.sum_kernel(plan.fresh("sum"), name, floats, width, len(parts))
            places = {f"c{index}": Place("block", part) for index, part in enumerate(parts)}
            items.append(plan.launch(adder, {**places, "gx": Place("block", grad)}))
        operands = graph.operands(name)
        if is_view(graph, name) or op in ("add", "identity"):
            for operand in operands:  # the same values: the same gradient
                if operand in needs:
                    contributions.setdefault(operand, []).append(grad)
            continue
        source = operands[0]
        if op not in WITH_KERNELS and plan.after.get(source) == [name]:
            # the activation's rule runs inside batch norm's backward kernels
            inline[source] = (op, attrs, parts)
            contributions[source] = [grad]
            continue
        in_shape = graph.shape(source)
        gx = plan.block.take(math.prod(in_shape) * width) if source in needs else None
        places = {"g": Place("block", grad), "x": plan.tensor(source), "y": plan.tensor(name)}
        if gx is not None:
            places["gx"] = Place("block", gx)
            contributions.setdefault(source, []).append(gx)
        weight_outputs = {"gw": f"{name}.weight", "gb": f"{name}.bias"}
        x_offset = plan.tensor(source).offset
        if op in ("dense", "conv2d"):
            weight = graph.params(name)["weight"]
            has_bias = "bias" in graph.params(name)
            job_places = {buffer: grads_of(key) for buffer, key in weight_outputs.items()
                          if key in plan.params}
            if op == "conv2d" and weights.per_block(attrs, shape):
                # this block's share, while x and g are in cache
                shares = {buffer: Place("block", plan.shares + plan.params[key][0])
                          for buffer, key in weight_outputs.items() if key in plan.params}
                kernel = weights.conv_weight_gradient(plan.fresh("wgrad"), name, attrs,
                                                      in_shape, shape, has_bias, width)
                items.append(plan.launch(kernel, {"source": places["x"], "grad": places["g"],
                                                  **shares}))
            else:
                jobs.append(WholeBatch(_weight_job(plan.fresh("wgrad"), name, graph,
                                                   weight.shape, has_bias, width, x_offset,
                                                   grad, job_places)))
            if gx is not None and (op == "dense" or transposed.conv_padding(attrs)):
                items.append(_as_forward(plan, name, op, attrs, in_shape, shape, weight.shape,
                                         places))
            elif gx is not None and transposed.phases(attrs, in_shape, shape) is not None:
                items += _by_phases(plan, name, attrs, in_shape, shape, weight.shape, places)
            elif gx is not None:
                kernel = kernels.conv_input_backward(plan.fresh("dgrad"), name, attrs,
                                                     in_shape, shape, weight, width)
                items.append(plan.launch(kernel, places))
        elif op == "batchnorm2d":
            items += _batchnorm(plan, name, shape, places, grads_of, inline.get(name))
        elif gx is None:
            continue
        elif op in ("avgpool2d", "maxpool2d", "global_avgpool2d"):
            then = None
            if _fusable_activation(graph, name, source, needs):
                # the activation's rule goes into this kernel, which then gives its input's
                # gradient
                contributions[source].remove(gx)
                contributions.setdefault(graph.operands(source)[0], []).append(gx)
                rule = ops.OPS[graph.op(source)].gradient
                assert rule is not None and rule.lower is not None
                then = (rule.lower, graph.attrs(source))
            items.append(plan.launch(_pool(plan.fresh("pgrad"), name, graph, in_shape, shape,
                                           width, then), places))
        elif op == "dropout":
            kernel = kernels.pointwise_backward(plan.fresh("dgrad"), name, floats, width,
                                                lambda mask, y, g, attrs: g * mask, {},
                                                extra="mask")
            items.append(plan.launch(kernel, {**places,
                                              "extra": Place("block", plan.masks[name])}))
        else:  # an elementwise op with a compiled rule
            rule = ops.OPS[op].gradient
            assert rule is not None and rule.lower is not None
            summing = {"parts": len(parts)} if plain else {}
            kernel = kernels.pointwise_backward(plan.fresh("egrad"), name, floats, width,
                                                rule.lower, attrs, **summing)
            summed = {f"c{index}": Place("block", part) for index, part in enumerate(parts)}
            items.append(plan.launch(kernel, {**places, **summed}))
    return items, jobs


def _as_forward(plan: Builder, name: str, op: str, attrs: dict, in_shape: tuple[int, ...],
                shape: tuple[int, ...], weight_shape: tuple[int, ...],
                places: dict[str, Place]) -> Launch:
    """The input gradient as a forward kernel, over weights rearranged at the step's start
    (`cnnc.training.transposed`)."""
    scratch = plan.glob.take(math.prod(weight_shape))
    groups = attrs.get("groups", 1)
    prepare = transposed.rearrange(plan.fresh("rearrange"), name, op, weight_shape, groups)
    plan.prepare.append(Launch(prepare, {"w": plan.param(f"{name}.weight"),
                                         "wt": Place("global", scratch)}))
    kernel = transposed.input_gradient_kernel(plan.fresh("dgrad"), op, attrs, in_shape, shape,
                                              weight_shape)
    kernel.layers = [name]
    (source,) = [buffer.name for buffer in kernel.buffers if buffer.role == "input"]
    (output,) = [buffer.name for buffer in kernel.buffers if buffer.role == "output"]
    weights = {buffer.name: scratch for buffer in kernel.buffers
               if buffer.param_of == f"{transposed.LAYER}.weight"}
    constants = plan.bind_params(kernel, skip=set(weights))
    return Launch(kernel, {source: places["g"], output: places["gx"]}, {**weights, **constants})


def _by_phases(plan: Builder, name: str, attrs: dict, in_shape: tuple[int, ...],
               shape: tuple[int, ...], weight_shape: tuple[int, ...],
               places: dict[str, Place]) -> list[Launch | WholeBatch]:
    """A strided conv's input gradient: a forward kernel per phase of the input, over weights
    rearranged at the step's start, into one scratch region that `interleave` reads."""
    found = transposed.phases(attrs, in_shape, shape)
    assert found is not None
    reached = [phase for phase in found if phase.reached]
    sizes = [in_shape[0] * math.prod(phase.computed) * plan.width for phase in reached]
    scratch = plan.block.take(sum(sizes))
    items: list[Launch | WholeBatch] = []
    start = scratch
    for phase, size in zip(reached, sizes):
        weights = plan.glob.take(shape[0] * weight_shape[1] * len(phase.taps[0])
                                 * len(phase.taps[1]))
        prepare = transposed.rearrange_phase(plan.fresh("rearrange"), name, weight_shape,
                                             attrs["groups"], phase)
        plan.prepare.append(Launch(prepare, {"w": plan.param(f"{name}.weight"),
                                             "wt": Place("global", weights)}))
        kernel = transposed.phase_kernel(plan.fresh("dgrad"), attrs, in_shape[0], shape, phase)
        kernel.layers = [name]
        (source,) = [buffer.name for buffer in kernel.buffers if buffer.role == "input"]
        (output,) = [buffer.name for buffer in kernel.buffers if buffer.role == "output"]
        bound = {buffer.name: weights for buffer in kernel.buffers
                 if buffer.param_of == f"{transposed.LAYER}.weight"}
        constants = plan.bind_params(kernel, skip=set(bound))
        items.append(Launch(kernel, {source: places["g"], output: Place("block", start)},
                            {**bound, **constants}))
        start += size
    kernel = transposed.interleave(plan.fresh("interleave"), name, in_shape, attrs["stride"],
                                   found, plan.width)
    items.append(plan.launch(kernel, {"phases": Place("block", scratch), "gx": places["gx"]}))
    return items


def _batchnorm(plan: Builder, name: str, shape: tuple[int, ...], places: dict[str, Place],
               grads_of: Callable[[str], Place],
               activation: tuple[str, dict, list[int]] | None = None
               ) -> list[Launch | WholeBatch]:
    """The sums of g and g * x^ over the batch (the bias's and the weight's gradients): each
    block's share right after its g is made, the shares added in a whole-batch stage; then
    x's gradient per block. With `activation` (op, attrs, its gradient's parts), g is that
    activation's input gradient, which both kernels compute from its parts as they go."""
    width = plan.width
    shared = {"stats": Place("global", plan.stats[name]),
              "grad_weight": grads_of(f"{name}.weight"), "grad_bias": grads_of(f"{name}.bias")}
    inputs = {"x": places["x"], "g": places["g"], "stats": shared["stats"],
              "weight": plan.param(f"{name}.weight"), "bias": plan.param(f"{name}.bias")}
    rule = None
    if activation is not None:
        op, attrs, parts = activation
        rule = (op, attrs, len(parts))
        inputs.pop("g")
        inputs |= {f"c{index}": Place("block", part) for index, part in enumerate(parts)}
    part = plan.block.take(2 * shape[0] * width)
    sums = batchnorm.block_gradient_sums(plan.fresh("bn_part"), name, shape, width, rule)

    def make(blocks: int, block_floats: int) -> tuple[Kernel, int, dict[str, Place]]:
        kernel = batchnorm.reduce_gradient(plan.fresh("bn_sums"), name, shape, width, blocks,
                                           block_floats, part)
        return kernel, shape[0], shared

    items: list[Launch | WholeBatch] = [
        plan.launch(sums, {**inputs, "part": Place("block", part)}), WholeBatch(make)]
    if "gx" in places:
        kernel = batchnorm.input_gradient(plan.fresh("bn_grad"), name, shape, width, rule)
        items.append(plan.launch(kernel, {
            **inputs, **shared, "gx": places["gx"], "hyper": plan.hyper,
            "valid": Place("block", plan.valid_offset)}))
    return items


def _fusable_activation(graph: Graph, pool: str, source: str, needs: set[str]) -> bool:
    """Whether the pool's input is an activation whose backward rule can run inside the
    pool's: read only by the pool, a rule that needs only its output, and windows that tile
    the input exactly (each point in one window, so each gradient is stored once)."""
    spec = ops.OPS[graph.op(source)]
    if (spec.kind != "elementwise" or spec.gradient is None or spec.gradient.lower is None
            or graph.op(source) in ("batchnorm2d", "dropout", "identity")
            or graph.users(source) != [pool] or graph.operands(source)[0] not in needs
            or reads_input(graph.op(source), graph.attrs(source))):
        return False
    if graph.op(pool) == "global_avgpool2d":
        return True
    attrs = graph.attrs(pool)
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    _, height, width = graph.shape(source)
    _, out_h, out_w = graph.shape(pool)
    return (kh, kw) == (sh, sw) and attrs["padding"] == ((0, 0), (0, 0)) and \
        (out_h * kh, out_w * kw) == (height, width)


def _pool(name: str, layer: str, graph: Graph, in_shape: tuple[int, ...],
          shape: tuple[int, ...], width: int,
          then: tuple[kernels.PointRule, dict] | None = None) -> Kernel:
    op = graph.op(layer)
    attrs = dict(graph.attrs(layer))
    divisors: np.ndarray | None = None
    if op == "global_avgpool2d":  # one window over the whole image
        attrs = {"kernel_size": in_shape[1:], "stride": (1, 1), "padding": ((0, 0), (0, 0))}
        divisors = np.full((1, 1), float(in_shape[1] * in_shape[2]))
    elif op == "avgpool2d":
        divisors = _avg_divisors(attrs, in_shape[1], in_shape[2], shape[1], shape[2])
    return kernels.pool_backward(name, layer, op, attrs, in_shape, shape, divisors, width,
                                 then)


def _weight_job(kernel_name: str, layer: str, graph: Graph, shape: tuple[int, ...],
                has_bias: bool, width: int, x_offset: int, g_offset: int,
                places: dict[str, Place]
                ) -> Callable[[int, int], tuple[Kernel, int, dict[str, Place]]]:
    """The whole-batch kernel of a dense layer's or a conv's weight (and bias) gradient."""
    def make(blocks: int, block_floats: int) -> tuple[Kernel, int, dict[str, Place]]:
        if graph.op(layer) == "dense":
            units, features = shape
            kernel = kernels.dense_weight_backward(kernel_name, layer, features, units,
                                                   has_bias, width, blocks, block_floats,
                                                   x_offset, g_offset)
            return kernel, units, places
        source = graph.operands(layer)[0]
        kernel = weights.conv_weight_gradient(
            kernel_name, layer, graph.attrs(layer), graph.shape(source), graph.shape(layer),
            has_bias, width, weights.Batch(blocks, block_floats, x_offset, g_offset))
        tile = kernels.weight_tile(shape[0] // graph.attrs(layer)["groups"], shape[2] * shape[3])
        return kernel, shape[0] // tile, places

    return make
