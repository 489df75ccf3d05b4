"""Winograd convolution (`Schedule.winograd`, `cnnc.lower.winograd`): the same results as the
direct convolution's reference for every shape, padding, batch and fused epilogue it takes,
the schedule field as files give it, the heuristic's choice and the tuner's search space."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, GOLDEN, TOLERANCE, as_list, expected_outputs
from numpy.testing import assert_allclose

import cnnc
from cnnc.errors import ScheduleError
from cnnc.passes import run_pipeline
from cnnc.passes.options import Options
from cnnc.target import CpuIsa
from cnnc.tools.tune import candidates

ZOO = EXAMPLES / "zoo"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's models with weights made by examples/zoo/make_weights.py (PyTorch), which
    the repository does not ship, in a directory of this module's own."""
    pytest.importorskip("torch", reason="the zoo's weights come from PyTorch")
    spec = importlib.util.spec_from_file_location("zoo_make_weights", ZOO / "make_weights.py")
    assert spec is not None and spec.loader is not None
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    directory = tmp_path_factory.mktemp("zoo")
    for name in ("vgg_bn", "resnet8"):
        make_weights.write(name, directory)
    return directory
LAYOUT_OF_BATCH = {1: "channel", 17: "batch"}


def winograd_tiles(model: cnnc.Model) -> dict[str, int]:
    """Each kernel's `winograd` field, in the variant of the model's first layout."""
    return {group.name: group.schedule.winograd
            for group in model.variants[0].graph.plan.groups}  # type: ignore[attr-defined]


def conv_model(model_file: Callable[..., Path], in_channels: int, out_channels: int,
               size: tuple[int, int], padding: int, tail: str = "",
               weights: str = "uniform") -> cnnc.Graph:
    """One 3x3 convolution and the `tail` layers after it; their parameters uniform in
    [-1, 1] (a harder test of rounding than a trained net's), or as initialised."""
    path = model_file(f"""
name: one_conv
input: [{in_channels}, {size[0]}, {size[1]}]
layers:
  - conv2d: {{out_channels: {out_channels}, kernel_size: 3, padding: {padding}}}
{tail}""")
    graph = cnnc.load(path)
    if weights == "initialised":
        return graph
    rng = np.random.default_rng(1)
    for node in graph.order():
        for name, value in graph.params(node).items():
            value[...] = rng.uniform(-1, 1, value.shape)  # not the initialiser's scale
            if name == "running_var":
                value[...] = np.abs(value) + 0.5
    return graph


def check(graph: cnnc.Graph, batch: int, tile: int, kernels: int = 1,
          target: str = "llvm") -> None:
    """Compiled with Winograd F(tile x tile) forced, `kernels` kernels compute by it and the
    outputs match the reference."""
    layout = LAYOUT_OF_BATCH[batch]
    model = cnnc.compile(graph, target=target, layout=layout,
                         schedule={"*": {"winograd": tile}})
    if target == "llvm":
        assert sum(1 for m in winograd_tiles(model).values() if m == tile) == kernels
    x = np.random.default_rng(0).standard_normal((batch, *graph.input_shape))
    x = x.astype(np.float32)
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize(("in_channels", "out_channels", "size", "padding"), [
    (3, 7, (9, 11), 0),  # odd sizes: tiles overhang the bottom and the right
    (5, 19, (8, 8), 1),  # channels not a multiple of 16, whole tiles
    (17, 33, (7, 10), 1),
    (1, 1, (3, 3), 0),  # one output point
])
def test_a_convolution_by_winograd_matches_the_reference(
        model_file: Callable[..., Path], in_channels: int, out_channels: int,
        size: tuple[int, int], padding: int, batch: int, tile: int) -> None:
    # F(4x4) rounds more (its transforms hold 8 and 1/24): with weights uniform in [-1, 1]
    # 17 input channels leave the tolerance (5e-5 off a value of 0.11); with the initialiser's
    # weights, as in the zoo, it stays inside.
    graph = conv_model(model_file, in_channels, out_channels, size, padding,
                       weights="uniform" if tile == 2 else "initialised")
    check(graph, batch, tile)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize("size", [(12, 12), (11, 13)])  # the pooled tile overhangs in the 2nd
def test_winograd_fused_with_batchnorm_relu_and_maxpool(
        model_file: Callable[..., Path], size: tuple[int, int], batch: int, tile: int) -> None:
    graph = conv_model(model_file, 6, 20, size, 1,
                       "  - batchnorm2d\n  - relu\n  - maxpool2d: {kernel_size: 2}\n"
                       "  - sigmoid\n")
    check(graph, batch, tile)


@pytest.mark.parametrize("batch", [1, 17])
def test_winograd_fused_with_average_pooling_and_a_residual_add(
        model_file: Callable[..., Path], batch: int) -> None:
    path = model_file("""
name: residual_pool
input: [4, 10, 10]
layers:
  - conv2d: {name: a, out_channels: 4, kernel_size: 3, padding: 1}
  - relu: {name: r}
  - conv2d: {name: b, out_channels: 4, kernel_size: 3, padding: 1}
  - add: {name: s, inputs: [b, r]}
  - avgpool2d: {name: p, kernel_size: 2}
""")
    check(cnnc.load(path), batch, 2, kernels=2)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("batch", [1, 17])
@pytest.mark.parametrize("name", ["vgg_bn", "resnet8"])
def test_zoo_models_by_winograd_match_the_reference(zoo: Path, name: str, batch: int,
                                                    tile: int) -> None:
    graph = cnnc.load(zoo / f"{name}.yaml")
    # vgg_bn: all six convolutions; resnet8: four (`test_what_winograd_does_not_compute...`).
    check(graph, batch, tile, kernels=6 if name == "vgg_bn" else 4)


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("case", ["residual", "same_padding"])
def test_golden_cases_by_winograd_match_their_expected_outputs(case: str, tile: int) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, schedule={"*": {"winograd": tile}})
    assert any(winograd_tiles(model).values())
    x = np.load(GOLDEN / f"{case}.io.npz")["input"]
    for got, want in zip(as_list(model(x)), expected_outputs(case, graph)):
        assert_allclose(got, want, **TOLERANCE)


@pytest.mark.parametrize("case", ["residual", "same_padding"])
def test_winograd_on_cuda_sim(case: str) -> None:
    check(cnnc.load(GOLDEN / f"{case}.yaml"), 17, 2, target="cuda-sim")


def test_a_schedule_file_sets_winograd_for_one_kernel(zoo: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"conv2d_relu_4": {"winograd": 4, "oc_block": 2}}))
    model = cnnc.compile(zoo / "vgg_bn.yaml", layout="batch", schedule=path)
    tiles = winograd_tiles(model)
    assert list(tiles.values()) == [0, 2, 2, 2, 4, 2, 0]  # the others: the heuristic's
    assert "winograd=4" in model.variants[0].lowered.kernels[5].to_text()  # type: ignore[attr-defined]


@pytest.mark.parametrize(("fields", "message"), [
    ({"conv2d_relu_4": {"winograd": 3}}, "s.json:1: kernel 'conv2d_relu_4': 'winograd' must "
     "be an integer 0 (off), 2 or 4 (the output tile of F(m x m, 3 x 3)), got 3"),
    ({"*": {"winograd": True}}, "s.json:1: every kernel ('*'): 'winograd' must be an integer "
     "0 (off), 2 or 4 (the output tile of F(m x m, 3 x 3)), got true"),
    ({"dense_6": {"winograd": 2}}, "s.json:1: kernel 'dense_6': 'winograd' must be 0 "
     "(Winograd computes only a 3x3 stride-1 undilated ungrouped conv2d, whose fused pooling "
     "window, if any, tiles its output), got 2"),
])
def test_a_bad_winograd_field_is_one_error_line(zoo: Path, tmp_path: Path,
                                                 fields: dict[str, object],
                                                 message: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ScheduleError) as error:
        cnnc.compile(zoo / "vgg_bn.yaml", schedule=path)
    assert str(error.value).replace(str(tmp_path) + "/", "") == message


def test_what_winograd_does_not_compute_stays_direct(zoo: Path) -> None:
    # The stride-2 and 1x1 convolutions, the dense layer, and the last block's convolution
    # fused with the global pooling (a window of the whole image does not tile a tile).
    model = cnnc.compile(zoo / "resnet8.yaml", schedule={"*": {"winograd": 4}})
    assert winograd_tiles(model) == {
        "conv2d_relu_0": 4, "conv2d_relu_1": 4, "conv2d_add_relu_2": 4, "conv2d_relu_3": 0,
        "conv2d_4": 0, "conv2d_add_relu_5": 4, "conv2d_relu_6": 0, "conv2d_7": 0,
        "conv2d_add_relu_global_avgpool2d_8": 0, "dense_9": 0}


@pytest.mark.parametrize("layout", ["channel", "batch"])
@pytest.mark.parametrize("isa", [CpuIsa(16, 32), CpuIsa(8, 16)])
def test_the_cpu_heuristic_picks_f2_for_wide_convolutions_in_both_layouts(
        zoo: Path, layout: str, isa: CpuIsa) -> None:
    # The first convolution (3 input channels) stays direct; the five others take F(2x2)
    # in either layout, so that the layouts compute them alike.
    graph = run_pipeline(cnnc.load(zoo / "vgg_bn.yaml"), Options(layout=layout, cpu=isa))
    picked = [group.schedule.winograd for group in graph.plan.groups]
    assert picked == [0, 2, 2, 2, 2, 2, 0]
    assert all(bool(group.scratch) == bool(group.schedule.winograd)
               for group in graph.plan.groups)
    for group in graph.plan.groups[1:6]:
        tile = group.schedule.oc_block * group.schedule.x_block
        assert tile <= isa.broadcast_tile


def test_training_options_keep_every_kernel_direct(zoo: Path) -> None:
    # A trainer's kernels read the live weights, which Winograd transforms at compile time.
    graph = run_pipeline(cnnc.load(zoo / "vgg_bn.yaml"),
                         Options(layout="batch", winograd=False))
    assert all(group.schedule.winograd == 0 for group in graph.plan.groups)


def test_the_heuristic_keeps_gpu_kernels_direct(zoo: Path) -> None:
    graph = run_pipeline(cnnc.load(zoo / "vgg_bn.yaml"), Options(target="cuda-sim"))
    assert all(group.schedule.winograd == 0 for group in graph.plan.groups)


def test_tune_tries_winograd_only_where_it_applies(zoo: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cnnc.compile(zoo / "vgg_bn.yaml", layout="channel", threads=1)
    conv = list(candidates(model, "channel", 1, seed=0))  # type: ignore[arg-type]
    assert {schedule["winograd"] for schedule in conv} == {0, 2, 4}
    dense = list(candidates(model, "channel", 6, seed=0))  # type: ignore[arg-type]
    assert {schedule["winograd"] for schedule in dense} == {0}


def test_winograd_switched_off_by_a_schedule_gets_the_direct_tile(zoo: Path) -> None:
    graph = cnnc.load(zoo / "vgg_bn.yaml")
    off = run_pipeline(graph, Options(layout="channel", schedules={"*": {"winograd": 0}}))
    direct = run_pipeline(graph, Options(layout="channel", winograd=False))
    assert [group.schedule for group in off.plan.groups] == \
        [group.schedule for group in direct.plan.groups]
