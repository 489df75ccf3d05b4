"""Batch 1 on two threads (`cnnc.backends.llvm.split`): one image's big kernels split across
the thread pool, the same bits as on one thread, and LeNet-sized kernels left whole.

The zoo's weights are made by examples/zoo/make_weights.py (PyTorch) into this session's own
directory, as in test_zoo.py; the golden cases need nothing but the repository.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import CASES, EXAMPLES, GOLDEN, as_list

import cnnc
from cnnc.backends.llvm import jit, split

ZOO = EXAMPLES / "zoo"
ZOO_MODELS = ["vgg_bn", "resnet8", "nin", "mnist_cnn", "mobilenet"]
SPLIT_PAYS = split.split_pays  # before the autouse fixture replaces it


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="the zoo's weights come from PyTorch")
    spec = importlib.util.spec_from_file_location("zoo_make_weights", ZOO / "make_weights.py")
    assert spec is not None and spec.loader is not None
    make_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_weights)
    directory = tmp_path_factory.mktemp("zoo")
    for name in ZOO_MODELS:
        make_weights.write(name, directory)
    return directory


@pytest.fixture(autouse=True)
def split_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every split plan is used, whatever the timing of a call on this (perhaps busy)
    machine says: these tests are of the split's bits. The choice itself is tested below."""
    monkeypatch.setattr(split, "split_pays", lambda split_seconds, whole_seconds: True)


@pytest.fixture
def barrier_1us(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool barrier of 1 us, whatever this machine measures while other programs load it:
    the split decisions then depend on the model and the measured peak alone."""
    monkeypatch.setattr(split, "host_barrier_us", lambda threads: 1.0)


def image(graph: cnnc.Graph) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, *graph.input_shape), np.float32)


def same_bits(graph: cnnc.Graph, calls: int = 5) -> cnnc.CompiledModel:
    """The two-thread model of `graph`, after checking that its batch-1 outputs are those of
    the one-thread model, bit for bit, call after call."""
    one = cnnc.compile(graph, threads=1)
    two = cnnc.compile(graph, threads=2)
    x = image(graph)
    expected = as_list(one(x))
    for _ in range(calls):
        for got, want in zip(as_list(two(x)), expected):
            assert got.tobytes() == want.tobytes()
    return two


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_batch1_split_gives_the_bits_of_one_thread(name: str, zoo_dir: Path,
                                                       barrier_1us: None) -> None:
    two = same_bits(cnnc.load(zoo_dir / f"{name}.yaml"))
    assert " x2" in two.split_plan  # its convolutions are big enough to split


@pytest.mark.parametrize("case", CASES)
def test_every_splittable_kernel_split_gives_the_same_bits(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A free barrier splits every kernel that can be split, odd row counts included.
    monkeypatch.setattr(split, "host_barrier_us", lambda threads: 0.0)
    assert " x2" in same_bits(cnnc.load(GOLDEN / f"{case}.yaml")).split_plan


def test_lenet_stays_on_one_thread(barrier_1us: None) -> None:
    two = cnnc.compile(cnnc.load(EXAMPLES / "lenet.yaml"), threads=2)
    assert two.split_plan == ""
    assert two.split_stages == ()


def lowered_of(graph: cnnc.Graph) -> tuple[cnnc.Graph, cnnc.lower.LoweredModel]:
    variant = cnnc.compile(graph, threads=1).variant_for(1)
    return variant.graph, variant.lowered


def test_the_decision_weighs_flops_at_the_peak_against_the_barrier(zoo_dir: Path) -> None:
    # 100 GFLOP/s and a 1 us barrier: a kernel is split when half its time at the peak is
    # over SPLIT_MARGIN = 4 us, i.e. above 800 kFLOP on an even split.
    graph, lowered = lowered_of(cnnc.load(zoo_dir / "mnist_cnn.yaml"))
    assert split.describe(lowered, split.plan_stages(graph, lowered, 2, 100.0, 1.0)) == (
        "stage 0: pack_input, conv2d_relu_0 x1\n"  # 411 kFLOP: too small
        "stage 1: conv2d_relu_maxpool2d_1 x2\n"  # 21 MFLOP
        "stage 2: dense_relu_2 x2\n"  # 2.4 MFLOP, in 4 channel blocks (its weights stream)
        "stage 3: dense_3, unpack_output_0 x1")  # dense_3: one channel block
    assert split.plan_stages(graph, lowered, 2, 100.0, 1000.0) == []  # a dear barrier


def test_a_dense_layer_that_streams_its_weights_is_split_for_the_memory() -> None:
    """9216 x 256 weights (9.4 MB) read once per image: at any FLOP rate the time to stream
    them from memory is what splitting halves."""
    graph = cnnc.Graph("wide_dense", (16, 24, 24))
    graph.add("f", "flatten", ["input"], {})
    rng = np.random.default_rng(0)
    graph.add("d", "dense", ["f"], cnnc.ops.OPS["dense"].check_attrs({"units": 256}),
              {"weight": rng.normal(0, 0.01, (256, 9216)).astype(np.float32),
               "bias": np.zeros(256, np.float32)})
    graph.outputs = ["d"]
    graph, lowered = lowered_of(graph)
    (dense,) = [kernel for kernel in lowered.kernels if kernel.name.startswith("dense")]
    assert split.kernel_param_bytes(dense) == 4 * (256 * 9216 + 256)
    fast = 1e6  # GFLOP/s: the FLOPs alone are never worth a barrier
    assert split.plan_stages(graph, lowered, 2, fast, 1.0) == []
    stages = split.plan_stages(graph, lowered, 2, fast, 1.0, memory_gbps=20.0)
    assert [lowered.kernels[stage.kernels[0]] for stage in stages if stage.items == 2] \
        == [dense]
    assert split.plan_stages(graph, lowered, 2, fast, 1000.0, memory_gbps=20.0) == []


def test_a_split_kernel_is_compiled_once_in_place_of_the_whole(zoo_dir: Path) -> None:
    """The channel variant's runner runs the split kernel's shares in turn: the whole
    kernel is not compiled beside it (a third less IR to build), and the bits are those of
    one thread at batch 1 and 5."""
    graph = cnnc.load(zoo_dir / "mnist_cnn.yaml")
    two, one = cnnc.compile(graph, threads=2), cnnc.compile(graph, threads=1)
    defined = [line.split("@", 1)[1].split("(", 1)[0].strip('"')
               for line in two.source("ll").splitlines() if line.startswith("define")]
    channel = [name for name in defined if name.startswith("cnnc_run_channel.")]
    assert channel == ["cnnc_run_channel." + name for name in (
        "pack_input", "conv2d_relu_0", "conv2d_relu_maxpool2d_1_part_of_2",
        "dense_relu_2_part_of_2", "dense_3", "unpack_output_0")]
    # the bounds check names a kernel by its number in that order
    kernels = [name for name in defined if not name.startswith("cnnc_run_")
               or "." in name]
    assert jit.kernel_symbols(two._jit_variants) == kernels
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.normal(0, 1, (batch, *graph.input_shape)).astype(np.float32)
        np.testing.assert_array_equal(two(x), one(x))


def test_lenet_sized_kernels_are_not_worth_a_barrier() -> None:
    graph, lowered = lowered_of(cnnc.load(EXAMPLES / "lenet.yaml"))
    assert split.plan_stages(graph, lowered, 2, 100.0, 1.0) == []
    # Its second convolution has 5 rows; were it split, 3 and 2 of them.
    kernel = lowered.kernels[2]
    assert kernel.name == "conv2d_sigmoid_avgpool2d_1"
    text = split.split_kernel(kernel, 2).to_text()
    assert "kernel conv2d_sigmoid_avgpool2d_1_part_of_2(" in text
    assert "for (y = 0; y < 3; y++) {" in text
    assert "if (y + block * 3 < 5) {" in text


def test_a_split_kernel_runs_its_share_of_rows(zoo_dir: Path) -> None:
    graph, lowered = lowered_of(cnnc.load(zoo_dir / "vgg_bn.yaml"))
    kernel = lowered.kernels[1]
    assert kernel.name == "conv2d_relu_0"
    loop = split.split_loop(kernel, 2)
    assert loop is not None and (loop.var, loop.extent) == ("y", 32)
    text = split.split_kernel(kernel, 2).to_text()
    assert "for (y = 0; y < 16; y++) {" in text and "y + block * 16" in text
    assert "for (y = 0; y < 32; y++)" not in text and "if (y + block" not in text
    # Edge kernels read the batch, and a dense kernel has no row or channel-block loop.
    assert split.split_loop(lowered.kernels[0], 2) is None
    assert split.split_loop(lowered.kernels[-2], 2) is None


def test_a_busy_pool_runs_the_image_whole_on_the_calling_thread(zoo_dir: Path,
                                                                barrier_1us: None) -> None:
    graph = cnnc.load(zoo_dir / "resnet8.yaml")
    two = cnnc.compile(graph, threads=2)
    expected = cnnc.compile(graph, threads=1)(image(graph))
    assert two.split_plan
    pool = two._pool
    assert pool is not None
    with pool._lock:  # another call holds the pool
        result: list[np.ndarray] = []
        caller = threading.Thread(target=lambda: result.append(two(image(graph))))
        caller.start()
        caller.join(timeout=30)
    assert result and result[0].tobytes() == expected.tobytes()


def test_the_barrier_is_measured_once_per_cpu(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # a cache of its own: another test (or run) may have measured 3 threads already
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cnnc.target, "_FACTS", {})
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        return 0.5

    assert cnnc.target.pool_barrier_us(3, measure) == 0.5
    assert cnnc.target.pool_barrier_us(3, measure) == 0.5
    assert calls == [1]
    assert split.measure_barrier_us(2) > 0.0


def test_a_split_plan_slower_than_one_thread_is_not_used(zoo_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The model times a call both ways when it is built; when one thread wins, batch 1
    runs whole on the calling thread, with the same bits, and the plan says so."""
    monkeypatch.setattr(split, "host_barrier_us", lambda threads: 1.0)
    timings: list[tuple[float, float]] = []

    def one_thread_wins(split_seconds: float, whole_seconds: float) -> bool:
        timings.append((split_seconds, whole_seconds))
        return False

    monkeypatch.setattr(split, "split_pays", one_thread_wins)
    graph = cnnc.load(zoo_dir / "resnet8.yaml")
    two = same_bits(graph)
    assert two._small.stage_count == 0  # every call runs on the calling thread
    assert two.split_stages and timings and all(a > 0 and b > 0 for a, b in timings)
    assert two.split_plan.splitlines()[-1].endswith("not used: one thread runs the call")
    assert " x2" in two.split_plan  # the plan it measured is still listed
    assert SPLIT_PAYS(1.0, 2.0) and not SPLIT_PAYS(2.0, 1.0)


def test_a_kernel_is_split_by_rows_before_channel_blocks(zoo_dir: Path) -> None:
    # mobilenet's 1x1 convolution on 8x8 loops over 2 channel blocks outside its rows
    graph, lowered = lowered_of(cnnc.load(zoo_dir / "mobilenet.yaml"))
    kernel = lowered.kernels[9]
    assert kernel.name == "conv2d_relu6_8"
    top = kernel.body[0]
    assert isinstance(top, cnnc.kernel.For) and (top.var, top.extent) == ("cb", 2)
    loop = split.split_loop(kernel, 2)
    assert loop is not None and (loop.var, loop.extent) == ("y", 8)
    assert split.split_loop(kernel, 9) is None  # neither loop has 9 iterations
