"""Model files in, op graphs out: `cnnc.frontend.load(path)` picks the reader by the file.

An ONNX model (the suffix `.onnx`, or a binary file that opens like an ONNX protobuf) goes to
`onnx_model`; anything else is read as cnnc's YAML format by `yaml_model`. Another binary file
is named as such rather than failing on a decode error.
"""

from __future__ import annotations

from pathlib import Path

from cnnc.errors import ModelError
from cnnc.frontend import yaml_model
from cnnc.graph import Graph


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(4096)
    except OSError:
        return b""  # the reader reports the file it cannot read


def _looks_binary(head: bytes) -> bool:
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start < len(head) - 4  # not merely a character cut at the end
    return False


def _is_onnx(path: Path, head: bytes) -> bool:
    if path.suffix.lower() == ".onnx":
        return True
    if not _looks_binary(head):
        return False  # a text file: no need to import the ONNX reader to say so
    from cnnc.frontend.onnx_model import looks_like_onnx

    return looks_like_onnx(head)


def is_onnx(path: str | Path) -> bool:
    """Whether `path` is read as an ONNX model: by its suffix, or by its first bytes."""
    path = Path(path)
    return _is_onnx(path, _head(path) if path.is_file() else b"")


def load(path: str | Path, input_shape: tuple[int, ...] | None = None) -> Graph:
    """Read the model at `path` and return its checked op graph.

    `input_shape` (the per-sample shape, e.g. (3, 32, 32)) fixes the dynamic dimensions of an
    ONNX model's input; a YAML model gives its own."""
    path = Path(path)
    head = _head(path) if path.is_file() else b""
    if _is_onnx(path, head):
        from cnnc.frontend.onnx_model import load_onnx

        return load_onnx(path, input_shape)
    is_yaml = path.suffix.lower() in (".yaml", ".yml")  # its reader names a bad character
    if not is_yaml and _looks_binary(head):
        raise ModelError("not a text file; a model is an ONNX file or a YAML file in cnnc's "
                         "model format (docs/model-format.md)", file=str(path))
    graph = yaml_model.load(path)
    if input_shape is not None and tuple(input_shape) != graph.input_shape:
        raise ModelError(f"--input-shape {','.join(map(str, input_shape))} differs from the "
                         f"model's input {list(graph.input_shape)}; a YAML model gives its "
                         "input shape itself", file=str(path))
    return graph


__all__ = ["is_onnx", "load"]
