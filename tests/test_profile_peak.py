"""The profile compares each kernel with the measured peak of one core of this machine and
says so; on several threads it says plainly that kernels are timed on one."""

from __future__ import annotations

import re
from dataclasses import replace

from conftest import GOLDEN

import cnnc
from cnnc import target
from cnnc.profile import profile_table


def test_the_of_peak_column_uses_the_targets_peak() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", threads=1)
    variant = model.variant_for(32)
    cpu = replace(target.host_cpu(), peak_gflops_per_core=10.0, peak_source="measured")
    lines = profile_table(variant.graph, variant.lowered, 32, model.kernel_runner(variant, 32),
                          0.05, peak=cpu).splitlines()
    assert lines[0].startswith("peak: 10 GFLOP/s/core, measured (")
    row = next(line for line in lines if line.startswith("conv2d_sigmoid_avgpool2d_1 "))
    rate, of_peak = float(row.split()[3]), int(row.split()[4].rstrip("%"))
    assert rate > 0
    assert abs(of_peak - rate * 10) <= 1  # rate / 10 GFLOP/s, in percent


def test_the_profile_states_the_peak_it_compares_with() -> None:
    text = cnnc.compile(GOLDEN / "lenet.yaml", threads=1).profile(8, seconds=0.02)
    peak = target.host_cpu().peak_gflops_per_core
    assert re.match(rf"peak: {peak:.0f} GFLOP/s/core, (measured|cached) \(", text)
    assert "timed on one thread" not in text  # nothing to explain on one thread


def test_a_profile_on_two_threads_says_kernels_are_timed_on_one() -> None:
    text = cnnc.compile(GOLDEN / "lenet.yaml", threads=2).profile(64, seconds=0.02)
    assert text.splitlines()[1] == ("each kernel is timed on one thread, against one core's "
                                    "peak; the model runs on 2 threads, each taking whole "
                                    "batch blocks")
