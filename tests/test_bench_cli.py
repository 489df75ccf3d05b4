"""`cnnc bench` as a user meets it: an unknown engine is refused at once, an engine whose
process dies is reported by name (and never hangs the bench), `--no-fuse` and
`--disable-pass` reach cnnc's engine, and progress goes to stderr only on a terminal."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLES, GOLDEN

import cnnc
from cnnc.tools.bench import ProcessTimer, run_bench
from cnnc.tools.engines import UnknownEngine
from cnnc.tools.workers import WorkerDied

TINY = GOLDEN / "conv1x1.yaml"


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()`, failing the test (not hanging it) when it takes more than `seconds`."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the test below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cnnc_command(*args: str | Path, tty: bool = False) -> tuple[int, str, str]:
    """Run `cnnc ARGS` in a fresh interpreter: (status, stdout, stderr); with `tty`, stderr
    is a terminal."""
    command = [sys.executable, "-m", "cnnc.cli", *map(str, args)]
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        return done.returncode, done.stdout, done.stderr
    terminal, child = pty.openpty()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=child, text=True)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the child has closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(terminal)
    stdout, _ = process.communicate(timeout=60)
    return process.returncode, stdout, b"".join(chunks).decode().replace("\r\n", "\n")


def test_an_unknown_engine_fails_at_once_with_the_list_of_engines() -> None:
    start = time.monotonic()
    status, stdout, stderr = cnnc_command("bench", EXAMPLES / "lenet.yaml", "--against",
                                          "numpy,pytorch")
    assert (status, stdout) == (2, "")
    assert stderr == ("error: unknown engine 'pytorch'; expected one of reference, "
                      "onnxruntime, openvino, torch, numpy, torch-cuda\n")
    assert time.monotonic() - start < 20
    graph = cnnc.load(TINY)
    with pytest.raises(UnknownEngine, match="unknown engine 'pytorch'"):
        run_bench(graph, None, "llvm", [1], [1], ["pytorch"])


def test_an_engine_process_that_raises_is_dropped_with_its_last_error_line() -> None:
    graph = cnnc.load(TINY)
    report = within(60, lambda: run_bench(
        graph, None, "llvm", [2], [1], ["reference"], rounds=3, round_seconds=0.01,
        compile_options={"disable_passes": ("no_such_pass",)}))
    assert report.failed == ["cnnc-llvm"]
    assert report.notes[0].startswith(
        "cnnc-llvm failed to start on 1 threads, dropped: the cnnc-llvm engine's process died "
        "(exit code 1): ValueError: unknown pass 'no_such_pass'")
    assert [result.engine for result in report.results] == ["reference"]


def test_an_engine_process_killed_mid_request_fails_naming_the_engine() -> None:
    graph = cnnc.load(TINY)
    timer = within(60, lambda: ProcessTimer(graph, "reference", 1, 0, {}))
    try:
        threading.Timer(1.0, os.kill, (timer.worker.process.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerDied, match=r"^the reference engine's process was killed "
                                             r"by SIGKILL"):
            within(30, lambda: timer.time(1, 10**9))
        assert time.monotonic() - start < 10
    finally:
        timer.close()


def test_the_bench_reports_progress_per_check_and_per_batch() -> None:
    graph = cnnc.load(TINY)
    lines: list[str] = []
    run_bench(graph, {1: cnnc.compile(graph, threads=1)}, "llvm", [2], [1], ["reference"],
              rounds=3, round_seconds=0.01, progress=lines.append)
    assert len(lines) == 4
    assert re.fullmatch(r"threads 1: started cnnc-llvm, reference \(\d+\.\d s\)", lines[0])
    for line, engine in zip(lines[1:3], ("cnnc-llvm", "reference")):
        assert re.fullmatch(rf"threads 1, batch 2: {engine} agrees with the reference \(max "
                            r"abs error \S+\)", line)
    assert re.fullmatch(r"threads 1, batch 2: timed cnnc-llvm, reference over 3 rounds "
                        r"\(\d+\.\d s\)", lines[3])


def test_no_fuse_and_disable_pass_reach_cnnc_with_progress_on_a_terminal() -> None:
    status, stdout, stderr = cnnc_command(
        "bench", TINY, "--batch", "1", "--threads", "1", "--against", "reference",
        "--rounds", "3", "--no-fuse", "--disable-pass", "tile", "--disable-pass", "layout",
        tty=True)
    assert status == 0, stderr
    assert [line.split()[2] for line in stdout.splitlines()[2:]] == ["cnnc-llvm", "reference"]
    progress = stderr.splitlines()
    assert progress[0] == "bench: compiling conv1x1 for llvm on 1 threads"
    assert progress[-1].startswith("bench: threads 1, batch 1: timed cnnc-llvm, reference")
    assert len(progress) == 5
    status, stdout, stderr = cnnc_command(
        "bench", TINY, "--batch", "1", "--threads", "1", "--against", "reference",
        "--rounds", "3", "--quiet", tty=True)
    assert (status, stderr) == (0, "")


def test_torch_on_the_gpu_is_an_engine_that_says_when_it_cannot_run() -> None:
    torch = pytest.importorskip("torch", reason="needs PyTorch")
    from cnnc.tools.engines import EngineUnavailable, make_engine

    graph = cnnc.load(TINY)
    if torch.cuda.is_available():
        x = np.random.default_rng(0).random((2, *graph.input_shape), dtype=np.float32)
        np.testing.assert_allclose(make_engine("torch-cuda", graph, 1)(x),
                                   cnnc.reference(graph, x), rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(EngineUnavailable, match="PyTorch sees no CUDA device"):
            make_engine("torch-cuda", graph, 1)
