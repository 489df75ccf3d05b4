"""The state of one ONNX import: the values of the tensors, and how nodes read them.

A handler (one per ONNX op type, in `onnx_table.HANDLERS`) reads its node through the
`Importer` and returns the values of its outputs: a `Tensor` (computed by a graph node from
the model input), a constant (a NumPy array, folded at import time) or `Dims` (a shape vector
whose batch entry is symbolic, as `Shape` gives).
It raises `Unsupported` with the reason when cnnc cannot compute the node.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.errors import ModelError
from cnnc.frontend.onnx_model import to_array
from cnnc.frontend.yaml_model import MAX_VALUES
from cnnc.graph import INPUT, Graph

Shape = tuple[int, ...]
Pads = tuple[tuple[int, int], tuple[int, int]]
MAX_FOLDED = 1 << 24  # values of one constant computed at import time


class Unsupported(Exception):
    """cnnc cannot compute this node; `reason` says why, `unknown` when no entry maps it."""

    def __init__(self, reason: str = "", unknown: bool = False) -> None:
        self.reason, self.unknown = reason, unknown
        super().__init__(reason)


class _Poisoned(Exception):
    """An input comes from a node already reported: this node is not judged on its own."""


@dataclass(frozen=True)
class Tensor:
    """A value computed from the input: graph node `node`, per-sample `shape`; `pad` is the
    zero padding of a `Pad` not applied yet (a following Conv takes it into its padding)."""

    node: str
    shape: Shape
    pad: Pads | None = None
    pad_node: str = ""


@dataclass(frozen=True)
class Dims:
    """A 1-D shape vector (or a scalar, `scalar`) whose None entries are the batch N."""

    items: tuple[int | None, ...]
    scalar: bool = False


@dataclass(frozen=True)
class Absent:
    """An output cnnc does not compute (a MaxPool's indices, a Dropout's mask)."""

    reason: str


class _Poison:
    pass


POISON = _Poison()
Value = Tensor | Dims | Absent | np.ndarray | _Poison
Handler = Callable[["Importer", Any, str], list[Value]]


class Importer:
    """Maps the nodes of one ONNX graph, in order, onto `graph`."""

    def __init__(self, graph: Graph, model: Any, opset: int, batch: int | None,
                 file: str, handlers: dict[str, Handler]) -> None:
        import onnx

        self.handlers = handlers
        self.onnx, self.graph, self.model, self.opset = onnx, graph, model, opset
        self.batch, self.file = batch, file
        self.values: dict[str, Value] = {}
        self.source: dict[int, str] = {}  # id of an initializer's array -> its name
        for tensor in model.graph.initializer:
            array = to_array(onnx, tensor, file)
            self.values[tensor.name] = array
            self.source[id(array)] = tensor.name
        for value in model.graph.input:
            if value.name not in self.values:
                self.values[value.name] = Tensor(INPUT, graph.input_shape)
        self.uses = Counter(name for node in model.graph.node for name in node.input)
        self.uses.update(output.name for output in model.graph.output)
        self.taken = {INPUT}

    def run(self) -> list[str]:
        """Map every node; return one line per node cnnc cannot compute (none: success)."""
        problems: list[str] = []
        for index, node in enumerate(self.model.graph.node):
            label = node.name or f"{node.op_type}_{index}"
            outputs: list[Value]
            try:
                outputs = self._convert(node, label)
            except _Poisoned:
                outputs = []
            except Unsupported as error:
                problems.append(_describe(node, label, error, self.handlers))
                outputs = []
            except ModelError as error:
                problems.append(f"node '{label}' ({node.op_type}): {error.reason}")
                outputs = []
            except (ValueError, TypeError, KeyError, IndexError, ArithmeticError,
                    RuntimeError) as error:
                problems.append(f"node '{label}' ({node.op_type}): cannot be read: {error}")
                outputs = []
            for position, name in enumerate(node.output):
                if not name:
                    continue
                if position < len(outputs):
                    self.values[name] = outputs[position]
                elif outputs:
                    self.values[name] = Absent(f"output {position} of node '{label}' "
                                               f"({node.op_type}), which cnnc does not compute")
                else:
                    self.values[name] = POISON
        self._outputs(problems)
        return problems

    def _outputs(self, problems: list[str]) -> None:
        for output in self.model.graph.output:
            value = self.values.get(output.name, POISON)
            if isinstance(value, _Poison):
                continue
            if isinstance(value, Absent):
                problems.append(f"output '{output.name}' is {value.reason}")
            elif not isinstance(value, Tensor) or value.pad is not None:
                problems.append(f"output '{output.name}' does not depend on the input (a "
                                "constant); cnnc compiles what the input computes")
            elif value.node == INPUT:
                problems.append(f"output '{output.name}' is the input itself; cnnc compiles "
                                "at least one op")
            elif value.node in self.graph.outputs:
                problems.append(f"output '{output.name}' is the same tensor as another output")
            else:
                self.graph.outputs.append(value.node)

    def _convert(self, node: Any, label: str) -> list[Value]:
        if node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"ops of domain '{node.domain}' are not ONNX's own", unknown=True)
        handler = self.handlers.get(node.op_type)
        if handler is None:  # named even below a node already reported
            raise Unsupported(unknown=True)
        inputs = [self.values.get(name, POISON) if name else None for name in node.input]
        if node.op_type in FOLDABLE and all(
                value is None or isinstance(value, np.ndarray) for value in inputs):
            return self.fold(node, [value for value in inputs])
        # A handler checks its attributes before it reads an input that may be poisoned.
        return handler(self, node, label)

    def fold(self, node: Any, inputs: list[Any]) -> list[Value]:
        """Compute a node of constants now, with the `onnx` package's reference evaluator."""
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return [to_array(self.onnx, attribute.t, self.file)]
        present = [value for value in inputs if value is not None]
        if node.op_type in ELEMENTWISE_FOLD and present:
            size = math.prod(np.broadcast_shapes(*(value.shape for value in present)))
        elif node.op_type == "ConstantOfShape":
            size = math.prod(int(dim) for dim in present[0].reshape(-1))
        else:
            size = 0
        if size > MAX_FOLDED:
            raise Unsupported(f"it would compute a constant of {size} values at import time")
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(node, opsets={"": self.opset})
        feeds = {name: value for name, value in zip(node.input, inputs) if name}
        return [np.asarray(value) for value in evaluator.run(None, feeds)]

    # --- reading a node ----------------------------------------------------------------------

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        for attribute in node.attribute:
            if attribute.name == name:
                value = self.onnx.helper.get_attribute_value(attribute)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def value(self, node: Any, index: int) -> Value | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        value = self.values[node.input[index]]
        if isinstance(value, _Poison):
            raise _Poisoned()
        return value

    def tensor(self, node: Any, index: int, allow_pad: bool = False) -> Tensor:
        value = self.value(node, index)
        if isinstance(value, Absent):
            raise Unsupported(f"it reads {value.reason}")
        if not isinstance(value, Tensor):
            raise Unsupported(f"input '{node.input[index]}' is a constant where cnnc expects "
                              "a tensor computed from the model input")
        if value.pad is not None and not allow_pad:
            # not a Conv that takes the padding in: the Pad becomes a node, once for all
            padded = self.add(value.pad_node, "pad", [Tensor(value.node, value.shape)],
                              {"pads": [list(side) for side in value.pad]})
            self.values[node.input[index]] = padded
            return padded
        return value

    def const(self, node: Any, index: int) -> np.ndarray | None:
        value = self.value(node, index)
        if value is None:
            return None
        if not isinstance(value, np.ndarray):
            raise Unsupported(f"input '{node.input[index]}' must be a constant (an initializer)")
        return value

    def weight(self, node: Any, index: int) -> tuple[np.ndarray | None, str | None]:
        """A float32 parameter input, and the initializer it is, for naming the layer."""
        array = self.const(node, index)
        if array is None:
            return None, None
        name = node.input[index]
        if array.dtype != np.float32:
            raise Unsupported(f"{array.dtype} tensor '{name}': cnnc computes float32; export "
                              "with model.float()")
        if not np.isfinite(array).all():
            raise Unsupported(f"tensor '{name}' holds NaN or infinite values")
        return array, self.source.get(id(array))

    # --- building the graph ------------------------------------------------------------------

    def add(self, label: str, op: str, operands: list[Tensor], attrs: dict[str, Any],
            params: dict[str, tuple[np.ndarray | None, str | None]] | None = None,
            suffix: str = "") -> Tensor:
        """Add a graph node for ONNX node `label`; its parameters are checked against the
        op's shapes. Errors of attributes or shapes say why the node is not supported."""
        spec = ops.OPS[op]
        try:
            checked = spec.check_attrs(attrs)
            shapes = [operand.shape for operand in operands]
            expected = spec.infer(checked, shapes) and spec.param_shapes(checked, shapes)
        except (ops.AttrError, ops.ShapeError) as error:
            raise Unsupported(str(error)) from None
        arrays = {key: value for key, value in (params or {}).items() if value[0] is not None}
        for key, shape in expected.items():
            array = arrays[key][0]
            assert array is not None
            if array.shape != shape:
                raise Unsupported(f"its {key} has shape {list(array.shape)}, expected "
                                  f"{list(shape)}")
        name = self._name(label, [source for _, source in arrays.values()], suffix)
        shape = self.graph.add(name, op, [operand.node for operand in operands], checked,
                               {key: np.ascontiguousarray(value, np.float32)
                                for key, (value, _) in arrays.items()})
        if math.prod(shape) > MAX_VALUES:
            raise Unsupported(f"its output of {math.prod(shape)} values per sample is too "
                              f"large (at most {MAX_VALUES})")
        return Tensor(name, shape)

    def _name(self, label: str, sources: list[str | None], suffix: str) -> str:
        """The layer's name: the prefix its initializers share (`conv1` of `conv1.weight`, as
        in a PyTorch state_dict), else the module path in the node's name, else the name."""
        candidates = []
        prefixes = {source.rsplit(".", 1)[0] for source in sources if source and "." in source}
        if sources and len(prefixes) == 1 and all(sources):
            candidates.append(prefixes.pop())
        module = _module_path(label)
        if module and sources:
            candidates.append(module)
        candidates.append(label.lstrip("/") or label)
        for candidate in candidates:
            if candidate + suffix not in self.taken and candidate:
                break
        base = candidate + suffix
        name, count = base, 1
        while name in self.taken:
            count += 1
            name = f"{base}_{count}"
        self.taken.add(name)
        return name

    def used_once(self, node: Any) -> bool:
        """Whether the node's first output has exactly one reader (so it may be rewritten)."""
        return self.uses[node.input[0]] == 1


def _module_path(label: str) -> str:
    """`layer1.0.conv1` from the legacy exporter's `/layer1/layer1.0/conv1/Conv`."""
    parts = label.split("/")
    if len(parts) < 3 or parts[0]:
        return ""
    path: list[str] = []
    for part in parts[1:-1]:
        if path and part.startswith(".".join(path) + "."):
            path = part.split(".")
        else:
            path.append(part)
    return ".".join(path)


def _describe(node: Any, label: str, error: Unsupported, handlers: dict[str, Any]) -> str:
    detail = "".join(f", {key}={value}" for key, value in _key_attrs(node))
    head = f"node '{label}' ({node.op_type}{detail})"
    if error.unknown:
        supported = ", ".join(sorted(handlers))
        why = f" ({error.reason})" if error.reason else ""
        return f"{head}: not supported{why}; cnnc supports {supported}"
    return f"{head}: not supported: {error.reason}"


def _key_attrs(node: Any) -> list[tuple[str, str]]:
    shown = []
    for attribute in node.attribute:
        if attribute.name == "mode" and attribute.s:
            shown.append(("mode", attribute.s.decode(errors="replace")))
    return shown


# The ops folded when every input is a constant; the elementwise ones are size-checked first.
ELEMENTWISE_FOLD = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Where", "Min", "Max", "Neg",
                    "Sqrt", "Reciprocal", "Abs", "Exp", "Log", "Floor", "Ceil", "Relu",
                    "Sigmoid", "Tanh", "Cast", "Identity", "Dropout", "Clip", "Not"}
FOLDABLE = ELEMENTWISE_FOLD | {
    "Constant", "Concat", "Gather", "Unsqueeze", "Squeeze", "Reshape", "Shape", "Slice",
    "Transpose", "Flatten", "ConstantOfShape", "ReduceProd", "ReduceSum", "ReduceMean",
    "Softmax", "Size",
}

