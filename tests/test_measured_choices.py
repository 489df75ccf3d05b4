"""Choices a model makes by timing itself when it is built (`cnnc.backends.llvm.measured`):
the layout of large batches, measured once per model and CPU and cached. Whichever it picks,
the outputs match the reference; the split choice of batch 1 is in test_split_batch1.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, TOLERANCE

import cnnc
from cnnc.backends.llvm import measured
from cnnc.reference import reference

LENET = GOLDEN / "lenet_relu_max.yaml"


def fixed_ratio(monkeypatch: pytest.MonkeyPatch, ratio: float) -> list[str]:
    """Make every model's measured layout ratio `ratio`; returns the keys asked for."""
    keys: list[str] = []

    def layout_ratio(key: str, measure: object) -> float:
        keys.append(key)
        return ratio

    monkeypatch.setattr(cnnc.target, "layout_ratio", layout_ratio)
    return keys


@pytest.mark.parametrize("ratio, layout", [(0.5, "channel"), (2.0, "batch")])
def test_large_batches_run_in_the_layout_measured_faster(
        monkeypatch: pytest.MonkeyPatch, ratio: float, layout: str) -> None:
    fixed_ratio(monkeypatch, ratio)
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    model = cnnc.compile(graph, threads=2)
    assert model.layout_ratio == ratio
    assert model.variant_for(64).layout == layout
    assert model.variant_for(3).layout == "channel"  # below a block: channel, as before
    x = np.random.default_rng(3).standard_normal((37, *graph.input_shape), np.float32)
    got = model(x)
    np.testing.assert_allclose(got, reference(graph, x), **TOLERANCE)
    # the bits of the model compiled in that layout alone
    alone = cnnc.compile(graph, threads=1, layout=layout)
    assert got.tobytes() == alone(x).tobytes()
    assert f"{layout} layout" in model.profile(37, seconds=0.01)


def test_the_choice_does_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    keys = fixed_ratio(monkeypatch, 0.5)
    graph = cnnc.load(LENET)
    for threads in (1, 2, 3):
        cnnc.compile(graph, threads=threads)
    assert len(keys) == 3 and len(set(keys)) == 1
    cnnc.compile(graph, threads=1, schedule={"conv2d_relu_maxpool2d_0": {"oc_block": 2}})
    assert len(set(keys)) == 2  # other kernels: another model to measure


def test_the_ratio_is_measured_once_per_model_and_cpu(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cnnc.target, "_FACTS", {})
    calls: list[float] = []
    real = measured.channel_over_batch

    def counted(channel_block: object, batch_block: object) -> float:
        calls.append(real(channel_block, batch_block))  # type: ignore[arg-type]
        return calls[-1]

    monkeypatch.setattr(measured, "channel_over_batch", counted)
    graph = cnnc.load(LENET)
    first = cnnc.compile(graph, threads=1)
    monkeypatch.setattr(cnnc.target, "_FACTS", {})  # a new process reads the file
    second = cnnc.compile(graph, threads=1)
    assert len(calls) == 1 and calls[0] > 0
    assert first.layout_ratio == second.layout_ratio == calls[0]
    assert (tmp_path / cnnc.target.LAYOUT_FILE).exists()


def test_one_layout_asked_for_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = fixed_ratio(monkeypatch, 0.5)
    model = cnnc.compile(cnnc.load(LENET), threads=1, layout="batch")
    assert keys == [] and model.layout_ratio is None
    assert model.variant_for(64).layout == "batch"


def test_time_calls_takes_the_fastest_of_interleaved_calls() -> None:
    order: list[str] = []
    first, second = measured.time_calls(lambda: order.append("a"), lambda: order.append("b"))
    assert 0 < first < 1e-3 and 0 < second < 1e-3
    assert order[:6] == ["a", "b"] * 3  # warm-up, then interleaved
    assert order.count("a") == order.count("b") == 3 + measured.TIMING_MAX_CALLS
