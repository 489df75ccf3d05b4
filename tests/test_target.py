"""The target module: the host CPU's fp32 peak is measured by a short FMA loop, once per CPU
model, then read from the cache directory; the GPU architecture table lives here too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cnnc.backends.cuda as cuda
import cnnc.passes.tile as tile
from cnnc import target


def test_the_peak_is_measured_once_then_cached(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(target, "_HOST", None)
    start = time.perf_counter()
    first = target.host_cpu()
    assert time.perf_counter() - start < 1.0
    assert first.peak_source == "measured"
    # Any x86 or Arm core of the last decade: between a few and a few hundred GFLOP/s.
    assert 2.0 < first.peak_gflops_per_core < 2000.0
    assert first.vector_width in (4, 8, 16)
    assert 1 <= first.fma_pipes <= 4
    (stored,) = json.loads((tmp_path / target.PEAK_FILE).read_text()).values()
    assert stored["peak_gflops_per_core"] == first.peak_gflops_per_core
    assert target.host_cpu().peak_source == "cached"  # the same process: not measured again
    monkeypatch.setattr(target, "_HOST", None)  # as a new process would
    again = target.host_cpu()
    assert (again.peak_source, again.peak_gflops_per_core) == \
        ("cached", first.peak_gflops_per_core)
    assert again.describe_peak().startswith(
        f"peak: {first.peak_gflops_per_core:.0f} GFLOP/s/core, cached (")


def test_the_vector_width_follows_the_features() -> None:
    assert target.vector_width("+avx,+avx2,+avx512f,+fma") == 16
    assert target.vector_width("+avx,+avx2,-avx512f,+fma") == 8
    assert target.vector_width("+sse4.2,-avx") == 4
    assert target.vector_width("+neon") == 4


def test_import_cnnc_does_not_import_llvmlite() -> None:
    code = "import sys, cnnc, cnnc.target, cnnc.profile; print('llvmlite' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout == "False\n"


def test_the_gpu_architectures_are_target_facts() -> None:
    assert cuda.gpu_arch is target.gpu_arch  # the backend reads the target, not a pass
    assert not hasattr(tile, "GPU_ARCHS")
    assert target.gpu_arch("sm_90a") == target.GPU_ARCHS[90]
    assert target.gpu_arch("sm_87") == target.GPU_ARCHS[86]  # the nearest older one
    with pytest.raises(ValueError, match="unknown CUDA architecture 'gfx90a'"):
        target.gpu_arch("gfx90a")
