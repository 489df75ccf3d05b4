"""The `onnx` package's backend node tests whose ops cnnc maps: each one cnnc accepts gives
the expected outputs on the reference and llvm (scripts/onnx_conformance.py runs them all,
with cuda-sim, and writes the table in docs/onnx.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the conformance suite comes with the onnx package")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import onnx_conformance  # noqa: E402

# cnnc's avgpool2d with ceil_mode follows PyTorch's divisor (docs/onnx.md)
KNOWN = {"test_averagepool_2d_ceil_last_window_starts_on_pad"}
CASES, _ = onnx_conformance.supported_cases(("node",))
SMALL = [case for case in CASES if case.name not in KNOWN and case.inputs
         and all(isinstance(array, np.ndarray) for array in (*case.inputs, *case.outputs))
         and sum(array.size for array in case.inputs) <= 4096]


def test_the_suite_has_the_cases_of_the_ops_cnnc_maps() -> None:
    names = {case.name for case in CASES}
    assert {"test_conv_with_strides_padding", "test_maxpool_2d_ceil", "test_gemm_transposeB",
            "test_globalaveragepool", "test_batchnorm_example"} <= names


@pytest.mark.parametrize("case", SMALL, ids=[case.name for case in SMALL])
def test_a_node_case_cnnc_accepts_passes(case: onnx_conformance.Case, tmp_path: Path) -> None:
    results = onnx_conformance.run_case(case, ("reference", "llvm"), tmp_path)
    verdicts = set(results.values())
    assert verdicts == {"pass"} or all(v.startswith("unsupported") for v in verdicts), results
