"""The same model and input give bitwise-identical outputs: across calls, thread counts, batch
sizes, fresh and cached compiles, and separate processes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import GOLDEN, as_list

import cnnc

CASES = ["lenet", "residual", "depthwise_dilated", "multi_in_out", "avgpool_pad"]
BATCH = 37  # several batch blocks and a partial one


def digest(outputs: np.ndarray | tuple[np.ndarray, ...]) -> str:
    return hashlib.sha256(b"".join(output.tobytes() for output in as_list(outputs))).hexdigest()


def inputs(graph: cnnc.Graph) -> np.ndarray:
    rng = np.random.default_rng(42)
    return rng.standard_normal((BATCH, *graph.input_shape)).astype(np.float32)


@pytest.mark.parametrize("case", CASES)
def test_every_thread_count_and_every_call_gives_the_same_bits(case: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    x = inputs(graph)
    digests = set()
    for threads in (1, 2, 3, 4, 7):
        model = cnnc.compile(graph, threads=threads)
        digests |= {digest(model(x)) for _ in range(3)}
    assert len(digests) == 1


@pytest.mark.parametrize("target", ["llvm", "cuda-sim"])
@pytest.mark.parametrize("case", CASES)
def test_an_image_gets_the_same_bits_whatever_batch_it_comes_in(case: str,
                                                                target: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target=target)
    x = inputs(graph)
    whole = as_list(model(x))
    for batch in (1, 2, 5, 16, 17):
        for part, full in zip(as_list(model(x[:batch])), whole):
            np.testing.assert_array_equal(part, full[:batch])


@pytest.mark.parametrize("target", ["llvm", "cuda-sim"])
def test_a_fresh_compile_and_a_cached_one_give_the_same_bits(target: str) -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    x = inputs(graph)
    fresh = cnnc.compile(graph, target=target, use_cache=False)
    cnnc.compile(graph, target=target)  # stores it, if not there yet
    cached = cnnc.compile(graph, target=target)
    assert digest(fresh(x)) == digest(cached(x))


PROCESS_SCRIPT = """
import hashlib, sys
import numpy as np
import cnnc

for path in sys.argv[1:]:
    graph = cnnc.load(path)
    x = np.random.default_rng(42).standard_normal((BATCH, *graph.input_shape))
    x = x.astype(np.float32)
    for target, threads in (("llvm", 1), ("llvm", 2), ("cuda-sim", None)):
        outputs = cnnc.compile(graph, target=target, threads=threads)(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        print(target, hashlib.sha256(b"".join(o.tobytes() for o in outputs)).hexdigest())
""".replace("BATCH", str(BATCH))


def test_separate_processes_give_the_same_bits_as_this_one() -> None:
    paths = [str(GOLDEN / f"{case}.yaml") for case in CASES[:3]]
    here = []
    for path in paths:
        graph = cnnc.load(path)
        x = inputs(graph)
        for target, threads in (("llvm", 1), ("llvm", 2), ("cuda-sim", None)):
            model = cnnc.compile(graph, target=target, threads=threads)
            here.append(f"{target} {digest(model(x))}")
    runs = [subprocess.run([sys.executable, "-c", PROCESS_SCRIPT, *paths], capture_output=True,
                           text=True, timeout=300, check=True, env=dict(os.environ))
            for _ in range(2)]
    for run in runs:
        assert run.stdout.splitlines() == here
