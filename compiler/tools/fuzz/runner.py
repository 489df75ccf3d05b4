"""Fuzzing jobs run in worker processes (`cnnc.tools.workers`), so that a model that kills its
process (a crash in native code) or hangs is a failure of that model and the run goes on.

A worker takes a `Job` (a model by seed and index, or a given case) and answers with the
`Outcome` that `judge.evaluate_case` gives; the runner restarts workers that die or hang.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

from cnnc.tools.fuzz.generate import generate
from cnnc.tools.fuzz.judge import Failure, Outcome, error_text, evaluate_case
from cnnc.tools.fuzz.model import Case
from cnnc.tools.fuzz.training import generate_training
from cnnc.tools.workers import Worker, WorkerDied, wait_any

CASE_TIMEOUT = 300.0  # seconds one model may take in a worker before it counts as hung
JOBS_PER_WORKER = 100  # then a fresh worker: the code of compiled models is never unloaded


@dataclass
class Job:
    """A model to evaluate: generated from (seed, index), a training one if `training`, or
    given as a Case."""

    configs: list[str]
    seed: int = 0
    index: int = 0
    case: Case | None = None
    training: bool = False

    def resolve(self) -> Case:
        if self.case is not None:
            return self.case
        if self.training:
            return generate_training(self.seed, self.index)
        return generate(self.seed, self.index)


def _worker_main(connection: Connection, cache_dir: str | None) -> None:
    if cache_dir is not None:
        os.environ["CNNC_CACHE_DIR"] = cache_dir
    connection.send(("ready", None))
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            outcome = evaluate_case(job.resolve(), job.configs,
                                    lambda name: connection.send(("config", name)))
        except Exception as error:  # the fuzzer's own bug: report it, keep the worker
            outcome = Outcome(job.configs, [Failure("fuzz", "internal", error_text(error),
                                                    type(error).__name__)])
        connection.send(("done", outcome))


class _Worker:
    """A worker process and the job it is on."""

    def __init__(self, cache_dir: str | None) -> None:
        self.process = Worker("the fuzzing worker process", _worker_main, cache_dir)
        self.job: tuple[int, Job] | None = None
        self.done = 0
        self.ready = False  # it has started (a worker that dies before is the fuzzer's fault)
        self.config = ""
        self.started = 0.0

    def submit(self, key: int, job: Job) -> None:
        self.job, self.config, self.started = (key, job), "", time.monotonic()
        where = f"model {job.index} of seed {job.seed}" if job.case is None else "a given case"
        self.process.name = f"the fuzzing worker process of {where}"
        self.process.send(job)

    def finished(self) -> Outcome | None:
        """The outcome of its job, if it has come; WorkerDied when the process has ended."""
        finished = None
        for kind, value in self.process.messages():
            if kind == "ready":
                self.ready = True
            elif kind == "config":
                self.config = value
            else:
                finished = value
        return finished

    def stop(self) -> None:
        self.process.stop(None)


class Runner:
    """Evaluates jobs in `jobs` worker processes (0: in this process, without isolation)."""

    def __init__(self, jobs: int, cache_dir: str | None = None) -> None:
        self.jobs = jobs
        self.cache_dir = cache_dir
        self._workers: list[_Worker] = []

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def run(self, jobs: Iterator[Job], deadline: float | None = None
            ) -> Iterator[tuple[int, Job, Outcome]]:
        """(position, job, outcome) for each job, as they finish; no job starts after
        `deadline` (a time.monotonic() value). A worker that dies, or takes more than
        CASE_TIMEOUT seconds, is a failure of its model, and a fresh worker takes over."""
        if self.jobs <= 0:
            for key, job in enumerate(jobs):
                if deadline is not None and time.monotonic() >= deadline:
                    return
                with _cache_env(self.cache_dir):
                    yield key, job, evaluate_case(job.resolve(), job.configs)
            return
        pending = enumerate(jobs)
        busy: list[_Worker] = []
        idle = list(self._workers)
        exhausted = False
        while True:
            while not exhausted and (idle or len(self._workers) < self.jobs):
                if deadline is not None and time.monotonic() >= deadline:
                    exhausted = True
                    break
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                worker = idle.pop() if idle else self._spawn()
                busy.append(worker)
                try:
                    worker.submit(*item)
                except WorkerDied:
                    pass  # found below, as a worker that died on its job
            if not busy:
                return
            wait_any([worker.process for worker in busy], timeout=min(5.0, CASE_TIMEOUT))
            for worker in list(busy):
                assert worker.job is not None
                key, job = worker.job
                try:
                    finished = worker.finished()
                except WorkerDied as died:
                    busy.remove(worker)
                    self._workers.remove(worker)
                    yield key, job, Outcome(job.configs, [self._crash(worker, died)])
                    continue
                if finished is not None:
                    busy.remove(worker)
                    worker.job = None
                    worker.done += 1
                    if worker.done < JOBS_PER_WORKER:
                        idle.append(worker)
                    else:
                        worker.stop()
                        self._workers.remove(worker)
                    yield key, job, finished
                elif time.monotonic() - worker.started > CASE_TIMEOUT:
                    last = worker.process.last_error()
                    worker.process.kill()
                    worker.stop()
                    busy.remove(worker)
                    self._workers.remove(worker)
                    yield key, job, Outcome(job.configs, [Failure(
                        worker.config or "load", "hang",
                        f"{worker.process.name} took more than {CASE_TIMEOUT:g} s (stopped it)"
                        + (f"; its last line on stderr: {last}" if last else ""), "Timeout")])

    @staticmethod
    def _crash(worker: _Worker, died: WorkerDied) -> Failure:
        if not worker.ready:
            raise RuntimeError(f"{died}; a fuzzing worker process failed to start: is the "
                               "main module guarded by `if __name__ == '__main__'`?")
        return Failure(worker.config or "load", "crash", str(died), "ProcessDied")

    def evaluate(self, case: Case, configs: list[str]) -> Outcome:
        return next(self.run(iter([Job(configs, case=case)])))[2]

    def _spawn(self) -> _Worker:
        worker = _Worker(self.cache_dir)
        self._workers.append(worker)
        return worker


@contextlib.contextmanager
def _cache_env(cache_dir: str | None) -> Iterator[None]:
    if cache_dir is None:
        yield
        return
    old = os.environ.get("CNNC_CACHE_DIR")
    os.environ["CNNC_CACHE_DIR"] = cache_dir
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CNNC_CACHE_DIR", None)
        else:
            os.environ["CNNC_CACHE_DIR"] = old
