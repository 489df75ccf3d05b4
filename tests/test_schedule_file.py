"""Schedule files are checked when read and against each kernel: every mistake is one
ScheduleError line naming the file, the line, the kernel and the field; tuned records that
do not hold here are skipped with a warning; the Schedule has no field that nothing reads."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, TOLERANCE, run_cli
from numpy.testing import assert_allclose

import cnnc
from cnnc.kernel import Schedule
from cnnc.schedule_file import ScheduleWarning

LENET = GOLDEN / "lenet.yaml"
KERNELS = ("conv2d_sigmoid_avgpool2d_0, conv2d_sigmoid_avgpool2d_1, dense_sigmoid_2, "
           "dense_sigmoid_3, dense_4")


def records(path: Path, *schedules: tuple[str, dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps({"kernel": kernel, "schedule": schedule}) + "\n"
                            for kernel, schedule in schedules))
    return path


def compile_error(schedule: object) -> str:
    with pytest.raises(cnnc.ScheduleError) as caught:
        cnnc.compile(LENET, schedule=schedule)  # type: ignore[arg-type]
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_zero_oc_block_is_one_line_with_the_kernels_range(tmp_path: Path) -> None:
    path = records(tmp_path / "schedules.jsonl", ("dense_4", {"oc_block": 2}),
                   ("dense_sigmoid_3", {"unroll_max": 4}), ("dense_sigmoid_2", {"oc_block": 0}))
    result = run_cli("compile", LENET, "--schedule", path.name, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("error: schedules.jsonl:3: kernel 'dense_sigmoid_2': 'oc_block' "
                             "must be an integer from 1 to 120, got 0\n")


def test_every_field_is_checked_for_type_and_range(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    cases = {
        '{"dense_4": {"oc_block": "x"}}': "s.json:1: kernel 'dense_4': 'oc_block' must be an "
        "integer from 1 to the kernel's output channels, got \"x\"",
        '{"dense_4": {"oc_block": 11}}': "s.json:1: kernel 'dense_4': 'oc_block' must be an "
        "integer from 1 to 10, got 11",
        '{"dense_4": {"oc_block": 2.0}}': "s.json:1: kernel 'dense_4': 'oc_block' must be an "
        "integer from 1 to the kernel's output channels, got 2.0",
        '{"conv2d_sigmoid_avgpool2d_0": {"x_block": 15}}': "s.json:1: kernel "
        "'conv2d_sigmoid_avgpool2d_0': 'x_block' must be an integer from 1 to 14, got 15",
        '{"dense_4": {"x_block": 2}}': "s.json:1: kernel 'dense_4': 'x_block' must be 1 for a "
        "kernel with an output without rows, got 2",
        '{"dense_4": {"unroll_max": -1}}': "s.json:1: kernel 'dense_4': 'unroll_max' must be "
        "an integer >= 0, got -1",
        '{"dense_4": {"gpu_threads": 2048}}': "s.json:1: kernel 'dense_4': 'gpu_threads' must "
        "be an integer from 1 to 1024, got 2048",
        '{"dense_4": {"gpu_batch_inner": 1}}': "s.json:1: kernel 'dense_4': 'gpu_batch_inner' "
        "must be true or false, got 1",
        '{"dense_4": 3}': "s.json:1: kernel 'dense_4': the schedule must be a JSON object of "
        "fields, got 3",
        '{"*": {"oc_block": 0}}': "s.json:1: every kernel ('*'): 'oc_block' must be an "
        "integer >= 1, got 0",
        '{"*": {"tile_everything": 3}}': "s.json:1: every kernel ('*'): unknown schedule "
        "fields ['tile_everything']; known: ['gpu_batch_inner', 'gpu_shared_tiles', "
        "'gpu_threads', 'oc_block', 'unroll_max', 'winograd', 'x_block']",
        '{"dense_4":\n {"oc_block": 2,}}': "s.json:2: not valid JSON: Expecting property name "
        "enclosed in double quotes",
    }
    for text, message in cases.items():
        path.write_text(text)
        assert compile_error(path).replace(str(tmp_path) + "/", "") == message, text


def test_an_unknown_kernel_name_lists_the_models_kernels() -> None:
    assert compile_error({"dense_9": {"oc_block": 2}}) == \
        f"no kernel 'dense_9' in model 'lenet'; its kernels: {KERNELS}"


def test_a_missing_file_is_one_line() -> None:
    assert compile_error("/nonexistent/s.json") == \
        "cannot read the schedule file '/nonexistent/s.json': No such file or directory"


def test_records_tuned_for_another_model_are_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "tuned.jsonl"
    record = {"kernel": "dense_4", "signature": "batch/0123456789abcdef", "layout": "batch",
              "schedule": {"oc_block": 2}}
    path.write_text(json.dumps({**record, "model": "resnet8"}) + "\n")
    with pytest.warns(ScheduleWarning, match="record was tuned for model 'resnet8', not "
                                             "'lenet'; ignored"):
        model = cnnc.compile(LENET, schedule=path)
    assert model.variants[0].graph.plan.groups[4].schedule.oc_block == 5  # the heuristic's
    path.write_text(json.dumps({**record, "kernel": "dense_9"}) + "\n")  # no model: older file
    with pytest.warns(ScheduleWarning, match="kernel 'dense_9' is not in model 'lenet' \\(the "
                                             "record was tuned for another model\\); ignored"):
        cnnc.compile(LENET, schedule=path)


def test_retired_fields_still_load_and_say_they_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text('{"dense_4": {"lanes": 8, "parallel": "batch_block", "oc_block": 2}}')
    with pytest.warns(ScheduleWarning, match="kernel 'dense_4': 'lanes' is no longer a "
                                             "schedule field"):
        model = cnnc.compile(LENET, schedule=path)
    assert model.variants[0].graph.plan.groups[4].schedule.oc_block == 2


def test_the_schedule_has_only_fields_that_are_read() -> None:
    assert [item.name for item in fields(Schedule)] == [
        "oc_block", "x_block", "unroll_max", "gpu_threads", "gpu_batch_inner",
        "gpu_shared_tiles", "winograd"]


def test_values_for_every_kernel_need_not_fit_each_one() -> None:
    # "*" is what the fuzzer gives: a kernel whose channels or row a value does not divide
    # falls back to the plain loop, with the same results.
    graph = cnnc.load(LENET)
    model = cnnc.compile(graph, schedule={"*": {"oc_block": 8, "x_block": 7}})
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
