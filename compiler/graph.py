"""The op graph: a networkx DiGraph with one node per op and the operand position on each edge.

A node holds its op, its normalised attributes, its parameters (float32 arrays), its inferred
per-sample output shape (the batch N is left out) and the model-file line it came from. The
graph prints as one readable line per node and as Graphviz DOT; passes change it only through
`replace_all_uses`, `erase` and `eliminate_dead_code`, never by editing networkx edges. What
the passes decide is its `plan`. It knows nothing of files.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import networkx as nx
import numpy as np

from cnnc import ops
from cnnc.ops import Attrs, Shape
from cnnc.plan import Plan

INPUT = "input"


class Graph:
    """A model as a graph of ops over one input tensor of per-sample shape `input_shape`."""

    def __init__(self, name: str, input_shape: Shape, source: str | None = None) -> None:
        self.name = name
        self.source = source
        self.outputs: list[str] = []
        self.plan = Plan()
        self.nx = nx.DiGraph()
        self.nx.add_node(INPUT, op=INPUT, attrs={}, params={}, shape=tuple(input_shape),
                         line=None, order=0)

    # --- building ----------------------------------------------------------------------------

    def add(self, name: str, op: str, inputs: list[str], attrs: Attrs | None = None,
            params: dict[str, np.ndarray] | None = None, line: int | None = None) -> Shape:
        """Add node `name` computing `op` over `inputs`; returns its inferred shape.

        Raises `ops.ShapeError` when the operands do not fit the op.
        """
        spec = ops.OPS[op]
        attrs = dict(attrs or {})
        shape = spec.infer(attrs, [self.shape(operand) for operand in inputs])
        self.nx.add_node(name, op=op, attrs=attrs, params=dict(params or {}), shape=shape,
                         line=line, order=len(self.nx))
        for index, operand in enumerate(inputs):
            # An op may read one tensor twice (add(x, x)): keep every position on one edge.
            if self.nx.has_edge(operand, name):
                self.nx.edges[operand, name]["index"].append(index)
            else:
                self.nx.add_edge(operand, name, index=[index])
        return shape

    def copy(self) -> Graph:
        """A copy whose nodes, attributes and plan may be changed without touching this graph."""
        other = Graph(self.name, self.input_shape, self.source)
        other.outputs = list(self.outputs)
        other.plan = copy.deepcopy(self.plan)
        other.nx = self.nx.copy()
        for name in other.nx:
            data = other.nx.nodes[name]
            data["attrs"] = dict(data["attrs"])
            data["params"] = dict(data["params"])
        for _, _, data in other.nx.edges(data=True):
            data["index"] = list(data["index"])
        return other

    # --- changing ----------------------------------------------------------------------------

    def replace_all_uses(self, old: str, new: str) -> None:
        """Make every reader of `old` read `new` at the same operand positions, and an output
        `old` become `new`; `old` itself stays, read by nobody."""
        if old == new:
            return
        for user in self.users(old):
            positions = self.nx.edges[old, user]["index"]
            if self.nx.has_edge(new, user):
                self.nx.edges[new, user]["index"] = sorted(
                    self.nx.edges[new, user]["index"] + positions)
            else:
                self.nx.add_edge(new, user, index=list(positions))
            self.nx.remove_edge(old, user)
        self.outputs = [new if name == old else name for name in self.outputs]

    def erase(self, name: str) -> None:
        """Remove node `name`, which nothing may read any more (torch.fx's `erase_node`)."""
        if name == INPUT:
            raise ValueError("the graph's input cannot be erased")
        readers = self.users(name) + (["the outputs"] if name in self.outputs else [])
        if readers:
            raise ValueError(f"cannot erase %{name}: still read by "
                             + ", ".join(reader if reader == "the outputs" else f"%{reader}"
                                         for reader in readers))
        self.nx.remove_node(name)

    def eliminate_dead_code(self) -> list[str]:
        """Erase every node that no output depends on; returns their names in graph order."""
        dead = []
        for name in reversed(self.order()):
            if name != INPUT and name not in self.outputs and not self.users(name):
                self.erase(name)
                dead.append(name)
        return dead[::-1]

    # --- reading -----------------------------------------------------------------------------

    @property
    def input_shape(self) -> Shape:
        return self.shape(INPUT)

    def node(self, name: str) -> dict[str, Any]:
        return self.nx.nodes[name]

    def op(self, name: str) -> str:
        return str(self.nx.nodes[name]["op"])

    def attrs(self, name: str) -> Attrs:
        return self.nx.nodes[name]["attrs"]

    def params(self, name: str) -> dict[str, np.ndarray]:
        return self.nx.nodes[name]["params"]

    def shape(self, name: str) -> Shape:
        return tuple(self.nx.nodes[name]["shape"])

    def operands(self, name: str) -> list[str]:
        """The inputs of `name` in operand order."""
        positioned = [
            (index, source)
            for source, _, data in self.nx.in_edges(name, data=True)
            for index in data["index"]
        ]
        return [source for _, source in sorted(positioned)]

    def users(self, name: str) -> list[str]:
        """The nodes that read `name`, in graph order."""
        return sorted(self.nx.successors(name), key=lambda user: self.nx.nodes[user]["order"])

    def order(self) -> list[str]:
        """All nodes, the input first, each after its operands, ties broken by file order."""
        return list(nx.lexicographical_topological_sort(
            self.nx, key=lambda name: self.nx.nodes[name]["order"]))

    def __iter__(self) -> Iterator[str]:
        return iter(self.order())

    def __len__(self) -> int:
        return len(self.nx)

    # --- printing ----------------------------------------------------------------------------

    def node_text(self, name: str) -> str:
        """One node as `%name = op[attrs](%operands) : f32[N,...]`."""
        operands = ", ".join(f"%{operand}" for operand in self.operands(name))
        attrs = format_attrs(self.op(name), self.attrs(name))
        return f"%{name} = {self.op(name)}{attrs}({operands}) : {format_shape(self.shape(name))}"

    def to_text(self) -> str:
        outputs = ", ".join(f"%{name}" for name in self.outputs)
        lines = [f"graph {self.name}(%input : {format_shape(self.input_shape)}) -> ({outputs}) {{"]
        lines += [f"  {self.node_text(name)}" for name in self.order() if name != INPUT]
        lines.append("}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        lines = [f"digraph {_dot_id(self.name)} {{", "  node [shape=box, fontname=monospace];"]
        for name in self.order():
            label = "\\n".join(
                _dot_escape(part) for part in (name, self.op(name), format_shape(self.shape(name))))
            style = ", style=bold" if name in self.outputs else ""
            lines.append(f'  {_dot_id(name)} [label="{label}"{style}];')
        for source, target in self.nx.edges:
            lines.append(f"  {_dot_id(source)} -> {_dot_id(target)};")
        lines.append("}")
        return "\n".join(lines)


def format_shape(shape: Shape, batch: str = "N") -> str:
    return "f32[" + ",".join([batch, *(str(dim) for dim in shape)]) + "]"


_SHORT = {"out_channels": "out", "kernel_size": "k", "stride": "s", "padding": "p",
          "dilation": "d", "groups": "g", "count_include_pad": "count_pad"}


def _format_value(value: Any) -> str:
    if isinstance(value, tuple) and all(isinstance(item, tuple) for item in value):
        (top, bottom), (left, right) = value
        if top == bottom == left == right:
            return str(top)
        if top == bottom and left == right:
            return f"{top}x{left}"
        return f"{top},{bottom}x{left},{right}"
    if isinstance(value, tuple):
        return str(value[0]) if value[0] == value[1] else f"{value[0]}x{value[1]}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def format_attrs(op: str, attrs: Attrs) -> str:
    """`[k=5x5 s=1 p=2]`: every attribute, shortened, defaults left out but k, s and p."""
    spec = ops.OPS.get(op)
    parts = []
    for key, value in attrs.items():
        attr = spec.attr(key) if spec else None
        default = attr.default if attr else None
        if key not in ("kernel_size", "stride", "padding") and attr is not None:
            if default is not ops.REQUIRED and _format_value(value) == _format_default(default):
                continue
        parts.append(f"{_SHORT.get(key, key)}={_format_value(value)}")
    return f"[{' '.join(parts)}]" if parts else ""


def _format_default(default: Any) -> str:
    if default is None:
        return ""
    return _format_value(default if not isinstance(default, int) or isinstance(default, bool)
                         else (default, default))


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot_id(text: str) -> str:
    return f'"{_dot_escape(text)}"'
