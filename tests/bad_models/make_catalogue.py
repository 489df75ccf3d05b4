"""Writes the catalogue of malformed models and weights files in this folder, and
manifest.json: for each model file, the text its ModelError must contain, the line it must
name and the layer (null where none applies). tests/test_bad_models.py checks every entry.

Run it again after changing an entry: `python tests/bad_models/make_catalogue.py`. The files
it writes are committed, so that each one can also be tried by hand: `cnnc graph FILE`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONV = "  - conv2d: {out_channels: 2, kernel_size: 3}\n"  # weight [2, 1, 3, 3], bias [2]


@dataclass
class Entry:
    """One malformed file: the model text (bytes for a file that is not UTF-8), what its
    error must say, where, and the weights file it needs, if any."""

    name: str
    text: str | bytes
    message: str
    line: int | None
    layer: str | None = None
    weights: Callable[[Path], None] | None = None


def good_weights() -> dict[str, np.ndarray]:
    return {"0.weight": np.ones((2, 1, 3, 3), np.float32), "0.bias": np.zeros(2, np.float32)}


def savez(path: Path, **changes: np.ndarray | None) -> None:
    arrays = {**good_weights(), **changes}
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})


def weights_model(file: str) -> str:
    return f"input: [1, 6, 6]\nweights: {file}\nlayers:\n{CONV}"


def npz_bytes(**changes: np.ndarray | None) -> bytes:
    buffer = io.BytesIO()
    arrays = {**good_weights(), **changes}
    np.savez(buffer, **{key: value for key, value in arrays.items() if value is not None})
    return buffer.getvalue()


def npy_member(header: dict[str, object], data: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


class RunsCode:
    """What a malicious weights file would hold: unpickling it runs a shell command."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("echo this must never run",)


def write_pickled(path: Path) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([RunsCode()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("0.weight.npy", buffer.getvalue())
        archive.writestr("0.bias.npy", npz_member(np.zeros(2, np.float32)))


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_huge_header(path: Path) -> None:
    # A header that claims 2^40 floats (4 TiB) over 16 bytes of data.
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("0.weight.npy", npy_member(
            {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)}, b"\0" * 16))
        archive.writestr("0.bias.npy", npz_member(np.zeros(2, np.float32)))


def write_garbage_member(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("0.weight.npy", b"this is not a .npy array")
        archive.writestr("0.bias.npy", npz_member(np.zeros(2, np.float32)))


def write_truncated_data(path: Path) -> None:
    # The header is right, the data stops half-way.
    member = npz_member(np.ones((2, 1, 3, 3), np.float32))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("0.weight.npy", member[: len(member) - 36])
        archive.writestr("0.bias.npy", npz_member(np.zeros(2, np.float32)))


def write_bad_crc(path: Path) -> None:
    data = bytearray(npz_bytes())
    marker = data.index(b"\x00\x00\x80\x3f")  # the first 1.0f of 0.weight, stored as is
    data[marker + 3] ^= 0x01
    path.write_bytes(bytes(data))


def write_directory(path: Path) -> None:
    path.mkdir()
    (path / "README").write_text("a directory named like a weights file\n")


def alias_bomb() -> str:
    level = "&x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"
    for depth in range(1, 9):
        level = f"&x{depth} [{level}, " + ", ".join([f"*x{depth - 1}"] * 9) + "]"
    return level


ENTRIES = [
    # --- the file -------------------------------------------------------------------------
    Entry("truncated.yaml", "input: [1, 28, 28]\nlayers:\n  - conv2d: {out_channels: 6, kern",
          "not valid YAML", 3),
    Entry("unclosed_bracket.yaml", "input: [1, 28, 28\nlayers:\n  - relu\n",
          "not valid YAML", 2),
    Entry("tab_indent.yaml", "input: [1, 8, 8]\nlayers:\n\t- relu\n", "not valid YAML", 3),
    Entry("empty.yaml", "", "the file is empty; a model needs 'input' and 'layers'", None),
    Entry("comments_only.yaml", "# a model\n# nothing here\n", "the file is empty", None),
    Entry("not_utf8.yaml", b"input: [1, 8, 8]\nname: \xff\xfe\nlayers: [relu]\n",
          "cannot read the model file", None),
    Entry("top_level_list.yaml", "- input: [1, 8, 8]\n- layers: [relu]\n",
          "a model must be a mapping", 1),
    Entry("top_level_string.yaml", "just some text\n", "a model must be a mapping", 1),
    Entry("duplicate_key.yaml", "input: [1, 8, 8]\ninput: [1, 9, 9]\nlayers: [relu]\n",
          "has the key 'input' twice", 2),
    Entry("python_object_tag.yaml",
          "input: !!python/object/apply:os.system [echo this must never run]\nlayers: [relu]\n",
          "not a valid YAML value: could not determine a constructor", 1),
    Entry("bad_int_tag.yaml", "input: [1, 8, 8]\nseed: !!int twelve\nlayers: [relu]\n",
          "not a valid YAML value", 2),
    Entry("bad_date.yaml", "input: [1, 8, 8]\nname: 2001-13-45\nlayers: [relu]\n",
          "not a valid YAML value", 2),
    Entry("alias_bomb.yaml", f"input: {alias_bomb()}\nlayers: [relu]\n",
          "a value of more than 10000 items (through YAML aliases)", 1),
    # --- the top level --------------------------------------------------------------------
    Entry("unknown_top_key.yaml", "input: [1, 8, 8]\nlayer:\n  - relu\n",
          "unknown key 'layer'; did you mean 'layers'?", 2),
    Entry("missing_input.yaml", "layers: [relu]\n", "missing 'input'", 1),
    Entry("missing_layers.yaml", "input: [1, 8, 8]\n", "missing 'layers'", 1),
    Entry("input_string.yaml", "input: 28x28\nlayers: [relu]\n",
          "'input' must be [channels, height, width], got '28x28'", 1),
    Entry("input_two_dims.yaml", "input: [28, 28]\nlayers: [relu]\n",
          "'input' must be [channels, height, width], got [28, 28]", 1),
    Entry("input_float.yaml", "input: [1, 2.5, 8]\nlayers: [relu]\n",
          "'input' must be [channels, height, width]", 1),
    Entry("input_zero.yaml", "input: [0, 8, 8]\nlayers: [relu]\n",
          "'input' dimensions must be between 1 and 65536, got [0, 8, 8]", 1),
    Entry("input_negative.yaml", "input: [1, -8, 8]\nlayers: [relu]\n",
          "'input' dimensions must be between 1 and 65536", 1),
    Entry("input_dimension_too_large.yaml", "input: [1, 100000, 8]\nlayers: [relu]\n",
          "'input' dimensions must be between 1 and 65536", 1),
    Entry("input_overflows_32_bits.yaml",
          "input: [65536, 65536, 65536]\nlayers:\n  - global_avgpool2d\n",
          "has 281474976710656 values per sample, too many (at most 67108864)", 1),
    Entry("layers_empty.yaml", "input: [1, 8, 8]\nlayers: []\n",
          "'layers' must be a non-empty list of layers", 2),
    Entry("layers_mapping.yaml", "input: [1, 8, 8]\nlayers: {relu: null}\n",
          "'layers' must be a non-empty list of layers", 2),
    Entry("name_empty.yaml", "name: ''\ninput: [1, 8, 8]\nlayers: [relu]\n",
          "'name' must be a non-empty string", 1),
    Entry("seed_negative.yaml", "input: [1, 8, 8]\nseed: -1\nlayers: [relu]\n",
          "'seed' must be a non-negative integer, got -1", 2),
    Entry("weights_not_a_path.yaml", "input: [1, 8, 8]\nweights: [1, 2]\nlayers: [relu]\n",
          "'weights' must be the path of a .npz file", 2),
    Entry("outputs_empty.yaml", "input: [1, 8, 8]\nlayers: [relu]\noutputs: []\n",
          "'outputs' must be a non-empty list of layer names", 3),
    Entry("outputs_unknown.yaml", "input: [1, 8, 8]\nlayers: [relu]\noutputs: [q]\n",
          "'outputs' names 'q', which is not a layer", 3),
    Entry("outputs_input.yaml", "input: [1, 8, 8]\nlayers: [relu]\noutputs: [input]\n",
          "'outputs' names 'input', which is not a layer", 3),
    Entry("outputs_twice.yaml", "input: [1, 8, 8]\nlayers: [relu]\noutputs: [0, '0']\n",
          "'outputs' names '0' twice", 3),
    # --- a layer's form -------------------------------------------------------------------
    Entry("layer_number.yaml", "input: [1, 8, 8]\nlayers:\n  - 5\n",
          "layer 0: 5 is not an op name", 3),
    Entry("layer_list.yaml", "input: [1, 8, 8]\nlayers:\n  - [relu]\n",
          "layer 0 must be an op name or a mapping", 3),
    Entry("two_ops.yaml", "input: [1, 8, 8]\nlayers:\n  - {relu: null, tanh: null}\n",
          "layer 0 must name exactly one op, got relu, tanh", 3),
    Entry("unknown_op.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2e: {out_channels: 2, kernel_size: 3}\n",
          "unknown op 'conv2e'; did you mean 'conv2d'?", 3, "0"),
    Entry("attributes_not_mapping.yaml", "input: [1, 8, 8]\nlayers:\n  - conv2d: [2, 3]\n",
          "the attributes of layer 0 must be a mapping", 3),
    Entry("unknown_attribute.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d:\n      out_channels: 2\n      kernel_sise: 3\n",
          "unknown attribute 'kernel_sise'; did you mean 'kernel_size'?", 5, "0"),
    Entry("missing_attribute.yaml", "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2}\n",
          "missing attribute 'kernel_size'", 3, "0"),
    Entry("activation_on_pool.yaml",
          "input: [1, 8, 8]\nlayers:\n  - maxpool2d: {kernel_size: 2, activation: relu}\n",
          "'activation' is allowed on conv2d and dense only", 3, "0"),
    Entry("activation_unknown.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3, "
          "activation: gelu}\n",
          "'activation' must be one of sigmoid, relu, tanh, relu6, hardswish, silu, "
          "got 'gelu'", 3, "0"),
    Entry("relu_two_inputs.yaml",
          "input: [1, 8, 8]\nlayers:\n  - relu\n  - tanh: {inputs: [0, input]}\n",
          "takes 1 input, got 2", 4, "1"),
    Entry("add_one_input.yaml", "input: [1, 8, 8]\nlayers:\n  - relu\n  - add\n",
          "takes 2 or more inputs, got 1", 4, "1"),
    # --- attributes -----------------------------------------------------------------------
    Entry("out_channels_word.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: two, kernel_size: 3}\n",
          "'out_channels' must be an integer, got 'two'", 3, "0"),
    Entry("stride_fraction.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3, "
          "stride: 1.5}\n",
          "'stride' must be an integer or [h, w], got 1.5", 3, "0"),
    Entry("kernel_true.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: true}\n",
          "'kernel_size' must be an integer or [h, w], got True", 3, "0"),
    Entry("out_channels_zero.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 0, kernel_size: 3}\n",
          "'out_channels' must be >= 1, got 0", 3, "0"),
    Entry("kernel_zero.yaml",
          "input: [1, 8, 8]\nlayers:\n  - maxpool2d: {kernel_size: 0}\n",
          "'kernel_size' must be >= 1, got 0", 3, "0"),
    Entry("stride_negative.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3, "
          "stride: -1}\n",
          "'stride' must be >= 1, got -1", 3, "0"),
    Entry("padding_negative.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3, "
          "padding: [[1, -1], [0, 0]]}\n",
          "'padding' must be >= 0, got -1", 3, "0"),
    Entry("out_channels_huge.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 100000000, kernel_size: 3}\n",
          "'out_channels' is too large (100000000); at most 16777216", 3, "0"),
    Entry("kernel_three_numbers.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: [1, 2, 3]}\n",
          "'kernel_size' must be an integer or [h, w], got [1, 2, 3]", 3, "0"),
    Entry("padding_bad_form.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3, "
          "padding: [[1, 2, 3], [1, 1]]}\n",
          "'padding' must be an integer, [ph, pw], [[top, bottom], [left, right]] "
          "or \"same\"", 3, "0"),
    Entry("bias_one.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3, bias: 1}\n",
          "'bias' must be true or false, got 1", 3, "0"),
    Entry("eps_zero.yaml", "input: [1, 8, 8]\nlayers:\n  - batchnorm2d: {eps: 0}\n",
          "'eps' must be > 0, got 0", 3, "0"),
    Entry("eps_nan.yaml", "input: [1, 8, 8]\nlayers:\n  - batchnorm2d: {eps: .nan}\n",
          "'eps' must be a number, got nan", 3, "0"),
    # --- the graph ------------------------------------------------------------------------
    Entry("name_input.yaml", "input: [1, 8, 8]\nlayers:\n  - relu: {name: input}\n",
          "the name 'input' is reserved for the model input", 3, "input"),
    Entry("duplicate_name.yaml",
          "input: [1, 8, 8]\nlayers:\n  - relu: {name: a}\n  - tanh: {name: a}\n",
          "the name 'a' is already used by layer 0 (line 3)", 4, "a"),
    Entry("name_of_an_activation.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {name: c, out_channels: 1, kernel_size: 1, "
          "activation: relu}\n  - sigmoid: {name: c.relu, inputs: input}\n"
          "  - add: {inputs: [c, c.relu]}\n",
          "the name 'c.relu' is already used by the relu of layer 'c' (line 3)", 4, "c.relu"),
    Entry("inputs_unknown.yaml",
          "input: [1, 8, 8]\nlayers:\n  - relu: {name: stem}\n  - tanh: {inputs: stme}\n",
          "'inputs' names 'stme', which is not a layer; did you mean 'stem'?", 4, "1"),
    Entry("cycle.yaml",
          "input: [1, 8, 8]\nlayers:\n  - relu: {name: a, inputs: b}\n"
          "  - tanh: {name: b, inputs: a}\n",
          "'inputs' form a cycle: a -> b -> a", 3, "a"),
    Entry("self_cycle.yaml", "input: [1, 8, 8]\nlayers:\n  - relu: {name: a, inputs: a}\n",
          "'inputs' form a cycle: a -> a", 3, "a"),
    # --- shapes ---------------------------------------------------------------------------
    Entry("kernel_larger_than_input.yaml",
          "input: [1, 6, 6]\nlayers:\n  - conv2d: {out_channels: 1, kernel_size: 7}\n",
          "kernel 7x7 (dilation 1x1) is larger than the padded input 6x6", 3, "0"),
    Entry("dilated_kernel_larger_than_input.yaml",
          "input: [1, 6, 6]\nlayers:\n  - conv2d: {out_channels: 1, kernel_size: 3, "
          "dilation: 3}\n",
          "kernel 3x3 (dilation 3x3) is larger than the padded input 6x6", 3, "0"),
    Entry("pool_window_larger_than_input.yaml",
          "input: [1, 3, 3]\nlayers:\n  - avgpool2d: {kernel_size: 4}\n",
          "kernel 4x4 is larger than the padded input 3x3", 3, "0"),
    Entry("groups_not_dividing.yaml",
          "input: [3, 8, 8]\nlayers:\n  - conv2d: {out_channels: 4, kernel_size: 1, groups: 2}\n",
          "input channels (3) are not divisible by groups (2)", 3, "0"),
    Entry("pool_padding_too_big.yaml",
          "input: [1, 8, 8]\nlayers:\n  - maxpool2d: {kernel_size: 2, padding: 2}\n",
          "is more than half the kernel 2x2", 3, "0"),
    Entry("add_shapes.yaml",
          "input: [1, 8, 8]\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3}\n"
          "  - add: {inputs: [0, input]}\n",
          "operands must have one shape, got [2, 6, 6] and [1, 8, 8]", 4, "1"),
    Entry("concat_shapes.yaml",
          "input: [1, 8, 8]\nlayers:\n  - maxpool2d: {kernel_size: 2}\n"
          "  - concat: {inputs: [0, input]}\n",
          "operands must agree in every dimension but channels", 4, "1"),
    Entry("dense_on_image.yaml", "input: [1, 8, 8]\nlayers:\n  - dense: {units: 10}\n",
          "expects a flat input [features], got [1, 8, 8]; add a 'flatten' layer", 3, "0"),
    Entry("image_op_after_flatten.yaml",
          "input: [1, 8, 8]\nlayers:\n  - flatten\n  - maxpool2d: {kernel_size: 2}\n",
          "expects an image input [C, H, W], got [64]", 4, "1"),
    Entry("output_too_large.yaml",
          "input: [1, 4096, 4096]\nlayers:\n  - conv2d: {out_channels: 8, kernel_size: 1}\n",
          "its output of 134217728 values per sample is too large (at most 67108864)", 3, "0"),
    # --- weights --------------------------------------------------------------------------
    Entry("weights_missing.yaml", weights_model("no_such_file.npz"), "does not exist", 2),
    Entry("weights_directory.yaml", weights_model("directory.weights.npz"),
          "is a directory, expected a .npz archive", 2,
          weights=lambda folder: write_directory(folder / "directory.weights.npz")),
    Entry("weights_text.yaml", weights_model("text.weights.npz"),
          "is not a .npz archive (a zip of named arrays)", 2,
          weights=lambda folder: (folder / "text.weights.npz").write_text("0.weight: 1\n")),
    Entry("weights_single_array.yaml", weights_model("single.weights.npz"),
          "is not a .npz archive (a zip of named arrays)", 2,
          weights=lambda folder: (folder / "single.weights.npz").write_bytes(
              npz_member(np.ones((2, 1, 3, 3), np.float32)))),
    Entry("weights_truncated_archive.yaml", weights_model("truncated.weights.npz"),
          "is not a .npz archive", 2,
          weights=lambda folder: (folder / "truncated.weights.npz").write_bytes(
              npz_bytes()[:200])),
    Entry("weights_truncated_data.yaml", weights_model("truncated_data.weights.npz"),
          "is not a readable .npz archive", 2,
          weights=lambda folder: write_truncated_data(folder / "truncated_data.weights.npz")),
    Entry("weights_bad_crc.yaml", weights_model("bad_crc.weights.npz"),
          "is not a readable .npz archive: Bad CRC-32", 2,
          weights=lambda folder: write_bad_crc(folder / "bad_crc.weights.npz")),
    Entry("weights_pickled_object.yaml", weights_model("pickled.weights.npz"),
          "cannot be read safely", 2,
          weights=lambda folder: write_pickled(folder / "pickled.weights.npz")),
    Entry("weights_huge_header.yaml", weights_model("huge_header.weights.npz"),
          "'0.weight' in 'huge_header.weights.npz' has shape [1099511627776], expected "
          "[2, 1, 3, 3]", 4, "0",
          weights=lambda folder: write_huge_header(folder / "huge_header.weights.npz")),
    Entry("weights_garbage_member.yaml", weights_model("garbage.weights.npz"),
          "member '0.weight.npy' is not a .npy array", 2,
          weights=lambda folder: write_garbage_member(folder / "garbage.weights.npz")),
    Entry("weights_lacking.yaml", weights_model("lacking.weights.npz"),
          "lacks '0.bias' (float32 [2])", 4, "0",
          weights=lambda folder: savez(folder / "lacking.weights.npz", **{"0.bias": None})),
    Entry("weights_float64.yaml", weights_model("float64.weights.npz"),
          "'0.bias' in 'float64.weights.npz' has dtype float64, expected float32", 4, "0",
          weights=lambda folder: savez(folder / "float64.weights.npz",
                                       **{"0.bias": np.zeros(2)})),
    Entry("weights_int.yaml", weights_model("int.weights.npz"),
          "'0.weight' in 'int.weights.npz' has dtype int32, expected float32", 4, "0",
          weights=lambda folder: savez(folder / "int.weights.npz",
                                       **{"0.weight": np.ones((2, 1, 3, 3), np.int32)})),
    Entry("weights_wrong_shape.yaml", weights_model("shape.weights.npz"),
          "'0.weight' in 'shape.weights.npz' has shape [2, 1, 3, 2], expected [2, 1, 3, 3]", 4,
          "0", weights=lambda folder: savez(folder / "shape.weights.npz",
                                            **{"0.weight": np.ones((2, 1, 3, 2), np.float32)})),
    Entry("weights_nan.yaml", weights_model("nan.weights.npz"),
          "'0.weight' in 'nan.weights.npz' holds NaN or infinite values", 4, "0",
          weights=lambda folder: savez(folder / "nan.weights.npz", **{"0.weight": np.full(
              (2, 1, 3, 3), np.nan, np.float32)})),
    Entry("weights_infinite.yaml", weights_model("inf.weights.npz"),
          "'0.bias' in 'inf.weights.npz' holds NaN or infinite values", 4, "0",
          weights=lambda folder: savez(folder / "inf.weights.npz",
                                       **{"0.bias": np.array([1, -np.inf], np.float32)})),
    Entry("weights_unused_key.yaml", weights_model("unused.weights.npz"),
          "has keys that no layer uses: '1.weight'", 2,
          weights=lambda folder: savez(folder / "unused.weights.npz",
                                       **{"1.weight": np.ones(3, np.float32)})),
]


def onnx_model(nodes: list[object] | None = None, inputs: list[object] | None = None,
               initializers: list[object] | None = None, opset: int = 17) -> bytes:
    """A small ONNX model: by default input 'x' [N, 1, 6, 6] through a Relu."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])
    graph = helper.make_graph(nodes or [helper.make_node("Relu", ["x"], ["y"], "relu")],
                              "bad", inputs or [x], [y], initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8)
    return bytes(model.SerializeToString())


def onnx_entries() -> list[Entry]:
    """The malformed ONNX models (they need the onnx package to be written)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def tensor(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> object:
        return numpy_helper.from_array(np.ones(shape, dtype), name)

    def value(name: str, dims: list[object], kind: int = TensorProto.FLOAT) -> object:
        return helper.make_tensor_value_info(name, kind, dims)

    conv = helper.make_node("Conv", ["x", "w"], ["y"], "conv", kernel_shape=[3, 3])
    good = onnx_model([conv], initializers=[tensor("w", (2, 1, 3, 3))])
    external = tensor("w", (2, 1, 3, 3))
    onnx.external_data_helper.set_external_data(external, "missing.bin")
    external.ClearField("raw_data")
    short = tensor("w", (2, 1, 3, 3))
    onnx.external_data_helper.set_external_data(short, "short.bin")
    short.ClearField("raw_data")
    wrong_size = tensor("w", (2, 1, 3, 3))
    wrong_size.raw_data = wrong_size.raw_data[:20]
    cycle = [helper.make_node("Relu", ["x", "b"], ["a"], "first"),
             helper.make_node("Relu", ["a"], ["b"], "second"),
             helper.make_node("Relu", ["b"], ["y"], "last")]
    corrupted = bytearray(good)
    corrupted[10:30] = b"\xff" * 20
    transpose = helper.make_node("ConvTranspose", ["x", "w"], ["y"], "Conv_12")
    return [
        Entry("onnx_empty.onnx", b"", "the file is empty; expected an ONNX model", None),
        Entry("onnx_truncated.onnx", good[:len(good) // 2], "not a readable ONNX model", None),
        Entry("onnx_corrupted.onnx", bytes(corrupted), "not a readable ONNX model", None),
        Entry("onnx_text.onnx", b"input: [1, 8, 8]\nlayers: [relu]\n",
              "not a readable ONNX model", None),
        Entry("onnx_no_graph.onnx", b"\x08\x07\x12\x07pytorch", "not an ONNX model", None),
        Entry("onnx_missing_external_data.onnx",
              onnx_model([conv], initializers=[external]),
              "external data file 'missing.bin' of initializer 'w' does not exist", None),
        Entry("onnx_short_external_data.onnx", onnx_model([conv], initializers=[short]),
              "external data file 'short.bin' is too short for initializer 'w'", None,
              weights=lambda folder: (folder / "short.bin").write_bytes(b"\0" * 16)),
        Entry("onnx_initializer_wrong_size.onnx",
              onnx_model([conv], initializers=[wrong_size]),
              "initializer 'w' holds 20 bytes, but its shape [2, 1, 3, 3] needs 72", None),
        Entry("onnx_two_inputs.onnx",
              onnx_model([helper.make_node("Add", ["x", "z"], ["y"], "add")],
                         [value("x", ["N", 1, 6, 6]), value("z", ["N", 1, 6, 6])]),
              "the graph has 2 inputs ('x', 'z'); cnnc compiles models of one input tensor",
              None),
        Entry("onnx_cycle.onnx", onnx_model(cycle),
              "the graph has a cycle: 'first' -> 'second' -> 'first'", None),
        Entry("onnx_float64_input.onnx",
              onnx_model(inputs=[value("x", ["N", 1, 6, 6], TensorProto.DOUBLE)]),
              "float64 tensor 'x': cnnc computes float32; export with model.float()", None),
        Entry("onnx_float64_weight.onnx",
              onnx_model([conv], initializers=[tensor("w", (2, 1, 3, 3), np.float64)]),
              "float64 tensor 'w': cnnc computes float32; export with model.float()", None),
        Entry("onnx_dynamic_height.onnx", onnx_model(inputs=[value("x", ["N", 1, "H", 6])]),
              "has dynamic dimensions besides the batch; give --input-shape C,H,W", None),
        Entry("onnx_old_opset.onnx", onnx_model(opset=5),
              "opset 5 is outside the opsets cnnc reads", None),
        Entry("onnx_conv_transpose.onnx",
              onnx_model([transpose], initializers=[tensor("w", (1, 2, 3, 3))]),
              "node 'Conv_12' (ConvTranspose): not supported; cnnc supports", None),
        Entry("onnx_resize_linear.onnx",
              onnx_model([helper.make_node("Resize", ["x", "", "s"], ["y"], "/layer1/Resize",
                                           mode="linear")], initializers=[tensor("s", (4,))]),
              "node '/layer1/Resize' (Resize, mode=linear): not supported; cnnc supports",
              None),
        Entry("onnx_maxpool_dilations.onnx",
              onnx_model([helper.make_node("MaxPool", ["x"], ["y"], "pool",
                                           kernel_shape=[2, 2], dilations=[2, 2])]),
              "node 'pool' (MaxPool): not supported: MaxPool with dilations [2, 2]", None),
    ]


def write(entries: list[Entry], manifest: dict[str, dict[str, object]]) -> None:
    for entry in entries:
        path = HERE / entry.name
        if isinstance(entry.text, bytes):
            path.write_bytes(entry.text)
        else:
            path.write_text(entry.text, encoding="utf-8")
        if entry.weights is not None:
            entry.weights(HERE)
        manifest[entry.name] = {"message": entry.message, "line": entry.line,
                                "layer": entry.layer}


def main() -> None:
    """Rewrite the whole catalogue; with the argument `onnx`, the ONNX entries only."""
    if sys.argv[1:] == ["onnx"]:
        manifest = json.loads((HERE / "manifest.json").read_text())
        entries = onnx_entries()
        write(entries, manifest)
        (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {len(entries)} malformed ONNX models in {HERE}")
        return
    for path in HERE.iterdir():
        if path.name in ("make_catalogue.py", "__pycache__"):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    manifest: dict[str, dict[str, object]] = {}
    entries = ENTRIES + onnx_entries()
    write(entries, manifest)
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(entries)} malformed models and their weights files in {HERE}")


if __name__ == "__main__":
    main()
