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
from cnnc.kernel import Const, Kernel, Load, walk
from cnnc.lower import USER_INPUT, USER_OUTPUT, lower
from cnnc.ops.elementwise import BATCHNORM_MOMENTUM
from cnnc.passes import Options, run_pipeline
from cnnc.passes.fuse import _name, tensor_of
from cnnc.passes.tile import tile
from cnnc.plan import Group
from cnnc.training import batchnorm, kernels, weights
from cnnc.util import ceil_div

ALIGN = 16  # floats: every placed tensor starts on a 64-byte line
Region = Literal["block", "global", "input"]



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
    trained: list[str]  # the params the optimizer updates (not running statistics)
    param_floats: int  # the trained region (and each like it), padded to optimizer chunks
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
    valid_offset: int  # 1.0 in a block's lanes that hold an image of the batch, else 0.0
    masks: dict[str, int]  # dropout layer -> offset of its mask in a block
    stats_layers: list[str]  # the batchnorm layers, which use the batch's statistics
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
                 "add", "identity", "batchnorm2d", "dropout")


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


def reads_input(op: str, attrs: dict) -> bool:
    """Whether an elementwise op's compiled gradient reads its input (not only its output):
    one that does not may be fused into the kernel before it, whose value is then not kept."""
    rule = ops.OPS[op].gradient
    assert rule is not None and rule.lower is not None
    probe = rule.lower(Load("x", Const(0)), Load("y", Const(0)), Load("g", Const(0)), attrs)
    return any(isinstance(node, Load) and node.buffer == "x" for node in walk(probe))


def fuse_activations(graph: Graph) -> list[Group]:
    """One kernel per op, but a conv or dense layer and the activation after it (when that is
    its only reader and the activation's gradient needs only its output, as sigmoid's, relu's
    and tanh's do): the pre-activation value is then never written to memory."""
    groups = list(graph.plan.groups)
    merged: list[Group] = []
    for group in groups:
        node = group.producer
        if merged and len(group.nodes) == 1 and graph.op(node) not in ("batchnorm2d", "dropout"):
            previous = merged[-1]
            source = graph.operands(node)
            spec = ops.OPS[graph.op(node)]
            if (len(previous.nodes) == 1 and graph.op(previous.producer) in ("conv2d", "dense")
                    and source == [previous.producer] and spec.kind == "elementwise"
                    and graph.users(previous.producer) == [node]
                    and previous.producer not in graph.outputs
                    and spec.gradient is not None and spec.gradient.lower is not None
                    and not reads_input(graph.op(node), graph.attrs(node))):
                previous.nodes.append(node)
                continue
        merged.append(Group(list(group.nodes), group.window))
    return merged


class Builder:
    """The state of planning one program: the forward graph, the two regions being laid out
    and what is placed where. `backward` walks the graph through it."""

    def __init__(self, graph: Graph, batch_size: int) -> None:
        options = Options(layout="batch", winograd=False)
        self.graph = run_pipeline(graph, options, ("fold_batchnorm", "fuse", "tile",
                                                   "plan_memory"))
        self.graph.plan.groups = _name(fuse_activations(self.graph), self.graph)
        tile(self.graph, options)
        self.lowered = lower(self.graph)
        self.width = self.lowered.images_per_block
        self.blocks = ceil_div(batch_size, self.width)
        self.order = [name for name in self.graph.order() if name != INPUT]
        self.glob = _Allocator()
        self.block = _Allocator()
        self.params: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.trained: list[str] = []
        self.constants: list[tuple[int, np.ndarray]] = []
        self.number = 0
        self.stats: dict[str, int] = {}  # batchnorm layer -> its batch statistics (global)
        self.after: dict[str, list[str]] = {}  # batchnorm layer -> the nodes its kernel computes
        self.masks: dict[str, int] = {}  # dropout layer -> its mask (in each block)
        self.tensors: dict[str, int] = {}  # forward tensor -> offset in each block
        self.prepare: list[Launch] = []  # once at the start of a step
        self.valid_offset = 0
        self.grads_offset = 0
        self.shared_floats = 0  # the trained region's part whose gradients blocks share
        self.shares = 0  # where each block's shares of those gradients are
        self.hyper = Place("global")

    def fresh(self, stem: str) -> str:
        """A kernel name of its own: "_t" keeps it apart from the forward kernels' names
        (`dropout_2`)."""
        self.number += 1
        return f"{stem}_t{self.number}"

    def place_params(self) -> int:
        """Trained parameters first, in one region padded to the optimizer's chunks; then the
        buffers (running statistics), which the optimizer never touches. Returns the trained
        region's size. The convolutions' come first, in a part padded to the chunks too
        (`shared_floats`): each block computes its share of their gradients, laid out alike
        (`cnnc.training.weights`)."""
        buffers = []
        chunk = kernels.OPTIMIZER_CHUNK
        convs = [name for name in self.order if self.graph.op(name) == "conv2d"
                 and weights.per_block(self.graph.attrs(name), self.graph.shape(name))]

        def place(names: list[str]) -> None:
            for name in names:
                rule = ops.OPS[self.graph.op(name)].gradient
                for key, value in self.graph.params(name).items():
                    if rule is not None and key in rule.buffers:
                        buffers.append((f"{name}.{key}", value))
                        continue
                    self.params[f"{name}.{key}"] = (self.glob.take(value.size), value.shape)
                    self.trained.append(f"{name}.{key}")

        place(convs)
        if convs:
            self.shared_floats = ceil_div(self.glob.floats, chunk) * chunk
            self.glob.floats = self.shared_floats
        place([name for name in self.order if name not in convs])
        floats = ceil_div(max(self.glob.floats, 1), chunk) * chunk
        self.glob.floats = floats
        for key, value in buffers:
            self.params[key] = (self.glob.take(value.size), value.shape)
        return floats

    def param(self, key: str) -> Place:
        return Place("global", self.params[key][0])

    def bind_params(self, kernel: Kernel, skip: set[str] | None = None) -> dict[str, int]:
        """A kernel's parameter buffers (but `skip`): model parameters in their region, other
        tables (an average pool's divisors) as constants the store starts with."""
        bound = {}
        for buffer in kernel.buffers:
            if buffer.role != "param" or buffer.name in (skip or set()):
                continue
            if buffer.param_of:
                offset, shape = self.params[buffer.param_of]
                assert buffer.size == math.prod(shape), buffer.param_of
                bound[buffer.name] = offset
            else:
                assert buffer.data is not None
                bound[buffer.name] = self.glob.take(buffer.data.size)
                self.constants.append((bound[buffer.name], buffer.data))
        return bound

    def launch(self, kernel: Kernel, places: dict[str, Place]) -> Launch:
        used = {buffer.name for buffer in kernel.arguments}
        return Launch(kernel, {key: place for key, place in places.items() if key in used},
                      self.bind_params(kernel))

    def tensor(self, name: str) -> Place:
        return Place("block", self.tensors[tensor_of(self.graph, name)])

    def forward(self, training: bool) -> list[Launch | WholeBatch]:
        """The forward kernels; batch norm and dropout get kernels of their own, which read
        what changes at run time (statistics, masks) instead of the inference constants."""
        items: list[Launch | WholeBatch] = []
        kernels_in_order = self.lowered.kernels
        folded: set[str] = set()  # kernels that a batch norm's kernel computes
        for number, kernel in enumerate(kernels_in_order):
            binding = self.lowered.bindings[kernel.name]
            if USER_OUTPUT in binding.values() or kernel.name in folded:
                continue
            layer = kernel.layers[0] if len(kernel.layers) == 1 else ""
            op = self.graph.op(layer) if layer in self.graph.nx else ""
            if op == "batchnorm2d":
                then = self._after_batchnorm(layer, kernels_in_order[number + 1:]) \
                    if training else []
                folded |= {name for name, _ in then}
                items += self._batchnorm(layer, training, [node for _, node in then])
            elif op == "dropout" and training:
                items.append(self._dropout(layer))
            else:
                places = {buffer: Place("input") if bound == USER_INPUT else self.tensor(bound)
                          for buffer, bound in binding.items()}
                items.append(Launch(kernel, places, self.bind_params(kernel)))
        return items

    def _after_batchnorm(self, layer: str, following: list[Kernel]) -> list[tuple[str, str]]:
        """(kernel, node) of the ops after a batch norm that its kernel can compute as it
        normalises: an add, then an activation whose gradient reads only its output, each the
        only reader of the value before and the next kernel; the values between are then not
        kept, which is right since no backward rule reads them."""
        chain: list[tuple[str, str]] = []
        current = layer
        for kernel in following:
            users = self.graph.users(current)
            if len(users) != 1 or current in self.graph.outputs or kernel.layers != users:
                break
            node = users[0]
            op = self.graph.op(node)
            spec = ops.OPS[op]
            if op == "add" and not chain and self.graph.operands(node).count(current) == 1:
                chain.append((kernel.name, node))
            elif (spec.kind == "elementwise" and op not in ("batchnorm2d", "dropout", "add")
                  and not spec.channel_params and spec.lower is not None
                  and spec.gradient is not None and spec.gradient.lower is not None
                  and not reads_input(op, self.graph.attrs(node))):
                chain.append((kernel.name, node))
                break
            else:
                break
            current = node
        return chain

    def _batchnorm(self, layer: str, training: bool, then: list[str] | None = None
                   ) -> list[Launch | WholeBatch]:
        shape = self.graph.shape(layer)
        attrs = self.graph.attrs(layer)
        source = self.graph.operands(layer)[0]
        places = {"x": self.tensor(source), "y": self.tensor(layer),
                  "weight": self.param(f"{layer}.weight"), "bias": self.param(f"{layer}.bias"),
                  "running_mean": self.param(f"{layer}.running_mean"),
                  "running_var": self.param(f"{layer}.running_var")}
        if not training:
            kernel = batchnorm.evaluate(self.fresh("bn_eval"), layer, shape, attrs["eps"],
                                        self.width)
            return [self.launch(kernel, places)]
        self.stats[layer] = self.glob.take(2 * shape[0])
        places["stats"] = Place("global", self.stats[layer])
        places["hyper"] = self.hyper
        momentum = attrs.get("momentum", BATCHNORM_MOMENTUM)
        # each block's share of the statistics while its x is in cache, merged in a stage
        part = self.block.take(3 * shape[0] * self.width)
        shares = self.launch(batchnorm.block_statistics(self.fresh("bn_part"), layer, shape,
                                                        self.width),
                             {"x": places["x"], "valid": Place("block", self.valid_offset),
                              "part": Place("block", part)})

        def make(blocks: int, block_floats: int) -> tuple[Kernel, int, dict[str, Place]]:
            kernel = batchnorm.statistics(self.fresh("bn_stats"), layer, shape, attrs["eps"],
                                          momentum, self.width, blocks, block_floats, part,
                                          self.valid_offset)
            return kernel, shape[0], places

        steps: list[tuple[str, dict, int]] = []  # (op, attrs, operands it adds)
        previous = layer
        for node in then or []:
            others = [operand for operand in self.graph.operands(node) if operand != previous]
            for index, operand in enumerate(others):
                places[f"o{sum(count for _, _, count in steps) + index}"] = self.tensor(operand)
            steps.append((self.graph.op(node), self.graph.attrs(node), len(others)))
            previous = node
        places["y"] = self.tensor(previous)
        self.after[layer] = list(then or [])
        kernel = batchnorm.normalise(self.fresh("bn"), layer, shape, self.width, steps)
        kernel.layers = [layer, *(then or [])]
        return [shares, WholeBatch(make), self.launch(kernel, places)]

    def _dropout(self, layer: str) -> Launch:
        floats = math.prod(self.graph.shape(layer))
        self.masks[layer] = self.block.take(floats * self.width)
        kernel = kernels.pointwise_backward(self.fresh("dropout"), layer, floats, self.width,
                                            lambda mask, y, x, attrs: x * mask, {},
                                            extra="mask")
        return self.launch(kernel, {"extra": Place("block", self.masks[layer]),
                                    "g": self.tensor(self.graph.operands(layer)[0]),
                                    "gx": self.tensor(layer)})


@dataclass
class WholeBatch:
    """A whole-batch kernel inside the forward or backward sequence, made once the blocks'
    size is known: (blocks, floats per block) -> (kernel, items, places of its buffers)."""

    make: Callable[[int, int], tuple[Kernel, int, dict[str, Place]]]


def build(graph: Graph, loss: str, optimizer: object, batch_size: int) -> TrainingProgram:
    """The training program of `graph` for batches of up to `batch_size` images."""
    from cnnc.optim import SGD, Adam
    from cnnc.training.backward import backward

    check_compilable(graph, loss)
    plan = Builder(graph, batch_size)
    forward, width, order = plan.graph, plan.width, plan.order
    (output,) = forward.outputs
    classes = math.prod(forward.shape(output))  # the values the loss reads per image
    param_floats = plan.place_params()
    grads_offset = plan.glob.take(param_floats)
    state_names: tuple[str, ...] = ()
    if isinstance(optimizer, SGD) and optimizer.momentum:
        state_names = ("momentum",)
    elif isinstance(optimizer, Adam):
        state_names = ("first", "second")
    state_offsets: dict[str, int] = {state: plan.glob.take(param_floats)
                                     for state in state_names}
    hyper_offset = plan.glob.take(3)
    plan.hyper = Place("global", hyper_offset)
    plan.grads_offset = grads_offset
    plan.tensors = {name: plan.block.take(width * math.prod(forward.shape(name)))
                    for name in [INPUT, *order] if tensor_of(forward, name) == name}
    plan.valid_offset = plan.block.take(width)
    training_forward = plan.forward(training=True)
    evaluate = plan.forward(training=False)
    _check_params_bound([item for item in training_forward + evaluate
                         if isinstance(item, Launch)], plan.params, plan.trained)

    target_offset = plan.block.take(classes * width)
    weight_offset = plan.block.take(width)
    loss_offset = plan.block.take(width)
    grad_output = plan.block.take(classes * width)
    loss_launch = Launch(kernels.loss_kernel("loss", loss, classes, width), {
        "scores": plan.tensor(output), "target": Place("block", target_offset),
        "weight": Place("block", weight_offset), "loss": Place("block", loss_offset),
        "grad": Place("block", grad_output)})
    if plan.shared_floats:
        plan.shares = plan.block.take(plan.shared_floats)
    backward_items, weight_jobs = backward(plan, output, grad_output)
    chunk = kernels.OPTIMIZER_CHUNK

    def add_shares(blocks: int, block_floats: int) -> tuple[Kernel, int, dict[str, Place]]:
        kernel = weights.block_sum("block_sum", plan.shared_floats, width, blocks,
                                   block_floats, plan.shares)
        return kernel, plan.shared_floats // chunk, {"grads": Place("global", grads_offset)}

    if plan.shared_floats:
        weight_jobs.insert(0, WholeBatch(add_shares))

    if isinstance(optimizer, SGD):
        update = kernels.sgd_kernel("sgd", param_floats, optimizer.lr, optimizer.momentum,
                                    optimizer.weight_decay, optimizer.nesterov, width)
    elif isinstance(optimizer, Adam):
        update = kernels.adam_kernel("adam", param_floats, optimizer.betas, optimizer.eps,
                                     optimizer.weight_decay, width)
    else:
        raise TypeError(f"optimizer must be cnnc.optim.SGD or Adam, got {optimizer!r}")
    update_places = {"params": Place("global", 0), "grads": Place("global", grads_offset),
                     "hyper": plan.hyper,
                     **{state: Place("global", offset) for state, offset in state_offsets.items()}}
    update_stage = Stage("optimizer", [Launch(update, update_places)],
                         param_floats // kernels.OPTIMIZER_CHUNK)
    # Everything is placed: each block's size is known, so the whole-batch kernels are made.
    block_floats, global_floats = plan.block.floats, plan.glob.floats
    step = _stages(training_forward + [loss_launch] + backward_items + weight_jobs, plan,
                   block_floats, global_floats)
    if plan.prepare:
        step.insert(0, Stage("prepare", plan.prepare, 1))
    return TrainingProgram(
        forward, width, plan.blocks, block_floats, global_floats, plan.params, plan.trained,
        param_floats, grads_offset, state_offsets, plan.constants, hyper_offset, output,
        classes, plan.tensors, target_offset, weight_offset, loss_offset, plan.valid_offset,
        plan.masks, list(plan.stats), step=step + [update_stage],
        evaluate=_stages(evaluate, plan, block_floats, global_floats))


def _stages(items: list[Launch | WholeBatch], plan: Builder, block_floats: int,
            global_floats: int) -> list[Stage]:
    """Runs of per-block launches become one stage each; a whole-batch kernel a stage of its
    own, whose buffer `acts` is every block's region."""
    stages: list[Stage] = []
    run: list[Launch] = []
    for item in items:
        if isinstance(item, Launch):
            run.append(item)
            continue
        if run:
            stages.append(Stage(f"blocks_{len(stages)}", run))
            run = []
        kernel, count, places = item.make(plan.blocks, block_floats)
        launch = plan.launch(kernel, {"acts": Place("global", global_floats), **places})
        stages.append(Stage(kernel.name, [launch], count))
    if run:
        stages.append(Stage(f"blocks_{len(stages)}", run))
    return stages


def _check_params_bound(launches: list[Launch], params: dict[str, tuple[int, tuple[int, ...]]],
                        trained: list[str]) -> None:
    """ModelError unless the forward kernels read every trained parameter where it lives: a
    lowering that packed or folded one would train a copy nobody reads."""
    read = {offset for launch in launches for offset in launch.params.values()}
    read |= {place.offset for launch in launches for place in launch.places.values()
             if place.region == "global"}
    missing = sorted(key for key in trained if params[key][0] not in read)
    if missing:
        raise ModelError(f"cnnc cannot train parameters {', '.join(missing)} yet: the "
                         "forward kernels do not read them as they are")


__all__ = ["Builder", "Launch", "Place", "Stage", "TrainingProgram", "WholeBatch", "build",
           "check_compilable"]
