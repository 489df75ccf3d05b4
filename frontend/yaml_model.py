"""Reads a model file in cnnc's YAML format (docs/model-format.md) into an op graph.

It checks everything a user can get wrong and reports it as a `ModelError` naming the file,
the line, the layer and what was expected. It knows the file format and the op registry,
nothing about compilation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import networkx as nx
import yaml

from cnnc import ops
from cnnc.errors import ModelError
from cnnc.frontend.parameters import ParamShapes, init_from_seed, read_weights
from cnnc.graph import INPUT, Graph

TOP_KEYS = ("name", "input", "weights", "seed", "layers", "outputs")
LAYER_KEYS = ("name", "inputs", "activation")
MAX_DIM = 1 << 16  # larger images would overflow 32-bit index arithmetic in generated code
MAX_VALUES = 1 << 26  # values per sample of the input and of every layer's output
MAX_VALUE_NODES = 10_000  # YAML nodes in one value, aliases expanded


@dataclass
class Layer:
    """One entry of `layers`, parsed but not yet checked against its operands."""

    index: int
    op: str
    name: str
    line: int
    inputs: list[str]
    inputs_line: int
    attrs: dict[str, tuple[Any, int]] = field(default_factory=dict)  # value and its line
    activation: str | None = None


class _Reader:
    """Parsing state for one file: where errors point and how YAML nodes become values."""

    def __init__(self, path: Path, text: str) -> None:
        self.file = str(path)
        self.loader = yaml.SafeLoader(text)

    def fail(self, message: str, line: int | None = None, layer: Layer | None = None) -> NoReturn:
        raise ModelError(message, file=self.file, line=line,
                         layer=layer.name if layer else None, op=layer.op if layer else None)

    def value(self, node: yaml.Node) -> Any:
        """The Python value of `node`. Values in a model are small: one that YAML aliases
        make enormous (a "billion laughs") is refused before it is built or printed, and a
        value YAML cannot build (an unknown tag, a bad date) is reported, not raised."""
        if _expanded_size(node, MAX_VALUE_NODES) > MAX_VALUE_NODES:
            self.fail(f"a value of more than {MAX_VALUE_NODES} items (through YAML aliases); "
                      "a model's values are small", line(node))
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as error:
            problem = getattr(error, "problem", None) or str(error)
            self.fail(f"not a valid YAML value: {problem}", line(node))

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping node as {key: (key node, value node)}, refusing duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.fail(f"{what} must be a mapping", line(node))
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                self.fail(f"{what} has a key {key!r} that is not a name", line(key_node))
            key = str(key)
            if key in entries:
                self.fail(f"{what} has the key '{key}' twice", line(key_node))
            entries[key] = (key_node, value_node)
        return entries


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many nodes `node` holds with every alias expanded, counting no further than
    just past `limit`."""
    count = 0
    stack = [node]
    while stack and count <= limit:
        current = stack.pop()
        count += 1
        if isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
        elif isinstance(current, yaml.MappingNode):
            for key, value in current.value:
                stack.extend((key, value))
    return count


def line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(choices)}"


def load(path: str | Path) -> Graph:
    """Read the model at `path` and return its checked op graph."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"cannot read the model file: {error}", file=str(path)) from None
    reader = _Reader(path, text)
    try:
        root = reader.loader.get_single_node()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        reader.fail(f"not valid YAML: {problem}", mark.line + 1 if mark else None)
    finally:
        reader.loader.dispose()
    if root is None:
        reader.fail("the file is empty; a model needs 'input' and 'layers'")
    return _build(reader, path, root)


def _build(reader: _Reader, path: Path, root: yaml.Node) -> Graph:
    top = reader.mapping(root, "a model")
    for key, (key_node, _) in top.items():
        if key not in TOP_KEYS:
            reader.fail(f"unknown key '{key}'{suggest(key, TOP_KEYS)}", line(key_node))
    for required in ("input", "layers"):
        if required not in top:
            reader.fail(f"missing '{required}'", line(root))

    name = path.stem.split(".")[0]
    if "name" in top:
        name = reader.value(top["name"][1])
        if not isinstance(name, str) or not name:
            reader.fail("'name' must be a non-empty string", line(top["name"][1]))
    input_shape = _input_shape(reader, top["input"][1])

    layers_node = top["layers"][1]
    if not isinstance(layers_node, yaml.SequenceNode) or not layers_node.value:
        reader.fail("'layers' must be a non-empty list of layers", line(layers_node))
    layers: list[Layer] = []
    for index, node in enumerate(layers_node.value):
        previous = layers[-1].name if layers else INPUT
        layers.append(_parse_layer(reader, index, node, previous))

    graph = Graph(name, input_shape, source=str(path))
    output_of = _add_layers(reader, graph, layers)
    graph.outputs = _outputs(reader, top.get("outputs"), layers, output_of)
    _attach_params(reader, path, graph, layers, top)
    return graph


def _input_shape(reader: _Reader, node: yaml.Node) -> tuple[int, int, int]:
    value = reader.value(node)
    valid = isinstance(value, list) and len(value) == 3 and all(
        isinstance(dim, int) and not isinstance(dim, bool) for dim in value)
    if not valid:
        reader.fail(f"'input' must be [channels, height, width], got {value!r}", line(node))
    if min(value) < 1 or max(value) > MAX_DIM:
        reader.fail(f"'input' dimensions must be between 1 and {MAX_DIM}, got {value}", line(node))
    channels, height, width = value
    if channels * height * width > MAX_VALUES:
        reader.fail(f"'input' {value} has {channels * height * width} values per sample, too "
                    f"many (at most {MAX_VALUES})", line(node))
    return channels, height, width


def _parse_layer(reader: _Reader, index: int, node: yaml.Node, previous: str) -> Layer:
    """One entry of `layers`: a bare op name or a mapping `op: {attributes}`."""
    where = line(node)
    options: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    if isinstance(node, yaml.ScalarNode):
        op = reader.value(node)
        op_line = where
    elif isinstance(node, yaml.MappingNode):
        entries = reader.mapping(node, f"layer {index}")
        op_keys = [key for key in entries if key not in LAYER_KEYS]
        if len(op_keys) != 1:
            reader.fail(f"layer {index} must name exactly one op, got "
                        f"{', '.join(op_keys) or 'none'}", where)
        op = op_keys[0]
        op_line = line(entries[op][0])
        options = {key: entry for key, entry in entries.items() if key in LAYER_KEYS}
        attrs_node = entries[op][1]
        is_null = isinstance(attrs_node, yaml.ScalarNode) and reader.value(attrs_node) is None
        if not is_null:
            attr_entries = reader.mapping(attrs_node, f"the attributes of layer {index}")
            for key, entry in attr_entries.items():
                if key in options:
                    reader.fail(f"layer {index} gives '{key}' twice", line(entry[0]))
                options[key] = entry
    else:
        reader.fail(f"layer {index} must be an op name or a mapping 'op: {{attributes}}'", where)
    if not isinstance(op, str):
        reader.fail(f"layer {index}: {op!r} is not an op name", where)
    spec = ops.lookup(op)
    if spec is None:
        # Name the layer as every later error does, though its `name` is not checked yet.
        given = reader.value(options["name"][1]) if "name" in options else index
        raise ModelError(f"unknown op '{op}'{suggest(op, [*ops.OPS, *ops.ALIASES])}",
                         file=reader.file, line=op_line, layer=str(given))

    layer = Layer(index, spec.name, str(index), op_line, [previous], op_line)
    if "name" in options:
        key_node, value_node = options.pop("name")
        name = reader.value(value_node)
        if not isinstance(name, (str, int)) or isinstance(name, bool) or str(name) == "":
            reader.fail(f"layer {index}: 'name' must be a string or a number", line(key_node))
        layer.name = str(name)
    if "inputs" in options:
        key_node, value_node = options.pop("inputs")
        inputs = reader.value(value_node)
        if isinstance(inputs, (str, int)) and not isinstance(inputs, bool):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(item, (str, int)) and not isinstance(item, bool) for item in inputs):
            reader.fail("'inputs' must be a list of layer names", line(key_node), layer)
        layer.inputs, layer.inputs_line = [str(item) for item in inputs], line(key_node)
    if "activation" in options:
        key_node, value_node = options.pop("activation")
        if spec.kind != "anchor":
            reader.fail("'activation' is allowed on conv2d and dense only", line(key_node), layer)
        activation = reader.value(value_node)
        if activation not in ops.ACTIVATIONS:
            reader.fail(f"'activation' must be one of {', '.join(ops.ACTIVATIONS)}, "
                        f"got {activation!r}", line(value_node), layer)
        layer.activation = activation
    known = [attr.name for attr in spec.attrs]
    for key, (key_node, value_node) in options.items():
        if key not in known:
            hint = suggest(key, known + list(LAYER_KEYS)) if known else "; it takes no attributes"
            reader.fail(f"unknown attribute '{key}'{hint}", line(key_node), layer)
        layer.attrs[key] = (reader.value(value_node), line(key_node))
    arity = len(layer.inputs)
    if not spec.min_inputs <= arity <= spec.max_inputs:
        wanted = (str(spec.min_inputs) if spec.min_inputs == spec.max_inputs
                  else f"{spec.min_inputs} or more")
        reader.fail(f"takes {wanted} input{'s' if spec.max_inputs > 1 else ''}, got {arity}",
                    layer.inputs_line, layer)
    return layer


def _add_layers(reader: _Reader, graph: Graph, layers: list[Layer]) -> dict[str, str]:
    """Add every layer to `graph` in data-flow order; returns layer name -> node of its output."""
    by_name: dict[str, Layer] = {}
    for layer in layers:
        if layer.name == INPUT:
            reader.fail("the name 'input' is reserved for the model input", layer.line, layer)
        if layer.name in by_name:
            first = by_name[layer.name]
            reader.fail(f"the name '{layer.name}' is already used by layer {first.index} "
                        f"(line {first.line})", layer.line, layer)
        by_name[layer.name] = layer
    # An activation becomes a node `<name>.<activation>`: no layer may take that name too,
    # or the two would silently become one node.
    for layer in layers:
        node = f"{layer.name}.{layer.activation}"
        if layer.activation and node in by_name:
            other = by_name[node]
            reader.fail(f"the name '{node}' is already used by the {layer.activation} of layer "
                        f"'{layer.name}' (line {layer.line})", other.line, other)

    depends = nx.DiGraph()
    depends.add_nodes_from(by_name)
    for layer in layers:
        for operand in layer.inputs:
            if operand != INPUT and operand not in by_name:
                choices = [INPUT, *by_name]
                reader.fail(f"'inputs' names '{operand}', which is not a layer"
                            f"{suggest(operand, choices)}", layer.inputs_line, layer)
            if operand != INPUT:
                depends.add_edge(operand, layer.name)
    try:
        cycle = nx.find_cycle(depends)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        loop = " -> ".join([*(edge[0] for edge in cycle), cycle[0][0]])
        culprit = by_name[cycle[-1][1]]
        reader.fail(f"'inputs' form a cycle: {loop}", culprit.inputs_line, culprit)

    output_of = {INPUT: INPUT}
    order = nx.lexicographical_topological_sort(depends, key=lambda name: by_name[name].index)
    for name in order:
        layer = by_name[name]
        spec = ops.OPS[layer.op]
        try:
            attrs = spec.check_attrs({key: value for key, (value, _) in layer.attrs.items()})
        except ops.AttrError as error:
            where = layer.attrs[error.attr][1] if error.attr in layer.attrs else layer.line
            reader.fail(str(error), where, layer)
        operands = [output_of[operand] for operand in layer.inputs]
        try:
            graph.add(layer.name, layer.op, operands, attrs, line=layer.line)
        except ops.ShapeError as error:
            reader.fail(str(error), layer.line, layer)
        output_of[layer.name] = layer.name
        if layer.activation:
            node = f"{layer.name}.{layer.activation}"
            graph.add(node, layer.activation, [layer.name], line=layer.line)
            output_of[layer.name] = node
        _check_size(reader, graph, output_of[layer.name], layer)
    return output_of


def _check_size(reader: _Reader, graph: Graph, node: str, layer: Layer) -> None:
    size = 1
    for dim in graph.shape(node):
        size *= dim
    if size > MAX_VALUES:
        reader.fail(f"its output of {size} values per sample is too large (at most "
                    f"{MAX_VALUES})", layer.line, layer)


def _outputs(reader: _Reader, entry: tuple[yaml.Node, yaml.Node] | None, layers: list[Layer],
             output_of: dict[str, str]) -> list[str]:
    if entry is None:
        return [output_of[layers[-1].name]]
    key_node, value_node = entry
    names = reader.value(value_node)
    if isinstance(names, (str, int)) and not isinstance(names, bool):
        names = [names]
    if not isinstance(names, list) or not names:
        reader.fail("'outputs' must be a non-empty list of layer names", line(key_node))
    outputs = []
    for name in map(str, names):
        if name not in output_of or name == INPUT:
            choices = [layer.name for layer in layers]
            reader.fail(f"'outputs' names '{name}', which is not a layer{suggest(name, choices)}",
                        line(value_node))
        if output_of[name] in outputs:
            reader.fail(f"'outputs' names '{name}' twice", line(value_node))
        outputs.append(output_of[name])
    return outputs


def _attach_params(reader: _Reader, path: Path, graph: Graph, layers: list[Layer],
                   top: dict[str, tuple[yaml.Node, yaml.Node]]) -> None:
    shapes: ParamShapes = {}
    for layer in layers:
        spec = ops.OPS[layer.op]
        operand_shapes = [graph.shape(operand) for operand in graph.operands(layer.name)]
        expected = spec.param_shapes(graph.attrs(layer.name), operand_shapes)
        if expected:
            shapes[layer.name] = expected
    by_name = {layer.name: layer for layer in layers}

    if "weights" in top:
        key_node, value_node = top["weights"]
        file = reader.value(value_node)
        if not isinstance(file, str) or not file:
            reader.fail("'weights' must be the path of a .npz file", line(key_node))

        def fail(message: str, layer: str | None) -> ModelError:
            owner = by_name.get(layer) if layer else None
            return ModelError(message, file=reader.file,
                              line=owner.line if owner else line(key_node),
                              layer=layer, op=owner.op if owner else None)

        params = read_weights(path.parent / file, shapes, fail)
    else:
        seed = 0
        if "seed" in top:
            seed = reader.value(top["seed"][1])
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                reader.fail(f"'seed' must be a non-negative integer, got {seed!r}",
                            line(top["seed"][1]))
        params = init_from_seed(seed, shapes)
    for layer_name, layer_params in params.items():
        graph.params(layer_name).update(layer_params)
