"""Child processes that answer a parent over a pipe: the engines of `cnnc bench` and the
workers of `cnnc fuzz`.

Every wait of the parent has a time-out, and a child that dies, raises or stops answering
becomes a `WorkerError` that names the child and quotes its last line on stderr (which goes
to a log file, so that a child's traceback never lands on the user's terminal). The module
knows nothing of what the messages mean.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

STOP_SECONDS = 5.0  # how long a child may take to finish after it is told to stop


class WorkerError(Exception):
    """A child process died or gave no answer in time."""

    def __init__(self, message: str, last_error: str = "") -> None:
        super().__init__(f"{message}: {last_error}" if last_error else message)
        self.last_error = last_error


class WorkerDied(WorkerError):
    """The child process ended (it raised, crashed, was killed, or returned)."""


class WorkerTimeout(WorkerError):
    """The child process is alive but gave no answer in time; it has been killed."""


def _child_main(target: Callable[..., None], log_path: str, connection: Connection,
                args_path: str) -> None:
    # At the level of the file descriptor, so that native code's messages are kept too.
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 2)
    os.close(log)
    with open(args_path, "rb") as file:
        args = pickle.load(file)
    target(connection, *args)


class Worker:
    """A child process running `target(connection, *args)`, started at once (spawned, so that
    no thread or lock of the parent is inherited). `name` says what it is in messages, e.g.
    "the torch engine's process"."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        context = multiprocessing.get_context("spawn")
        handle, self._log_path = tempfile.mkstemp(prefix="cnnc-worker-", suffix=".log")
        os.close(handle)
        # The arguments (a model's weights: megabytes) go through a file, not the spawn pipe:
        # a child that dies before reading all of that pipe leaves start() blocked forever.
        handle, self._args_path = tempfile.mkstemp(prefix="cnnc-worker-", suffix=".args")
        with os.fdopen(handle, "wb") as file:
            pickle.dump(args, file)
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_child_main, daemon=True,
                                       args=(target, self._log_path, child, self._args_path))
        self.process.start()
        # Without our copy of its end, the pipe reports the child's death as end of file.
        child.close()
        self._pending: list[Any] = []  # messages read but not yet handed out

    @property
    def waitables(self) -> list[Any]:
        """What `multiprocessing.connection.wait` wakes up on: a message or the child's end."""
        return [self.connection, self.process.sentinel]

    def last_error(self) -> str:
        """The child's last non-empty line on stderr ("" when it wrote none)."""
        try:
            with open(self._log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 8192))
                tail = log.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def send(self, message: Any) -> None:
        try:
            self.connection.send(message)
        except (OSError, EOFError):
            raise self._died() from None

    def receive(self, timeout: float) -> Any:
        """The child's next message; WorkerDied when it ends first, WorkerTimeout (after
        killing it) when none comes in `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            if not wait(self.waitables, timeout=max(0.0, deadline - time.monotonic())):
                self.kill()
                raise WorkerTimeout(f"{self.name} gave no answer in {timeout:g} s (stopped "
                                    "it)", self.last_error())
            self._pending = self.messages()
        return self._pending.pop(0)

    def messages(self) -> list[Any]:
        """Every message the child has sent so far, without waiting; WorkerDied when there
        are none and the child has ended (or closed its end of the pipe)."""
        found, self._pending = self._pending, []
        closed = False
        try:
            while self.connection.poll():
                found.append(self.connection.recv())
        except (EOFError, OSError):
            closed = True
        if not found and (closed or not self.process.is_alive()):
            raise self._died()
        return found

    def ask(self, request: Any, timeout: float) -> Any:
        """Send `request` and return the answer (see `receive`)."""
        self.send(request)
        return self.receive(timeout)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(STOP_SECONDS)

    def stop(self, message: Any = None) -> None:
        """Send `message` (the child's signal to return), wait a little, then kill it."""
        with contextlib.suppress(OSError, EOFError):
            self.connection.send(message)
        self.process.join(STOP_SECONDS)
        self.kill()
        self.connection.close()
        for path in (self._log_path, self._args_path):
            with contextlib.suppress(OSError):
                os.remove(path)

    def _died(self) -> WorkerDied:
        self.process.join(STOP_SECONDS)
        return WorkerDied(f"{self.name} {describe_exit(self.process.exitcode)}",
                          self.last_error())


def describe_exit(code: int | None) -> str:
    """How a child ended, in words: "died (exit code 3)", "was killed by SIGKILL"."""
    if code is None:
        return "stopped answering"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        return f"was killed by signal {-code} (exit code {code})"
    if code == 0:
        return "ended without answering (exit code 0)"
    return f"died (exit code {code})"


def wait_any(workers: list[Worker], timeout: float) -> None:
    """Wait until one of `workers` has a message or has ended, or `timeout` seconds pass."""
    wait([item for worker in workers for item in worker.waitables], timeout=timeout)
