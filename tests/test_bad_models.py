"""The catalogue of malformed models and weights files (tests/bad_models, written by its
make_catalogue.py): each one gives a single ModelError that names the file, the line and the
layer where they apply, and `cnnc graph FILE` prints it as `error: ...` with exit status 2,
never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_cli

import cnnc
from cnnc.cli import main

CATALOGUE = Path(__file__).parent / "bad_models"
MANIFEST: dict[str, dict[str, object]] = json.loads((CATALOGUE / "manifest.json").read_text())
# A few go through a real process: the installed command, and a file that would run code if
# it were ever unpickled.
IN_A_PROCESS = ["alias_bomb.yaml", "python_object_tag.yaml", "weights_pickled_object.yaml",
                "weights_huge_header.yaml", "not_utf8.yaml", "onnx_truncated.onnx"]


def test_the_catalogue_has_at_least_forty_entries_of_models_and_weights() -> None:
    assert len(MANIFEST) >= 40
    assert sum(name.startswith("weights_") for name in MANIFEST) >= 15
    for name in MANIFEST:
        assert (CATALOGUE / name).is_file()


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_load_raises_one_model_error_naming_file_line_and_layer(name: str) -> None:
    if name.endswith(".onnx"):
        pytest.importorskip("onnx", reason="ONNX models need the onnx package (cnnc[onnx])")
    expected = MANIFEST[name]
    path = CATALOGUE / name
    with pytest.raises(cnnc.ModelError) as caught:
        cnnc.load(path)
    error = caught.value
    assert str(expected["message"]) in error.reason
    assert error.file == str(path)
    assert error.line == expected["line"]
    assert error.layer == expected["layer"]
    assert str(error).startswith(f"{path}:{error.line}:" if error.line else f"{path}:")
    assert "\n" not in str(error)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_cnnc_graph_prints_the_error_and_exits_with_status_2(name: str) -> None:
    if name.endswith(".onnx"):
        pytest.importorskip("onnx", reason="ONNX models need the onnx package (cnnc[onnx])")
    result = CliRunner().invoke(main, ["graph", str(CATALOGUE / name)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    assert str(MANIFEST[name]["message"]) in result.stderr
    assert result.stdout == ""
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("name", IN_A_PROCESS)
def test_the_installed_command_reports_it_without_a_traceback(name: str) -> None:
    result = run_cli("graph", CATALOGUE / name)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
    assert "this must never run" not in result.stdout + result.stderr
