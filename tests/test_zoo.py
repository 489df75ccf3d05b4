"""The model zoo (examples/zoo): every model, compiled for llvm (fused and unfused) and
cuda-sim, matches its PyTorch definition at batch 1 and 3, with PyTorch-initialised weights
made by examples/zoo/make_weights.py into a directory of this test session's own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import EXAMPLES, TOLERANCE, as_list
from numpy.testing import assert_allclose

import cnnc

pytest.importorskip("torch", reason="the zoo's definitions and weights come from PyTorch")
ZOO = EXAMPLES / "zoo"


def _load_make_weights() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo_make_weights", ZOO / "make_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_weights = _load_make_weights()
NAMES = list(make_weights.MODELS)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("zoo")
    for name in NAMES:
        make_weights.write(name, directory)
    return directory


def images(graph: cnnc.Graph, batch: int) -> np.ndarray:
    """Normal images at a different scale per image: the global-pooling nets' outputs hardly
    depend on uniform [0, 1) images, so those would not tell one image's result from another's."""
    rng = np.random.default_rng([13, batch])
    scale = rng.uniform(0.5, 2.0, batch).astype(np.float32)[:, None, None, None]
    return rng.standard_normal((batch, *graph.input_shape), np.float32) * scale


def test_every_zoo_yaml_has_a_pytorch_definition() -> None:
    assert sorted(path.stem for path in ZOO.glob("*.yaml")) == sorted(NAMES)
    assert len(NAMES) >= 7


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_pytorch(name: str, zoo_dir: Path) -> None:
    assert make_weights.check(name, zoo_dir, batch=1) < TOLERANCE["atol"]


@pytest.mark.parametrize(("target", "fuse"), [("llvm", True), ("llvm", False),
                                              ("cuda-sim", True)],
                         ids=["llvm-fused", "llvm-unfused", "cuda-sim"])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_zoo_model_matches_pytorch(name: str, target: str, fuse: bool,
                                            zoo_dir: Path) -> None:
    graph = cnnc.load(zoo_dir / f"{name}.yaml")
    model = cnnc.compile(graph, target=target, fuse=fuse)
    torch_model = make_weights.build(name)
    for batch in (1, 3):
        x = images(graph, batch)
        got = model(x)
        assert isinstance(got, np.ndarray) and got.shape == (batch, 10)
        assert_allclose(got, make_weights.forward(torch_model, x), **TOLERANCE)


@pytest.mark.parametrize("name", ["mobilenet", "nin"])
def test_feature_map_before_global_pooling_matches_pytorch(name: str, zoo_dir: Path) -> None:
    """Global average pooling hides a kernel that mixes up pixels; the map before it does not."""
    graph = cnnc.load(zoo_dir / f"{name}.yaml")
    pool = next(node for node in graph.order() if graph.op(node) == "global_avgpool2d")
    graph.outputs = [graph.operands(pool)[0], *graph.outputs]
    model = cnnc.compile(graph, target="llvm")
    torch_model = make_weights.build(name)
    x = images(graph, 3)
    features, logits = as_list(model(x))
    # A Sequential's layer names are its indices: the modules before the pooling make the map.
    assert_allclose(features, make_weights.forward(torch_model[:int(pool)], x), **TOLERANCE)
    assert_allclose(logits, make_weights.forward(torch_model, x), **TOLERANCE)
