"""The one `Model` protocol both backends' models implement (`cnnc.model`), the backend table
the driver picks them from, and the runner ABI declared once (`cnnc.backends.llvm.abi`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, run_cli
from llvmlite import ir

import cnnc
from cnnc.backends.llvm import abi
from cnnc.backends.llvm.model import LlvmModel
from cnnc.driver import export_kinds
from cnnc.model import c_name

LENET = GOLDEN / "lenet.yaml"


@pytest.fixture(scope="module")
def sim_model() -> cnnc.Model:
    return cnnc.compile(LENET, target="cuda-sim")


def test_both_targets_give_a_model_with_the_same_surface(sim_model: cnnc.Model) -> None:
    cpu = cnnc.compile(LENET)
    assert isinstance(cpu, LlvmModel) and cnnc.CompiledModel is LlvmModel
    for model in (cpu, sim_model):
        assert model.name == "lenet" and len(model.kernels) == 5
        assert model.output_shapes == [(10,)]
        assert model(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
        assert "conv2d_sigmoid_avgpool2d_0" in model.source("kernel")
        assert model.memory_bytes(0) == 0
    assert cpu.resources == {}  # LLVM reports none


def test_cuda_model_refuses_to_profile_with_a_clear_error(sim_model: cnnc.Model) -> None:
    with pytest.raises(cnnc.CnncError, match="profile times the kernels of target 'llvm' only"):
        sim_model.profile(1)


def test_cuda_export_writes_the_kinds_asked_for(sim_model: cnnc.Model, tmp_path: Path) -> None:
    assert export_kinds("cuda-sim") == ("cu", "ptx", "cubin", "json")
    assert export_kinds("llvm") == ("ll", "asm", "obj", "so")
    written = sim_model.export(tmp_path, emit=("cu",))  # needs no NVRTC
    assert written == [tmp_path / "lenet.cu"]
    assert written[0].read_text() == sim_model.source("cuda")
    with pytest.raises(ValueError, match="unknown output kind 'so'; kinds: cu, ptx, cubin, json"):
        sim_model.export(tmp_path, emit=("so",))


def test_cli_emit_kinds_are_the_targets_own(tmp_path: Path) -> None:
    result = run_cli("compile", LENET, "-t", "cuda-sim", "-o", tmp_path, "--emit", "cu")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lenet.cu"]
    result = run_cli("compile", LENET, "-t", "cuda-sim", "--emit", "so")
    assert result.returncode == 2
    assert result.stderr == "error: unknown --emit kind 'so'; expected cu, ptx, cubin, json\n"


def test_unknown_target_is_refused_before_anything_loads() -> None:
    with pytest.raises(ValueError, match="unknown target 'tpu'; targets: llvm, cuda, cuda-sim"):
        cnnc.compile("no/such/model.yaml", target="tpu")


def test_the_runner_in_the_generated_code_has_the_abi_type() -> None:
    llvm_ir = cnnc.compile(LENET, layout="batch").source("ll")
    runner = abi.RUNNER.ir_type(ir.FloatType().as_pointer())
    assert str(runner) == "i32 (float*, float*, i64, i64, i64, float*)"
    assert ('define i32 @"cnnc_run_batch"(float* %"x", float* %"y", i64 %"batch", '
            'i64 %"first", i64 %"end", float* %"arena")') in llvm_ir
    assert 'define i32 @"cnnc_run_batch_kernel"(i64 %"which", float* %"x"' in llvm_ir
    assert str(abi.RUNNER_KERNEL.ir_type(ir.IntType(8).as_pointer())) == \
        "i32 (i64, i8*, i8*, i64, i64, i64, i8*)"


def test_c_name_is_a_c_identifier() -> None:
    assert c_name("lenet") == "lenet"
    assert c_name("my model-2") == "my_model_2"
    assert c_name("2nd") == "m_2nd"
    assert c_name("") == "model"


def test_import_cnnc_imports_no_backend_and_compiled_model_no_llvmlite() -> None:
    code = ("import sys, cnnc\n"
            "def loaded(): return [m for m in sys.modules\n"
            "                      if m.startswith(('cnnc.backends', 'llvmlite'))]\n"
            "print(sorted(loaded()))\n"
            "assert cnnc.CompiledModel.__name__ == 'LlvmModel'\n"
            "print(sorted(loaded()))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, check=True).stdout.splitlines()
    assert found[0] == "[]"
    assert found[1] == ("['cnnc.backends', 'cnnc.backends.llvm', 'cnnc.backends.llvm.abi', "
                        "'cnnc.backends.llvm.export', 'cnnc.backends.llvm.model']")
