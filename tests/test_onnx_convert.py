"""`cnnc convert`: every golden model goes YAML -> ONNX -> YAML to the same graph (names,
ops, attributes, parameters), and ONNX Runtime runs the ONNX file to the reference's outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CASES, GOLDEN

import cnnc
from cnnc.cli import main
from cnnc.compare import check_outputs

pytest.importorskip("onnx", reason="converting to ONNX needs the onnx package")


def same_graph(got: cnnc.Graph, want: cnnc.Graph) -> None:
    assert got.to_text() == want.to_text()
    for node in want.order():
        assert sorted(got.params(node)) == sorted(want.params(node))
        for key, value in want.params(node).items():
            np.testing.assert_array_equal(got.params(node)[key], value)


@pytest.mark.parametrize("case", CASES)
def test_yaml_to_onnx_to_yaml_gives_the_same_graph(case: str, tmp_path: Path) -> None:
    runner = CliRunner()
    onnx_path, yaml_path = tmp_path / f"{case}.onnx", tmp_path / f"{case}.yaml"
    result = runner.invoke(main, ["convert", str(GOLDEN / f"{case}.yaml"), "-o", str(onnx_path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["convert", str(onnx_path), "-o", str(yaml_path)])
    assert result.exit_code == 0, result.output
    original = cnnc.load(GOLDEN / f"{case}.yaml")
    same_graph(cnnc.load(onnx_path), original)
    same_graph(cnnc.load(yaml_path), original)


@pytest.mark.parametrize("case", CASES)
def test_onnx_runtime_runs_the_converted_model_to_the_reference(case: str,
                                                                tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from cnnc.frontend.onnx_export import save_onnx

    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    path = save_onnx(graph, tmp_path / "model.onnx")
    x = np.random.default_rng(0).random((2, *graph.input_shape), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = tuple(session.run(None, {"input": x}))
    checks = check_outputs(got, cnnc.reference(graph, x), graph.outputs)
    assert all(check.ok for check in checks), checks


def test_an_onnx_file_without_the_suffix_is_read_by_its_content(tmp_path: Path) -> None:
    from cnnc.frontend.onnx_export import save_onnx

    graph = cnnc.load(GOLDEN / "lenet.yaml")
    path = save_onnx(graph, tmp_path / "lenet.model")
    same_graph(cnnc.load(path), graph)


def test_convert_refuses_an_unknown_output_format(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["convert", str(GOLDEN / "lenet.yaml"), "-o",
                                       str(tmp_path / "lenet.txt")])
    assert result.exit_code == 2
    assert result.stderr == (f"error: cannot tell the format of '{tmp_path / 'lenet.txt'}'; "
                             "name it .onnx or .yaml\n")
