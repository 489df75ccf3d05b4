"""Each pass on its own, as TVM tests its passes: the graph printed before the pass (with what
the passes before it decided) and the graph printed after it. The printed form is `describe`,
the text `--dump-ir` writes; the plan's products are read from `graph.plan`, never computed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import GOLDEN

import cnnc
from cnnc import ops
from cnnc.compare import check_output
from cnnc.graph import Graph
from cnnc.passes import PIPELINE, Options, describe, run_pipeline
from cnnc.passes.fuse import fuse
from cnnc.passes.plan_memory import unplanned

PASSES = dict(PIPELINE)
LLVM = Options()
CUDA = Options(target="cuda", arch="sm_90")


def add(graph: Graph, name: str, op: str, inputs: list[str],
        params: dict[str, np.ndarray] | None = None, **attrs: Any) -> None:
    graph.add(name, op, inputs, ops.OPS[op].check_attrs(attrs), params)


def weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)


def small_net() -> Graph:
    """conv -> relu -> maxpool -> flatten -> dense -> softmax over 2x6x6 images."""
    graph = Graph("small", (2, 6, 6))
    add(graph, "conv", "conv2d", ["input"], {"weight": weights(4, 2, 3, 3)},
        out_channels=4, kernel_size=3, padding=1, bias=False)
    add(graph, "relu", "relu", ["conv"])
    add(graph, "pool", "maxpool2d", ["relu"], kernel_size=2)
    add(graph, "flat", "flatten", ["pool"])
    add(graph, "fc", "dense", ["flat"], {"weight": weights(3, 36), "bias": weights(3)}, units=3)
    add(graph, "prob", "softmax", ["fc"])
    graph.outputs = ["prob"]
    return graph


def conv(graph: Graph, name: str, operand: str, channels: int = 2) -> None:
    add(graph, name, "conv2d", [operand], {"weight": weights(channels, 2, 3, 3)},
        out_channels=channels, kernel_size=3, padding=1, bias=False)


def before(name: str, graph: Graph, options: Options = LLVM) -> Graph:
    """A copy of `graph` after the passes that run before pass `name`."""
    graph = graph.copy()
    for other, run in PIPELINE:
        if other == name:
            return graph
        graph = run(graph, options)
    raise AssertionError(f"no pass {name!r}")


SMALL_TEXT = """\
graph small(%input : f32[N,2,6,6]) -> (%prob) {
  %conv = conv2d[out=4 k=3 s=1 p=1 bias=false](%input) : f32[N,4,6,6]
  %relu = relu(%conv) : f32[N,4,6,6]
  %pool = maxpool2d[k=2 s=2 p=0](%relu) : f32[N,4,3,3]
  %flat = flatten(%pool) : f32[N,36]
  %fc = dense[units=3](%flat) : f32[N,3]
  %prob = softmax(%fc) : f32[N,3]
}"""
UNTILED = "oc_block=1 x_block=1 unroll_max=0 gpu_threads=128 gpu_batch_inner=False " \
    "gpu_shared_tiles=False"


def test_prune_erases_what_no_output_reads() -> None:
    graph = Graph("dead", (2, 4, 4))
    add(graph, "a", "relu", ["input"])
    add(graph, "b", "tanh", ["input"])
    add(graph, "c", "sigmoid", ["b"])
    add(graph, "y", "add", ["a", "input"])
    graph.outputs = ["y"]
    assert describe(graph) == """\
graph dead(%input : f32[N,2,4,4]) -> (%y) {
  %a = relu(%input) : f32[N,2,4,4]
  %b = tanh(%input) : f32[N,2,4,4]
  %c = sigmoid(%b) : f32[N,2,4,4]
  %y = add(%a, %input) : f32[N,2,4,4]
}"""
    assert describe(PASSES["prune"](graph, Options())) == """\
graph dead(%input : f32[N,2,4,4]) -> (%y) {
  %a = relu(%input) : f32[N,2,4,4]
  %y = add(%a, %input) : f32[N,2,4,4]
}"""


def test_fold_batchnorm_folds_only_into_a_convolution_nothing_else_reads() -> None:
    graph = Graph("bn", (2, 5, 5))
    conv(graph, "conv", "input", channels=3)
    norm = {key: weights(3) ** 2 + 0.5 for key in ("weight", "bias", "running_mean",
                                                    "running_var")}
    add(graph, "bn", "batchnorm2d", ["conv"], norm)
    add(graph, "act", "relu", ["bn"])
    conv(graph, "side", "input", channels=3)
    add(graph, "side_bn", "batchnorm2d", ["side"], norm)
    add(graph, "y", "add", ["act", "side_bn", "side"])
    graph.outputs = ["y"]
    assert describe(graph) == """\
graph bn(%input : f32[N,2,5,5]) -> (%y) {
  %conv = conv2d[out=3 k=3 s=1 p=1 bias=false](%input) : f32[N,3,5,5]
  %bn = batchnorm2d(%conv) : f32[N,3,5,5]
  %act = relu(%bn) : f32[N,3,5,5]
  %side = conv2d[out=3 k=3 s=1 p=1 bias=false](%input) : f32[N,3,5,5]
  %side_bn = batchnorm2d(%side) : f32[N,3,5,5]
  %y = add(%act, %side_bn, %side) : f32[N,3,5,5]
}"""
    folded = PASSES["fold_batchnorm"](graph.copy(), Options())
    # %side is read by %y too, so its batch norm stays.
    assert describe(folded) == """\
graph bn(%input : f32[N,2,5,5]) -> (%y) {
  %conv = conv2d[out=3 k=3 s=1 p=1](%input) : f32[N,3,5,5]
  %act = relu(%conv) : f32[N,3,5,5]
  %side = conv2d[out=3 k=3 s=1 p=1 bias=false](%input) : f32[N,3,5,5]
  %side_bn = batchnorm2d(%side) : f32[N,3,5,5]
  %y = add(%act, %side_bn, %side) : f32[N,3,5,5]
}"""
    x = np.random.default_rng(5).standard_normal((3, 2, 5, 5)).astype(np.float32)
    check = check_output("y", cnnc.reference(folded, x), cnnc.reference(graph, x))
    assert check.ok, check.describe()


@pytest.mark.parametrize(("options", "chosen"), [
    (Options(), "layout: batch, [C][H][W][16]"),
    (Options(layout="channel"), "layout: channel, [H][W][C padded to 16]"),
    (Options(layout="channel", vector_width=8), "layout: channel, [H][W][C padded to 8]"),
    (CUDA, "layout: batch, [C][H][W][1]"),
    (Options(target="cuda-sim", layout="channel"), "layout: batch, [C][H][W][1]"),
])
def test_layout_is_chosen_by_the_options_and_target(options: Options, chosen: str) -> None:
    graph = before("layout", small_net(), options)
    assert describe(graph) == SMALL_TEXT
    assert describe(PASSES["layout"](graph, options)) == f"{SMALL_TEXT}\n{chosen}"


def test_fuse_puts_a_producer_its_elementwise_ops_and_a_pooling_in_one_kernel() -> None:
    graph = before("fuse", small_net())
    assert describe(graph) == f"{SMALL_TEXT}\nlayout: batch, [C][H][W][16]"
    # The flatten is a view of the pooled tensor; the softmax stays alone.
    assert describe(PASSES["fuse"](graph, Options())) == f"""{SMALL_TEXT}
kernels:
  conv2d_relu_maxpool2d_0: conv, relu, pool
    schedule: {UNTILED}
  dense_1: fc
    schedule: {UNTILED}
  softmax_2: prob
    schedule: {UNTILED}
layout: batch, [C][H][W][16]"""


def test_fuse_switched_off_in_the_options_is_one_kernel_per_op_but_views() -> None:
    options = Options(fuse=False)
    fused = PASSES["fuse"](before("fuse", small_net(), options), options)
    assert [(group.name, group.nodes) for group in fused.plan.groups] == [
        ("conv2d_0", ["conv"]), ("relu_1", ["relu"]), ("maxpool2d_2", ["pool"]),
        ("dense_3", ["fc"]), ("softmax_4", ["prob"])]


def test_fuse_never_merges_into_a_cycle() -> None:
    # Were %y to join %r's kernel, that kernel would read %s, which reads %r: a cycle.
    graph = Graph("cycle", (2, 6, 6))
    conv(graph, "conv", "input")
    add(graph, "r", "relu", ["conv"])
    add(graph, "s", "sigmoid", ["r"])
    add(graph, "y", "add", ["r", "s"])
    graph.outputs = ["y"]
    fused = PASSES["fuse"](before("fuse", graph), Options())
    assert describe(fused).split("\n}\n")[1] == f"""\
kernels:
  conv2d_relu_0: conv, r
    schedule: {UNTILED}
  sigmoid_add_1: s, y
    schedule: {UNTILED}
layout: batch, [C][H][W][16]"""


def test_fuse_launches_each_kernel_after_the_kernels_it_reads() -> None:
    # %y joins %r's kernel and reads %t, so the kernel of %t must run before it.
    graph = Graph("diamond", (2, 6, 6))
    conv(graph, "conv", "input")
    add(graph, "r", "relu", ["conv"])
    add(graph, "s", "sigmoid", ["conv"])
    add(graph, "t", "tanh", ["s"])
    add(graph, "y", "add", ["r", "t"])
    graph.outputs = ["y"]
    fused = fuse(before("fuse", graph), Options())
    assert [(group.name, group.nodes) for group in fused.plan.groups] == [
        ("conv2d_0", ["conv"]), ("sigmoid_tanh_1", ["s", "t"]), ("relu_add_2", ["r", "y"])]


def test_tile_prints_the_schedules_it_picks() -> None:
    graph = before("tile", small_net())
    kernels = "  conv2d_relu_maxpool2d_0: conv, relu, pool\n    schedule: {}\n" \
        "  dense_1: fc\n    schedule: {}\n  softmax_2: prob\n    schedule: {}"
    layout = "layout: batch, [C][H][W][16]"
    assert describe(graph) == \
        f"{SMALL_TEXT}\nkernels:\n{kernels.format(UNTILED, UNTILED, UNTILED)}\n{layout}"
    # The conv's tile: 2 channels by 3 pooled points, each a window row of 2 (12 of the
    # 16 accumulators AVX-512 gives a broadcast tile; 2 x 6 is the most FMAs per load).
    picked = ["oc_block=2 x_block=3 unroll_max=0 gpu_threads=128 gpu_batch_inner=False "
              "gpu_shared_tiles=False",
              "oc_block=3 x_block=1 unroll_max=0 gpu_threads=128 gpu_batch_inner=False "
              "gpu_shared_tiles=False",
              UNTILED]
    assert describe(PASSES["tile"](graph, Options())) == \
        f"{SMALL_TEXT}\nkernels:\n{kernels.format(*picked)}\n{layout}"


@pytest.mark.parametrize(("options", "schedules"), [
    # The channel layout's conv: 2 padded input channels, so its 3x3 window is unrolled.
    (Options(layout="channel"), [
        "oc_block=1 x_block=3 unroll_max=3 gpu_threads=128 gpu_batch_inner=False "
        "gpu_shared_tiles=False",
        UNTILED, UNTILED]),
    (CUDA, [
        "oc_block=1 x_block=1 unroll_max=8 gpu_threads=64 gpu_batch_inner=False "
        "gpu_shared_tiles=True",
        "oc_block=3 x_block=1 unroll_max=8 gpu_threads=128 gpu_batch_inner=True "
        "gpu_shared_tiles=False",
        "oc_block=1 x_block=1 unroll_max=8 gpu_threads=128 gpu_batch_inner=True "
        "gpu_shared_tiles=False"]),
])
def test_tile_picks_per_layout_and_target(options: Options, schedules: list[str]) -> None:
    tiled = PASSES["tile"](before("tile", small_net(), options), options)
    assert [group.schedule.describe() for group in tiled.plan.groups] == schedules


def test_tile_on_lenet() -> None:
    tiled = PASSES["tile"](before("tile", cnnc.load(GOLDEN / "lenet.yaml")), Options())
    # The convolutions' tiles count each pooled point as its window row of 2 points: 3 x 2 x 2
    # and 8 x 1 x 2 (5, the pooled row of the second, takes 10 points, too many).
    assert [(group.name, group.schedule.oc_block, group.schedule.x_block)
            for group in tiled.plan.groups] == [
        ("conv2d_sigmoid_avgpool2d_0", 3, 2), ("conv2d_sigmoid_avgpool2d_1", 8, 1),
        ("dense_sigmoid_2", 8, 1), ("dense_sigmoid_3", 7, 1), ("dense_4", 5, 1)]


def test_plan_memory_reuses_the_memory_of_dead_tensors() -> None:
    graph = before("plan_memory", small_net())
    text = describe(graph)
    assert text.endswith("layout: batch, [C][H][W][16]") and "memory" not in text
    # %fc and %prob reuse the input's floats, dead once the first kernel ran; each tensor
    # starts on a 64-byte line.
    assert describe(PASSES["plan_memory"](graph, Options())) == f"""{text}
memory: 6912 bytes per batch block
  %input: floats [0, 1152)
  %fc: floats [0, 48)
  %prob: floats [48, 96)
  %pool: floats [1152, 1728)"""


def test_without_plan_memory_every_tensor_has_floats_of_its_own() -> None:
    graph = unplanned(before("plan_memory", small_net()), Options())
    assert describe(graph).split("layout: batch, [C][H][W][16]\n")[1] == """\
memory: 7296 bytes per batch block
  %input: floats [0, 1152)
  %pool: floats [1152, 1728)
  %fc: floats [1728, 1776)
  %prob: floats [1776, 1824)"""


def test_a_switched_off_pass_leaves_the_plain_choice_in_the_plan() -> None:
    graph = small_net()
    plain = run_pipeline(graph, Options(), disabled=("fuse", "plan_memory"))
    assert [group.name for group in plain.plan.groups] == [
        "conv2d_0", "relu_1", "maxpool2d_2", "dense_3", "softmax_4"]
    reference = unplanned(run_pipeline(graph, Options(), disabled=("fuse",)), Options())
    assert plain.plan.memory == reference.plan.memory
    # Reading the plan changes nothing.
    text = describe(plain)
    assert plain.plan.groups is plain.plan.groups and describe(plain) == text


def test_reading_a_product_before_its_pass_ran_says_so() -> None:
    graph = small_net()
    with pytest.raises(ValueError, match="the graph has no kernel groups yet: run the fuse pass"):
        _ = graph.plan.groups
    with pytest.raises(ValueError, match="the graph has no memory plan yet: run the plan_memory"):
        _ = graph.plan.memory
    assert not graph.plan.has_groups and not graph.plan.has_memory


def test_lenet_becomes_five_kernels_in_125440_bytes_per_block() -> None:
    compiled = run_pipeline(cnnc.load(GOLDEN / "lenet.yaml"), Options())
    assert len(compiled.plan.groups) == 5
    assert compiled.plan.memory.bytes_per_block() == 125440
