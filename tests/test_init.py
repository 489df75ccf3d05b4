"""Xavier-uniform initialisation (D2L 6.6's `nn.init.xavier_uniform_` on every Conv2d and
Linear weight): each layer's bound and shape, fans equal to torch's, seeded determinism, the
samples' range and variance, and `apply_init` setting weights in place."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import cnnc
from cnnc import ops
from cnnc.errors import ModelError
from cnnc.init import apply_init, fans, xavier_uniform

torch = pytest.importorskip("torch")

LAYERS: list[tuple[str, str, list[str], dict[str, Any]]] = [
    ("c1", "conv2d", ["input"], {"out_channels": 6, "kernel_size": [3, 5], "groups": 2}),
    ("r1", "relu", ["c1"], {}),
    ("bn", "batchnorm2d", ["r1"], {}),
    ("f", "flatten", ["bn"], {}),
    ("d1", "dense", ["f"], {"units": 10}),
]
# c1: fan_in 4/2*3*5 = 30, fan_out 6*3*5 = 90; d1: fan_in 6*4*2 = 48, fan_out 10
BOUNDS = {"c1.weight": math.sqrt(6 / 120), "d1.weight": math.sqrt(6 / 58)}
SHAPES = {"c1.weight": (6, 2, 3, 5), "d1.weight": (10, 48)}


def build(layers: list[tuple[str, str, list[str], dict[str, Any]]] = LAYERS,
          input_shape: tuple[int, ...] = (4, 6, 6)) -> cnnc.Graph:
    graph = cnnc.Graph("init", input_shape)
    for name, op, inputs, raw in layers:
        spec = ops.OPS[op]
        attrs = spec.check_attrs(raw)
        shapes = spec.param_shapes(attrs, [graph.shape(operand) for operand in inputs])
        graph.add(name, op, inputs, attrs,
                  {key: np.full(shape, 0.25, np.float32) for key, shape in shapes.items()})
    graph.outputs = [layers[-1][0]]
    return graph


def test_every_conv_and_dense_weight_gets_its_bound_and_shape() -> None:
    weights = xavier_uniform(build(), seed=0)
    assert {key: weight.shape for key, weight in weights.items()} == SHAPES
    for key, weight in weights.items():
        assert weight.dtype == np.float32
        assert np.abs(weight).max() <= np.float32(BOUNDS[key])
        assert np.abs(weight).max() > 0.8 * BOUNDS[key]  # the bound is reached, not smaller


@pytest.mark.parametrize(("op", "shape"), [
    ("conv2d", (6, 2, 3, 5)), ("conv2d", (16, 6, 5, 5)), ("conv2d", (8, 1, 1, 1)),
    ("dense", (10, 48)), ("dense", (120, 400)),
])
def test_fans_equal_torchs(op: str, shape: tuple[int, ...]) -> None:
    expected = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert fans(op, shape) == expected


def test_the_same_seed_gives_the_same_weights() -> None:
    first, again, other = (xavier_uniform(build(), seed) for seed in (3, 3, 4))
    for key in SHAPES:
        np.testing.assert_array_equal(first[key], again[key])
        assert (first[key] != other[key]).all()


def test_samples_fill_the_uniform_range_with_its_variance() -> None:
    graph = build([("d", "dense", ["input"], {"units": 512})], (256,))
    (weight,) = xavier_uniform(graph, seed=1).values()
    bound = math.sqrt(6 / (256 + 512))
    # 131,072 samples: the extremes come within 0.1% of the bound, and the variance
    # (bound^2 / 3 for a uniform, torch's 2 / (fan_in + fan_out)) within 1%
    assert -bound <= weight.min() < -0.999 * bound and 0.999 * bound < weight.max() <= bound
    np.testing.assert_allclose(weight.var(), 2 / (256 + 512), rtol=0.01)
    np.testing.assert_allclose(weight.mean(), 0.0, atol=bound * 0.01)
    # and torch's own xavier_uniform_ spreads as much
    reference = torch.nn.init.xavier_uniform_(torch.empty(512, 256)).numpy()
    np.testing.assert_allclose(weight.var(), reference.var(), rtol=0.02)


def test_apply_init_sets_the_weights_in_place_and_keeps_the_rest() -> None:
    graph = build()
    apply_init(graph, "xavier_uniform", seed=5)
    expected = xavier_uniform(build(), seed=5)
    for key, weight in expected.items():
        layer, param = key.split(".")
        np.testing.assert_array_equal(graph.params(layer)[param], weight)
    for layer, param in (("c1", "bias"), ("d1", "bias"), ("bn", "weight"), ("bn", "bias")):
        np.testing.assert_array_equal(graph.params(layer)[param], 0.25)


def test_an_unknown_init_names_the_known_ones() -> None:
    with pytest.raises(ModelError) as error:
        apply_init(build(), "he_normal", seed=0)
    assert str(error.value) == "unknown init 'he_normal'; expected one of xavier_uniform"
    with pytest.raises(ValueError, match="^init seed must be an integer >= 0, got -1$"):
        xavier_uniform(build(), seed=-1)
