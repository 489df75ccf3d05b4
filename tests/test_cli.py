"""The `cnnc` command, run for real in a fresh interpreter as a user would run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, GOLDEN, run_cli
from numpy.testing import assert_allclose, assert_array_equal

import cnnc

LENET = EXAMPLES / "lenet.yaml"


def test_graph_prints_lenet_shapes() -> None:
    result = run_cli("graph", LENET)
    assert result.returncode == 0, result.stderr
    shapes = [line.rsplit(" : ", 1)[1] for line in result.stdout.splitlines()[1:-1]]
    assert shapes == [
        "f32[N,6,28,28]", "f32[N,6,28,28]", "f32[N,6,14,14]", "f32[N,16,10,10]",
        "f32[N,16,10,10]", "f32[N,16,5,5]", "f32[N,400]", "f32[N,120]", "f32[N,120]",
        "f32[N,84]", "f32[N,84]", "f32[N,10]",
    ]
    assert result.stdout == cnnc.load(LENET).to_text() + "\n"


def test_graph_as_dot() -> None:
    result = run_cli("graph", LENET, "--format", "dot")
    assert result.returncode == 0, result.stderr
    assert result.stdout == cnnc.load(LENET).to_dot() + "\n"
    assert result.stdout.startswith('digraph "lenet" {\n')


def test_run_prints_shape_and_top1() -> None:
    result = run_cli("run", LENET, "--batch", "3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    # The same random input, drawn here: uniform in [0, 1) from the seed.
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    top1 = cnnc.reference(cnnc.load(LENET), x).argmax(axis=1)
    assert result.stdout.splitlines() == [
        "input: f32[3,1,28,28] (random, seed 1)",
        "output %11: f32[3,10]",
        "top-1: " + " ".join(str(index) for index in top1),
    ]
    assert result.stderr == ""


def test_run_writes_the_output(tmp_path: Path) -> None:
    result = run_cli("run", LENET, "--batch", "2", "--target", "reference", "-o", "out.npy",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "wrote out.npy"
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    written = np.load(tmp_path / "out.npy")
    assert written.dtype == np.float32
    assert_allclose(written, cnnc.reference(cnnc.load(LENET), x), rtol=1e-6, atol=1e-7)


def test_run_on_an_input_file(tmp_path: Path) -> None:
    image = np.ones((1, 1, 6, 8), np.float32)
    image[..., 2:6] = 0
    np.save(tmp_path / "x.npy", image)
    model = EXAMPLES / "edge_detection.yaml"
    result = run_cli("run", model, "--input", "x.npy", "-o", "edges.npy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["input: f32[1,1,6,8] (x.npy)",
                                              "output %edge: f32[1,1,6,7]"]
    row = [0, 1, 0, 0, 0, -1, 0]
    assert_array_equal(np.load(tmp_path / "edges.npy"), [[[row] * 6]])


def test_run_writes_several_outputs_to_npz(tmp_path: Path) -> None:
    model = EXAMPLES / "multiple_channels.yaml"
    result = run_cli("run", model, "-i", EXAMPLES / "multiple_channels.input.npy",
                     "-o", "out.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:3] == ["output %sum_in: f32[1,1,2,2]",
                                               "output %three_out: f32[1,3,2,2]"]
    with np.load(tmp_path / "out.npz") as written:
        assert sorted(written.files) == ["sum_in", "three_out"]
        assert_array_equal(written["sum_in"], [[[[56, 72], [104, 120]]]])
        assert_array_equal(written["three_out"][0, 2], [[96, 128], [192, 224]])


@pytest.mark.parametrize("example", sorted(path.name for path in EXAMPLES.glob("*.yaml")))
def test_every_example_runs(example: str) -> None:
    result = run_cli("run", EXAMPLES / example, "--batch", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("input: f32[2,")


def test_the_pooling_example_gives_the_book_values(tmp_path: Path) -> None:
    result = run_cli("run", EXAMPLES / "pooling.yaml", "-i", EXAMPLES / "pooling.input.npy",
                     "-o", "out.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert_array_equal(out["max3_pad"][0, 0], [[5, 7], [13, 15]])
        assert_array_equal(out["max_rect"][0, 0], [[5, 7], [13, 15]])
        assert_array_equal(out["max3"][0, :, 0, 0], [10, 11])
        assert_array_equal(out["avg2"][0, 0, 0], [2.5, 3.5, 4.5])


def test_a_bad_model_is_one_line_on_stderr(tmp_path: Path) -> None:
    model = tmp_path / "model.yaml"
    model.write_text("input: [1, 8, 8]\nlayers:\n  - conv2e: {out_channels: 2, kernel_size: 3}\n")
    for command in ("graph", "run"):
        result = run_cli(command, model)
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (
            f"error: {model}:3: layer '0': unknown op 'conv2e'; did you mean 'conv2d'?\n")


def test_a_missing_model(tmp_path: Path) -> None:
    result = run_cli("run", tmp_path / "nowhere.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'nowhere.yaml'}: cannot read the model")
    assert "Traceback" not in result.stderr


def test_an_input_of_the_wrong_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    result = run_cli("run", LENET, "--input", tmp_path / "x.npy")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "error: model 'lenet' expects input f32[N,1,28,28], got shape (2, 3)\n")


def test_an_input_that_is_not_an_array(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_text("not numpy")
    result = run_cli("run", LENET, "--input", tmp_path / "x.npy")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot read the input '{tmp_path / 'x.npy'}': ")
    assert "Traceback" not in result.stderr


def test_several_outputs_need_an_npz(tmp_path: Path) -> None:
    result = run_cli("run", GOLDEN / "pool_basic.yaml", "-o", "out.npy", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "error: the model has 2 outputs; write them to a .npz file, not 'out.npy'\n")
    assert not (tmp_path / "out.npy").exists()


def test_input_and_batch_exclude_each_other(tmp_path: Path) -> None:
    result = run_cli("run", LENET, "--input", "x.npy", "--batch", "2")
    assert result.returncode == 2
    assert result.stderr == ("error: give either --input or --batch/--seed, not both "
                             "(see `cnnc run --help`)\n")


def test_an_unknown_target() -> None:
    result = run_cli("run", LENET, "--target", "fpga")
    assert result.returncode == 2
    assert "Invalid value for '--target' / '-t'" in result.stderr


def test_help_explains_every_option() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    assert "graph" in top.stdout and "run" in top.stdout and "--version" in top.stdout
    run_help = run_cli("run", "--help").stdout
    for option in ("--input", "--batch", "--seed", "--output", "--target", "--check",
                   "--no-fuse", "--schedule", "--threads", "reference"):
        assert option in run_help
    graph_help = run_cli("graph", "--help").stdout
    assert "--format [text|dot]" in graph_help
    compile_help = run_cli("compile", "--help").stdout
    for option in ("--target", "--output-dir", "--emit", "--dump-ir", "--no-fuse",
                   "--schedule", "--disable-pass", "--arch", "--verbose"):
        assert option in compile_help


def test_run_llvm_with_check_passes(tmp_path: Path) -> None:
    result = run_cli("run", LENET, "--target", "llvm", "--check", "--batch", "5")
    assert result.returncode == 0, result.stderr
    assert "check %11: max abs error" in result.stdout
    assert result.stdout.rstrip().endswith("ok")


def test_run_check_reports_every_output() -> None:
    result = run_cli("run", GOLDEN / "avgpool_pad.yaml", "--check", "--batch", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == 3


def test_check_flags_outputs_beyond_the_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    from cnnc.cli import _check

    graph = cnnc.load(LENET)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    right = cnnc.reference(graph, x)
    assert _check(graph, x, (right,))
    wrong = right.copy()
    wrong[1, 3] += 1e-3
    assert not _check(graph, x, (wrong,))
    assert "max abs error 0.001" in capsys.readouterr().out.splitlines()[-1]


def test_compile_llvm_writes_the_library(tmp_path: Path) -> None:
    result = run_cli("compile", LENET, "-o", tmp_path, "--emit", "ll,obj,so")
    assert result.returncode == 0, result.stderr
    assert "5 kernels" in result.stdout
    assert "conv2d_sigmoid_avgpool2d_0" in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "lenet.h", "lenet.ll", "lenet.o", "lenet.so"]


def test_compile_dump_ir_and_unfused(tmp_path: Path) -> None:
    result = run_cli("compile", LENET, "--no-fuse", "--dump-ir", tmp_path / "ir")
    assert result.returncode == 0, result.stderr
    assert "11 kernels" in result.stdout
    assert (tmp_path / "ir" / "99_kernels.txt").exists()


def test_compile_rejects_a_bad_schedule_and_emit(tmp_path: Path) -> None:
    schedule = tmp_path / "bad.json"
    schedule.write_text('{"*": {"tile_everything": 3}}')
    result = run_cli("compile", LENET, "--schedule", schedule)
    assert result.returncode == 2
    assert "unknown schedule fields ['tile_everything']" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("compile", LENET, "--emit", "exe")
    assert result.returncode == 2
    assert "unknown --emit kind 'exe'" in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"cnnc {cnnc.__version__}\n"


def test_run_refuses_a_random_batch_too_large_for_memory() -> None:
    result = run_cli("run", LENET, "--batch", "100000000", "--target", "reference")
    assert result.returncode == 2
    assert "error: model 'lenet': a batch of 100000000 images needs" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_times_each_engine_in_its_own_process_after_checking_it(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = run_cli("bench", GOLDEN / "lenet.yaml", "--batch", "2", "--threads", "1",
                     "--against", "reference", "--rounds", "3", "--json", report, "--profile")
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout and "profile: threads=1 batch=2" in result.stdout
    records = json.loads(report.read_text())["results"]
    assert {record["engine"] for record in records} == {"cnnc-llvm", "reference"}
    for record in records:
        assert len(record["seconds"]) == 3
        assert record["max_error"] < 1e-5  # checked against the reference before timing
