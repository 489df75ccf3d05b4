"""`cnnc.tools.workers`: a parent never waits for ever on a child process. A child that raises, is
killed, returns or hangs in the middle of a request becomes a WorkerError, within seconds,
that names the child and quotes its last line on stderr."""

from __future__ import annotations

import os
import signal
import threading
import time
from multiprocessing.connection import Connection

import pytest

from cnnc.tools.workers import Worker, WorkerDied, WorkerTimeout, describe_exit


def raises_on_request(connection: Connection) -> None:
    connection.send("ready")
    connection.recv()
    raise ValueError("boom in the child")


def sleeps_on_request(connection: Connection) -> None:
    connection.send("ready")
    connection.recv()
    time.sleep(60)


def returns_on_request(connection: Connection) -> None:
    connection.send("ready")
    connection.recv()


def answers(connection: Connection) -> None:
    while (request := connection.recv()) is not None:
        connection.send(request * 2)


def test_a_child_that_raises_mid_request_is_reported_with_its_last_error_line() -> None:
    worker = Worker("the test child", raises_on_request)
    try:
        assert worker.receive(30) == "ready"
        start = time.monotonic()
        with pytest.raises(WorkerDied) as caught:
            worker.ask("go", timeout=30)
        assert time.monotonic() - start < 5
        assert str(caught.value) == \
            "the test child died (exit code 1): ValueError: boom in the child"
        assert caught.value.last_error == "ValueError: boom in the child"
    finally:
        worker.stop()


def test_a_child_killed_mid_request_is_reported_at_once() -> None:
    worker = Worker("the test child", sleeps_on_request)
    try:
        assert worker.receive(30) == "ready"
        worker.send("go")
        threading.Timer(0.3, os.kill, (worker.process.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerDied, match=r"^the test child was killed by SIGKILL \(exit "
                                             r"code -9\)$"):
            worker.receive(30)
        assert time.monotonic() - start < 5
    finally:
        worker.stop()


def test_a_child_that_hangs_times_out_and_is_stopped() -> None:
    worker = Worker("the test child", sleeps_on_request)
    try:
        assert worker.receive(30) == "ready"
        start = time.monotonic()
        with pytest.raises(WorkerTimeout, match=r"^the test child gave no answer in 0.5 s "
                                                r"\(stopped it\)$"):
            worker.ask("go", timeout=0.5)
        assert 0.5 <= time.monotonic() - start < 5
        assert not worker.process.is_alive()
    finally:
        worker.stop()


def test_a_child_that_returns_without_answering_is_reported() -> None:
    worker = Worker("the test child", returns_on_request)
    try:
        assert worker.receive(30) == "ready"
        with pytest.raises(WorkerDied, match=r"^the test child ended without answering "
                                             r"\(exit code 0\)$"):
            worker.ask("go", timeout=30)
    finally:
        worker.stop()


def test_a_child_that_answers_is_asked_and_stopped() -> None:
    worker = Worker("the test child", answers)
    assert [worker.ask(number, timeout=30) for number in (1, 2, 3)] == [2, 4, 6]
    worker.stop()
    assert worker.process.exitcode == 0


def test_exits_are_described_in_words() -> None:
    assert describe_exit(3) == "died (exit code 3)"
    assert describe_exit(-11) == "was killed by SIGSEGV (exit code -11)"
    assert describe_exit(0) == "ended without answering (exit code 0)"
