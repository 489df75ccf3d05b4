"""`cnnc tune` reports progress in what ends its search, the time budget: the fraction
follows the clock, reaches 1.0 when the search ends, and the command's bar reaches its end.
Candidates are checked with the one comparison rule, `cnnc.compare.agrees`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from conftest import GOLDEN

import cnnc
import cnnc.compare
import cnnc.tools.tune
from cnnc.cli import main

MODEL = GOLDEN / "multi_in_out.yaml"


def test_the_fraction_follows_the_time_budget() -> None:
    reports: list[tuple[float, float]] = []
    start = time.perf_counter()
    cnnc.tools.tune.tune(cnnc.load(MODEL), seconds=2, seed=1,
                   progress=lambda done: reports.append((time.perf_counter() - start, done)))
    fractions = [done for _, done in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(fractions) > 3
    for elapsed, done in reports[:-1]:  # the ETA a bar derives from it is true
        assert done == pytest.approx(min(1.0, elapsed / 2), abs=0.05)


def test_the_bar_reaches_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Any] = []
    real = click.progressbar

    def recording(*args: Any, **kwargs: Any) -> Any:
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(click, "progressbar", recording)
    result = CliRunner().invoke(main, ["tune", str(MODEL), "--seconds", "1",
                                       "-o", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 0, result.output
    (bar,) = bars
    assert bar.pos == bar.length


def test_candidates_are_checked_with_the_one_comparison_rule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert cnnc.tools.tune.agrees is cnnc.compare.agrees
    monkeypatch.setattr(cnnc.tools.tune, "agrees", lambda got, want: False)
    assert cnnc.tools.tune.tune(cnnc.load(MODEL), seconds=1) == []  # every candidate refused
