"""Concurrency: one compiled model called from 8 Python threads at once with different batch
sizes; two processes compiling the same models at the same time into one cache; and cache
entries that are truncated or damaged, which are detected by their checksum and rebuilt,
never loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GOLDEN, TOLERANCE, as_list
from numpy.testing import assert_allclose, assert_array_equal

import cnnc
from cnnc import cache

THREADS = 8


def call_from_threads(model: Any, inputs: list[np.ndarray], rounds: int
                      ) -> list[list[list[np.ndarray]]]:
    """Each input on a thread of its own, all started at once, `rounds` calls each."""
    start = threading.Barrier(len(inputs))
    results: list[list[list[np.ndarray]]] = [[] for _ in inputs]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            start.wait()
            for _ in range(rounds):
                results[index].append(as_list(model(inputs[index])))
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


@pytest.mark.parametrize("target, threads", [("llvm", 1), ("llvm", 2), ("cuda-sim", None)])
@pytest.mark.parametrize("case", ["lenet_relu_max", "multi_in_out"])
def test_eight_threads_with_different_batch_sizes_each_get_their_answer(
        case: str, target: str, threads: int | None) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target=target, threads=threads)
    rng = np.random.default_rng(5)
    # Batches below, at and above a batch block, so both CPU variants run at once.
    batches = [1, 2, 3, 7, 8, 9, 16, 33][:THREADS]
    inputs = [rng.standard_normal((batch, *graph.input_shape)).astype(np.float32)
              for batch in batches]
    alone = [as_list(model(x)) for x in inputs]
    results = call_from_threads(model, inputs, rounds=3 if target == "llvm" else 1)
    for x, expected, calls in zip(inputs, alone, results):
        for outputs in calls:
            for got, want in zip(outputs, expected):
                assert_array_equal(got, want)  # the same bits as a call on its own
        for got, want in zip(calls[0], as_list(cnnc.reference(graph, x))):
            assert_allclose(got, want, **TOLERANCE)


# --- two processes, one cache ----------------------------------------------------------------

COMPILE_SCRIPT = """
import hashlib, sys, time
from pathlib import Path
import numpy as np
import cnnc

go = Path(sys.argv[1])
while not go.exists():  # both processes start compiling at the same moment
    time.sleep(0.001)
for path in sys.argv[2:]:
    for target in ("llvm", "cuda-sim"):
        graph = cnnc.load(path)
        model = cnnc.compile(graph, target=target)
        x = np.random.default_rng(0).standard_normal((3, *graph.input_shape)).astype(np.float32)
        outputs = model(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        digest = hashlib.sha256(b"".join(o.tobytes() for o in outputs)).hexdigest()
        print(path, target, digest)
"""

SHARED_CASES = ["lenet", "residual", "avgpool_pad"]


def test_two_processes_compiling_at_once_share_the_cache_without_damage(
        tmp_path: Path) -> None:
    directory = tmp_path / "shared-cache"
    env = {**os.environ, "CNNC_CACHE_DIR": str(directory)}
    go = tmp_path / "go"
    paths = [str(GOLDEN / f"{case}.yaml") for case in SHARED_CASES]
    # The batch-1 split plan, part of the code and so of its cache key, follows the measured
    # pool barrier and memory bandwidth. Both processes read this session's from the cache,
    # as after any first run, rather than measuring them at once on the same cores (which
    # gave them different plans, and 7 entries, on a loaded CI machine).
    from cnnc.backends.llvm import runtime, split

    threads = runtime.cpus()
    barrier, bandwidth = split.host_barrier_us(threads), split.host_memory_gbps()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNC_CACHE_DIR", str(directory))
        patch.setattr(cnnc.target, "_FACTS", {})
        cnnc.target.pool_barrier_us(threads, lambda: barrier)
        cnnc.target.memory_gbps(lambda: bandwidth)
    assert (directory / cnnc.target.BARRIER_FILE).exists()
    processes = [subprocess.Popen([sys.executable, "-c", COMPILE_SCRIPT, str(go), *paths],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    go.touch()
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    assert outputs[0][0] == outputs[1][0]  # the same bits in both processes
    assert len(outputs[0][0].splitlines()) == 2 * len(SHARED_CASES)

    entries = sorted(directory.glob("*.obj"))
    assert len(entries) == 2 * len(SHARED_CASES)  # one per model and target, whole
    assert not list(directory.glob("*.tmp"))  # no half-written file left behind
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNC_CACHE_DIR", str(directory))
        for entry in entries:
            assert cache.load(entry.stem) is not None
        for case in SHARED_CASES:  # a third compile of each comes from the cache
            assert cnnc.compile(GOLDEN / f"{case}.yaml").cache_hit


# --- damaged entries -------------------------------------------------------------------------


def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flip_payload_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[-100] ^= 0x40
    return bytes(damaged)


def flip_checksum_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    position = len(cache.MAGIC) + 5
    damaged[position] = ord("0") if damaged[position] != ord("0") else ord("1")
    return bytes(damaged)


DAMAGE = {
    "truncated": truncate,
    "payload_byte_flipped": flip_payload_byte,
    "checksum_byte_flipped": flip_checksum_byte,
    "empty": lambda data: b"",
    "header_only": lambda data: data[: len(cache.MAGIC) + 64],
    "no_magic": lambda data: b"\x7fELF" + data[4:],
}


def cache_hit(model: Any) -> bool:
    """Whether `model`'s code came from the cache (the simulator keeps it on its library)."""
    if hasattr(model, "cache_hit"):
        return bool(model.cache_hit)
    return bool(model._runner.library.cache_hit)


@pytest.mark.parametrize("damage, target", [*((damage, "llvm") for damage in sorted(DAMAGE)),
                                            ("truncated", "cuda-sim"),
                                            ("payload_byte_flipped", "cuda-sim")])
def test_a_damaged_entry_is_detected_and_rebuilt_never_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str, target: str) -> None:
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path))
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    first = cnnc.compile(graph, target=target)
    expected = first(x)
    (entry,) = tmp_path.glob("*.obj")
    entry.write_bytes(DAMAGE[damage](entry.read_bytes()))
    assert cache.load(entry.stem) is None  # the checksum (or the header) gives it away

    again = cnnc.compile(graph, target=target)
    assert not cache_hit(again)  # built again, not loaded
    assert_array_equal(again(x), expected)
    assert cache.load(entry.stem) is not None  # and stored whole again
    assert cache_hit(cnnc.compile(graph, target=target))


def test_an_unwritable_cache_only_costs_time(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be\n")
    monkeypatch.setenv("CNNC_CACHE_DIR", str(blocker))
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    model = cnnc.compile(graph)
    x = np.zeros((1, 1, 28, 28), np.float32)
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)
    assert not cnnc.compile(graph).cache_hit
