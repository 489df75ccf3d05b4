"""ONNX models cnnc cannot compile: one ModelError lists every unsupported node, each with its
cause; `--input-shape` fixes dynamic dimensions. (The malformed files are in the bad-model
catalogue, tests/bad_models.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cnnc
from cnnc.cli import main

onnx = pytest.importorskip("onnx", reason="ONNX models need the onnx package (cnnc[onnx])")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def write(path: Path, nodes: list, dims: list, initializers: list | None = None,
          output: str = "y") -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", "C"])],
        initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def weight(name: str, *shape: int) -> object:
    return numpy_helper.from_array(np.full(shape, 0.5, np.float32), name)


def test_one_error_lists_every_unsupported_node_with_its_cause(tmp_path: Path) -> None:
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["t"], "Conv_12"),
             helper.make_node("Resize", ["t", "", "s"], ["r"], "/layer1/Resize", mode="linear"),
             helper.make_node("MaxPool", ["r"], ["p"], "pool", kernel_shape=[2, 2],
                              dilations=[2, 2]),
             helper.make_node("Relu", ["p"], ["y"], "relu")]
    path = write(tmp_path / "model.onnx", nodes, ["N", 1, 6, 6],
                 [weight("w", 1, 2, 3, 3), weight("s", 4)])
    with pytest.raises(cnnc.ModelError) as caught:
        cnnc.load(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: 3 nodes cannot be compiled:"
    assert lines[1].startswith(f"  {path}: node 'Conv_12' (ConvTranspose): not supported; "
                               "cnnc supports Add, AveragePool, ")
    assert lines[2].startswith(f"  {path}: node '/layer1/Resize' (Resize, mode=linear): not "
                               "supported; cnnc supports ")
    assert lines[3] == (f"  {path}: node 'pool' (MaxPool): not supported: MaxPool with "
                        "dilations [2, 2]; cnnc pools without dilation")
    assert caught.value.nodes == [line.split(": ", 1)[1] for line in lines[1:]]


def test_a_dynamic_dimension_is_fixed_by_input_shape(tmp_path: Path) -> None:
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"], "gap"),
             helper.make_node("Flatten", ["g"], ["y"], "flat")]
    path = write(tmp_path / "model.onnx", nodes, ["N", 3, "H", "W"])
    with pytest.raises(cnnc.ModelError, match=r"give --input-shape C,H,W"):
        cnnc.load(path)
    graph = cnnc.load(path, input_shape=(3, 5, 7))
    assert graph.to_text().splitlines()[0] == "graph g(%input : f32[N,3,5,7]) -> (%flat) {"
    result = CliRunner().invoke(main, ["graph", str(path), "--input-shape", "3,5,7"])
    assert result.exit_code == 0, result.output
    assert "%gap = global_avgpool2d(%input) : f32[N,3,1,1]" in result.stdout
    result = CliRunner().invoke(main, ["graph", str(path), "--input-shape", "4,5,7"])
    assert result.exit_code == 2
    assert result.stderr == (f"error: {path}: --input-shape 4,5,7 does not fit input 'x' "
                             "[N, 3, ?, ?]\n")
    result = CliRunner().invoke(main, ["graph", str(path), "--input-shape", "3,x"])
    assert result.exit_code == 2
    assert result.stderr == "error: --input-shape takes positive integers C,H,W, got '3,x'\n"


def test_an_input_shape_that_disagrees_with_the_model_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "model.onnx", [helper.make_node("Relu", ["x"], ["y"], "r")],
                 ["N", 3, "H", 8])
    with pytest.raises(cnnc.ModelError) as caught:
        cnnc.load(path, input_shape=(3, 8, 9))
    assert str(caught.value) == (f"{path}: --input-shape 3,8,9 does not fit input 'x' "
                                 "[N, 3, ?, 8]")


def test_a_pad_before_a_conv_becomes_its_padding(tmp_path: Path) -> None:
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], "pad"),
             helper.make_node("Conv", ["p", "w"], ["c"], "conv", kernel_shape=[3, 3]),
             helper.make_node("Flatten", ["c"], ["y"], "flat")]
    pads = numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64), "pads")
    path = write(tmp_path / "model.onnx", nodes, ["N", 1, 6, 6], [pads, weight("w", 2, 1, 3, 3)])
    graph = cnnc.load(path)
    assert graph.node_text("conv") == \
        "%conv = conv2d[out=2 k=3 s=1 p=1,3x2,0 bias=false](%input) : f32[N,2,8,6]"

