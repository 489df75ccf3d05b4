"""Writes an op graph as a model in cnnc's YAML format plus its `.weights.npz`.

Every node becomes one layer with its name, inputs and every attribute, so that
`yaml_model.load` reads it back to the same graph; parameters are keyed `<layer>.<param>`,
as a PyTorch state_dict is. It knows the file format only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cnnc.graph import INPUT, Graph


def _plain(value: Any) -> Any:
    """A normalised attribute value as YAML writes it: pairs as [h, w], padding per side."""
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def to_yaml(graph: Graph, weights_file: str) -> str:
    layers = []
    for name in graph.order()[1:]:
        attrs = {key: _plain(value) for key, value in graph.attrs(name).items()}
        layer: dict[str, Any] = {graph.op(name): attrs or None, "name": name,
                                 "inputs": graph.operands(name)}
        layers.append(layer)
    document: dict[str, Any] = {"name": graph.name, "input": list(graph.input_shape)}
    if any(graph.params(name) for name in graph.order()):
        document["weights"] = weights_file
    document["layers"] = layers
    document["outputs"] = list(graph.outputs)
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=100)


def save_yaml(graph: Graph, path: str | Path) -> list[Path]:
    """Write `graph` at `path` (and `<stem>.weights.npz` beside it); return the files."""
    path = Path(path)
    weights = path.with_name(path.name.split(".")[0] + ".weights.npz")
    arrays = {f"{name}.{key}": value for name in graph.order()
              for key, value in graph.params(name).items()}
    path.write_text(to_yaml(graph, weights.name), encoding="utf-8")
    if not arrays:
        return [path]
    with open(weights, "wb") as file:
        np.savez(file, **arrays)
    return [path, weights]


__all__ = ["INPUT", "save_yaml", "to_yaml"]
