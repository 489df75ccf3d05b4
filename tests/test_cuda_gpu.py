"""Target "cuda" on a real GPU: the golden cases, several batch sizes, agreement with
cuda-sim, and the exported cubin. Every test here skips itself where there is no GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CASES, GOLDEN, TOLERANCE, as_list, expected_outputs
from numpy.testing import assert_allclose

import cnnc
from cnnc.backends.cuda import driver_api, nvrtc

LENET = GOLDEN / "lenet.yaml"

_MISSING = driver_api.device_missing() or nvrtc.available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_MISSING is not None, reason=f"needs a GPU: {_MISSING}"),
]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", CASES)
def test_golden_case_on_the_gpu(case: str, fuse: bool) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target="cuda", fuse=fuse)
    x = np.load(GOLDEN / f"{case}.io.npz")["input"]
    actual = as_list(model(x))
    expected = expected_outputs(case, graph)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        assert_allclose(got, want, **TOLERANCE)


def test_the_default_architecture_is_the_gpu_present() -> None:
    arch, _ = driver_api.probe()
    model = cnnc.compile(LENET, target="cuda")
    assert model.arch == arch or model.arch in nvrtc.supported_archs()


def test_lenet_batches_match_the_reference_and_cuda_sim() -> None:
    graph = cnnc.load(LENET)
    gpu = cnnc.compile(graph, target="cuda")
    sim = cnnc.compile(graph, target="cuda-sim")
    rng = np.random.default_rng(5)
    for batch in (1, 3, 256, 1000, 7, 2, 3):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        got = gpu(x)
        assert got.shape == (batch, 10)
        assert_allclose(got, cnnc.reference(graph, x), **TOLERANCE)
        if batch <= 7:
            assert_allclose(got, sim(x), rtol=1e-5, atol=1e-6)


def test_batch_one_runs_as_one_cuda_graph() -> None:
    graph = cnnc.load(LENET)
    model = cnnc.compile(graph, target="cuda")
    rng = np.random.default_rng(6)
    # The first call at a batch size launches kernel by kernel; the next ones replay a graph,
    # each with its own input.
    for expected_launch in ("kernels", "graph", "graph", "graph"):
        x = rng.random((1, 1, 28, 28), dtype=np.float32)
        assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
        assert model.last_launch == expected_launch
    big = rng.random((4096, 1, 28, 28), dtype=np.float32)
    for _ in range(2):
        assert_allclose(model(big), cnnc.reference(graph, big), **TOLERANCE)
        assert model.last_launch == "kernels"
    x = rng.random((1, 1, 28, 28), dtype=np.float32)
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
    assert model.last_launch == "graph"
    model.use_graphs = False
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
    assert model.last_launch == "kernels"
    model.close()


def test_batch_zero_gives_an_empty_output() -> None:
    assert cnnc.compile(LENET, target="cuda")(np.zeros((0, 1, 28, 28))).shape == (0, 10)


def test_kernels_can_be_timed_on_the_device() -> None:
    model = cnnc.compile(LENET, target="cuda")
    seconds = model.time_kernels(256, repeats=5)
    assert 0 < seconds < 1


def test_an_exported_cubin_loads_and_runs(tmp_path: Path) -> None:
    from cnnc.backends.cuda.driver_api import DeviceModule

    model = cnnc.compile(LENET, target="cuda")
    cu, ptx, cubin, _ = model.export(tmp_path)
    module = DeviceModule(cubin.read_bytes(), ptx.read_text(), model.kernels)
    assert len(module.functions) == len(model.kernels)
