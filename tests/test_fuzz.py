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
from cnnc import ops
from cnnc.reference import evaluate as interpret
from cnnc.tools.fuzz.command import fuzz_command
from cnnc.tools.fuzz.configs import CONFIGS, Config, configs_for
from cnnc.tools.fuzz.generate import generate
from cnnc.tools.fuzz.judge import compare, reference_variants
from cnnc.tools.fuzz.loop import Report, fuzz
from cnnc.tools.fuzz.model import CASE_FILE, INPUT_FILE, MODEL_FILE, Case
from cnnc.tools.fuzz.replay import replay, write_case
from cnnc.tools.fuzz.runner import Job, Runner

SEED = 2026
COUNT = 150
CI_SECONDS = 180.0


def test_a_fixed_seed_of_150_models_matches_the_reference_on_every_configuration(
        tmp_path: Path) -> None:
    start = time.monotonic()
    # Each model runs on llvm (fused, one thread) and on one other configuration in turn.
    report = fuzz(seed=SEED, count=COUNT, sample=1, jobs=2, out=tmp_path / "failures",
                  shrink_seconds=30)
    seconds = time.monotonic() - start
    print(report.summary())
    assert report.models == COUNT
    assert [f"model {index}: {failure.describe()}" for index, failure in report.failures] == []
    assert report.runs_per_config["llvm"] == COUNT
    for name in CONFIGS:  # every configuration had its share, bounds checking included
        assert report.runs_per_config[name] >= COUNT // (2 * len(CONFIGS))
    assert set(report.ops) == set(ops.OPS)  # every op of the format was generated
    assert seconds < CI_SECONDS


def test_a_seed_always_gives_the_same_models_inputs_and_weights() -> None:
    for index in range(12):
        first, second = generate(SEED, index), generate(SEED, index)
        assert first.spec.yaml_text() == second.spec.yaml_text()
        np.testing.assert_array_equal(first.x, second.x)
        assert (first.layout, first.input_kind, first.schedule) == \
            (second.layout, second.input_kind, second.schedule)
        for key, value in (first.spec.weights or {}).items():
            assert second.spec.weights is not None
            np.testing.assert_array_equal(value, second.spec.weights[key])
    assert generate(SEED, 0).spec.yaml_text() != generate(SEED + 1, 0).spec.yaml_text()


def test_generated_models_use_the_whole_format(tmp_path: Path) -> None:
    cases = [generate(SEED, index) for index in range(60)]
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
    batches = [len(generate(SEED, index).x) for index in range(60)]
    assert min(batches) == 1 and max(batches) > 32
    kinds = {generate(SEED, index).input_kind for index in range(60)}
    assert {"large", "tiny", "saturating", "special"} <= kinds


def test_configurations_rotate_so_that_each_gets_its_share() -> None:
    targets = list(CONFIGS)
    chosen = [configs_for(index, targets, sample=1) for index in range(40)]
    assert all(configs[0] == "llvm" and len(configs) == 2 for configs in chosen)
    assert {configs[1] for configs in chosen} == set(targets[1:])
    every = configs_for(4, targets, sample=None)
    assert every == targets  # bounds checking on every fourth model
    assert "llvm-bounds" not in configs_for(5, targets, sample=None)


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
    class Broken(Config):
        def compile(self, graph: cnnc.Graph, schedule: dict[str, Any] | None = None) -> Any:
            return OffByOne(super().compile(graph, schedule), graph)

    monkeypatch.setitem(CONFIGS, "llvm-broken", Broken("llvm-broken"))
    return "llvm-broken"


def test_a_failure_is_shrunk_written_and_replayed(tmp_path: Path, broken_config: str) -> None:
    index = next(index for index in range(200)
                 if sum(layer.op == "maxpool2d" for layer in generate(7, index).spec.layers)
                 and len(generate(7, index).spec.layers) >= 4)
    report = fuzz(seed=7, count=index + 1, targets=["llvm", broken_config], jobs=0,
                  out=tmp_path, shrink_seconds=120)
    failing = [(found, failure) for found, failure in report.failures if found == index]
    assert failing and failing[0][1].config == broken_config
    assert failing[0][1].kind == "mismatch"
    directory = next(path for path in report.written if f"model{index}-" in path.name)
    record = json.loads((directory / CASE_FILE).read_text())
    assert record["shrunk"] and record["failure"]["config"] == broken_config
    shrunk = cnnc.load(directory / MODEL_FILE)
    assert [shrunk.op(name) for name in shrunk.order()] == ["input", "maxpool2d"]
    assert len(np.load(directory / INPUT_FILE)) == 1
    assert replay(directory).failures  # still fails on the broken configuration

    result = CliRunner().invoke(fuzz_command, ["--replay", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "cases pass" in result.output


def test_the_command_runs_a_seed_and_replays_what_it_wrote(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(fuzz_command, ["--seed", "3", "--count", "3", "--targets",
                                          "llvm,cuda-sim", "--jobs", "0", "--out",
                                          str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "fuzzed 3 models (seed 3)" in result.output and "0 failures" in result.output
    case = generate(3, 1)
    write_case(tmp_path / "one", case, None, ["llvm", "cuda-sim"])
    result = runner.invoke(fuzz_command, ["--replay", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert "1 of 1 cases pass" in result.output
    start = time.monotonic()
    timed = runner.invoke(fuzz_command, ["--seed", "3", "--seconds", "2", "--targets",
                                         "llvm", "--jobs", "0", "--out", str(tmp_path)])
    assert timed.exit_code == 0 and time.monotonic() - start < 30
    assert "0 failures" in timed.output
    bad = runner.invoke(fuzz_command, ["--targets", "llvm,gpu"])
    assert bad.exit_code == 2 and "unknown target 'gpu'" in bad.output


class KillsItsProcess:
    """Unpickling this ends the process at once, as a crash in native code would."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return os._exit, (3,)


def test_a_model_that_kills_its_worker_is_a_crash_and_the_run_goes_on() -> None:
    good = generate(SEED, 1)
    deadly = Case(good.spec, KillsItsProcess())  # type: ignore[arg-type]
    jobs = [Job(["llvm"], case=deadly), Job(["llvm"], case=good)]
    with Runner(1) as runner:
        outcomes = {key: outcome for key, _, outcome in runner.run(iter(jobs))}
    (failure,) = outcomes[0].failures
    assert failure.kind == "crash" and "exit code 3" in failure.message
    assert outcomes[1].failures == []


class RaisesWhenUnpickled:
    """Unpickling this raises in the worker, outside any handler of the fuzzer's."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return int, ("not a number",)


class HangsWhenUnpickled:
    """Unpickling this keeps the worker busy far beyond the case time-out."""

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return time.sleep, (60,)


def test_a_worker_that_raises_is_a_crash_quoting_its_last_error_line() -> None:
    good = generate(SEED, 1)
    raising = Case(good.spec, RaisesWhenUnpickled())  # type: ignore[arg-type]
    start = time.monotonic()
    with Runner(1) as runner:
        outcome = runner.evaluate(raising, ["llvm"])
    assert time.monotonic() - start < 20
    (failure,) = outcome.failures
    assert (failure.kind, failure.error) == ("crash", "ProcessDied")
    assert failure.message == ("the fuzzing worker process of a given case died (exit code "
                               "1): ValueError: invalid literal for int() with base 10: "
                               "'not a number'")


def test_a_worker_that_hangs_is_stopped_after_the_case_time_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cnnc.tools.fuzz.runner.CASE_TIMEOUT", 1.0)
    good = generate(SEED, 1)
    hanging = Case(good.spec, HangsWhenUnpickled())  # type: ignore[arg-type]
    start = time.monotonic()
    with Runner(1) as runner:
        outcome = runner.evaluate(hanging, ["llvm"])
    assert time.monotonic() - start < 10
    (failure,) = outcome.failures
    assert (failure.kind, failure.error) == ("hang", "Timeout")
    assert failure.message == ("the fuzzing worker process of a given case took more than "
                               "1 s (stopped it)")


def test_the_summary_says_in_plain_words_that_envelope_matches_pass() -> None:
    report = Report(seed=2026, models=20, runs=20, excused=54,
                         excused_models={3: 50, 17: 4}, runs_per_config={"llvm": 20})
    assert report.summary().splitlines()[1] == (
        "54 output values of models 3 and 17 (seed 2026) passed within float32 rounding: they "
        "are further from the reference than rtol=0.0001, atol=1e-05, but no further than "
        "float32 rounding can move these models, whose output changes a lot for tiny changes "
        "inside. They count as passes; nothing is written for them.")
    one = Report(seed=1, excused=2, excused_models={5: 2})
    assert "2 output values of model 5 (seed 1) passed" in one.summary()
    assert "can move this model," in one.summary()


def test_the_fuzzer_reports_progress_and_is_quiet_when_told(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("cnnc.tools.fuzz.loop.PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    fuzz(seed=3, count=3, targets=["llvm"], jobs=0, out=tmp_path, progress=lines.append)
    assert [line.split(" models checked")[0] for line in lines] == ["1 of 3", "2 of 3",
                                                                    "3 of 3"]
    assert all(", 0 failures, " in line for line in lines)
    result = CliRunner().invoke(fuzz_command, ["--seed", "3", "--count", "2", "--targets",
                                               "llvm", "--jobs", "0", "--quiet", "--out",
                                               str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


def test_the_report_names_the_models_with_envelope_matches(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    judge = compare

    def one_more_excused(*args: Any) -> tuple[str | None, int]:
        problem, excused = judge(*args)
        return problem, excused + 1

    # Each model is judged twice, at its batch and alone.
    monkeypatch.setattr("cnnc.tools.fuzz.judge.compare", one_more_excused)
    report = fuzz(seed=3, count=2, targets=["llvm"], jobs=0, out=tmp_path)
    assert report.failures == []
    assert report.excused_models == {0: 2, 1: 2} and report.excused == 4
    assert "4 output values of models 0 and 1 (seed 3) passed within float32 rounding" in \
        report.summary()


def test_the_float32_envelope_runs_the_reference_loop_itself(tmp_path: Path) -> None:
    case = next(case for case in (generate(SEED, index) for index in range(40))
                if any(layer.op == "conv2d" for layer in case.spec.layers))
    graph = cnnc.load(case.spec.write(tmp_path))
    x = case.x[:2]
    seen: list[str] = []

    def unchanged(key: str, value: np.ndarray) -> np.ndarray:
        seen.append(key)
        return value

    outputs = interpret(graph, x.astype(np.float64), unchanged)
    want = cnnc.reference(graph, x)
    for got, expected in zip(outputs, want if isinstance(want, tuple) else (want,)):
        np.testing.assert_array_equal(got.astype(np.float32), expected)  # bit for bit
    assert seen == [key for name in graph.order() if name != "input"
                    for key in [*graph.operands(name),
                                *(f"{name}.{param}" for param in graph.params(name))]]
    rounded, noisy = reference_variants(graph, x)
    assert len(rounded) == 1 and len(noisy) == 3
