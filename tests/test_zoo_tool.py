"""`python -m cnnc.tools.zoo`'s check of a busy machine: the CPUs other work keeps busy just
before the run, from /proc/stat (not the 1-minute load average, which still counts a test
suite that has just ended)."""

from __future__ import annotations

import io
from typing import Any

import pytest

from cnnc.tools import zoo


def test_busy_cpus_counts_the_cpus_not_idle_between_two_readings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # user nice system idle iowait irq softirq steal: 400 ticks pass, 100 of them idle
    readings = iter(["cpu  100 0 100 1000 0 0 0 0 0 0\n", "cpu  250 0 250 1090 10 0 0 0 0 0\n"])
    monkeypatch.setattr(zoo, "open", lambda path: io.StringIO(next(readings)), raising=False)
    monkeypatch.setattr(zoo.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(zoo.os, "cpu_count", lambda: 2)
    assert zoo.busy_cpus() == pytest.approx(2 * (1 - 100 / 400))


def test_busy_cpus_falls_back_to_the_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(path: Any) -> Any:
        raise OSError("no /proc here")

    monkeypatch.setattr(zoo, "open", missing, raising=False)
    monkeypatch.setattr(zoo.os, "getloadavg", lambda: (0.75, 0.5, 0.25))
    assert zoo.busy_cpus() == 0.75


def test_compile_times_are_measured_cold_and_cached() -> None:
    """Cold runs LLVM; cached finds the object code (it only runs the passes again)."""
    from conftest import EXAMPLES

    import cnnc

    cold, cached = zoo.compile_seconds(cnnc.load(EXAMPLES / "lenet.yaml"))
    assert 0 < cached < cold
    assert zoo.compile_table({"lenet": (1.234, 0.0456)})[-1] == "| lenet | 1.23 s | 0.046 s |"
