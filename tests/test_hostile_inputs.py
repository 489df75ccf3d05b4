"""Hostile and broken input at call time, on every target: wrong rank or sizes, batch 0,
non-contiguous, Fortran-ordered and unaligned arrays, other dtypes, NaN and ±Inf (propagated
exactly as the reference does), a batch too large for memory; and layer names that are free
text, which must never reach generated code unescaped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GOLDEN, TOLERANCE, as_list
from numpy.testing import assert_allclose, assert_array_equal

import cnnc
from cnnc.errors import BatchMemoryError, InputError

TARGETS = ["llvm", "cuda-sim"]


@pytest.fixture(scope="module", params=TARGETS)
def lenet(request: pytest.FixtureRequest) -> tuple[cnnc.Graph, Any]:
    graph = cnnc.load(GOLDEN / "lenet_relu_max.yaml")
    return graph, cnnc.compile(graph, target=request.param)


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("shape, what", [
    ((1, 28, 28), "(1, 28, 28)"),
    ((2, 1, 1, 28, 28), "(2, 1, 1, 28, 28)"),
    ((2, 3, 28, 28), "(2, 3, 28, 28)"),
    ((2, 1, 28, 27), "(2, 1, 28, 27)"),
    ((2, 1, 32, 32), "(2, 1, 32, 32)"),
    ((), "()"),
])
def test_a_wrong_rank_or_size_is_refused_naming_the_expected_shape(
        lenet: tuple[cnnc.Graph, Any], shape: tuple[int, ...], what: str) -> None:
    _, model = lenet
    with pytest.raises(InputError) as caught:
        model(np.zeros(shape, np.float32))
    assert str(caught.value) == ("model 'lenet_relu_max' expects input f32[N,1,28,28], got "
                                 f"shape {what}")


@pytest.mark.parametrize("bad", [None, "images", [[1.0, 2.0], [3.0]], np.zeros(3, complex),
                                 np.array([object()])], ids=["none", "string", "ragged",
                                                             "complex", "object"])
def test_what_is_not_a_float_array_is_refused(lenet: tuple[cnnc.Graph, Any], bad: Any) -> None:
    _, model = lenet
    with pytest.raises(InputError, match="expects a float array f32"):
        model(bad)


def test_batch_zero_gives_an_empty_result_of_the_right_shape(
        lenet: tuple[cnnc.Graph, Any]) -> None:
    graph, model = lenet
    result = model(np.zeros((0, 1, 28, 28), np.float32))
    assert result.shape == (0, 10) and result.dtype == np.float32
    assert cnnc.reference(graph, np.zeros((0, 1, 28, 28))).shape == (0, 10)


def presentations(x: np.ndarray) -> dict[str, np.ndarray]:
    """The same values as arrays a user might pass: views, other orders and dtypes."""
    wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), np.float32)
    wide[..., ::2] = x
    reversed_batch = np.ascontiguousarray(x[::-1])[::-1]
    raw = np.zeros(x.nbytes + 1, np.uint8)
    unaligned = np.ndarray(x.shape, np.float32, buffer=raw.data, offset=1)
    unaligned[...] = x
    readonly = x.copy()
    readonly.flags.writeable = False
    return {"strided": wide[..., ::2], "fortran": np.asfortranarray(x),
            "negative_strides": reversed_batch, "unaligned": unaligned, "readonly": readonly,
            "big_endian": x.astype(">f4"), "float64": x.astype(np.float64)}


def test_views_orders_and_byte_orders_give_the_bits_of_the_plain_array(
        lenet: tuple[cnnc.Graph, Any]) -> None:
    _, model = lenet
    x = images(5)
    plain = model(x)
    for name, array in presentations(x).items():
        assert array.dtype != np.float32 or not array.flags.c_contiguous or \
            name in ("unaligned", "readonly")
        assert_array_equal(model(array), plain, err_msg=name)
    assert_array_equal(x, images(5))  # the caller's array is never written


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int32, np.uint8, np.int64,
                                   np.bool_, np.longdouble])
def test_other_dtypes_are_converted_as_the_reference_converts_them(
        lenet: tuple[cnnc.Graph, Any], dtype: type) -> None:
    graph, model = lenet
    x = (images(3) * 4).astype(dtype)
    assert_allclose(model(x), cnnc.reference(graph, x), **TOLERANCE)


def test_values_beyond_float32_become_infinities_as_in_the_reference(
        lenet: tuple[cnnc.Graph, Any]) -> None:
    graph, model = lenet
    x = images(2).astype(np.float64)
    x[0, 0, 3, 4] = 1e300
    x[1, 0, 10, 10] = -1e300
    assert_array_equal(np.isnan(model(x)), np.isnan(cnnc.reference(graph, x)))


SPECIAL_CASES = ["lenet", "lenet_relu_max", "residual", "avgpool_pad", "maxpool_pad_stride",
                 "depthwise_dilated", "multi_in_out"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", SPECIAL_CASES)
def test_nan_and_infinities_propagate_exactly_as_in_the_reference(case: str,
                                                                  target: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    model = cnnc.compile(graph, target=target)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, *graph.input_shape)).astype(np.float32)
    x[0].flat[rng.integers(0, x[0].size, 3)] = np.nan
    x[1].flat[rng.integers(0, x[1].size, 3)] = np.inf
    x[2].flat[rng.integers(0, x[2].size, 3)] = -np.inf
    x[3, ...] = np.inf
    x[4, ...] = np.nan
    for got, want in zip(as_list(model(x)), as_list(cnnc.reference(graph, x))):
        assert_array_equal(np.isnan(got), np.isnan(want))
        assert_array_equal(np.isposinf(got), np.isposinf(want))
        assert_array_equal(np.isneginf(got), np.isneginf(want))
        finite = np.isfinite(want)
        assert_allclose(got[finite], want[finite], **TOLERANCE)


def test_a_batch_too_large_for_memory_is_refused_before_anything_is_allocated(
        lenet: tuple[cnnc.Graph, Any]) -> None:
    graph, model = lenet
    # A view of 10^10 images that takes no memory itself; converting it would take 29 TiB.
    huge = np.broadcast_to(np.zeros((1, 1, 28, 28), np.float32), (10**10, 1, 28, 28))
    for run in (model, lambda x: cnnc.reference(graph, x)):
        with pytest.raises(BatchMemoryError, match=r"a batch of 10000000000 images needs "
                                                   r"\d+\.\d GiB .* run it in smaller batches"):
            run(huge)
    assert issubclass(BatchMemoryError, MemoryError) and issubclass(BatchMemoryError,
                                                                    cnnc.CnncError)


# --- layer names are free text ---------------------------------------------------------------

HOSTILE_NAMES = [
    "a'b\"c", "x; system(\"rm -rf /\");", "*/ #error injected /*", "line\n#error injected",
    "ends with a backslash \\", "define i32 @main() {", "; ret void\nret void", "__global__",
    "float", "%0", "@cnnc_run_batch", "}\n}\n", "tab\there", "名前", "\u2028\u2029", "?" * 3,
]


def hostile_model(tmp_path: Path) -> Path:
    """A model whose every layer has one of HOSTILE_NAMES, and a hostile model name."""
    lines = ["name: \"model\\n#error injected */\"", "input: [2, 9, 9]", "layers:"]
    ops = ["conv2d: {out_channels: 4, kernel_size: 3, padding: 1, activation: relu}",
           "maxpool2d: {kernel_size: 2, ceil_mode: true}", "batchnorm2d",
           "conv2d: {out_channels: 4, kernel_size: 1, groups: 2}", "tanh", "avgpool2d: "
           "{kernel_size: 3, stride: 1, padding: 1}", "sigmoid", "relu"]
    names = HOSTILE_NAMES[: len(ops)]
    for op, name in zip(ops, names):
        lines.append(f"  - {op}" if ":" in op and "{" in op else f"  - {op}:")
        lines.append(f"    name: {json_string(name)}")
    lines.append(f"  - add: {{name: {json_string(HOSTILE_NAMES[8])}, "
                 f"inputs: [{json_string(names[-1])}, {json_string(names[-2])}]}}")
    lines.append("  - flatten: {name: " + json_string(HOSTILE_NAMES[9]) + "}")
    lines.append("  - dense: {units: 3, name: " + json_string(HOSTILE_NAMES[10]) + "}")
    lines.append(f"outputs: [{json_string(HOSTILE_NAMES[10])}, {json_string(names[2])}]")
    path = tmp_path / "hostile.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def json_string(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a YAML double-quoted string


@pytest.mark.parametrize("target", TARGETS)
def test_hostile_layer_names_stay_out_of_the_generated_code(tmp_path: Path,
                                                            target: str) -> None:
    graph = cnnc.load(hostile_model(tmp_path))
    assert set(HOSTILE_NAMES[:11]) <= set(graph.order())
    # "#error injected" on a line of its own, or a comment closed early, would stop the
    # compiler: compiling at all shows every name stayed inside its comment or string.
    model = cnnc.compile(graph, target=target, use_cache=False)
    source = model.source("ll" if target == "llvm" else "cuda")
    for line in source.splitlines():
        assert not line.lstrip().startswith("#error"), line
        assert "\u2028" not in line and "名前" not in line
    x = np.random.default_rng(4).standard_normal((3, 2, 9, 9)).astype(np.float32)
    for got, want in zip(as_list(model(x)), as_list(cnnc.reference(graph, x))):
        assert_allclose(got, want, **TOLERANCE)
