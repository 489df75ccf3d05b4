"""Reads an ONNX model (a protobuf, through the `onnx` package) into cnnc's op graph.

It checks the file before it trusts it (truncated, not ONNX, external data, initializer
sizes, inputs, cycles), then maps every node through the table in `onnx_ops` and reports
every node it cannot map in one `ModelError`. It knows file formats only, never a backend.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from cnnc.errors import ModelError
from cnnc.graph import Graph

# The default-domain opsets whose semantics the table in onnx_ops follows.
MIN_OPSET = 6
MAX_IR_VERSION = 12
EXPORTER_GRAPH_NAMES = ("", "main_graph", "torch_jit", "torch-jit-export")


class UnsupportedNodes(ModelError):
    """Every node of an ONNX model that cnnc cannot compile; `nodes` holds one line each."""

    def __init__(self, nodes: list[str], file: str) -> None:
        self.nodes = nodes
        if len(nodes) == 1:
            message = nodes[0]
        else:
            listed = "\n".join(f"  {file}: {line}" for line in nodes)
            message = f"{len(nodes)} nodes cannot be compiled:\n{listed}"
        super().__init__(message, file=file)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ModelError("reading an ONNX model needs the onnx package "
                         "(pip install -e '.[onnx]')") from None
    return onnx


def looks_like_onnx(head: bytes) -> bool:
    """Whether a file's first bytes may be an ONNX ModelProto: field 1 (ir_version), a varint."""
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= MAX_IR_VERSION + 20


def load_onnx(path: str | Path, input_shape: tuple[int, ...] | None = None) -> Graph:
    """Read the ONNX model at `path` and return its checked op graph.

    A dynamic batch axis is the batch N; any other dynamic input dimension needs
    `input_shape` (the per-sample shape, e.g. (3, 32, 32))."""
    from cnnc.frontend.onnx_ops import Importer
    from cnnc.frontend.onnx_table import HANDLERS

    path = Path(path)
    file = str(path)
    onnx = _onnx()
    model = _read(onnx, path)
    _check_structure(onnx, model, path)
    shape, batch = _input_shape(onnx, model, file, input_shape)
    name = model.graph.name
    if name in EXPORTER_GRAPH_NAMES or not name.isprintable():
        name = path.stem.split(".")[0] or "model"
    graph = Graph(name, shape, source=file)
    opset = _opset(model, file)
    problems = Importer(graph, model, opset, batch, file, HANDLERS).run()
    if problems:
        raise UnsupportedNodes(problems, file)
    return graph


def _read(onnx: Any, path: Path) -> Any:
    from google.protobuf.message import DecodeError

    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelError(f"cannot read the model file: {error.strerror or error}",
                         file=file) from None
    if not data:
        raise ModelError("the file is empty; expected an ONNX model", file=file)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelError(f"not a readable ONNX model (truncated or corrupted?): {error}",
                         file=file) from None
    if model.ir_version < 3 or not model.HasField("graph") or not model.opset_import:
        raise ModelError("not an ONNX model: it has no IR version, graph or opset", file=file)
    _load_external_data(onnx, model, path)
    return model


def _load_external_data(onnx: Any, model: Any, path: Path) -> None:
    """Read each initializer kept in a side file, checking its place and size first, so that
    a bad reference is reported and never read past the file or the folder."""
    file, folder = str(path), path.resolve().parent
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or folder not in target.parents:
            raise ModelError(f"initializer '{tensor.name}' names external data '{location}' "
                             "outside the model's folder", file=file)
        if not target.is_file():
            raise ModelError(f"external data file '{location}' of initializer "
                             f"'{tensor.name}' does not exist", file=file)
        needed = _byte_size(onnx, tensor, file)
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", needed))
        except ValueError:
            raise ModelError(f"initializer '{tensor.name}' has a bad external data offset or "
                             "length", file=file) from None
        if length != needed or offset < 0:
            raise ModelError(f"initializer '{tensor.name}' takes {length} bytes of "
                             f"'{location}', but its shape needs {needed}", file=file)
        if offset + needed > target.stat().st_size:
            raise ModelError(f"external data file '{location}' is too short for initializer "
                             f"'{tensor.name}' ({needed} bytes at offset {offset})", file=file)
        with open(target, "rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(needed)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _byte_size(onnx: Any, tensor: Any, file: str) -> int:
    if any(dim < 0 for dim in tensor.dims):
        raise ModelError(f"initializer '{tensor.name}' has a negative dimension "
                         f"{list(tensor.dims)}", file=file)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise ModelError(f"initializer '{tensor.name}' has an unknown data type "
                         f"{tensor.data_type}", file=file) from None
    return math.prod(tensor.dims) * itemsize


def check_tensor_size(onnx: Any, tensor: Any, file: str) -> None:
    """Refuse a tensor whose data does not fill its shape (before numpy reshapes it)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return
    values = math.prod(tensor.dims)
    if tensor.raw_data:
        size = _byte_size(onnx, tensor, file)
        if len(tensor.raw_data) != size:
            raise ModelError(f"initializer '{tensor.name}' holds {len(tensor.raw_data)} bytes, "
                             f"but its shape {list(tensor.dims)} needs {size}", file=file)
        return
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    count = len(getattr(tensor, field))
    if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
        count //= 2
    if count != values:
        raise ModelError(f"initializer '{tensor.name}' holds {count} values, but its shape "
                         f"{list(tensor.dims)} needs {values}", file=file)


def _check_structure(onnx: Any, model: Any, path: Path) -> None:
    """One input, every tensor defined once, no cycle; then the `onnx` checker."""
    file, graph = str(path), model.graph
    for tensor in graph.initializer:
        check_tensor_size(onnx, tensor, file)
    constant = {tensor.name for tensor in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in constant]
    if len(inputs) != 1:
        named = ", ".join(f"'{name}'" for name in inputs) or "none"
        raise ModelError(f"the graph has {len(inputs)} inputs ({named}); cnnc compiles models "
                         "of one input tensor", file=file)
    producer: dict[str, int] = {name: -1 for name in (*constant, *inputs)}
    for index, node in enumerate(graph.node):
        for output in node.output:
            if output and output in producer:
                raise ModelError(f"tensor '{output}' is produced twice (by node "
                                 f"'{node.name or index}' and before)", file=file)
            if output:
                producer[output] = index
    depends = nx.DiGraph()
    depends.add_nodes_from(range(len(graph.node)))
    for index, node in enumerate(graph.node):
        for operand in node.input:
            if operand and operand not in producer:
                raise ModelError(f"node '{node.name or index}' ({node.op_type}) reads tensor "
                                 f"'{operand}', which no node, initializer or input produces",
                                 file=file)
            if operand and producer[operand] >= 0:
                depends.add_edge(producer[operand], index)
    try:
        cycle = nx.find_cycle(depends)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        names = [graph.node[edge[0]].name or str(edge[0]) for edge in cycle]
        loop = " -> ".join(f"'{name}'" for name in [*names, names[0]])
        raise ModelError(f"the graph has a cycle: {loop}", file=file)
    for output in graph.output:
        if output.name not in producer:
            raise ModelError(f"output '{output.name}' is not computed by any node", file=file)
    if list(nx.topological_sort(depends)) != list(range(len(graph.node))):
        order = list(nx.lexicographical_topological_sort(depends))
        nodes = [graph.node[index] for index in order]
        del graph.node[:]
        graph.node.extend(nodes)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
        # An op the checker does not know is reported with every other unsupported node.
        if not text.startswith(("No Op registered", "No opset import for domain")):
            raise ModelError(f"not a valid ONNX model: {text}", file=file) from None


def _opset(model: Any, file: str) -> int:
    versions = [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")]
    if not versions:
        raise ModelError("the model imports no opset of the default ONNX domain", file=file)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= versions[0] <= newest:
        raise ModelError(f"opset {versions[0]} is outside the opsets cnnc reads ({MIN_OPSET} "
                         f"to {newest}); convert it with onnx.version_converter", file=file)
    return int(versions[0])


def _input_shape(onnx: Any, model: Any, file: str,
                 given: tuple[int, ...] | None) -> tuple[tuple[int, ...], int | None]:
    """The per-sample input shape, and the batch size when the model fixes it."""
    constant = {tensor.name for tensor in model.graph.initializer}
    value = next(value for value in model.graph.input if value.name not in constant)
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ModelError(f"input '{value.name}' is a {kind or 'value of no type'}; cnnc "
                         "reads one float32 tensor", file=file)
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        try:
            dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, ValueError, TypeError):
            dtype = onnx.helper.tensor_dtype_to_string(tensor_type.elem_type).lower()
        raise ModelError(f"{dtype} tensor '{value.name}': cnnc computes float32; export with "
                         "model.float()", file=file)
    if not tensor_type.HasField("shape"):
        if given is None:
            raise ModelError(f"input '{value.name}' has no shape; give --input-shape C,H,W",
                             file=file)
        return tuple(given), None
    dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
    if len(dims) < 2:
        raise ModelError(f"input '{value.name}' has rank {len(dims)}; cnnc needs a batch axis "
                         "and at least one more", file=file)
    batch = dims[0]
    if given is not None:
        if len(given) != len(dims) - 1 or any(
                dim is not None and dim != want for dim, want in zip(dims[1:], given)):
            shown = ", ".join("?" if dim is None else str(dim) for dim in dims[1:])
            raise ModelError(f"--input-shape {','.join(map(str, given))} does not fit input "
                             f"'{value.name}' [N, {shown}]", file=file)
        return tuple(given), batch
    dynamic = [index for index, dim in enumerate(dims) if index and not dim]
    if dynamic:
        shown = ", ".join(_dim_text(dim) for dim in tensor_type.shape.dim[1:])
        raise ModelError(f"input '{value.name}' [N, {shown}] has dynamic dimensions besides the "
                         "batch; give --input-shape C,H,W (load(path, input_shape=...))",
                         file=file)
    return tuple(int(dim) for dim in dims[1:] if dim), batch


def _dim_text(dim: Any) -> str:
    if dim.HasField("dim_value"):
        return str(dim.dim_value)
    return dim.dim_param or "?"


def to_array(onnx: Any, tensor: Any, file: str) -> np.ndarray:
    """An initializer or constant's value, its size checked against its shape first."""
    check_tensor_size(onnx, tensor, file)
    return np.asarray(onnx.numpy_helper.to_array(tensor))
