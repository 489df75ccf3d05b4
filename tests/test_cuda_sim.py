"""Target "cuda-sim": the generated CUDA C, built by the host C++ compiler and run on the CPU,
against the golden outputs and the NumPy reference, with every thread mapping the schedule
can choose; and the simulator's report of a barrier that not every thread reaches."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, GOLDEN, TOLERANCE, as_list, expected_outputs
from numpy.testing import assert_allclose

import cnnc
from cnnc.backends.cuda.driver_api import pack_params
from cnnc.backends.cuda.simulator import SimKernel, SimLibrary
from cnnc.errors import DeviceError, InputError


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", CASES)
def test_golden_case_on_cuda_sim(case: str, fuse: bool) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target="cuda-sim", fuse=fuse)
    x = np.load(GOLDEN / f"{case}.io.npz")["input"]
    actual = as_list(model(x))
    expected = expected_outputs(case, graph)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        assert got.dtype == np.float32
        assert_allclose(got, want, **TOLERANCE)


# Every way a schedule can map a kernel onto the GPU, forced on every kernel.
MAPPINGS = {
    "neighbouring_pixels": {"*": {"gpu_shared_tiles": False, "gpu_batch_inner": False}},
    "neighbouring_images": {"*": {"gpu_shared_tiles": False, "gpu_batch_inner": True}},
    "block_per_image": {"*": {"gpu_shared_tiles": True, "gpu_threads": 64}},
    "one_warp_blocks": {"*": {"gpu_threads": 32, "oc_block": 1}},
}


@pytest.mark.parametrize("mapping", sorted(MAPPINGS))
@pytest.mark.parametrize("case", ["lenet_relu_max", "residual", "avgpool_pad"])
def test_every_thread_mapping_matches_the_reference(case: str, mapping: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target="cuda-sim", schedule=MAPPINGS[mapping])
    x = np.random.default_rng(7).standard_normal((5, *graph.input_shape), np.float32)
    for got, want in zip(as_list(model(x)), as_list(cnnc.reference(graph, x))):
        assert_allclose(got, want, **TOLERANCE)


def test_lenet_on_several_batch_sizes_matches_the_reference() -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    model = cnnc.compile(graph, target="cuda-sim")
    rng = np.random.default_rng(3)
    # More sizes than the model keeps arenas for, and one of them again at the end.
    for batch in (1, 3, 17, 2, 5, 6, 3):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)


def test_batch_zero_gives_empty_outputs() -> None:
    model = cnnc.compile(GOLDEN / "pool_basic.yaml", target="cuda-sim")
    outputs = model(np.zeros((0, 1, 3, 3), np.float32))
    assert isinstance(outputs, tuple)
    assert [output.shape for output in outputs] == [(0, 1, 2, 2), (0, 1, 2, 2)]


def test_inputs_are_checked_like_the_cpu_target() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", target="cuda-sim")
    with pytest.raises(InputError, match=r"expects input f32\[N,1,28,28\]"):
        model(np.zeros((2, 1, 28, 27), np.float32))
    # Integers and non-contiguous arrays are converted, as on the CPU.
    x = np.arange(2 * 28 * 28).reshape(2, 1, 28, 28)[::-1] % 3
    assert_allclose(model(x), cnnc.reference(model.graph, x), **TOLERANCE)


def test_max_propagates_nan_like_numpy() -> None:
    graph = cnnc.load(GOLDEN / "maxpool_pad_stride.yaml")
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 0] = np.nan
    got = cnnc.compile(graph, target="cuda-sim")(x)
    assert np.isnan(got[0, 0, 0, 0]) and not np.isnan(got[0, 0, 1, 1])
    assert_allclose(got, cnnc.reference(graph, x), **TOLERANCE)


def test_memory_grows_with_the_batch() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", target="cuda-sim")
    assert model.memory_bytes(0) == 0
    assert model.memory_bytes(10) == 10 * model.memory_bytes(1) > 0


# --- the simulator's barriers ----------------------------------------------------------------

BARRIER_KERNELS = """\
extern "C" __global__ void __launch_bounds__(64) all_reach(float* out, int n)
{
    __shared__ float tile[64];
    tile[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

extern "C" __global__ void half_return_early(float* out, int n)
{
    if (threadIdx.x >= 16)
        return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void two_barriers(float* out, int n)
{
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}
"""


@pytest.fixture(scope="module")
def barrier_library() -> SimLibrary:
    kernels = [SimKernel(name, ("float*", "int"), True)
               for name in ("all_reach", "half_return_early", "two_barriers")]
    return SimLibrary("barriers", BARRIER_KERNELS, kernels, use_cache=False)


def launch(library: SimLibrary, kernel: int, grid: int, block: int) -> np.ndarray:
    out = np.zeros(grid * block, np.float32)
    params, _keep = pack_params([out.ctypes.data, len(out)], ["pointer", "int"])
    library.launch(kernel, grid, block, params)
    return out


def test_threads_of_a_block_share_memory_across_a_barrier(barrier_library: SimLibrary) -> None:
    out = launch(barrier_library, 0, 3, 64)
    assert out.tolist() == list(range(63, -1, -1)) * 3


def test_a_barrier_some_threads_skip_is_an_error(barrier_library: SimLibrary) -> None:
    with pytest.raises(DeviceError, match=r"half_return_early.*16 of 32 threads wait at the "
                                          r"__syncthreads\(\) on line 13 of the source.*"
                                          r"finished without reaching it"):
        launch(barrier_library, 1, 1, 32)


def test_threads_at_different_barriers_are_an_error(barrier_library: SimLibrary) -> None:
    with pytest.raises(DeviceError, match=r"two_barriers.*different barriers.*line 20.*line 22"):
        launch(barrier_library, 2, 1, 8)
