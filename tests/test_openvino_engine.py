"""The OpenVINO engine (`cnnc bench --against openvino`): it matches the reference in float32
(OpenVINO would infer in bf16 on a CPU with AMX or AVX-512 BF16 unless told not to), returns
a model's outputs in their order, and runs in the bench beside cnnc."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GOLDEN, TOLERANCE, as_list
from numpy.testing import assert_allclose

import cnnc
from cnnc.tools.bench import run_bench
from cnnc.tools.engines import UnknownEngine, check_engine_names, make_engine

pytest.importorskip("openvino", reason="openvino is not installed (pip install -e '.[bench]')")
pytest.importorskip("onnx", reason="the engine runs the ONNX graph the bench builds")


@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_matches_the_reference_on_lenet(threads: int) -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    engine = make_engine("openvino", graph, threads)
    rng = np.random.default_rng(5)
    # Batch sizes change between calls on the one reused infer request.
    for batch in (1, 7, 1):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        got = engine(x)
        assert isinstance(got, np.ndarray) and got.shape == (batch, 10)
        assert got.dtype == np.float32
        assert_allclose(got, cnnc.reference(graph, x), **TOLERANCE)


def test_openvino_returns_every_output_in_order() -> None:
    graph = cnnc.load(GOLDEN / "avgpool_pad.yaml")  # three outputs of one shape
    engine = make_engine("openvino", graph, 1)
    x = np.random.default_rng(6).standard_normal((3, *graph.input_shape), np.float32)
    got, want = as_list(engine(x)), as_list(cnnc.reference(graph, x))
    assert len(got) == len(want) == len(graph.outputs) > 1
    for value, expected in zip(got, want):
        assert value.shape == expected.shape
        assert_allclose(value, expected, **TOLERANCE)


def test_bench_times_openvino_after_checking_it() -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    report = run_bench(graph, {1: cnnc.compile(graph, threads=1)}, "llvm", batches=[2],
                       threads=[1], against=["openvino"], rounds=2, round_seconds=0.01)
    assert report.notes == []
    assert [(result.engine, len(result.seconds)) for result in report.results] == \
        [("cnnc-llvm", 2), ("openvino", 2)]
    assert report.results[1].max_error < TOLERANCE["atol"]


def test_an_unknown_engine_is_told_openvino_exists() -> None:
    with pytest.raises(UnknownEngine, match="expected one of .*openvino"):
        check_engine_names(["openvin"])
