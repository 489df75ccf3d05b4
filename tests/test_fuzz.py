"""The differential fuzzer (`cnnc fuzz`): a fixed seed's 150 random valid models checked on
every configuration against the reference, as CI runs it; and the fuzzer's own parts: the
same seed gives the same models, a failure is shrunk and written as files that `--replay`
runs again, and a model that kills its worker process is reported, not fatal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import cnnc
from cnnc import fuzz, ops

SEED = 2026
COUNT = 150
CI_SECONDS = 180.0


def test_a_fixed_seed_of_150_models_matches_the_reference_on_every_configuration(
        tmp_path: Path) -> None:
    start = time.monotonic()
    # Each model runs on llvm (fused, one thread) and on one other configuration in turn.
    report = fuzz.fuzz(seed=SEED, count=COUNT, sample=1, jobs=2, out=tmp_path / "failures",
                       shrink_seconds=30)
    seconds = time.monotonic() - start
    print(report.summary())
    assert report.models == COUNT
    assert [f"model {index}: {failure.describe()}" for index, failure in report.failures] == []
    assert report.runs_per_config["llvm"] == COUNT
    for name in fuzz.CONFIGS:  # every configuration had its share, bounds checking included
        assert report.runs_per_config[name] >= COUNT // (2 * len(fuzz.CONFIGS))
    assert set(report.ops) == set(ops.OPS)  # every op of the format was generated
    assert seconds < CI_SECONDS


def test_a_seed_always_gives_the_same_models_inputs_and_weights() -> None:
    for index in range(12):
        first, second = fuzz.generate(SEED, index), fuzz.generate(SEED, index)
        assert first.spec.yaml_text() == second.spec.yaml_text()
        np.testing.assert_array_equal(first.x, second.x)
        assert (first.layout, first.input_kind, first.schedule) == \
            (second.layout, second.input_kind, second.schedule)
        for key, value in (first.spec.weights or {}).items():
            assert second.spec.weights is not None
            np.testing.assert_array_equal(value, second.spec.weights[key])
    assert fuzz.generate(SEED, 0).spec.yaml_text() != fuzz.generate(SEED + 1, 0).spec.yaml_text()


def test_generated_models_use_the_whole_format(tmp_path: Path) -> None:
    cases = [fuzz.generate(SEED, index) for index in range(60)]
    joined = "\n".join(case.spec.yaml_text() for case in cases)
    for written in ("groups:", "dilation:", "ceil_mode:", "count_include_pad:", "eps:",
                    "inputs:", "outputs:", "activation:", "linear", "bias:", "weights:",
                    "seed:", "name:"):
        assert written in joined, written
    paddings = [layer.attrs["padding"] for case in cases for layer in case.spec.layers
                if "padding" in layer.attrs]
    assert {type(padding).__name__ for padding in paddings} == {"int", "list"}
    assert any(isinstance(padding, list) and isinstance(padding[0], list)
               for padding in paddings)  # each side on its own
    batches = [len(fuzz.generate(SEED, index).x) for index in range(60)]
    assert min(batches) == 1 and max(batches) > 32
    kinds = {fuzz.generate(SEED, index).input_kind for index in range(60)}
    assert {"large", "tiny", "saturating", "special"} <= kinds


def test_configurations_rotate_so_that_each_gets_its_share() -> None:
    targets = list(fuzz.CONFIGS)
    chosen = [fuzz.configs_for(index, targets, sample=1) for index in range(40)]
    assert all(configs[0] == "llvm" and len(configs) == 2 for configs in chosen)
    assert {configs[1] for configs in chosen} == set(targets[1:])
    every = fuzz.configs_for(4, targets, sample=None)
    assert every == targets  # bounds checking on every fourth model
    assert "llvm-bounds" not in fuzz.configs_for(5, targets, sample=None)


class OffByOne:
    """A stand-in for a compiler bug: llvm, but any model with a max pooling is off by 1."""

    def __init__(self, model: Any, graph: cnnc.Graph) -> None:
        self.model = model
        self.broken = any(graph.op(name) == "maxpool2d" for name in graph.order())

    def __call__(self, x: Any) -> Any:
        outputs = self.model(x)
        if not self.broken:
            return outputs
        return tuple(o + 1 for o in outputs) if isinstance(outputs, tuple) else outputs + 1


@pytest.fixture
def broken_config(monkeypatch: pytest.MonkeyPatch) -> str:
    class Broken(fuzz.Config):
        def compile(self, graph: cnnc.Graph, schedule: dict[str, Any] | None = None) -> Any:
            return OffByOne(super().compile(graph, schedule), graph)

    monkeypatch.setitem(fuzz.CONFIGS, "llvm-broken", Broken("llvm-broken"))
    return "llvm-broken"


def test_a_failure_is_shrunk_written_and_replayed(tmp_path: Path, broken_config: str) -> None:
    index = next(index for index in range(200)
                 if sum(layer.op == "maxpool2d" for layer in fuzz.generate(7, index).spec.layers)
                 and len(fuzz.generate(7, index).spec.layers) >= 4)
    report = fuzz.fuzz(seed=7, count=index + 1, targets=["llvm", broken_config], jobs=0,
                       out=tmp_path, shrink_seconds=120)
    failing = [(found, failure) for found, failure in report.failures if found == index]
    assert failing and failing[0][1].config == broken_config
    assert failing[0][1].kind == "mismatch"
    directory = next(path for path in report.written if f"model{index}-" in path.name)
    record = json.loads((directory / fuzz.CASE_FILE).read_text())
    assert record["shrunk"] and record["failure"]["config"] == broken_config
    shrunk = cnnc.load(directory / fuzz.MODEL_FILE)
    assert [shrunk.op(name) for name in shrunk.order()] == ["input", "maxpool2d"]
    assert len(np.load(directory / fuzz.INPUT_FILE)) == 1
    assert fuzz.replay(directory).failures  # still fails on the broken configuration

    result = CliRunner().invoke(fuzz.fuzz_command, ["--replay", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "cases pass" in result.output


def test_the_command_runs_a_seed_and_replays_what_it_wrote(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(fuzz.fuzz_command, ["--seed", "3", "--count", "3", "--targets",
                                               "llvm,cuda-sim", "--jobs", "0", "--out",
                                               str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "fuzzed 3 models (seed 3)" in result.output and "0 failures" in result.output
    case = fuzz.generate(3, 1)
    fuzz.write_case(tmp_path / "one", case, None, ["llvm", "cuda-sim"])
    result = runner.invoke(fuzz.fuzz_command, ["--replay", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert "1 of 1 cases pass" in result.output
    start = time.monotonic()
    timed = runner.invoke(fuzz.fuzz_command, ["--seed", "3", "--seconds", "2", "--targets",
                                              "llvm", "--jobs", "0", "--out", str(tmp_path)])
    assert timed.exit_code == 0 and time.monotonic() - start < 30
    assert "0 failures" in timed.output
    bad = runner.invoke(fuzz.fuzz_command, ["--targets", "llvm,gpu"])
    assert bad.exit_code == 2 and "unknown target 'gpu'" in bad.output


class KillsItsProcess:
    """Unpickling this ends the process at once, as a crash in native code would."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return os._exit, (3,)


def test_a_model_that_kills_its_worker_is_a_crash_and_the_run_goes_on() -> None:
    good = fuzz.generate(SEED, 1)
    deadly = fuzz.Case(good.spec, KillsItsProcess())  # type: ignore[arg-type]
    jobs = [fuzz.Job(["llvm"], case=deadly), fuzz.Job(["llvm"], case=good)]
    with fuzz.Runner(1) as runner:
        outcomes = {key: outcome for key, _, outcome in runner.run(iter(jobs))}
    (failure,) = outcomes[0].failures
    assert failure.kind == "crash" and "exit code 3" in failure.message
    assert outcomes[1].failures == []
