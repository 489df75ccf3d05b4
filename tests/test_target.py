"""The target module: the host CPU's fp32 peak is measured by a short FMA loop, once per CPU
model, then read from the cache directory; its vector registers come from LLVM's features and
are what the options and the tiling pass read; the GPU architecture table lives here too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import one_op_graph

import cnnc.backends.cuda as cuda
import cnnc.passes.tile as tile
from cnnc import target
from cnnc.passes import Options, run_pipeline


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


def test_the_cpu_registers_follow_the_features() -> None:
    avx512 = target.CpuIsa.from_features("+avx,+avx2,+avx512f,+fma")
    avx2 = target.CpuIsa.from_features("+avx,+avx2,-avx512f,+fma")
    assert (avx512.vector_width, avx512.vector_registers) == (16, 32)
    assert (avx2.vector_width, avx2.vector_registers) == (8, 16)
    # What the tiling pass may fill: AVX-512's are the constants it used before it asked.
    assert (avx512.accumulators, avx512.register_tile) == (8, 14)
    assert (avx2.accumulators, avx2.register_tile) == (4, 7)
    assert target.host_cpu().isa == target.host_isa()


def test_the_options_take_the_vector_width_from_the_target() -> None:
    avx2 = target.CpuIsa(8, 16)
    assert Options(target="llvm", cpu=avx2).vector_width == 8
    assert Options(target="llvm").cpu == target.host_isa()
    assert Options(target="llvm").vector_width == target.host_isa().vector_width
    gpu = Options(target="cuda")
    assert (gpu.cpu, gpu.vector_width) == (None, 1)  # one lane per GPU thread
    assert Options(target="llvm", vector_width=4).vector_width == 4  # as asked


def test_the_tiling_pass_fills_the_target_registers() -> None:
    weight = np.zeros((16, 3, 3, 3), np.float32)
    graph = one_op_graph("conv2d", (3, 8, 8), {"weight": weight}, out_channels=16,
                         kernel_size=3, bias=False)
    blocks = {}
    for name, isa in (("avx512", target.CpuIsa(16, 32)), ("avx2", target.CpuIsa(8, 16))):
        schedule = run_pipeline(graph, Options(target="llvm", cpu=isa)).plan.groups[0].schedule
        blocks[name] = (schedule.oc_block, schedule.x_block)
    # The batch layout's channels x points tile (`broadcast_tile`, half the registers): 4 x 3
    # of 6 points a row within AVX-512's 16 accumulators, 4 x 2 within AVX2's 8.
    assert blocks == {"avx512": (4, 3), "avx2": (4, 2)}
    # The channel layout's channels x points tile: 16 channels are one AVX-512 vector, so
    # all 6 points of a row share its weights (6 <= 14); AVX2's two vectors of 8 leave room
    # for 3 points (2 x 3 <= 7).
    tiles = {}
    for name, isa in (("avx512", target.CpuIsa(16, 32)), ("avx2", target.CpuIsa(8, 16))):
        compiled = run_pipeline(graph, Options(target="llvm", layout="channel", cpu=isa))
        schedule = compiled.plan.groups[0].schedule
        tiles[name] = (schedule.oc_block, schedule.x_block)
    assert tiles == {"avx512": (1, 6), "avx2": (2, 3)}
