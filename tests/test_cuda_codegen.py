"""The CUDA backend's generated source, its GPU schedules, NVRTC (PTX, cubin, ptxas report,
errors), the files `export` writes, and the error for a model called where no GPU is."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import one_op_graph
from fakes.cuda_driver import FakeDriver, assert_all_freed, install, stand_in_model
from numpy.testing import assert_allclose

import cnnc
from cnnc.backends.cuda import codegen, driver_api, nvrtc
from cnnc.backends.cuda import model as cuda_model
from cnnc.errors import CompileError, DeviceError
from cnnc.lower import lower
from cnnc.passes import Options, run_pipeline

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(path.stem for path in GOLDEN.glob("*.yaml"))
LENET = GOLDEN / "lenet.yaml"
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}

NVRTC_MISSING = nvrtc.available()
needs_nvrtc = pytest.mark.skipif(NVRTC_MISSING is not None,
                                 reason=f"NVRTC is not usable here: {NVRTC_MISSING}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def lenet_program(fast_math: bool = False) -> codegen.CudaProgram:
    compiled = run_pipeline(cnnc.load(LENET), Options(target="cuda", arch="sm_90"))
    return codegen.generate(lower(compiled), "lenet", "sm_90", fast_math)


# --- the source ------------------------------------------------------------------------------


def test_one_global_function_per_fused_kernel_in_launch_order() -> None:
    model = cnnc.compile(LENET, target="cuda-sim")
    source = model.source("cuda")
    names = re.findall(r'extern "C" __global__ void __launch_bounds__\(\d+, \d+\)\n(\w+)\(',
                       source)
    assert names == model.kernels == [
        "conv2d_sigmoid_avgpool2d_0", "conv2d_sigmoid_avgpool2d_1", "dense_sigmoid_2",
        "dense_sigmoid_3", "dense_4"]
    # The edge kernels of the CPU layout are copies on the GPU.
    assert "pack_input" not in source and "unpack_output" not in source
    assert "kernel pack_input" not in model.source("kernel")
    assert "kernel dense_4(" in model.source("kernel")


def test_the_printed_kernels_are_those_after_gpu_binding() -> None:
    # What the CUDA C is printed from: loops bound to threads, staged buffers marked, and the
    # one-image lane loop of the CPU layout gone.
    text = cnnc.compile(LENET, target="cuda-sim").source("kernel")
    first = text.split("\n\n")[0]
    assert "// gpu: mapping=block_per_image threads=224 points=196 min_blocks=5" in first
    assert "kernel conv2d_sigmoid_avgpool2d_0(staged const float in0[784], float out[1176])" \
        in first
    assert "for (y = 0; y < 14; y++) {  // gpu_thread" in first
    assert "for (lane = " not in text


def test_each_kernel_names_the_layers_it_came_from() -> None:
    source = cnnc.compile(GOLDEN / "lenet_named.yaml", target="cuda-sim").source("cuda")
    assert "// kernel conv2d_sigmoid_avgpool2d_0: layers c1, c1.sigmoid, 1" in source
    assert "// kernel dense_sigmoid_2: layers f1, f1.sigmoid" in source


def test_lenet_convolutions_stage_their_input_in_shared_memory() -> None:
    program = lenet_program()
    first, second, *dense = program.launches
    assert (first.mapping, first.staged, first.shared_bytes) == ("block_per_image", ["in0"],
                                                                  784 * 4)
    assert (second.mapping, second.shared_bytes) == ("block_per_image", 6 * 14 * 14 * 4)
    assert "__shared__ float in0[784];" in program.source
    assert "__syncthreads();" in program.source
    # A dense layer puts neighbouring images on neighbouring threads: a warp reads each
    # weight once, as a broadcast.
    assert [launch.mapping for launch in dense] == ["image_minor"] * 3
    assert all(launch.grid(1000) == -(-1000 * launch.points // launch.threads)
               for launch in dense)
    assert first.grid(1000) == 1000


def test_launch_bounds_keep_registers_at_64() -> None:
    program = lenet_program()
    for launch in program.launches:
        assert f"__launch_bounds__({launch.threads}, {launch.min_blocks})" in program.source
        assert 65536 // (launch.threads * launch.min_blocks) <= 64


def test_accurate_math_unless_fast_math_is_asked_for() -> None:
    accurate = lenet_program().source
    assert "expf(" in accurate and "__expf" not in accurate
    assert "__expf(" in lenet_program(fast_math=True).source


def test_small_uniformly_read_parameters_go_to_constant_memory() -> None:
    program = lenet_program()
    spaces = {(param.kernel, param.floats): param for param in program.parameters}
    assert spaces[("conv2d_sigmoid_avgpool2d_0", 150)].space == "constant"
    assert spaces[("conv2d_sigmoid_avgpool2d_1", 2400)].space == "constant"
    assert spaces[("dense_sigmoid_2", 120)].space == "constant"
    dense_weights = spaces[("dense_sigmoid_2", 48000)]
    assert dense_weights.space == "global"
    assert f"__device__ const float {dense_weights.symbol}[48000] = {{" in program.source
    conv_weights = spaces[("conv2d_sigmoid_avgpool2d_0", 150)]
    assert f"__constant__ float {conv_weights.symbol}[150] = {{" in program.source
    constant = sum(param.floats * 4 for param in program.parameters
                   if param.space == "constant")
    assert constant <= codegen.CONSTANT_LIMIT


def test_a_table_read_per_pixel_stays_out_of_constant_memory() -> None:
    # avgpool without counting the padding divides each pixel by its own count.
    compiled = run_pipeline(cnnc.load(GOLDEN / "avgpool_pad.yaml"), Options(target="cuda"))
    program = codegen.generate(lower(compiled), "avgpool_pad", "sm_90")
    tables = [param for param in program.parameters if param.kernel == "avgpool2d_1"]
    assert [param.space for param in tables] == ["global"]


def test_float_literals_are_exact() -> None:
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    values[:4] = [0.0, -0.0, 1e-45, 3.4028235e38]
    texts = ", ".join(codegen.format_floats(values)).replace("f", "").split(",")
    parsed = np.array([float(text) for text in texts if text.strip()], np.float32)
    assert parsed.tobytes() == values.tobytes()


# --- the schedules ---------------------------------------------------------------------------


def test_gpu_schedules_come_from_the_tiling_pass() -> None:
    compiled = run_pipeline(cnnc.load(LENET), Options(target="cuda", arch="sm_90"))
    schedules = {group.name: group.schedule for group in compiled.plan.groups}
    first = schedules["conv2d_sigmoid_avgpool2d_0"]
    assert (first.oc_block, first.gpu_threads, first.gpu_shared_tiles) == (6, 224, True)
    assert schedules["conv2d_sigmoid_avgpool2d_1"].oc_block == 4  # 100 threads per image
    assert schedules["dense_sigmoid_2"].gpu_batch_inner
    # The CPU keeps its own schedules.
    cpu = run_pipeline(cnnc.load(LENET), Options(target="llvm"))
    assert not any(group.schedule.gpu_shared_tiles for group in cpu.plan.groups)


def test_an_architecture_with_less_shared_memory_stages_less() -> None:
    # A 3x3 convolution over 16 channels of 16x16 reads 16 KiB per image: within Hopper's
    # shared-memory budget per block, beyond Turing's.
    weight = np.zeros((4, 16, 3, 3), np.float32)
    graph = one_op_graph("conv2d", (16, 16, 16), {"weight": weight}, out_channels=4,
                         kernel_size=3, bias=False)
    staged = {}
    for arch in ("sm_90", "sm_75"):
        compiled = run_pipeline(graph, Options(target="cuda", arch=arch))
        staged[arch] = compiled.plan.groups[0].schedule.gpu_shared_tiles
    assert staged == {"sm_90": True, "sm_75": False}


def test_a_malformed_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown CUDA architecture 'ampere'"):
        cnnc.compile(LENET, target="cuda-sim", arch="ampere")


# --- NVRTC -----------------------------------------------------------------------------------


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("case", CASES)
def test_nvrtc_compiles_every_golden_model(case: str, arch: str) -> None:
    model = cnnc.compile(GOLDEN / f"{case}.yaml", target="cuda", arch=arch)
    assert model.arch == arch
    assert set(model.resources) == set(model.kernels)
    binary = model.binary()
    assert binary.cubin[:4] == b"\x7fELF"
    assert f".target {arch}" in binary.ptx


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_lenet_kernels_spill_nothing_and_use_at_most_64_registers(arch: str) -> None:
    resources = cnnc.compile(LENET, target="cuda", arch=arch).resources
    assert len(resources) == 5
    for name, used in resources.items():
        assert used["spill_bytes"] == 0 and used["spill_load_bytes"] == 0, name
        assert 0 < used["registers"] <= 64, name
    assert resources["conv2d_sigmoid_avgpool2d_0"]["shared_bytes"] == 784 * 4


@needs_nvrtc
def test_ptx_names_every_kernel() -> None:
    model = cnnc.compile(LENET, target="cuda", arch="sm_90")
    ptx = model.source("ptx")
    assert all(f".entry {name}(" in ptx for name in model.kernels)


@needs_nvrtc
def test_a_compile_error_carries_the_log_and_the_line() -> None:
    source = 'extern "C" __global__ void broken(float* out)\n{\n    out[0] = missing;\n}\n'
    with pytest.raises(CompileError) as raised:
        nvrtc.compile_source(source, "broken.cu", "sm_90", use_cache=False)
    error = raised.value
    assert error.line == 3
    assert error.source_line == "    out[0] = missing;"
    assert 'identifier "missing" is undefined' in error.log
    assert "at line 3: out[0] = missing;" in str(error)


def test_without_nvrtc_target_cuda_says_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Hide NVRTC where it is installed: importing it now fails as where it is not.
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)
    bindings = sys.modules.get("cuda.bindings")
    if bindings is not None:
        monkeypatch.delattr(bindings, "nvrtc", raising=False)
    with pytest.raises(CompileError, match=r"needs NVRTC.*pip install -e '\.\[cuda\]'"):
        nvrtc.compile_source("", "empty.cu", "sm_90", use_cache=False)


def test_ptxas_report_is_parsed() -> None:
    log = """\
ptxas info    : 232320 bytes gmem, 14504 bytes cmem[3]
ptxas info    : Compiling entry function 'dense_4' for 'sm_80'
ptxas info    : Function properties for dense_4
ptxas         .     8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 0 barriers, 8 bytes cumulative stack size, 372 bytes cmem[0]
ptxas info    : Compiling entry function 'conv' for 'sm_80'
ptxas info    : Function properties for conv
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 3136 bytes smem, 372 bytes cmem[0]
"""
    assert nvrtc.parse_resources(log) == {
        "dense_4": {"registers": 64, "shared_bytes": 0, "spill_bytes": 8,
                    "spill_load_bytes": 4, "stack_bytes": 8},
        "conv": {"registers": 32, "shared_bytes": 3136, "spill_bytes": 0,
                 "spill_load_bytes": 0, "stack_bytes": 0},
    }


@needs_nvrtc
def test_export_writes_source_ptx_cubin_and_a_launch_description(tmp_path: Path) -> None:
    model = cnnc.compile(LENET, target="cuda", arch="sm_90")
    written = model.export(tmp_path / "out")
    assert [path.name for path in written] == ["lenet.cu", "lenet.ptx", "lenet.cubin",
                                                "lenet.json"]
    assert written[0].read_text() == model.source("cuda")
    assert written[2].read_bytes()[:4] == b"\x7fELF"
    description = json.loads(written[3].read_text())
    assert description["arch"] == "sm_90"
    assert [kernel["name"] for kernel in description["kernels"]] == model.kernels
    first = description["kernels"][0]
    assert first["block"] == [224, 1, 1]
    assert first["grid"] == ["ceil(N * 224 / 224)", 1, 1]
    assert first["static_shared_bytes"] == 3136
    assert first["resources"]["spill_bytes"] == 0
    assert [argument["name"] for argument in first["arguments"]] == ["in0", "out", "batch"]
    # Every tensor a kernel reads was written by an earlier kernel, or is the input.
    written_tensors = {description["input"]["tensor"]}
    for kernel in description["kernels"]:
        for argument in kernel["arguments"][:-1]:
            if argument["access"] == "read":
                assert argument["tensor"] in written_tensors
            else:
                written_tensors.add(argument["tensor"])
    assert description["outputs"][0]["shape"] == ["N", 10]
    assert description["outputs"][0]["tensor"] in written_tensors
    arena = description["arena"]["floats_per_image"]
    for kernel in description["kernels"]:
        for argument in kernel["arguments"][:-1]:
            assert argument["offset_floats_per_image"] + argument["floats_per_image"] <= arena


# --- running where there is no GPU -----------------------------------------------------------


@pytest.mark.skipif(driver_api.device_missing() is None, reason="a GPU is present")
@needs_nvrtc
def test_calling_a_cuda_model_without_a_gpu_says_to_use_cuda_sim() -> None:
    model = cnnc.compile(LENET, target="cuda")  # compiling needs no GPU
    assert model.arch == "sm_90"
    with pytest.raises(DeviceError, match=r"no CUDA driver or GPU was found.*target=\"cuda-sim\""):
        model(np.zeros((1, 1, 28, 28), np.float32))


# --- the driver-API path, against a stand-in driver ------------------------------------------


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    """The stand-in driver in place of cuda.bindings.driver."""
    yield install(monkeypatch)
    driver_api.probe.cache_clear()


def test_the_driver_api_path_runs_lenet_on_a_stand_in_gpu(
        stand_in: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    assert driver_api.probe() == ("sm_90", "Stand-in GPU")
    graph = cnnc.load(LENET)
    model = stand_in_model(stand_in, graph, monkeypatch)
    model.use_graphs = False
    rng = np.random.default_rng(11)
    for batch in (3, 1, 3):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        assert_allclose(model(x), cnnc.reference(graph, x), rtol=1e-4, atol=1e-5)
        assert model.last_launch == "kernels"
    assert [name for name, _, _ in stand_in.launches[:5]] == model.kernels
    assert stand_in.launches[0][1:] == (3, 224)  # a block per image
    assert len(stand_in.launches) == 15
    assert len(stand_in.memory) == 2  # one arena per batch size
    assert stand_in.calls["cuStreamBeginCapture"] == 0
    model.close()
    assert_all_freed(stand_in)


def test_batch_one_runs_as_one_cuda_graph_on_a_stand_in_gpu(
        stand_in: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = cnnc.load(LENET)
    model = stand_in_model(stand_in, graph, monkeypatch)
    rng = np.random.default_rng(12)
    images = [rng.random((1, 1, 28, 28), dtype=np.float32) for _ in range(4)]
    # The first call at a batch size allocates its arena and launches the kernels one by one.
    assert_allclose(model(images[0]), cnnc.reference(graph, images[0]), **TOLERANCE)
    assert model.last_launch == "kernels"
    assert stand_in.calls["cuStreamBeginCapture"] == 0
    # The second captures the whole pass once; every later call replays it.
    for x in images[1:]:
        assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
        assert model.last_launch == "graph"
    assert stand_in.calls["cuStreamBeginCapture"] == 1
    assert stand_in.graph_launches == 3
    assert len(stand_in.launches) == 5  # only the first call's kernels ran outside the graph
    assert stand_in.captured() == ["copy", *model.kernels, "copy"]
    assert list(stand_in.streams.values()) == [FakeDriver.CUstream_flags.CU_STREAM_NON_BLOCKING]
    # Another batch size gets a graph of its own; batch 1 keeps its graph.
    x3 = rng.random((3, 1, 28, 28), dtype=np.float32)
    for expected_launch in ("kernels", "graph", "graph"):
        assert_allclose(model(x3), cnnc.reference(graph, x3), **TOLERANCE)
        assert model.last_launch == expected_launch
    assert_allclose(model(images[0]), cnnc.reference(graph, images[0]), **TOLERANCE)
    assert model.last_launch == "graph"
    assert stand_in.calls["cuStreamBeginCapture"] == 2 and len(stand_in.executables) == 2
    # Batches above GRAPH_MAX_BATCH are not captured; switching graphs off frees them.
    monkeypatch.setattr(cuda_model, "GRAPH_MAX_BATCH", 2)
    model(x3)
    assert model.last_launch == "kernels" and len(stand_in.executables) == 1
    model.use_graphs = False
    assert_allclose(model(images[1]), cnnc.reference(graph, images[1]), **TOLERANCE)
    assert model.last_launch == "kernels" and not stand_in.executables
    model.close()
    assert_all_freed(stand_in)


def test_a_graph_copies_every_output_out(stand_in: FakeDriver,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    graph = cnnc.load(GOLDEN / "pool_basic.yaml")  # two outputs
    model = stand_in_model(stand_in, graph, monkeypatch)
    rng = np.random.default_rng(13)
    for expected_launch in ("kernels", "graph", "graph"):
        x = rng.standard_normal((1, *graph.input_shape), np.float32)
        got, want = model(x), cnnc.reference(graph, x)
        assert model.last_launch == expected_launch
        assert isinstance(got, tuple) and isinstance(want, tuple) and len(got) == 2
        for one, other in zip(got, want):
            assert_allclose(one, other, **TOLERANCE)
    assert stand_in.captured()[-2:] == ["copy", "copy"]
    model.close()
    assert_all_freed(stand_in)


@pytest.mark.parametrize("failing", [
    "cuStreamCreate", "cuMemAllocHost", "cuStreamBeginCapture", "cuMemcpyHtoDAsync",
    "cuLaunchKernel@capture", "cuMemcpyDtoHAsync", "cuStreamEndCapture", "cuGraphInstantiate",
    "cuGraphLaunch", "cuStreamBeginCapture:raise", "cuLaunchKernel@capture:raise",
    "cuGraphInstantiate:raise", "cuGraphLaunch:raise"])
def test_a_failed_capture_falls_back_to_plain_launches(
        failing: str, stand_in: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = cnnc.load(LENET)
    model = stand_in_model(stand_in, graph, monkeypatch)
    stand_in.fail = failing
    rng = np.random.default_rng(14)
    for batch in (1, 1, 1, 3, 3, 1):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
        assert model.last_launch == "kernels"
    assert stand_in.calls[failing.removesuffix(":raise")] >= 1  # the failure did happen
    assert stand_in.calls["cuStreamBeginCapture"] <= 1  # and graphs were not tried again
    assert stand_in.graph_launches == 0 and not stand_in.capturing
    assert len(stand_in.launches) == 6 * len(model.kernels)
    model.close()
    assert_all_freed(stand_in)


def test_cuda_sim_runs_plain_launches() -> None:
    model = cnnc.compile(LENET, target="cuda-sim")
    assert model.last_launch is None
    x = np.zeros((1, 1, 28, 28), np.float32)
    model(x)
    model(x)
    assert model.last_launch == "kernels"
