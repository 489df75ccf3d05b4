"""The fuzzer's training mode (`cnnc fuzz --train`): a seed's random models of the ops whose
gradient cnnc compiles, one compiled step each against the reference backward, passes; a
wrong gradient rule is caught, shrunk, written with its targets and replayed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import cnnc
from cnnc import ops
from cnnc.tools.fuzz.command import fuzz_command
from cnnc.tools.fuzz.configs import BOUNDS_EVERY
from cnnc.tools.fuzz.loop import fuzz
from cnnc.tools.fuzz.model import CASE_FILE, INPUT_FILE, MODEL_FILE, TARGET_FILE
from cnnc.tools.fuzz.replay import replay
from cnnc.tools.fuzz.training import MAX_TRAINING_BATCH, compilable_ops, generate_training
from cnnc.training import kernels
from cnnc.training.program import check_compilable

SEED = 2026


def test_training_models_use_only_ops_whose_gradient_compiles(tmp_path: Path) -> None:
    cases = [generate_training(SEED, index) for index in range(40)]
    drawn: set[str] = set()
    for index, case in enumerate(cases):
        assert case.training is not None
        graph = cnnc.load(case.spec.write(tmp_path / str(index)))
        check_compilable(graph, case.training.loss)  # raises for an op that does not compile
        drawn |= {graph.op(name) for name in graph.order() if name != "input"}
        assert len(case.training.y) == len(case.x) <= case.training.batch_size
    assert drawn <= compilable_ops()
    assert {"conv2d", "dense", "maxpool2d", "avgpool2d", "add", "flatten"} <= drawn
    assert {case.training.loss for case in cases if case.training} == {"cross_entropy",
                                                                      "squared_error"}
    assert {case.training.reduction for case in cases if case.training} == {"mean", "sum"}
    batches = [len(case.x) for case in cases]
    assert min(batches) < 16 and max(batches) > 32 and max(batches) <= MAX_TRAINING_BATCH
    again = generate_training(SEED, 3)
    assert again.spec.yaml_text() == cases[3].spec.yaml_text()
    assert again.training is not None and cases[3].training is not None
    np.testing.assert_array_equal(again.training.y, cases[3].training.y)


def test_a_seeded_training_run_matches_the_reference_on_one_and_two_threads(
        tmp_path: Path) -> None:
    report = fuzz(seed=SEED, count=24, jobs=0, out=tmp_path, training=True)
    print(report.summary())
    assert [f"model {index}: {failure.describe()}" for index, failure in report.failures] == []
    assert report.models == 24
    # cuda-sim (which checks every access's bounds) on every BOUNDS_EVERY-th model
    assert report.runs_per_config == {"train": 24, "train-2threads": 24, "train-cuda-sim": 6}


def test_torch_step_is_the_reference_step_in_float32() -> None:
    """The envelope's PyTorch run computes the same step as the reference (batch norm in
    training mode, dropout by the reference's masks), to float32 rounding."""
    pytest.importorskip("torch")
    from conftest import agree
    from conftest import build_graph as build
    from test_training_compiled import NORMALISED, batch

    from cnnc.reference_backward import reference_backward
    from cnnc.tools.fuzz.torch_step import torch_step

    graph = build((2, 7, 7), NORMALISED)
    for loss, reduction in (("cross_entropy", "mean"), ("squared_error", "sum")):
        x, y = batch(graph, 9, loss)
        want = reference_backward(graph, x, y, loss=loss, reduction=reduction, training=True,
                                  seed=3)
        got = torch_step(graph, x, y, loss, reduction, want.masks)
        assert got is not None
        np.testing.assert_allclose(got[0], want.loss, rtol=1e-5)
        assert set(got[1]) == set(want.gradients)
        for key, grad in want.gradients.items():
            if key == "c2.bias":  # before batch norm: exactly 0, float32 leaves residue
                np.testing.assert_allclose(got[1][key], 0.0, atol=1e-4)
                continue
            agree(got[1][key], grad, key)


def _scaled_tanh_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for a compiler bug: the compiled gradient of tanh is 1% too large."""
    original = kernels.pointwise_backward
    tanh = ops.OPS["tanh"].gradient
    assert tanh is not None and tanh.lower is not None

    def pointwise_backward(name: str, layer: str, floats: int, width: int, rule: Any,
                           attrs: dict, extra: str = "") -> Any:
        if rule is tanh.lower:
            def scaled(x: Any, y: Any, g: Any, attrs: dict) -> Any:
                return rule(x, y, g, attrs) * 1.01
            return original(name, layer, floats, width, scaled, attrs, extra)
        return original(name, layer, floats, width, rule, attrs, extra)

    monkeypatch.setattr(kernels, "pointwise_backward", pointwise_backward)


def test_a_wrong_gradient_is_caught_shrunk_written_and_replayed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def tanh_after_a_conv(index: int) -> bool:
        layers = [layer.op for layer in generate_training(SEED, index).spec.layers]
        return "tanh" in layers and "conv2d" in layers[:layers.index("tanh")]

    index = next(index for index in range(100) if tanh_after_a_conv(index))
    _scaled_tanh_gradient(monkeypatch)
    report = fuzz(seed=SEED, count=index + 1, jobs=0, out=tmp_path, shrink_seconds=120,
                  training=True)
    failing = [failure for found, failure in report.failures if found == index]
    configs = ["train", "train-2threads"] + ["train-cuda-sim"] * (index % BOUNDS_EVERY == 0)
    assert [(failure.config, failure.kind) for failure in failing] == \
        [(config, "mismatch") for config in configs]
    assert "gradient of" in failing[0].message and "differ from the reference" in \
        failing[0].message
    directory = next(path for path in report.written if f"training-model{index}-" in path.name)
    record = json.loads((directory / CASE_FILE).read_text())
    assert record["shrunk"] and record["failure"]["config"] == "train"
    assert set(record["training"]) == {"loss", "reduction", "batch_size"}
    shrunk = cnnc.load(directory / MODEL_FILE)
    kept = [shrunk.op(name) for name in shrunk.order()]
    assert "tanh" in kept and len(kept) <= 5
    assert len(np.load(directory / INPUT_FILE)) == len(np.load(directory / TARGET_FILE)) == 1
    assert replay(directory).failures  # still fails with the broken rule

    result = CliRunner().invoke(fuzz_command, ["--replay", str(directory)])
    assert result.exit_code == 1 and f"FAILED ({', '.join(configs)})" in result.output
    monkeypatch.undo()
    assert replay(directory).failures == []  # and passes once the rule is right again


def test_the_command_runs_the_training_mode(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(fuzz_command, ["--train", "--seed", "3", "--count", "2", "--jobs",
                                          "0", "--quiet", "--shrink-seconds", "0", "--out",
                                          str(tmp_path)])
    # The plumbing, whatever the models find: a run that found failures exits with 1.
    summary = result.output.splitlines()[0]
    assert summary.startswith("fuzzed 2 models (seed 3)"), result.output
    assert "(train 2, train-2threads 2, train-cuda-sim 1)" in summary
    assert result.exit_code == (0 if summary.endswith("; 0 failures") else 1)
    bad = runner.invoke(fuzz_command, ["--train", "--targets", "llvm"])
    assert bad.exit_code == 2
    assert "unknown target 'llvm' with --train; expected some of train, train-2threads, " \
        "train-cuda-sim" in bad.output
    only = runner.invoke(fuzz_command, ["--train", "--targets", "train-cuda-sim", "--seed", "3",
                                        "--count", "2", "--jobs", "0", "--quiet",
                                        "--shrink-seconds", "0", "--out", str(tmp_path)])
    assert "(train-cuda-sim 2)" in only.output.splitlines()[0], only.output
