"""The LLVM target against the golden outputs and the NumPy reference: fused and unfused,
every thread count, odd sizes, the exported C library, and the checks made before native
code runs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import CASES, GOLDEN, TOLERANCE, as_list, expected_outputs
from numpy.testing import assert_allclose

import cnnc

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("layout", ["batch", "channel"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", CASES)
def test_golden_case_on_llvm(case: str, fuse: bool, layout: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, fuse=fuse, layout=layout)
    x = np.load(GOLDEN / f"{case}.io.npz")["input"]
    actual = as_list(model(x))
    expected = expected_outputs(case, graph)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape
        assert_allclose(got, want, **TOLERANCE)


def test_lenet_is_five_kernels_with_activation_and_pooling_inside_the_convolutions() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml")
    assert len(model.kernels) == 5
    assert model.kernels[:2] == ["conv2d_sigmoid_avgpool2d_0", "conv2d_sigmoid_avgpool2d_1"]


def test_unfused_lenet_has_one_kernel_per_op_but_flatten() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", fuse=False)
    assert len(model.kernels) == 11


def test_residual_add_stays_inside_a_convolution_kernel() -> None:
    model = cnnc.compile(GOLDEN / "residual.yaml")
    assert any(name.startswith("conv2d_add") for name in model.kernels)
    assert not any(name.startswith("add") for name in model.kernels)
    # The batch norm is folded into the convolution before it.
    assert not any("batchnorm" in name for name in model.kernels)


def test_fused_kernel_never_stores_the_full_convolution_output() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml")
    first = model.source("kernel").split("kernel conv2d_sigmoid_avgpool2d_0(")[1]
    signature = first.split(")", 1)[0]
    # Its output is the pooled 6x14x14 tensor, not the 6x28x28 convolution.
    assert f"float out[{6 * 14 * 14 * model.images_per_block}]" in signature


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_outputs_are_bitwise_identical_whatever_the_thread_count(threads: int) -> None:
    x = np.random.default_rng(7).standard_normal((53, 1, 28, 28)).astype(np.float32)
    one = cnnc.compile(GOLDEN / "lenet.yaml", threads=1)(x)
    many = cnnc.compile(GOLDEN / "lenet.yaml", threads=threads)(x)
    assert np.array_equal(one, many)
    assert np.array_equal(one, cnnc.compile(GOLDEN / "lenet.yaml", threads=1)(x))


def test_an_image_gets_the_same_bits_whatever_the_batch_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Small batches run in the channel layout, large ones in the batch layout (where it was
    # measured faster; here it is made so): both must round alike, so that an image's
    # result does not depend on its company.
    monkeypatch.setattr(cnnc.target, "layout_ratio", lambda key, measure: 2.0)
    for case in ("lenet", "residual", "depthwise_dilated", "lenet_relu_max"):
        graph = cnnc.load(GOLDEN / f"{case}.yaml")
        model = cnnc.compile(graph)
        x = np.random.default_rng(5).standard_normal((21, *graph.input_shape))
        together = model(x.astype(np.float32))
        alone = np.concatenate([model(x[i: i + 1].astype(np.float32)) for i in range(21)])
        assert model.variant_for(1).layout == "channel"
        assert model.variant_for(21).layout == "batch"
        assert np.array_equal(together, alone), case


@pytest.mark.parametrize("batch", [1, 15, 16, 17, 37])
def test_any_batch_size_matches_the_reference(batch: int) -> None:
    graph = cnnc.load(GOLDEN / "residual.yaml")
    x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    assert_allclose(cnnc.compile(graph)(x), cnnc.reference(graph, x), **TOLERANCE)


def test_batch_zero_gives_an_empty_result() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml")
    assert model(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)


def test_wrong_shapes_are_refused_before_native_code_runs() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml")
    with pytest.raises(ValueError, match=r"expects input f32\[N,1,28,28\], got shape \(2, 1, 28\)"):
        model(np.zeros((2, 1, 28), np.float32))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 28, 28\)"):
        model(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        model(np.array([["a"]]))


def test_other_float_types_and_layouts_are_converted() -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    model = cnnc.compile(graph)
    x = np.random.default_rng(3).standard_normal((4, 1, 28, 28))
    expected = cnnc.reference(graph, x.astype(np.float32))
    assert_allclose(model(x), expected, **TOLERANCE)  # float64
    assert_allclose(model(np.asfortranarray(x)), expected, **TOLERANCE)
    strided = np.random.default_rng(4).standard_normal((4, 1, 56, 56))[:, :, ::2, ::2]
    assert_allclose(model(strided), cnnc.reference(graph, strided), **TOLERANCE)


def test_memory_plan_reuses_buffers() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", threads=2)
    unplanned = cnnc.compile(GOLDEN / "lenet.yaml", threads=2, disable_passes=("plan_memory",))
    assert model.memory_bytes(256) < unplanned.memory_bytes(256)
    one_image = model.variant_for(1)
    assert model.memory_bytes(1) == one_image.memory.bytes_per_block()
    assert model.memory_bytes(256) == 2 * model.memory.bytes_per_block()


def test_every_pass_can_be_switched_off_without_changing_results() -> None:
    graph = cnnc.load(GOLDEN / "residual.yaml")
    x = np.load(GOLDEN / "residual.io.npz")["input"]
    for name in ("prune", "fold_batchnorm", "fuse", "layout", "tile", "plan_memory"):
        model = cnnc.compile(graph, disable_passes=(name,))
        assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE, err_msg=name)


def test_dump_ir_writes_the_graph_after_every_pass(tmp_path: Path) -> None:
    cnnc.compile(GOLDEN / "lenet.yaml", dump_ir=tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())
    files = ["00_input.txt", "01_prune.txt", "02_fold_batchnorm.txt", "03_layout.txt",
             "04_fuse.txt", "05_tile.txt", "06_plan_memory.txt", "99_kernels.txt"]
    assert names == [*files, "channel_layout"]  # the variant for small batches
    assert sorted(path.name for path in (tmp_path / "channel_layout").iterdir()) == files
    assert "conv2d_sigmoid_avgpool2d_0: 0, 1, 2" in (tmp_path / "04_fuse.txt").read_text()


def test_a_schedule_override_is_applied_and_keeps_results(tmp_path: Path) -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    x = np.load(GOLDEN / "lenet.io.npz")["input"]
    path = tmp_path / "schedule.json"
    path.write_text('{"conv2d_sigmoid_avgpool2d_1": {"oc_block": 2, "unroll_max": 5}}')
    model = cnnc.compile(graph, schedule=path)
    assert "oc_block=2 x_block=1 unroll_max=5" in model.source("kernel")
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)


def test_generated_llvm_names_the_layers_and_vectorises_exp() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml")
    assert '; kernel conv2d_sigmoid_avgpool2d_0: layers "0", "1", "2"' in model.source("ll")
    assembly = model.source("asm")
    assert "zmm" in assembly  # AVX-512 registers: the lane loop is one vector
    assert "expf" not in assembly  # sigmoid uses the polynomial exp, never libm


def test_layer_names_never_reach_generated_code_unescaped(tmp_path: Path) -> None:
    hostile = 'x"; drop(); define void @evil() { ret void } ;\nret'
    model_file = tmp_path / "m.yaml"
    model_file.write_text(
        "input: [1, 6, 6]\nseed: 1\nlayers:\n"
        f"  - conv2d: {{name: {json.dumps(hostile)}, out_channels: 2, kernel_size: 3}}\n"
        "  - relu\n")
    graph = cnnc.load(model_file)
    assert hostile in graph.order()
    model = cnnc.compile(graph)
    ll = model.source("ll")
    # The name appears only JSON-escaped inside a comment line, never as code.
    assert all(line.startswith("; kernel") for line in ll.splitlines() if "@evil" in line)
    assert json.dumps(hostile) in ll
    x = np.random.default_rng(0).standard_normal((3, 1, 6, 6)).astype(np.float32)
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)


def test_second_compile_hits_the_cache_and_a_damaged_entry_is_rebuilt() -> None:
    from cnnc import cache

    first = cnnc.compile(GOLDEN / "lenet.yaml")
    second = cnnc.compile(GOLDEN / "lenet.yaml")
    assert second.cache_hit
    entry = cache.entry_path(second._key)
    entry.write_bytes(entry.read_bytes()[:-100])  # truncated
    third = cnnc.compile(GOLDEN / "lenet.yaml")
    assert not third.cache_hit
    x = np.load(GOLDEN / "lenet.io.npz")["input"]
    assert np.array_equal(first(x), third(x))
    assert cnnc.compile(GOLDEN / "lenet.yaml").cache_hit  # rewritten whole


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_exported_library_runs_from_c_and_matches_python(tmp_path: Path) -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml")
    written = model.export(tmp_path, emit=("ll", "asm", "obj", "so"))
    assert {path.name for path in written} == {"lenet.h", "lenet.ll", "lenet.s", "lenet.o",
                                               "lenet.so"}
    program = tmp_path / "run_lenet"
    subprocess.run(["cc", "-O2", '-DCNNC_MODEL_HEADER="lenet.h"', f"-I{tmp_path}",
                    str(EXAMPLES / "c" / "main.c"), str(tmp_path / "lenet.so"), "-lm",
                    f"-Wl,-rpath,{tmp_path}", "-o", str(program)], check=True)
    batch = 19
    printed = subprocess.run([str(program), str(batch)], check=True, capture_output=True,
                             text=True).stdout
    from_c = np.array([float(line) for line in printed.split()], np.float32)
    x = np.sin(0.01 * np.arange(batch * 784, dtype=np.float64)).astype(np.float32)
    from_python = model(x.reshape(batch, 1, 28, 28))
    assert from_c.shape == (batch * 10,)
    assert_allclose(from_c, from_python.ravel(), rtol=1e-6, atol=1e-7)


def test_a_batch_whose_outputs_cannot_fit_in_memory_is_refused_first(tmp_path: Path) -> None:
    # A tiny float32 input takes the fast path; its 80 GiB of outputs must still be refused
    # before anything is allocated.
    path = tmp_path / "wide.yaml"
    path.write_text("input: [1, 1, 1]\nseed: 0\nlayers:\n  - flatten\n"
                    "  - dense: {units: 1048576}\n")
    model = cnnc.compile(path, layout="batch")
    x = np.zeros((20000, 1, 1, 1), np.float32)
    with pytest.raises(MemoryError, match="a batch of 20000 images needs 78.1 GiB"):
        model(x)
    assert model(x[:2]).shape == (2, 1048576)
