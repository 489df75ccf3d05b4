"""`cnnc tune` and `cnnc bench`: the tuner's records replay exactly and never change results;
the bench checks every engine against the reference before it times it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import GOLDEN
from numpy.testing import assert_allclose

import cnnc
from cnnc.target import llvm_cpu_name
from cnnc.tools.bench import run_bench
from cnnc.tools.tune import candidates, tune


def test_tuned_schedules_replay_without_measuring(tmp_path: Path) -> None:
    graph = cnnc.load(GOLDEN / "multi_in_out.yaml")
    records = tune(graph, seconds=3, seed=1)
    assert {record.layout for record in records} == {"batch", "channel"}
    path = tmp_path / "schedules.jsonl"
    path.write_text("".join(record.to_json(llvm_cpu_name()) + "\n"
                            for record in records))
    model = cnnc.compile(graph, schedule=path)
    for variant in model.variants:
        for group in variant.graph.plan.groups:
            (record,) = [r for r in records if r.layout == variant.layout
                         and r.kernel == group.name]
            for field, value in record.schedule.items():
                assert getattr(group.schedule, field) == value
    x = np.random.default_rng(0).standard_normal((20, 2, 3, 3)).astype(np.float32)
    assert_allclose(model(x), cnnc.reference(graph, x), rtol=1e-4, atol=1e-5)


def test_records_for_another_cpu_are_not_applied(tmp_path: Path) -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    model = cnnc.compile(graph)
    group = model.variants[0].graph.plan.groups[1]
    from cnnc.passes.tile import signature

    record = {"signature": signature(model.variants[0].graph, group, "batch"),
              "kernel": group.name, "layout": "batch", "cnnc": cnnc.__version__,
              "schedule": {"oc_block": 2}}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({**record, "cpu": "some-other-cpu"}) + "\n")
    assert cnnc.compile(graph, schedule=path).variants[0].graph.plan.groups[1].schedule \
        .oc_block == group.schedule.oc_block
    path.write_text(json.dumps({**record, "cpu": llvm_cpu_name()}) + "\n")
    assert cnnc.compile(graph, schedule=path).variants[0].graph.plan.groups[1].schedule \
        .oc_block == 2


def test_the_search_order_is_fixed_by_the_seed() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", layout="batch")
    first = list(candidates(model, "batch", 1, seed=3))
    assert first == list(candidates(model, "batch", 1, seed=3))
    assert first != list(candidates(model, "batch", 1, seed=4))
    assert first[0] == {"oc_block": 8, "x_block": 1, "unroll_max": 0,
                        "winograd": 0}  # the heuristic first


def test_bench_refuses_to_time_an_engine_that_disagrees() -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    right = cnnc.compile(graph, threads=1)

    def wrong(x: np.ndarray) -> np.ndarray:
        return right(x) + 1e-3

    report = run_bench(graph, {1: wrong}, "llvm", [2], [1], ["reference"], rounds=3,
                       round_seconds=0.01)
    assert [result.engine for result in report.results] == ["reference"]
    assert any("cnnc-llvm at batch 2 disagrees with the reference, not timed" in note
               for note in report.notes)
    report = run_bench(graph, {1: right}, "llvm", [2], [1], ["reference"], rounds=3,
                       round_seconds=0.01)
    timed = {result.engine: result for result in report.results}
    assert set(timed) == {"cnnc-llvm", "reference"}
    assert len(timed["cnnc-llvm"].seconds) == 3
    assert timed["cnnc-llvm"].max_error < 1e-5
    assert "images/s" in report.table()


def test_the_profile_lists_every_kernel_with_its_share_of_the_time() -> None:
    model = cnnc.compile(GOLDEN / "lenet.yaml", threads=1)
    for batch, layout in ((1, "channel"), (32, "batch")):
        variant = model.variant_for(batch)
        peak, *lines = model.profile(batch, seconds=0.05).splitlines()
        assert peak.startswith("peak: ") and " GFLOP/s/core, " in peak
        names = [kernel.name for kernel in variant.lowered.kernels]
        assert [line.split()[0] for line in lines[1:-1]] == names
        shares = [int(line.split()[2].rstrip("%")) for line in lines[1:-1]]
        assert abs(sum(shares) - 100) <= len(names)  # each share is rounded
        assert all(float(line.split()[1].removesuffix("us")) >= 0 for line in lines[1:-1])
        convolution = lines[1 + names.index("conv2d_sigmoid_avgpool2d_1")]
        assert float(convolution.split()[3]) > 0  # GFLOP/s of a kernel that computes
        assert f"batch {batch}, {layout} layout" in lines[-1]
