"""The native thread pool: workers share a call's blocks, give every image the bits one thread
gives it, sleep (stop spinning) when calls stop, wake for the next call, and end when their
model is collected. A call made while another holds the pool runs on its own thread."""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time

import numpy as np
import pytest
from conftest import EXAMPLES, GOLDEN, TOLERANCE, as_list, expected_outputs
from numpy.testing import assert_allclose, assert_array_equal

import cnnc
from cnnc.backends.llvm import runtime


def workers_alive() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith("cnnc-worker")}


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_every_batch_size_gets_the_bits_of_one_thread(threads: int) -> None:
    graph = cnnc.load(GOLDEN / "lenet_relu_max.yaml")
    alone = cnnc.compile(graph, threads=1)
    shared = cnnc.compile(graph, threads=threads)
    rng = np.random.default_rng(3)
    for batch in (2, 5, 15, 16, 17, 33, 64, 100):
        x = rng.standard_normal((batch, *graph.input_shape)).astype(np.float32)
        assert_array_equal(shared(x), alone(x), err_msg=f"batch {batch}")


@pytest.mark.parametrize("case", ["lenet_relu_max", "multi_in_out"])
def test_golden_outputs_through_the_pool(case: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, threads=2)
    x = np.load(GOLDEN / f"{case}.io.npz")["input"]
    copies = -(-48 // len(x))  # at least 3 blocks of 16, so that both threads take part
    outputs = as_list(model(np.concatenate([x] * copies)))
    for actual, expected in zip(outputs, expected_outputs(case, graph)):
        assert_allclose(actual, np.concatenate([expected] * copies), **TOLERANCE)


def test_idle_workers_sleep_and_wake_for_the_next_call() -> None:
    model = cnnc.compile(EXAMPLES / "lenet.yaml", threads=2)
    x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    expected = model(x)
    # Spinning ends SPIN_SECONDS after the last call; then the process uses no CPU.
    time.sleep(50 * runtime.SPIN_SECONDS)
    used = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - used < 0.1, "an idle worker kept spinning"
    assert model._pool._sleepers.count == 1
    assert_array_equal(model(x), expected)  # woken, or its blocks run by the caller


def test_workers_end_when_their_model_is_collected() -> None:
    before = workers_alive()
    model = cnnc.compile(EXAMPLES / "lenet.yaml", threads=3)
    model(np.zeros((64, 1, 28, 28), np.float32))
    started = workers_alive() - before
    assert len(started) == 2
    del model
    gc.collect()
    for thread in started:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_call_while_the_pool_is_busy_runs_on_its_own_thread() -> None:
    model = cnnc.compile(EXAMPLES / "lenet.yaml", threads=2)
    x = np.random.default_rng(1).random((32, 1, 28, 28), dtype=np.float32)
    expected = model(x)
    assert model._pool is not None
    model._pool._lock.acquire()  # as if another call held the pool
    try:
        assert_array_equal(model(x), expected)
    finally:
        model._pool._lock.release()


def test_one_thread_has_no_pool() -> None:
    model = cnnc.compile(EXAMPLES / "lenet.yaml", threads=1)
    assert model._pool is None


def test_workers_of_a_pool_larger_than_the_machine_do_not_spin() -> None:
    # A spinning worker would take a CPU from a thread with work to do.
    assert runtime.ThreadPool(runtime.cpus() + 1)._spin_ticks == 0
    assert runtime.ThreadPool(1)._spin_ticks > 0


def test_threads_default_to_the_cpus_the_process_may_use() -> None:
    assert cnnc.compile(EXAMPLES / "lenet.yaml").threads == runtime.cpus()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_workers_of_its_own() -> None:
    model = cnnc.compile(EXAMPLES / "lenet.yaml", threads=2)
    x = np.random.default_rng(2).random((64, 1, 28, 28), dtype=np.float32)
    expected = model(x)  # the parent's workers have started
    pid = os.fork()
    if pid == 0:  # the child: its answer is its exit status
        ok = False
        try:
            ok = np.array_equal(model(x), expected) and len(model._pool._workers) == 1 \
                and model._pool._workers[0].is_alive()
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_late_worker_never_claims_a_block_of_a_job_it_did_not_read() -> None:
    # The control block as a caller leaves it halfway through posting job 6: NEXT retagged,
    # job 6's fields written, SEQ still 5. A worker that saw job 5 arrive only now must not
    # run any block (it may have read job 6's fields, or job 5's, or a mix of them).
    native = runtime.native()
    control = np.zeros(runtime.CONTROL_SIZE, np.int64)
    calls: list[tuple[int, int]] = []

    @ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
    def runner(x: int, y: int, batch: int, first: int, end: int, arena: int) -> int:
        calls.append((first, end))
        return 0

    arenas = np.zeros(4, np.int64)
    control[runtime.SEQ] = 5
    control[runtime.NEXT] = 6 << 32
    control[runtime.FN] = ctypes.cast(runner, ctypes.c_void_p).value
    control[runtime.BATCH], control[runtime.BLOCKS] = 64, 4
    control[runtime.ARENAS] = arenas.ctypes.data
    assert native.worker(control.ctypes.data, 1, 4, 1000) == 5  # saw job 5, then idled
    assert calls == [] and control[runtime.DONE] == 0
    # Once job 6 is posted, the same worker runs its blocks.
    control[runtime.SEQ] = 6
    assert native.worker(control.ctypes.data, 1, 5, 1000) == 6
    assert calls == [(0, 1), (1, 2), (2, 3), (3, 4)] and control[runtime.DONE] == 4


def atomic_steps(function: str) -> list[str]:
    """The atomic loads, stores and fences of a function of the pool's module, in order, as
    "store 16", "fence release", "load 8", ... (the number is the control block's index)."""
    text = str(runtime.build_module())
    body = text[text.index(f'@"{function}"'):]
    body = body[: body.index("\n}")]
    where: dict[str, str] = {}
    steps = []
    for line in body.splitlines():
        words = line.replace(",", " ").split()
        if "getelementptr" in words:
            where[words[0]] = words[-1]
        elif words[:1] == ["fence"]:
            steps.append(" ".join(words))
        elif "atomic" in words and ("store" in words or "load" in words):
            pointer = words[words.index("i64*", words.index("atomic") + 2) + 1]
            steps.append(f"{'store' if 'store' in words else 'load'} {where.get(pointer)}")
    return steps


def test_a_job_is_retagged_before_it_is_written_and_read_before_it_is_claimed() -> None:
    # The protocol that keeps a late worker from running a block with a stale job's
    # arguments: the caller stores NEXT (the new tag), fences, writes the job, publishes SEQ;
    # a worker reads the job, fences, then reads NEXT.
    post = atomic_steps("cnnc_pool_call")
    fields = [f"store {index}" for index in range(runtime.FN, runtime.ARENAS + 1)]
    assert post.index(f"store {runtime.NEXT}") < post.index("fence release") < \
        min(post.index(step) for step in fields)
    assert post.index(f"store {runtime.SEQ}") > max(post.index(step) for step in fields)
    run = atomic_steps("cnnc_pool_run")
    loads = [f"load {index}" for index in range(runtime.FN, runtime.ARENAS + 1)]
    assert max(run.index(step) for step in loads) < run.index("fence acquire") < \
        run.index(f"load {runtime.NEXT}")
