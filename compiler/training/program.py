"""A training step as a program of kernels: the forward kernels (the inference lowering, one
kernel per op so that every value the backward pass reads is kept), the loss, the backward
rules in reverse order, the weight gradients and the optimizer's update.

All of a step's memory is one float32 array, the store, planned once per batch size:

    params | grads | optimizer state | constants | hyper | block 0 | block 1 | ...

Each batch block's region holds its forward values, their gradients, the targets and the
loss; a buffer of a kernel is bound to a `Place` in it. The step runs in `Stage`s: a stage
runs its kernels for each batch block (in parallel over blocks) or for each item of a
whole-batch kernel (an output channel of a weight gradient, a chunk of the optimizer's
parameters); stages run one after the other. Backends turn the program into code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cnnc import ops
from cnnc.errors import ModelError
from cnnc.graph import INPUT, Graph
from cnnc.kernel import Kernel
from cnnc.lower import USER_INPUT, USER_OUTPUT, lower
from cnnc.lower.template import _avg_divisors
from cnnc.passes import Options, run_pipeline
from cnnc.passes.fuse import is_view, tensor_of
from cnnc.training import kernels
from cnnc.util import ceil_div

ALIGN = 16  # floats: every placed tensor starts on a 64-byte line
Region = Literal["block", "global", "input"]
# A weight gradient's kernel, made once the blocks' layout is known: (blocks, floats per
# block) -> (kernel, items, its output buffer -> "layer.param")
WeightJob = Callable[[int, int], tuple[Kernel, int, dict[str, str]]]


@dataclass(frozen=True)
class Place:
    """Where a buffer lives: in each block's region, in the store's global part, or the
    user's input array."""

    region: Region
    offset: int = 0


@dataclass
class Launch:
    kernel: Kernel
    places: dict[str, Place]  # argument buffer -> its place
    params: dict[str, int] = field(default_factory=dict)  # param buffer -> global offset


@dataclass
class Stage:
    """`launches` run for each block (`items` None) or for each of `items` items."""

    name: str
    launches: list[Launch]
    items: int | None = None


@dataclass
class TrainingProgram:
    graph: Graph  # the forward graph after the passes
    width: int  # images per block
    blocks: int  # of the largest batch
    block_floats: int
    global_floats: int
    params: dict[str, tuple[int, tuple[int, ...]]]  # "layer.param" -> (offset, shape)
    param_floats: int  # the params region (and each like it), padded to optimizer chunks
    grads_offset: int
    state_offsets: dict[str, int]  # optimizer state name -> offset
    constants: list[tuple[int, np.ndarray]]  # data the store starts with
    hyper_offset: int
    output: str
    classes: int
    tensors: dict[str, int]  # forward tensor -> offset in a block
    target_offset: int
    weight_offset: int
    loss_offset: int
    step: list[Stage]
    evaluate: list[Stage]

    @property
    def store_floats(self) -> int:
        return self.global_floats + self.blocks * self.block_floats


class _Allocator:
    def __init__(self) -> None:
        self.floats = 0

    def take(self, floats: int) -> int:
        offset = self.floats
        self.floats += ceil_div(max(floats, 1), ALIGN) * ALIGN
        return offset


TRAINABLE_OPS = ("conv2d", "dense", "avgpool2d", "maxpool2d", "global_avgpool2d", "flatten",
                 "add", "identity")


def check_compilable(graph: Graph, loss: str) -> None:
    """ModelError naming every layer whose gradient cnnc cannot compile yet, at once."""
    bad = []
    for name in graph.order():
        if name == INPUT:
            continue
        op = graph.op(name)
        spec = ops.OPS[op]
        rule = spec.gradient
        if op in TRAINABLE_OPS or (rule is not None and rule.lower is not None):
            continue
        bad.append(f"'{name}' ({op})")
    if bad:
        raise ModelError(f"cnnc cannot compile the gradient of {', '.join(bad)} yet; "
                         "cnnc.reference_backward can compute it")
    if len(graph.outputs) != 1:
        raise ModelError(f"training needs a model with one output, model '{graph.name}' has "
                         f"{len(graph.outputs)}")
    shape = graph.shape(graph.outputs[0])
    if loss == "cross_entropy" and len(shape) != 1:
        raise ModelError(f"cross_entropy needs class scores of shape [classes]; the output of "
                         f"model '{graph.name}' has shape {list(shape)}")


def build(graph: Graph, loss: str, optimizer: object, batch_size: int) -> TrainingProgram:
    """The training program of `graph` for batches of up to `batch_size` images."""
    from cnnc.optim import SGD, Adam

    check_compilable(graph, loss)
    forward = run_pipeline(graph, Options(layout="batch"), ("fold_batchnorm", "fuse"))
    lowered = lower(forward)
    width = lowered.images_per_block
    blocks = ceil_div(batch_size, width)
    (output,) = forward.outputs
    classes = math.prod(forward.shape(output))  # the values the loss reads per image
    order = [name for name in forward.order() if name != INPUT]

    glob = _Allocator()
    params: dict[str, tuple[int, tuple[int, ...]]] = {}
    start = glob.floats
    for name in order:
        for key, value in forward.params(name).items():
            params[f"{name}.{key}"] = (glob.take(value.size), value.shape)
    param_floats = ceil_div(max(glob.floats - start, 1), kernels.OPTIMIZER_CHUNK) * \
        kernels.OPTIMIZER_CHUNK
    glob.floats = start + param_floats
    grads_offset = glob.take(param_floats)
    state_names: tuple[str, ...] = ()
    if isinstance(optimizer, SGD) and optimizer.momentum:
        state_names = ("momentum",)
    elif isinstance(optimizer, Adam):
        state_names = ("first", "second")
    state_offsets: dict[str, int] = {state: glob.take(param_floats) for state in state_names}
    hyper_offset = glob.take(2)
    constants: list[tuple[int, np.ndarray]] = []

    def bind_params(kernel: Kernel) -> dict[str, int]:
        """Trained parameters live in the params region; other tables are constants."""
        bound = {}
        for buffer in kernel.buffers:
            if buffer.role != "param":
                continue
            if buffer.param_of:
                offset, shape = params[buffer.param_of]
                assert buffer.size == math.prod(shape), buffer.param_of
                bound[buffer.name] = offset
            else:
                assert buffer.data is not None
                bound[buffer.name] = glob.take(buffer.data.size)
                constants.append((bound[buffer.name], buffer.data))
        return bound

    block = _Allocator()
    tensors = {name: block.take(width * math.prod(forward.shape(name)))
               for name in [INPUT, *order] if tensor_of(forward, name) == name}

    def tensor_place(name: str) -> Place:
        return Place("block", tensors[tensor_of(forward, name)])

    forward_launches = []
    for kernel in lowered.kernels:
        binding = lowered.bindings[kernel.name]
        if USER_OUTPUT in binding.values():
            continue
        places = {buffer: Place("input") if bound == USER_INPUT else tensor_place(bound)
                  for buffer, bound in binding.items()}
        forward_launches.append(Launch(kernel, places, bind_params(kernel)))
    _check_params_bound(forward, forward_launches, params)

    target_offset = block.take(classes * width)
    weight_offset = block.take(width)
    loss_offset = block.take(width)
    grad_output = block.take(classes * width)
    loss_launch = Launch(kernels.loss_kernel("loss", loss, classes, width), {
        "scores": tensor_place(output), "target": Place("block", target_offset),
        "weight": Place("block", weight_offset), "loss": Place("block", loss_offset),
        "grad": Place("block", grad_output)})

    backward, weight_jobs = _backward(forward, order, width, output, grad_output, block,
                                      tensor_place, bind_params)
    block_floats = block.floats
    global_floats = glob.floats
    base = Place("global", global_floats)  # where block 0's region starts
    weight_stages = []
    for make in weight_jobs:
        kernel, items, outputs = make(blocks, block_floats)
        places = {"acts": base, **{buffer: Place("global", grads_offset + params[key][0])
                                   for buffer, key in outputs.items()}}
        weight_stages.append(Stage(kernel.name, [Launch(kernel, places)], items))

    floats = param_floats
    if isinstance(optimizer, SGD):
        update = kernels.sgd_kernel("sgd", floats, optimizer.lr, optimizer.momentum,
                                    optimizer.weight_decay, optimizer.nesterov, width)
    elif isinstance(optimizer, Adam):
        update = kernels.adam_kernel("adam", floats, optimizer.betas, optimizer.eps,
                                     optimizer.weight_decay, width)
    else:
        raise TypeError(f"optimizer must be cnnc.optim.SGD or Adam, got {optimizer!r}")
    update_places = {"params": Place("global", start), "grads": Place("global", grads_offset),
                     "hyper": Place("global", hyper_offset),
                     **{state: Place("global", offset) for state, offset in state_offsets.items()}}
    update_stage = Stage("optimizer", [Launch(update, update_places)],
                         param_floats // kernels.OPTIMIZER_CHUNK)

    return TrainingProgram(
        forward, width, blocks, block_floats, global_floats, params, param_floats,
        grads_offset, state_offsets, constants, hyper_offset, output, classes, tensors,
        target_offset, weight_offset, loss_offset,
        step=[Stage("forward_backward", forward_launches + [loss_launch] + backward),
              *weight_stages, update_stage],
        evaluate=[Stage("forward", forward_launches)])


def _check_params_bound(graph: Graph, launches: list[Launch],
                        params: dict[str, tuple[int, tuple[int, ...]]]) -> None:
    read = {buffer.param_of for launch in launches for buffer in launch.kernel.buffers
            if buffer.param_of}
    missing = sorted(set(params) - read)
    if missing:
        raise ModelError(f"cnnc cannot train parameters {', '.join(missing)} yet: the "
                         "forward kernels do not read them as they are")


def _backward(graph: Graph, order: list[str], width: int, output: str, grad_output: int,
              block: _Allocator, tensor_place: Callable[[str], Place],
              bind_params: Callable[[Kernel], dict[str, int]]
              ) -> tuple[list[Launch], list[WeightJob]]:
    """The per-block backward launches, in reverse order, and the weight-gradient jobs."""
    trained = {name for name in order if graph.params(name)}
    needs: set[str] = set()
    for name in order:  # a value needs a gradient when a trained parameter comes before it
        if name in trained or any(operand in needs for operand in graph.operands(name)):
            needs.add(name)
    contributions: dict[str, list[int]] = {output: [grad_output]}
    launches: list[Launch] = []
    jobs: list[WeightJob] = []
    number = 0

    def fresh(stem: str) -> str:
        nonlocal number
        number += 1
        return f"{stem}_{number}"

    for name in reversed(order):
        parts = contributions.pop(name, [])
        if not parts:
            continue  # the loss does not depend on it
        op, attrs = graph.op(name), graph.attrs(name)
        shape = graph.shape(name)
        floats = math.prod(shape)
        if len(parts) == 1:
            grad = parts[0]
        else:
            grad = block.take(floats * width)
            adder = kernels.sum_kernel(fresh("sum"), name, floats, width, len(parts))
            places = {f"c{index}": Place("block", part) for index, part in enumerate(parts)}
            launches.append(Launch(adder, {**places, "gx": Place("block", grad)}))
        operands = graph.operands(name)
        wanted = [operand for operand in operands if operand in needs]
        if is_view(graph, name) or op in ("add", "identity"):
            for operand in wanted:  # the same values: the same gradient
                contributions.setdefault(operand, []).append(grad)
            continue
        source = operands[0]
        in_shape = graph.shape(source)
        gx = block.take(math.prod(in_shape) * width) if source in needs else None
        places = {"g": Place("block", grad)}
        kernel: Kernel | None = None
        if op == "dense":
            weight = graph.params(name)["weight"]
            if gx is not None:
                kernel = kernels.dense_input_backward(fresh("dgrad"), name, weight, width)
            jobs.append(_dense_job(fresh("wgrad"), name, weight.shape,
                                   "bias" in graph.params(name), width,
                                   tensor_place(source).offset, grad))
        elif op == "conv2d":
            weight = graph.params(name)["weight"]
            if gx is not None:
                kernel = kernels.conv_input_backward(fresh("dgrad"), name, attrs, in_shape,
                                                     shape, weight, width)
            jobs.append(_conv_job(fresh("wgrad"), name, attrs, in_shape, shape,
                                  "bias" in graph.params(name), width,
                                  tensor_place(source).offset, grad))
        elif op in ("avgpool2d", "maxpool2d", "global_avgpool2d"):
            if gx is not None:
                kernel = _pool(fresh("pgrad"), name, graph, in_shape, shape, width)
                places.update({"x": tensor_place(source), "y": tensor_place(name)})
        else:  # an elementwise op with a compiled rule
            rule = ops.OPS[op].gradient
            assert rule is not None and rule.lower is not None
            if gx is not None:
                kernel = kernels.pointwise_backward(fresh("egrad"), name, floats, width,
                                                    rule.lower, attrs)
                places.update({"x": tensor_place(source), "y": tensor_place(name)})
        if kernel is not None and gx is not None:
            places["gx"] = Place("block", gx)
            used = {buffer.name for buffer in kernel.arguments}
            launches.append(Launch(kernel, {key: place for key, place in places.items()
                                            if key in used}, bind_params(kernel)))
            contributions.setdefault(source, []).append(gx)
    return launches, jobs


def _pool(name: str, layer: str, graph: Graph, in_shape: tuple[int, ...],
          shape: tuple[int, ...], width: int) -> Kernel:
    op = graph.op(layer)
    attrs = dict(graph.attrs(layer))
    divisors: np.ndarray | None = None
    if op == "global_avgpool2d":  # one window over the whole image
        attrs = {"kernel_size": in_shape[1:], "stride": (1, 1), "padding": ((0, 0), (0, 0))}
        divisors = np.full((1, 1), float(in_shape[1] * in_shape[2]))
    elif op == "avgpool2d":
        divisors = _avg_divisors(attrs, in_shape[1], in_shape[2], shape[1], shape[2])
    return kernels.pool_backward(name, layer, op, attrs, in_shape, shape, divisors, width)


def _dense_job(kernel_name: str, layer: str, shape: tuple[int, ...], has_bias: bool,
               width: int, x_offset: int, g_offset: int) -> WeightJob:
    units, features = shape

    def make(blocks: int, block_floats: int) -> tuple[Kernel, int, dict[str, str]]:
        kernel = kernels.dense_weight_backward(kernel_name, layer, features, units,
                                               has_bias, width, blocks, block_floats,
                                               x_offset, g_offset)
        outputs = {"gw": f"{layer}.weight", **({"gb": f"{layer}.bias"} if has_bias else {})}
        return kernel, units, outputs

    return make


def _conv_job(kernel_name: str, layer: str, attrs: dict, in_shape: tuple[int, ...],
              shape: tuple[int, ...], has_bias: bool, width: int, x_offset: int,
              g_offset: int) -> WeightJob:
    def make(blocks: int, block_floats: int) -> tuple[Kernel, int, dict[str, str]]:
        kernel = kernels.conv_weight_backward(kernel_name, layer, attrs, in_shape, shape,
                                              has_bias, width, blocks, block_floats, x_offset,
                                              g_offset)
        outputs = {"gw": f"{layer}.weight", **({"gb": f"{layer}.bias"} if has_bias else {})}
        return kernel, shape[0], outputs

    return make


__all__ = ["Launch", "Place", "Stage", "TrainingProgram", "build", "check_compilable"]
