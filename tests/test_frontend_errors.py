"""What a bad model gets: one ModelError whose message names the file, the line, the layer and
what was expected. Each test writes a small model into tmp_path and reads the message back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import cnnc

ModelFile = Callable[..., Path]


def load_error(path: Path) -> cnnc.ModelError:
    with pytest.raises(cnnc.ModelError) as info:
        cnnc.load(path)
    return info.value


def where(path: Path, line: int, layer: str | None = None, op: str | None = None) -> str:
    """The start of a message: `FILE:LINE: layer 'NAME' (OP): `."""
    who = "" if layer is None else f" layer '{layer}'" + (f" ({op})" if op else "") + ":"
    return f"{path}:{line}:{who} "


# Each case: the model, then the line, layer and op the error names, and its reason.
LAYER_ERRORS = {
    "unknown op, with the nearest name": (
        "input: [1, 8, 8]\nlayers:\n  - conv2e: {out_channels: 2, kernel_size: 3}\n",
        3, "0", None, "unknown op 'conv2e'; did you mean 'conv2d'?",
    ),
    "unknown op of a named layer": (
        "input: [1, 8, 8]\nlayers:\n  - relu\n  - maxpol2d: {name: pool, kernel_size: 2}\n",
        4, "pool", None, "unknown op 'maxpol2d'; did you mean 'maxpool2d'?",
    ),
    "unknown bare op, with every valid name": (
        "input: [1, 8, 8]\nlayers:\n  - relu\n  - xyzzy\n",
        4, "1", None,
        "unknown op 'xyzzy'; expected one of conv2d, dense, maxpool2d, avgpool2d, "
        "global_avgpool2d, batchnorm2d, sigmoid, relu, tanh, softmax, flatten, add, concat, "
        "global_maxpool2d, leaky_relu, relu6, clip, hardsigmoid, hardswish, elu, gelu, silu, "
        "identity, dropout, channel_mul, channel_add, log_softmax, pad, linear",
    ),
    "unknown attribute, with the nearest name": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 2\n      kernel_sise: 3\n",
        5, "0", "conv2d", "unknown attribute 'kernel_sise'; did you mean 'kernel_size'?",
    ),
    "attribute on an op that takes none": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {alpha: 0.1}\n",
        3, "0", "relu", "unknown attribute 'alpha'; it takes no attributes",
    ),
    "missing attribute": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2}\n",
        3, "0", "conv2d", "missing attribute 'kernel_size' (an integer or [kh, kw])",
    ),
    "missing units of dense": (
        "input: [4, 1, 1]\nlayers:\n  - flatten\n  - dense: {bias: false}\n",
        4, "1", "dense", "missing attribute 'units' (the number of outputs)",
    ),
    "a word where an integer belongs": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: two\n      kernel_size: 3\n",
        4, "0", "conv2d", "'out_channels' must be an integer, got 'two'",
    ),
    "a boolean where an integer belongs": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: true, kernel_size: 3}\n",
        3, "0", "conv2d", "'out_channels' must be an integer, got True",
    ),
    "a fraction where an integer belongs": (
        "input: [1, 8, 8]\nlayers:\n  - maxpool2d:\n      kernel_size: 2.5\n",
        4, "0", "maxpool2d", "'kernel_size' must be an integer or [h, w], got 2.5",
    ),
    "three numbers for a pair": (
        "input: [1, 8, 8]\nlayers:\n  - maxpool2d:\n      kernel_size: [1, 2, 3]\n",
        4, "0", "maxpool2d", "'kernel_size' must be an integer or [h, w], got [1, 2, 3]",
    ),
    "a number where a boolean belongs": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 1\n"
        "      bias: 1\n",
        6, "0", "conv2d", "'bias' must be true or false, got 1",
    ),
    "zero channels": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 0\n      kernel_size: 3\n",
        4, "0", "conv2d", "'out_channels' must be >= 1, got 0",
    ),
    "negative stride": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      stride: -1\n",
        6, "0", "conv2d", "'stride' must be >= 1, got -1",
    ),
    "zero dilation": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      dilation: [1, 0]\n",
        6, "0", "conv2d", "'dilation' must be >= 1, got 0",
    ),
    "zero groups": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 1, kernel_size: 3, groups: 0}\n",
        3, "0", "conv2d", "'groups' must be >= 1, got 0",
    ),
    "zero units": (
        "input: [1, 2, 2]\nlayers:\n  - flatten\n  - dense: {units: 0}\n",
        4, "1", "dense", "'units' must be >= 1, got 0",
    ),
    "negative eps": (
        "input: [1, 8, 8]\nlayers:\n  - batchnorm2d:\n      eps: -0.1\n",
        4, "0", "batchnorm2d", "'eps' must be > 0, got -0.1",
    ),
    "negative padding": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      padding: -1\n",
        6, "0", "conv2d", "'padding' must be >= 0, got -1",
    ),
    "inputs naming a layer that does not exist": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: stem}\n"
        "  - add:\n      inputs: [stem, stme2]\n",
        5, "1", "add", "'inputs' names 'stme2', which is not a layer; did you mean 'stem'?",
    ),
    "inputs that are not names": (
        "input: [1, 8, 8]\nlayers:\n  - relu:\n      inputs: {a: 1}\n",
        4, "0", "relu", "'inputs' must be a list of layer names",
    ),
    "inputs forming a cycle": (
        "input: [1, 8, 8]\nlayers:\n  - add: {name: a, inputs: [input, b]}\n"
        "  - add: {name: b, inputs: [a, input]}\n",
        3, "a", "add", "'inputs' form a cycle: a -> b -> a",
    ),
    "a layer reading itself": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: loop, inputs: [loop]}\n",
        3, "loop", "relu", "'inputs' form a cycle: loop -> loop",
    ),
    "a name used twice": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: a}\n  - tanh: {name: a}\n",
        4, "a", "tanh", "the name 'a' is already used by layer 0 (line 3)",
    ),
    "a number name that clashes with a position": (
        "input: [1, 8, 8]\nlayers:\n  - relu\n  - tanh: {name: 0}\n",
        4, "0", "tanh", "the name '0' is already used by layer 0 (line 3)",
    ),
    "the reserved name input": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: input}\n",
        3, "input", "relu", "the name 'input' is reserved for the model input",
    ),
    "add of different shapes": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3}\n"
        "  - add: {inputs: [0, input]}\n",
        4, "1", "add", "operands must have one shape, got [2, 6, 6] and [1, 8, 8]",
    ),
    "add of one operand": (
        "input: [1, 8, 8]\nlayers:\n  - relu\n  - add\n",
        4, "1", "add", "takes 2 or more inputs, got 1",
    ),
    "relu of two operands": (
        "input: [1, 8, 8]\nlayers:\n  - tanh\n  - relu: {inputs: [0, input]}\n",
        4, "1", "relu", "takes 1 input, got 2",
    ),
    "concat of different sizes": (
        "input: [1, 8, 8]\nlayers:\n  - maxpool2d: {kernel_size: 2}\n"
        "  - concat: {inputs: [0, input]}\n",
        4, "1", "concat",
        "operands must agree in every dimension but channels, got [1, 4, 4] and [1, 8, 8]",
    ),
    "dense after a 4-D tensor without flatten": (
        "input: [1, 8, 8]\nlayers:\n  - relu\n  - dense: {units: 10}\n",
        4, "1", "dense", "expects a flat input [features], got [1, 8, 8]; add a 'flatten' layer",
    ),
    "pooling after flatten": (
        "input: [1, 8, 8]\nlayers:\n  - flatten\n  - global_avgpool2d\n",
        4, "1", "global_avgpool2d", "expects an image input [C, H, W], got [64]",
    ),
    "a kernel larger than the padded input": (
        "input: [1, 4, 4]\nlayers:\n  - conv2d: {out_channels: 1, kernel_size: 7, padding: 1}\n",
        3, "0", "conv2d", "kernel 7x7 (dilation 1x1) is larger than the padded input 6x6",
    ),
    "a dilated kernel larger than the input": (
        "input: [1, 4, 4]\nlayers:\n  - conv2d: {out_channels: 1, kernel_size: 3, dilation: 2}\n",
        3, "0", "conv2d", "kernel 3x3 (dilation 2x2) is larger than the padded input 4x4",
    ),
    "a pooling window larger than the input": (
        "input: [1, 2, 8]\nlayers:\n  - avgpool2d: {kernel_size: 3}\n",
        3, "0", "avgpool2d", "kernel 3x3 is larger than the padded input 2x8",
    ),
    "input channels not divisible by groups": (
        "input: [3, 8, 8]\nlayers:\n  - conv2d: {out_channels: 4, kernel_size: 3, groups: 2}\n",
        3, "0", "conv2d", "input channels (3) are not divisible by groups (2)",
    ),
    "output channels not divisible by groups": (
        "input: [4, 8, 8]\nlayers:\n  - conv2d: {out_channels: 6, kernel_size: 3, groups: 4}\n",
        3, "0", "conv2d", "out_channels (6) is not divisible by groups (4)",
    ),
    "pool padding more than half the kernel": (
        "input: [1, 8, 8]\nlayers:\n  - maxpool2d: {kernel_size: 2, padding: [0, 2]}\n",
        3, "0", "maxpool2d",
        "padding 0,0 x 2,2 is more than half the kernel 2x2 (as in PyTorch, each side may pad "
        "at most kernel_size // 2)",
    ),
    "an activation that does not exist": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      activation: gelu\n",
        6, "0", "conv2d",
        "'activation' must be one of sigmoid, relu, tanh, relu6, hardswish, silu, got 'gelu'",
    ),
    "an activation on pooling": (
        "input: [1, 8, 8]\nlayers:\n  - maxpool2d:\n      kernel_size: 2\n      activation: relu\n",
        5, "0", "maxpool2d", "'activation' is allowed on conv2d and dense only",
    ),
    "an output too large": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2000000, kernel_size: 1}\n",
        3, "0", "conv2d",
        "its output of 128000000 values per sample is too large (at most 67108864)",
    ),
    "an attribute too large": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 100000000, kernel_size: 1}\n",
        3, "0", "conv2d", "'out_channels' is too large (100000000); at most 16777216",
    ),
}


@pytest.mark.parametrize("case", list(LAYER_ERRORS))
def test_layer_error(model_file: ModelFile, case: str) -> None:
    text, line, layer, op, reason = LAYER_ERRORS[case]
    path = model_file(text)
    error = load_error(path)
    assert str(error) == where(path, line, layer, op) + reason
    assert (error.line, error.layer, error.reason) == (line, layer, reason)


# Errors in the file or its top level, which belong to no layer.
FILE_ERRORS = {
    "padding with three numbers": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      padding: [1, 2, 3]\n",
        6, "'padding' must be an integer, [ph, pw], [[top, bottom], [left, right]] or \"same\", "
        "got [1, 2, 3]",
    ),
    "padding that mixes forms": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      padding: [[1, 2], 3]\n",
        6, "'padding' must be an integer, [ph, pw], [[top, bottom], [left, right]] or \"same\", "
        "got [[1, 2], 3]",
    ),
    "padding with three sides": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      padding: [[1, 2, 3], [0, 0]]\n",
        6, "'padding' must be an integer, [ph, pw], [[top, bottom], [left, right]] or \"same\", "
        "got [[1, 2, 3], [0, 0]]",
    ),
    "padding as a fraction": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      kernel_size: 3\n"
        "      padding: 0.5\n",
        6, "'padding' must be an integer, [ph, pw], [[top, bottom], [left, right]] or \"same\", "
        "got 0.5",
    ),
}


@pytest.mark.parametrize("case", list(FILE_ERRORS))
def test_padding_forms(model_file: ModelFile, case: str) -> None:
    text, line, reason = FILE_ERRORS[case]
    path = model_file(text)
    assert str(load_error(path)) == where(path, line, "0", "conv2d") + reason


TOP_LEVEL_ERRORS = {
    "a misspelt top-level key": (
        "input: [1, 8, 8]\nlayer:\n  - relu\n", 2, "unknown key 'layer'; did you mean 'layers'?",
    ),
    "a misspelt weights key": (
        "input: [1, 8, 8]\nlayers:\n  - relu\nwieghts: w.npz\n",
        4, "unknown key 'wieghts'; did you mean 'weights'?",
    ),
    "no input": ("layers:\n  - relu\n", 1, "missing 'input'"),
    "no layers": ("name: m\ninput: [1, 8, 8]\n", 1, "missing 'layers'"),
    "an empty list of layers": (
        "input: [1, 8, 8]\nlayers: []\n", 2, "'layers' must be a non-empty list of layers",
    ),
    "a list instead of a mapping": ("- relu\n- tanh\n", 1, "a model must be a mapping"),
    "an input of two dimensions": (
        "input: [8, 8]\nlayers:\n  - relu\n",
        1, "'input' must be [channels, height, width], got [8, 8]",
    ),
    "an input dimension of zero": (
        "input: [0, 8, 8]\nlayers:\n  - relu\n",
        1, "'input' dimensions must be between 1 and 65536, got [0, 8, 8]",
    ),
    "a huge input": (
        "input: [1, 100000, 100000]\nlayers:\n  - relu\n",
        1, "'input' dimensions must be between 1 and 65536, got [1, 100000, 100000]",
    ),
    "an empty name": ("name: ''\ninput: [1, 8, 8]\nlayers:\n  - relu\n", 1,
                      "'name' must be a non-empty string"),
    "a negative seed": (
        "input: [1, 8, 8]\nseed: -1\nlayers:\n  - relu\n",
        2, "'seed' must be a non-negative integer, got -1",
    ),
    "outputs naming a missing layer": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: r}\noutputs: [q]\n",
        4, "'outputs' names 'q', which is not a layer; expected one of r",
    ),
    "outputs naming the input": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: r}\noutputs: [r, input]\n",
        4, "'outputs' names 'input', which is not a layer; expected one of r",
    ),
    "outputs naming a layer twice": (
        "input: [1, 8, 8]\nlayers:\n  - relu: {name: r}\noutputs: [r, r]\n",
        4, "'outputs' names 'r' twice",
    ),
    "a layer of two ops": (
        "input: [1, 8, 8]\nlayers:\n  - relu:\n    tanh:\n",
        3, "layer 0 must name exactly one op, got relu, tanh",
    ),
    "a layer that is a list": (
        "input: [1, 8, 8]\nlayers:\n  - [relu]\n",
        3, "layer 0 must be an op name or a mapping 'op: {attributes}'",
    ),
    "an attribute given twice": (
        "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 1\n      out_channels: 2\n",
        5, "the attributes of layer 0 has the key 'out_channels' twice",
    ),
    "weights that are not a path": (
        "input: [1, 8, 8]\nweights: [1, 2]\nlayers:\n  - relu\n",
        2, "'weights' must be the path of a .npz file",
    ),
}


@pytest.mark.parametrize("case", list(TOP_LEVEL_ERRORS))
def test_top_level_error(model_file: ModelFile, case: str) -> None:
    text, line, reason = TOP_LEVEL_ERRORS[case]
    path = model_file(text)
    error = load_error(path)
    assert str(error) == f"{path}:{line}: {reason}"
    assert error.layer is None


# --- files that are not YAML at all ----------------------------------------------------------


def test_truncated_yaml(model_file: ModelFile) -> None:
    path = model_file("input: [1, 8, 8\nlayers:\n  - relu\n")
    message = str(load_error(path))
    assert message == f"{path}:2: not valid YAML: expected ',' or ']', but got ':'"


def test_yaml_with_a_tab(model_file: ModelFile) -> None:
    path = model_file("input: [1, 8, 8]\nlayers:\n\t- relu\n")
    message = str(load_error(path))
    assert message == f"{path}:3: not valid YAML: found character '\\t' that cannot start any token"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(model_file: ModelFile, text: str) -> None:
    path = model_file(text)
    assert str(load_error(path)) == f"{path}: the file is empty; a model needs 'input' and 'layers'"


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(b"\xff\xfe\x00 binary")
    message = str(load_error(path))
    assert message.startswith(f"{path}: cannot read the model file: 'utf-8' codec can't decode")


def test_missing_model_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    message = str(load_error(path))
    assert message.startswith(f"{path}: cannot read the model file: [Errno 2]")


# --- weights ---------------------------------------------------------------------------------

CONV_WITH_WEIGHTS = """\
input: [1, 8, 8]
weights: w.npz
layers:
  - relu
  - conv2d: {name: c, out_channels: 2, kernel_size: 3}
"""
GOOD_WEIGHTS = {"c.weight": np.ones((2, 1, 3, 3), np.float32), "c.bias": np.zeros(2, np.float32)}


def weights_error(model_file: ModelFile, tmp_path: Path, **changes: np.ndarray | None) -> str:
    """The message for CONV_WITH_WEIGHTS with GOOD_WEIGHTS changed (None removes a key)."""
    arrays = {**GOOD_WEIGHTS, **changes}
    np.savez(tmp_path / "w.npz", **{key: value for key, value in arrays.items()
                                    if value is not None})
    return str(load_error(model_file(CONV_WITH_WEIGHTS)))


def test_good_weights_load(model_file: ModelFile, tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", **GOOD_WEIGHTS)
    graph = cnnc.load(model_file(CONV_WITH_WEIGHTS))
    assert graph.params("c")["weight"].shape == (2, 1, 3, 3)


def test_weights_file_missing(model_file: ModelFile, tmp_path: Path) -> None:
    path = model_file(CONV_WITH_WEIGHTS)
    message = str(load_error(path))
    assert message == f"{path}:2: weights file '{tmp_path / 'w.npz'}' does not exist"


def test_weights_path_is_a_directory(model_file: ModelFile, tmp_path: Path) -> None:
    (tmp_path / "w.npz").mkdir()
    path = model_file(CONV_WITH_WEIGHTS)
    assert str(load_error(path)) == (
        f"{path}:2: weights file '{tmp_path / 'w.npz'}' is a directory, expected a .npz archive")


@pytest.mark.parametrize("kind", ["text", "npy"])
def test_weights_file_is_not_an_archive(model_file: ModelFile, tmp_path: Path, kind: str) -> None:
    if kind == "text":
        (tmp_path / "w.npz").write_text("c.weight: 1\n")
    else:
        with open(tmp_path / "w.npz", "wb") as file:
            np.save(file, GOOD_WEIGHTS["c.weight"])
    path = model_file(CONV_WITH_WEIGHTS)
    assert str(load_error(path)) == (
        f"{path}:2: weights file '{tmp_path / 'w.npz'}' is not a .npz archive "
        "(a zip of named arrays)")


def test_weights_holding_a_pickled_object_array(model_file: ModelFile, tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", **{"c.weight": np.array([{"code": 1}, None], dtype=object)})
    path = model_file(CONV_WITH_WEIGHTS)
    message = str(load_error(path))
    assert message.startswith(f"{path}:2: weights file '{tmp_path / 'w.npz'}' cannot be read "
                              "safely: Object arrays cannot be loaded when allow_pickle=False")


def test_weights_lack_a_parameter(model_file: ModelFile, tmp_path: Path) -> None:
    message = weights_error(model_file, tmp_path, **{"c.bias": None})
    assert message == (f"{tmp_path / 'model.yaml'}:5: layer 'c' (conv2d): "
                       "weights file 'w.npz' lacks 'c.bias' (float32 [2])")


def test_weights_of_the_wrong_shape(model_file: ModelFile, tmp_path: Path) -> None:
    message = weights_error(model_file, tmp_path, **{"c.weight": np.ones((2, 1, 3, 2), np.float32)})
    assert message == (f"{tmp_path / 'model.yaml'}:5: layer 'c' (conv2d): "
                       "'c.weight' in 'w.npz' has shape [2, 1, 3, 2], expected [2, 1, 3, 3]")


def test_weights_of_the_wrong_dtype(model_file: ModelFile, tmp_path: Path) -> None:
    message = weights_error(model_file, tmp_path, **{"c.bias": np.zeros(2, np.float64)})
    assert message == (f"{tmp_path / 'model.yaml'}:5: layer 'c' (conv2d): "
                       "'c.bias' in 'w.npz' has dtype float64, expected float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weights_not_finite(model_file: ModelFile, tmp_path: Path, bad: float) -> None:
    weight = np.ones((2, 1, 3, 3), np.float32)
    weight[1, 0, 2, 2] = bad
    message = weights_error(model_file, tmp_path, **{"c.weight": weight})
    assert message == (f"{tmp_path / 'model.yaml'}:5: layer 'c' (conv2d): "
                       "'c.weight' in 'w.npz' holds NaN or infinite values")


def test_weights_with_a_key_no_layer_uses(model_file: ModelFile, tmp_path: Path) -> None:
    message = weights_error(model_file, tmp_path, **{"0.weight": np.ones(1, np.float32)})
    assert message == (f"{tmp_path / 'model.yaml'}:2: "
                       "weights file 'w.npz' has keys that no layer uses: '0.weight'")


def test_model_error_is_a_value_error(model_file: ModelFile) -> None:
    # Callers that catch ValueError still catch a bad model.
    with pytest.raises(ValueError):
        cnnc.load(model_file("input: [1, 8, 8]\nlayers: [nope]\n"))
