"""Shared helpers: where the golden cases and examples live, writing a model file, running one
op through the reference, running the real `cnnc` command, and the graphs and comparison the
training tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cnnc
from cnnc import ops

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = ROOT / "examples"
CASES = sorted(path.stem for path in GOLDEN.glob("*.yaml"))
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # float32 against the float64 reference
os.environ.setdefault("CNNC_VERIFY", "1")  # lowering verifies every kernel (and children)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory,
                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test session compiles into a cache of its own, never the user's."""
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def expected_outputs(case: str, graph: cnnc.Graph) -> list[np.ndarray]:
    """A golden case's expected outputs, in the order of the graph's outputs."""
    data = np.load(GOLDEN / f"{case}.io.npz")
    if len(graph.outputs) == 1:
        return [data["expected"]]
    return [data[f"expected_{name}"] for name in graph.outputs]


def as_list(outputs: np.ndarray | tuple[np.ndarray, ...]) -> list[np.ndarray]:
    return list(outputs) if isinstance(outputs, tuple) else [outputs]


@pytest.fixture
def model_file(tmp_path: Path) -> Callable[..., Path]:
    """Write YAML text into tmp_path (as model.yaml unless named) and return its path."""

    def write(text: str, name: str = "model.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


def one_op_graph(op: str, input_shape: tuple[int, ...], params: dict[str, Any] | None = None,
                 **attrs: Any) -> cnnc.Graph:
    """A graph of the single op `op` over the input, built in Python as a pass would."""
    graph = cnnc.Graph(op, input_shape)
    spec = ops.OPS[op]
    arrays = {key: np.asarray(value, np.float32) for key, value in (params or {}).items()}
    graph.add("y", op, ["input"], spec.check_attrs(attrs), arrays)
    graph.outputs = ["y"]
    return graph


@pytest.fixture
def run_op() -> Callable[..., np.ndarray]:
    """run_op(op, x, params=None, **attrs): the reference output of one op on array x."""

    def run(op: str, x: Any, params: dict[str, Any] | None = None, **attrs: Any) -> np.ndarray:
        x = np.asarray(x, np.float32)
        result = cnnc.reference(one_op_graph(op, x.shape[1:], params, **attrs), x)
        assert isinstance(result, np.ndarray)
        return result

    return run


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `cnnc` command in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "cnnc.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=120, check=False,
    )


# --- training tests ---------------------------------------------------------------------------

Layer = tuple[str, str, list[str], dict[str, Any]]  # (name, op, operands, attributes)

# A small LeNet for 8x8 digits: every window op, three activations, both anchors.
LENET_8X8: list[Layer] = [
    ("c1", "conv2d", ["input"], {"out_channels": 6, "kernel_size": 3, "padding": 1}),
    ("s1", "sigmoid", ["c1"], {}),
    ("p1", "avgpool2d", ["s1"], {"kernel_size": 2}),
    ("c2", "conv2d", ["p1"], {"out_channels": 8, "kernel_size": 3}),
    ("r2", "relu", ["c2"], {}),
    ("p2", "maxpool2d", ["r2"], {"kernel_size": 2, "ceil_mode": True}),
    ("f", "flatten", ["p2"], {}),
    ("d1", "dense", ["f"], {"units": 16}),
    ("t1", "tanh", ["d1"], {}),
    ("d2", "dense", ["t1"], {"units": 10}),
]


def build_graph(input_shape: tuple[int, ...], layers: list[Layer], seed: int = 0) -> cnnc.Graph:
    """A graph of `layers` with parameters drawn from `seed`; its last layer is the output."""
    rng = np.random.default_rng(seed)
    graph = cnnc.Graph("test", input_shape)
    for name, op, inputs, raw in layers:
        spec = ops.OPS[op]
        attrs = spec.check_attrs(raw)
        shapes = spec.param_shapes(attrs, [graph.shape(operand) for operand in inputs])
        params = {key: rng.normal(0, 0.5, shape).astype(np.float32)
                  for key, shape in shapes.items()}
        if "running_var" in params:
            params["running_var"] = rng.uniform(0.5, 2, shapes["running_var"]).astype(np.float32)
        graph.add(name, op, inputs, attrs, params)
    graph.outputs = [layers[-1][0]]
    return graph


def agree(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """got equals want at rtol=1e-4, atol=1e-5 (`cnnc.compare`), or the test fails."""
    from cnnc.compare import check_output

    check = check_output(name, got, want)
    assert check.ok, check.describe()
