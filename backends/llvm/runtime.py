"""The native side of calling a compiled model: a thread pool, and the call itself.

`cnnc_call` runs a model's runner on the calling thread. It takes the addresses where the
NumPy arrays keep their data pointers (inside the array objects), so that the Python call path
need not ask NumPy for them: that costs more than a small model's convolution.

The thread pool: workers wait for work spinning in native code, and share a call's batch
blocks through one atomic counter.

Why not `concurrent.futures`: on our 2-core machines, a worker that sleeps between calls is
woken by the calling thread and often lands on the caller's core, where the two share one
core until the scheduler moves one of them; two threads then ran the LeNet only 1.25 times as
fast as one. Here a worker spins (with `pause`) for a few milliseconds after its last block,
so back-to-back calls find it awake on its own core; only then does it return to Python and
sleep on a condition. Blocks are claimed one at a time, so the caller never waits for a
worker that is asleep or late: it runs whatever is left itself.

The control block is an int64 array, each field on a cache line of its own:

    SEQ     number of the current job; a worker spins until it changes (-1: stop)
    JOB     the job: runner address, x, y, batch, blocks, address of the arena table
    NEXT    (SEQ << 32) | next unclaimed block; tagged, so that a late worker can never
            claim a block of a job that is not the one whose arguments it read
    DONE    blocks finished
    STATUS  the first non-zero status a runner returned (0 if none)
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np
from llvmlite import ir

from cnnc.backends.llvm import abi, jit

LINE = 8  # int64s per 64-byte cache line
SEQ, JOB, NEXT, DONE, STATUS = (field * LINE for field in range(5))
FN, X, Y, BATCH, BLOCKS, ARENAS = range(JOB, JOB + 6)
CONTROL_SIZE = 5 * LINE
STOP = -1
# How long an idle worker spins before it sleeps: long enough to span the Python between two
# calls of a loop, short enough not to hold a core for long after the last one.
SPIN_SECONDS = 0.002

I64 = ir.IntType(64)
I32 = ir.IntType(32)
I8_PTR = ir.IntType(8).as_pointer()
RUNNER = abi.RUNNER.ir_type(I8_PTR)  # a variant's runner, called through its address


def build_module() -> ir.Module:
    """`cnnc_call(runner, x_slot, y_slot, batch, first, end, arena)`: the runner on this thread,
    with x and y read from their slots (each the address of a data pointer);
    `cnnc_pool_call(control, runner, x_slot, y_slot, batch, blocks, arenas)`: post a job, run blocks
    of it on the calling thread until none is left, wait for the rest, return the status;
    `cnnc_pool_worker(control, participant, last, spin_cycles)`: run every job posted after
    job `last`; return the last job seen once idle for `spin_cycles`, or -1 when told to stop."""
    module = ir.Module(name="cnnc_pool")
    module.triple = jit.host().triple
    pause = ir.Function(module, ir.FunctionType(ir.VoidType(), ()), "llvm.x86.sse2.pause")
    cycles = ir.Function(module, ir.FunctionType(I64, ()), "llvm.readcyclecounter")
    i64_ptr = I64.as_pointer()

    def at(builder: ir.IRBuilder, control: ir.Value, index: int) -> ir.Value:
        return builder.gep(control, [ir.Constant(I64, index)])

    def load(builder: ir.IRBuilder, control: ir.Value, index: int, order: str = "acquire"
             ) -> ir.Value:
        return builder.load_atomic(at(builder, control, index), order, 8)

    def store(builder: ir.IRBuilder, value: ir.Value, control: ir.Value, index: int,
              order: str = "monotonic") -> None:
        builder.store_atomic(value, at(builder, control, index), order, 8)

    # --- claim blocks of job `seq` and run them, until none is left ------------------------
    run = ir.Function(module, ir.FunctionType(ir.VoidType(), (i64_ptr, I64, I64)),
                      "cnnc_pool_run")
    run.linkage = "internal"
    control, participant, seq = run.args
    builder = ir.IRBuilder(run.append_basic_block("entry"))
    runner = builder.inttoptr(load(builder, control, FN, "monotonic"), RUNNER.as_pointer())
    x = builder.inttoptr(load(builder, control, X, "monotonic"), I8_PTR)
    y = builder.inttoptr(load(builder, control, Y, "monotonic"), I8_PTR)
    batch = load(builder, control, BATCH, "monotonic")
    blocks = load(builder, control, BLOCKS, "monotonic")
    arenas = builder.inttoptr(load(builder, control, ARENAS, "monotonic"), i64_ptr)
    # The caller retags NEXT before it writes the job (and fences): if any field read above
    # is the next job's, NEXT below carries that job's tag, and a late worker claims nothing.
    builder.fence("acquire")
    tag = builder.shl(seq, ir.Constant(I64, 32))
    claim = run.append_basic_block("claim")
    work = run.append_basic_block("work")
    builder.branch(claim)
    builder.position_at_end(claim)
    word = load(builder, control, NEXT, "monotonic")
    block = builder.and_(word, ir.Constant(I64, 0xFFFFFFFF))
    current = builder.icmp_unsigned("==", builder.and_(word, ir.Constant(I64, -1 << 32)), tag)
    with builder.if_then(builder.not_(builder.and_(
            current, builder.icmp_signed("<", block, blocks)))):
        builder.ret_void()
    pair = builder.cmpxchg(at(builder, control, NEXT), word,
                           builder.add(word, ir.Constant(I64, 1)), "acq_rel", "monotonic")
    builder.cbranch(builder.extract_value(pair, 1), work, claim)
    builder.position_at_end(work)
    arena = builder.inttoptr(builder.load(builder.gep(arenas, [participant])), I8_PTR)
    status = builder.call(runner, [x, y, batch, block, builder.add(block, ir.Constant(I64, 1)),
                                   arena])
    with builder.if_then(builder.icmp_signed("!=", status, ir.Constant(I32, 0)), likely=False):
        builder.cmpxchg(at(builder, control, STATUS), ir.Constant(I64, 0),
                        builder.zext(status, I64), "monotonic", "monotonic")  # the first
    builder.atomic_rmw("add", at(builder, control, DONE), ir.Constant(I64, 1), "release")
    builder.branch(claim)

    def data(builder: ir.IRBuilder, slot: ir.Value) -> ir.Value:
        return builder.load(builder.inttoptr(slot, i64_ptr))

    # --- cnnc_call: the runner on the calling thread ---------------------------------------------
    single = ir.Function(module, abi.CALL.ir_type(I8_PTR), "cnnc_call")
    runner_address, x_slot, y_slot, batch, first, end, arena = single.args
    builder = ir.IRBuilder(single.append_basic_block("entry"))
    builder.ret(builder.call(builder.inttoptr(runner_address, RUNNER.as_pointer()), [
        builder.inttoptr(data(builder, x_slot), I8_PTR),
        builder.inttoptr(data(builder, y_slot), I8_PTR), batch, first, end,
        builder.inttoptr(arena, I8_PTR)]))

    # --- cnnc_pool_call: the calling thread posts a job, takes part, waits ---------------------
    call = ir.Function(module, abi.POOL_CALL.ir_type(i64_ptr), "cnnc_pool_call")
    control, *job = call.args
    builder = ir.IRBuilder(call.append_basic_block("entry"))
    job[1], job[2] = data(builder, job[1]), data(builder, job[2])
    seq = builder.add(load(builder, control, SEQ, "monotonic"), ir.Constant(I64, 1))
    # NEXT first: from here on no late worker of an earlier job can claim a block.
    store(builder, builder.shl(seq, ir.Constant(I64, 32)), control, NEXT)
    builder.fence("release")
    for index, value in zip((FN, X, Y, BATCH, BLOCKS, ARENAS), job):
        store(builder, value, control, index)
    store(builder, ir.Constant(I64, 0), control, DONE)
    store(builder, ir.Constant(I64, 0), control, STATUS)
    store(builder, seq, control, SEQ, "release")
    builder.call(run, [control, ir.Constant(I64, 0), seq])
    spin = call.append_basic_block("wait")
    out = call.append_basic_block("out")
    builder.branch(spin)
    builder.position_at_end(spin)
    with builder.if_then(builder.icmp_signed("<", load(builder, control, DONE), job[4])):
        builder.call(pause, [])
        builder.branch(spin)
    builder.branch(out)
    builder.position_at_end(out)
    builder.ret(builder.trunc(load(builder, control, STATUS, "monotonic"), I32))

    # --- cnnc_pool_worker: a worker thread's life in native code -------------------------------
    worker = ir.Function(module, abi.POOL_WORKER.ir_type(i64_ptr), "cnnc_pool_worker")
    control, participant, last, limit = worker.args
    entry = worker.append_basic_block("entry")
    loop = worker.append_basic_block("loop")
    job_block = worker.append_basic_block("job")
    idle = worker.append_basic_block("idle")
    builder = ir.IRBuilder(entry)
    started = builder.call(cycles, [])
    builder.branch(loop)
    builder.position_at_end(loop)
    seen = builder.phi(I64, "seen")
    since = builder.phi(I64, "since")  # when this idle spell began
    seen.add_incoming(last, entry)
    since.add_incoming(started, entry)
    seq = load(builder, control, SEQ)
    builder.cbranch(builder.icmp_signed("!=", seq, seen), job_block, idle)
    builder.position_at_end(job_block)
    with builder.if_then(builder.icmp_signed("==", seq, ir.Constant(I64, STOP))):
        builder.ret(ir.Constant(I64, STOP))
    builder.call(run, [control, participant, seq])
    finished = builder.call(cycles, [])
    seen.add_incoming(seq, builder.block)
    since.add_incoming(finished, builder.block)
    builder.branch(loop)
    builder.position_at_end(idle)
    with builder.if_then(builder.icmp_unsigned(">", builder.sub(builder.call(cycles, []), since),
                                               limit)):
        builder.ret(seen)
    builder.call(pause, [])
    seen.add_incoming(seen, builder.block)
    since.add_incoming(since, builder.block)
    builder.branch(loop)

    # --- sequences: a training step's stages, one native call ---------------------------------
    def stages(name: str, signature: abi.Signature, step: Callable[..., ir.Value]) -> None:
        """`name(lead, table, count, ...)`: stage i runs runner table[2i] over table[2i+1]
        blocks through `step`, in order; stops at the first non-zero status."""
        function = ir.Function(module, signature.ir_type(i64_ptr), name)
        lead, table, count, *rest = function.args
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        counter = builder.alloca(I64)
        builder.store(ir.Constant(I64, 0), counter)
        head = function.append_basic_block("head")
        body = function.append_basic_block("body")
        done = function.append_basic_block("done")
        builder.branch(head)
        builder.position_at_end(head)
        index = builder.load(counter)
        builder.cbranch(builder.icmp_signed("<", index, count), body, done)
        builder.position_at_end(body)
        pair = builder.gep(builder.inttoptr(table, i64_ptr), [builder.shl(index, ir.Constant(
            I64, 1))])
        runner, blocks = builder.load(pair), builder.load(builder.gep(pair, [ir.Constant(I64, 1)]))
        status = step(builder, lead, runner, blocks, *rest)
        builder.store(builder.add(index, ir.Constant(I64, 1)), counter)
        with builder.if_then(builder.icmp_signed("!=", status, ir.Constant(I32, 0))):
            builder.ret(status)
        builder.branch(head)
        builder.position_at_end(done)
        builder.ret(ir.Constant(I32, 0))

    def alone(builder: ir.IRBuilder, arena: ir.Value, runner: ir.Value, blocks: ir.Value,
              x_slot: ir.Value, y_slot: ir.Value, batch: ir.Value) -> ir.Value:
        return builder.call(single, [runner, x_slot, y_slot, batch, ir.Constant(I64, 0), blocks,
                                     arena])

    def pooled(builder: ir.IRBuilder, control: ir.Value, runner: ir.Value, blocks: ir.Value,
               x_slot: ir.Value, y_slot: ir.Value, batch: ir.Value, arenas: ir.Value
               ) -> ir.Value:
        return builder.call(call, [control, runner, x_slot, y_slot, batch, blocks, arenas])

    stages("cnnc_sequence", abi.SEQUENCE, alone)
    stages("cnnc_pool_sequence", abi.POOL_SEQUENCE, pooled)

    ticks = ir.Function(module, abi.POOL_TICKS.ir_type(i64_ptr), "cnnc_pool_ticks")
    builder = ir.IRBuilder(ticks.append_basic_block("entry"))
    builder.ret(builder.call(cycles, []))
    return module


class _Native:
    """The pool's code, compiled once per process: it does not depend on any model."""

    def __init__(self) -> None:
        self.library = jit.JitLibrary(jit.emit_object(jit.optimise(str(build_module()))))
        self.call = abi.CALL.function(self.library.address("cnnc_call"))
        self.pool_call = abi.POOL_CALL.function(self.library.address("cnnc_pool_call"))
        self.worker = abi.POOL_WORKER.function(self.library.address("cnnc_pool_worker"))
        self.sequence = abi.SEQUENCE.function(self.library.address("cnnc_sequence"))
        self.pool_sequence = abi.POOL_SEQUENCE.function(
            self.library.address("cnnc_pool_sequence"))
        ticks = abi.POOL_TICKS.function(self.library.address("cnnc_pool_ticks"))
        clock, start = time.perf_counter(), ticks()
        time.sleep(0.002)
        per_second = (ticks() - start) / (time.perf_counter() - clock)
        self.spin_ticks = max(1, int(per_second * SPIN_SECONDS))


_NATIVE: _Native | None = None
_NATIVE_LOCK = threading.Lock()


def native() -> _Native:
    global _NATIVE
    if _NATIVE is not None:
        return _NATIVE
    with _NATIVE_LOCK:
        if _NATIVE is None:
            _NATIVE = _Native()
        return _NATIVE


class _Sleepers:
    """What the workers share with their pool: the condition they sleep on, and how many do."""

    def __init__(self) -> None:
        self.wake = threading.Condition()
        self.count = 0


class ThreadPool:
    """`threads - 1` workers that, with the calling thread, run the batch blocks of a call.

    Workers start on the first call. One call at a time uses the pool: `try_call` returns
    None when another call holds it, and the caller then runs its blocks alone."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._native = native()
        # More threads than CPUs: a spinning worker would take a CPU from one with work, so
        # workers sleep as soon as they are idle.
        self._spin_ticks = self._native.spin_ticks if threads <= cpus() else 0
        self._fresh()
        _POOLS.add(self)

    def _fresh(self) -> None:
        """New control block, lock, condition and no workers: at the start, and in the child
        of a fork, which inherits the parent's pool but none of its threads (and maybe a lock
        that one of them held)."""
        raw = np.zeros(CONTROL_SIZE + LINE, np.int64)
        start = (-raw.ctypes.data % 64) // 8
        self._control = raw[start: start + CONTROL_SIZE]  # cache-line aligned
        self._address = self._control.ctypes.data
        self._lock = threading.Lock()
        self._sleepers = _Sleepers()
        self._workers: list[threading.Thread] = []
        # The workers never hold the pool, so that a pool nobody uses any more is collected
        # and its finaliser stops them; it also runs at exit, before the JIT-compiled code
        # the workers spin in is freed.
        self._finalizer = weakref.finalize(self, _stop, self._control, self._sleepers,
                                           self._workers)

    def try_call(self, runner: int, x_slot: int, y_slot: int, batch: int, blocks: int,
                 arenas: int) -> int | None:
        """Run blocks [0, blocks) of `runner` over the threads, participant p with the arena
        whose address is arenas[p]; the first non-zero status or 0, None if the pool is busy.
        x and y are read from their slots as for `cnnc_call`."""
        return self._held(self._native.pool_call, runner, x_slot, y_slot, batch, blocks,
                          arenas)

    def try_sequence(self, table: int, count: int, x_slot: int, y_slot: int, batch: int,
                     arenas: int) -> int | None:
        """`try_call` for each of `count` stages in turn, in one native call: stage i is
        runner table[2i] over table[2i + 1] blocks (a training step)."""
        return self._held(self._native.pool_sequence, table, count, x_slot, y_slot, batch,
                          arenas)

    def _held(self, native: Callable[..., int], *arguments: int) -> int | None:
        """`native(control, *arguments)` with the pool held and its workers awake; None,
        without waiting, when another call holds the pool."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if not self._workers:
                self._start()
            if self._sleepers.count:
                with self._sleepers.wake:
                    self._sleepers.wake.notify_all()
            return int(native(self._address, *arguments))
        finally:
            self._lock.release()

    def _start(self) -> None:
        for participant in range(1, self.threads):
            thread = threading.Thread(target=_serve, name=f"cnnc-worker-{participant}",
                                      daemon=True, args=(self._native, self._control,
                                                         participant, self._sleepers,
                                                         self._spin_ticks))
            thread.start()
            self._workers.append(thread)


_POOLS: weakref.WeakSet[ThreadPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _NATIVE_LOCK
    _NATIVE_LOCK = threading.Lock()  # a thread of the parent may have held it
    for pool in list(_POOLS):
        pool._finalizer.detach()  # the parent's workers are not ours to stop
        pool._fresh()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cpus() -> int:
    """The CPUs this process may run on (all of the machine's, unless it is confined)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _serve(native: _Native, control: np.ndarray, participant: int, sleepers: _Sleepers,
           spin_ticks: int) -> None:
    """A worker: spin in native code while calls keep coming, sleep when they stop."""
    address = control.ctypes.data
    last = int(control[SEQ])
    while True:
        last = int(native.worker(address, participant, last, spin_ticks))
        if last == STOP:
            return
        with sleepers.wake:
            # A job posted since the spin ended is taken at once. One posted while we sleep
            # is run by its caller alone, who wakes us for the next.
            if int(control[SEQ]) == last:
                sleepers.count += 1
                sleepers.wake.wait()
                sleepers.count -= 1


def _stop(control: np.ndarray, sleepers: _Sleepers, workers: list[threading.Thread]) -> None:
    control[SEQ] = STOP
    with sleepers.wake:
        sleepers.wake.notify_all()
    for thread in workers:
        if thread is not threading.current_thread():
            thread.join(timeout=1.0)
