"""Every bug the fuzzer found, as the shrunk case it was found with (tests/regressions/NAME:
model.yaml, its weights, input.npy and case.json), replayed on the configurations it names.

A case whose bug is not fixed yet carries "xfail" (why) in its case.json: it is expected to
fail, strictly, so that the fix shows up as an unexpected pass and its mark is removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cnnc.tools.fuzz.configs import CONFIGS
from cnnc.tools.fuzz.model import CASE_FILE
from cnnc.tools.fuzz.replay import case_dirs, read_case, replay

REGRESSIONS = Path(__file__).parent / "regressions"


def cases() -> list[object]:
    params: list[object] = []
    for directory in case_dirs(REGRESSIONS):
        record = json.loads((directory / CASE_FILE).read_text())
        marks = [pytest.mark.xfail(strict=True, reason=record["xfail"])] \
            if "xfail" in record else []
        params.append(pytest.param(directory, id=directory.name, marks=marks))
    return params


@pytest.mark.parametrize("case", cases())
def test_shrunk_case_matches_the_reference_on_every_configuration(case: Path) -> None:
    outcome = replay(case)
    assert [failure.describe() for failure in outcome.failures] == []


def test_every_case_names_its_configurations_and_reproduces_from_files_alone() -> None:
    for directory in case_dirs(REGRESSIONS):
        model, x, _, configs, record = read_case(directory)
        assert model.exists() and len(x) >= 1
        assert configs and set(configs) <= set(CONFIGS)
        assert "failure" in record  # what it did when it was found
