"""The LLVM target's debug mode: with check_bounds every load and store checks its index, so
a bad index is reported instead of touching memory."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

import cnnc
from cnnc.backends.llvm import jit
from cnnc.kernel import Buffer, For, Kernel, Load, Store, Var
from cnnc.lower import LoweredModel

GOLDEN = Path(__file__).parent / "golden"


def run_kernel(kernel: Kernel, check_bounds: bool) -> tuple[np.ndarray, int]:
    """JIT one hand-written kernel over a 64-float arena; returns the arena and the flag."""
    lowered = LoweredModel([kernel], {kernel.name: {"src": "a", "out": "b"}}, 1)
    variant = jit.Variant("run", lowered, {"a": 0, "b": 32})
    module = jit.build_module("bounds", [variant], param_offsets={}, check_bounds=check_bounds)
    library = jit.JitLibrary(jit.emit_object(jit.optimise(module.text())))
    library.set_params(np.zeros(16, np.float32))
    arena = np.arange(64, dtype=np.float32)
    run = ctypes.CFUNCTYPE(ctypes.c_int32, *([ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3
                                              + [ctypes.c_void_p]))(library.address("run"))
    assert run(None, None, 1, 0, 1, arena.ctypes.data) == 0
    flag = library.bounds_flag().value if check_bounds else 0
    return arena, flag


def copy_kernel(extent: int) -> Kernel:
    """out[i] = src[i + 1] for i < extent: reads one past the end of src when extent is 32."""
    i = Var("i")
    body = [For("i", extent, [Store("out", i, Load("src", i + 1))])]
    return Kernel("copy", ["test"], [Buffer("src", 32, "input"), Buffer("out", 32, "output")],
                  body)


def test_an_index_past_the_end_is_caught_and_not_performed() -> None:
    arena, flag = run_kernel(copy_kernel(32), check_bounds=True)
    assert flag == 1  # the first (and only) kernel
    assert_allclose(arena[32:63], np.arange(1, 32))  # every access in bounds was done
    assert arena[63] == arena[0]  # the bad read was redirected to element 0


def test_accesses_in_bounds_raise_nothing() -> None:
    arena, flag = run_kernel(copy_kernel(31), check_bounds=True)
    assert flag == 0
    assert_allclose(arena[32:63], np.arange(1, 32))


@pytest.mark.parametrize("case", ["lenet", "residual", "depthwise_dilated", "avgpool_pad"])
def test_golden_models_stay_in_bounds(case: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, check_bounds=True, use_cache=False)
    for batch in (1, 3, 17):
        x = np.random.default_rng(batch).standard_normal((batch, *graph.input_shape))
        outputs = model(x.astype(np.float32))
        expected = cnnc.reference(graph, x.astype(np.float32))
        for got, want in zip(outputs if isinstance(outputs, tuple) else (outputs,),
                             expected if isinstance(expected, tuple) else (expected,)):
            assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_recorded_violation_raises_bounds_error_naming_the_kernel() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", check_bounds=True, use_cache=False)
    x = np.zeros((2, 1, 28, 28), np.float32)
    model(x)
    # What a bad access leaves behind, as the generated code writes it: 1 + kernel number.
    symbols = jit.kernel_symbols(model._jit_variants)
    assert model._bounds_flag is not None
    model._bounds_flag.value = symbols.index("cnnc_run_channel.conv2d_sigmoid_avgpool2d_0") + 1
    with pytest.raises(cnnc.CnncError, match="kernel cnnc_run_channel.conv2d_sigmoid_avgpool2d_0"
                                             " of model 'lenet' indexed out of bounds"):
        model(x)
    assert model._bounds_flag.value == 0
    model(x)  # and the model goes on working
