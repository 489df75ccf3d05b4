"""`cnnc bench --train` on a tiny model: the table and the JSON say images/s, the ratio, the
share of the measured peak (3 x forward FLOPs) and the memory; a peer that trains differently
fails the check before timing, naming the parameter; options that do not fit are one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from numpy.testing import assert_allclose

import cnnc
from cnnc.cli import main
from cnnc.tools.bench_train import TrainBenchError, run_train_bench

pytest.importorskip("torch")

TINY = """\
name: tiny
input: [1, 8, 8]
seed: 0
layers:
  - conv2d: {name: c, out_channels: 4, kernel_size: 3, padding: 1}
  - relu: {name: r}
  - flatten: {name: f}
  - dense: {name: d, units: 10}
"""
# conv2d: 2 x (4 x 8 x 8 outputs) x 9 taps; relu: 256 elements; dense: 2 x 10 x 256.
TINY_FORWARD_FLOPS = 4608 + 256 + 5120


def write_model(tmp_path: Path, text: str = TINY) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return path


def test_bench_train_reports_throughput_peak_share_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    result = CliRunner().invoke(main, ["bench", "--train", str(write_model(tmp_path)),
                                       "--threads", "1", "--batch", "32", "--rounds", "3",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == ("training tiny: SGD(lr=0.9), cross entropy (mean), random data; cnnc "
                        "against PyTorch eager")
    assert lines[1].startswith("check (threads 1, 32 images): one step from the same weights")
    assert "4 parameters agree after it" in lines[1]
    assert lines[2].split() == ["threads", "batch", "engine", "step", "spread", "images/s",
                                "cnnc/torch", "%", "of", "peak", "memory", "peak", "RSS",
                                "RSS", "rise"]
    assert [line.split()[:3] for line in lines[4:6]] == [["1", "32", "cnnc"],
                                                          ["1", "32", "torch"]]
    assert "training FLOPs = 3 x forward FLOPs per image" in result.output

    record = json.loads(out.read_text())
    assert record["forward_flops_per_image"] == TINY_FORWARD_FLOPS
    assert record["training_flops_per_image"] == 3 * TINY_FORWARD_FLOPS
    assert record["optimizer"] == {"name": "SGD", "lr": 0.9}
    assert [check["parameters"] for check in record["checks"]] == [4]
    cnnc_run, torch_run = record["results"]
    assert (cnnc_run["engine"], torch_run["engine"]) == ("cnnc", "torch")
    assert len(cnnc_run["seconds"]) == len(torch_run["seconds"]) == 3
    trainer = cnnc.compile_training(write_model(tmp_path), batch_size=32, threads=1)
    assert cnnc_run["store_bytes"] == trainer.store.nbytes
    assert torch_run["store_bytes"] is None
    for run in (cnnc_run, torch_run):
        assert run["peak_rss_bytes"] >= run["base_rss_bytes"] > 0
        assert_allclose(run["images_per_second"], 32 / run["median_seconds"], rtol=1e-12)
        assert_allclose(run["peak_share"], run["images_per_second"] * 3 * TINY_FORWARD_FLOPS
                        / (record["peak_gflops_per_core"] * 1e9), rtol=1e-12)
    (point,) = record["points"]
    assert (point["threads"], point["batch"]) == (1, 32)
    assert_allclose(point["ratio"], cnnc_run["images_per_second"]
                    / torch_run["images_per_second"], rtol=1e-12)
    assert point["cnnc_peak_share"] == cnnc_run["peak_share"]


def test_a_peer_with_another_learning_rate_fails_the_check(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import torch

    plain = torch.optim.SGD

    def wrong(params: Any, lr: float) -> Any:
        return plain(params, lr=lr * 1.5)

    monkeypatch.setattr(torch.optim, "SGD", wrong)
    graph = cnnc.load(write_model(tmp_path))
    with pytest.raises(TrainBenchError, match=r"^after one step from the same weights, "
                                              r"parameter 'c\.weight' differs between cnnc "
                                              r"and torch: \d+ of 36 values"):
        run_train_bench(graph, [16], [1], rounds=3, round_seconds=0.01, in_process=True)


def test_the_same_peer_in_process_passes_the_check(tmp_path: Path) -> None:
    graph = cnnc.load(write_model(tmp_path))
    report = run_train_bench(graph, [16], [1], rounds=3, round_seconds=0.01, in_process=True)
    assert [(check.threads, check.batch, check.parameters) for check in report.checks] == \
        [(1, 16, 4)]
    assert_allclose(report.checks[0].cnnc_loss, report.checks[0].torch_loss, rtol=1e-4)
    assert [(result.engine, len(result.seconds)) for result in report.results] == \
        [("cnnc", 3), ("torch", 3)]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--train", "--plot", "x.png"],
     "error: --plot applies to inference; --train times cnnc's llvm trainer"),
    (["--train", "--against", "onnxruntime"],
     "error: --train compares with torch only, got --against onnxruntime"),
    (["--lr", "0.1"], "error: --lr and --data apply to --train only"),
])
def test_options_that_do_not_fit_are_one_line(tmp_path: Path, arguments: list[str],
                                              message: str) -> None:
    result = CliRunner().invoke(main, ["bench", str(write_model(tmp_path)), *arguments])
    assert (result.exit_code, result.output) == (2, message + "\n")


def test_a_model_cnnc_cannot_train_is_one_line(tmp_path: Path) -> None:
    model = write_model(tmp_path, TINY.replace("relu: {name: r}", "gelu: {name: r}"))
    result = CliRunner().invoke(main, ["bench", "--train", str(model)])
    assert (result.exit_code, result.output) == (
        2, "error: cnnc cannot compile the gradient of 'r' (gelu) yet; "
           "cnnc.reference_backward can compute it\n")


def test_dropout_is_refused_before_anything_starts(tmp_path: Path) -> None:
    model = write_model(tmp_path, TINY.replace("flatten: {name: f}",
                                               "dropout: {name: drop}\n  - flatten: {name: f}"))
    result = CliRunner().invoke(main, ["bench", "--train", str(model)])
    assert (result.exit_code, result.output) == (
        1, "error: bench --train cannot time model 'tiny': layer 'drop' is dropout, whose "
           "random masks the torch peer does not share\n")


class ExitOnLoad:
    """Unpickles as the child's immediate exit, as a child that dies while it starts."""

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os._exit, (3,))


def _never_called(connection: Any, *args: Any) -> None:
    raise AssertionError("the child should have died first")


def test_a_child_that_dies_while_reading_its_arguments_is_reported_not_hung() -> None:
    # A model's weights are megabytes; through the spawn pipe, a child that died before
    # reading them all left the parent's Process.start() blocked for ever.
    import threading

    from cnnc.tools.workers import Worker, WorkerDied

    outcome: dict[str, BaseException] = {}

    def start() -> None:
        try:
            Worker("the test process", _never_called, ExitOnLoad(),
                   b"x" * (4 << 20)).receive(60)
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "still starting the child after 60 s"
    assert isinstance(outcome.get("error"), WorkerDied)
    assert str(outcome["error"]) == "the test process died (exit code 3)"
