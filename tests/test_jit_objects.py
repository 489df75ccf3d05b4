"""A JIT model is compiled as one object per variant (`jit.compile_objects`), built while
LLVM compiles the one before, and linked by MCJIT; the compile cache keeps the objects as
one entry."""

from __future__ import annotations

import numpy as np
from conftest import EXAMPLES

import cnnc
from cnnc.backends.llvm import jit
from cnnc.backends.llvm.model import _joined, _split


def test_each_variant_is_an_object_and_they_link() -> None:
    model = cnnc.compile(EXAMPLES / "lenet.yaml", threads=2, use_cache=False)
    objects = jit.compile_objects("lenet", model._jit_variants, model._param_offsets)
    assert len(objects) == len(model._jit_variants) == 2
    rng = np.random.default_rng(0)
    one = cnnc.compile(EXAMPLES / "lenet.yaml", threads=1)
    for batch in (1, 3, 37):  # the channel variant, then the batch variant
        x = rng.normal(0, 1, (batch, 1, 28, 28)).astype(np.float32)
        np.testing.assert_array_equal(model(x), one(x))


def test_the_cache_keeps_the_objects_as_one_entry() -> None:
    parts = [b"first object", b"x" * 1000]
    assert _split(_joined(parts)) == parts
    assert _split(b"an object of the old form") is None  # then the model compiles again
    assert _split(_joined([parts[0]])[:-1]) is None
    first = cnnc.compile(EXAMPLES / "lenet.yaml", threads=1)
    again = cnnc.compile(EXAMPLES / "lenet.yaml", threads=1)
    assert again.cache_hit
    x = np.random.default_rng(1).normal(0, 1, (2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(again(x), first(x))
