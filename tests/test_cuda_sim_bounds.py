"""Target "cuda-sim" with check_bounds: every load and store of the generated CUDA C checks its
index against its buffer, so a kernel that indexes out of bounds raises BoundsError naming the
kernel and the buffer instead of touching memory; models that stay in bounds run unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import GOLDEN, TOLERANCE, as_list
from numpy.testing import assert_allclose

import cnnc
from cnnc.backends.cuda.model import CudaModel
from cnnc.errors import BoundsError
from cnnc.kernel import Const, For, If, Kernel, Stmt, Store

MAPPINGS = {
    "neighbouring_pixels": {"*": {"gpu_shared_tiles": False, "gpu_batch_inner": False}},
    "neighbouring_images": {"*": {"gpu_shared_tiles": False, "gpu_batch_inner": True}},
    "block_per_image": {"*": {"gpu_shared_tiles": True, "gpu_threads": 64}},
}


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
@pytest.mark.parametrize("case", ["lenet_relu_max", "residual", "avgpool_pad"])
def test_golden_models_stay_in_bounds_on_every_thread_mapping(case: str, mapping: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target="cuda-sim", check_bounds=True,
                         schedule=MAPPINGS[mapping])
    assert "CNNC_AT(" in model.source()
    x = np.random.default_rng(2).standard_normal((3, *graph.input_shape), np.float32)
    for got, want in zip(as_list(model(x)), as_list(cnnc.reference(graph, x))):
        assert_allclose(got, want, **TOLERANCE)


def test_without_check_bounds_the_source_has_no_checks() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", target="cuda-sim")
    assert "CNNC_AT" not in model.source()


def first_store(body: list[Stmt]) -> Store:
    for stmt in body:
        if isinstance(stmt, Store):
            return stmt
        if isinstance(stmt, (For, If)):
            try:
                return first_store(stmt.body)
            except LookupError:
                continue
    raise LookupError("no store")


def compute_kernels(model: CudaModel) -> list[Kernel]:
    return [kernel for kernel in model.lowered.kernels if not kernel.uses_batch]


def rebuilt(model: CudaModel) -> CudaModel:
    """`model` generated again from its (changed) kernels, with check_bounds."""
    return CudaModel(model.graph, model.kernels, model.lowered, model.memory, "cuda-sim",
                     model.arch, False, use_cache=False, check_bounds=True)


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
def test_a_store_past_the_end_raises_bounds_error_naming_kernel_and_buffer(
        mapping: str) -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", target="cuda-sim", check_bounds=True,
                         schedule=MAPPINGS[mapping])
    kernel = compute_kernels(model)[0]
    store = first_store(kernel.body)
    size = kernel.buffer(store.buffer).size
    store.index = store.index + Const(size)  # every store now lands one image further on
    with pytest.raises(BoundsError, match=rf"kernel {kernel.name} accessed {store.buffer}\[\d+\]"
                                          rf", out of bounds of its {size} floats"):
        rebuilt(model)(np.zeros((2, 1, 28, 28), np.float32))


def test_an_index_below_zero_is_caught() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", target="cuda-sim", check_bounds=True)
    kernel = compute_kernels(model)[-1]
    store = first_store(kernel.body)
    store.index = store.index - Const(1_000_000)
    with pytest.raises(BoundsError, match=r"accessed \w+\[-\d+\]"):
        rebuilt(model)(np.zeros((1, 1, 28, 28), np.float32))


def test_the_checked_source_also_compiles_for_the_gpu_where_nvrtc_is_installed() -> None:
    from cnnc.backends.cuda import nvrtc

    if nvrtc.available() is not None:
        pytest.skip(str(nvrtc.available()))
    model = cnnc.compile(GOLDEN / "depthwise_dilated.yaml", target="cuda-sim", check_bounds=True)
    ptx = model.binary().ptx
    assert "trap;" in ptx and "vprintf" in ptx  # on a GPU a bad index stops the kernel
