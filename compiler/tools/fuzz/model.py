"""A fuzzed model as a user would write it (a YAML model file plus a weights .npz), and a case:
a model with the input it runs on and how that input is presented (memory order, dtype).

The fuzzer writes models in the model format and reads them back with `cnnc.load`, so that
it makes exactly what a user can write.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cnnc.frontend import load
from cnnc.graph import INPUT, Graph

MODEL_FILE = "model.yaml"
WEIGHTS_FILE = "model.weights.npz"
INPUT_FILE = "input.npy"
TARGET_FILE = "target.npy"  # the training mode's targets
CASE_FILE = "case.json"


@dataclass
class LayerSpec:
    """One entry of `layers`. `name` and `inputs` are always the effective ones; the writer
    leaves them out where they equal the defaults. `attrs` hold the values as written."""

    op: str
    name: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    activation: str | None = None
    alias: str | None = None  # "linear" for dense
    beside: bool = False  # name/inputs/activation next to the op key, not among the attributes
    name_as_int: bool = False  # write a numeric name as a YAML integer


@dataclass
class ModelSpec:
    """A model file: what the YAML says, and the weights (None: drawn from `seed`)."""

    input: tuple[int, int, int]
    layers: list[LayerSpec]
    outputs: list[str] | None = None  # None: the last layer
    weights: dict[str, np.ndarray] | None = None
    seed: int = 0
    name: str | None = None

    def output_of(self, layer: LayerSpec) -> str:
        return f"{layer.name}.{layer.activation}" if layer.activation else layer.name

    def yaml_text(self) -> str:
        layers = []
        previous = INPUT
        for position, layer in enumerate(self.layers):
            layers.append(_layer_entry(layer, position, previous))
            previous = layer.name
        document: dict[str, Any] = {}
        if self.name is not None:
            document["name"] = self.name
        document["input"] = list(self.input)
        if self.weights is not None:
            document["weights"] = WEIGHTS_FILE
        elif self.seed:
            document["seed"] = self.seed
        document["layers"] = layers
        if self.outputs is not None:
            document["outputs"] = list(self.outputs)
        return str(yaml.safe_dump(document, sort_keys=False, default_flow_style=None,
                                  allow_unicode=True, width=100))

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / MODEL_FILE
        path.write_text(self.yaml_text(), encoding="utf-8")
        if self.weights is not None:
            np.savez(directory / WEIGHTS_FILE, **self.weights)  # type: ignore[arg-type]
        return path

    def copy(self) -> ModelSpec:
        return copy.deepcopy(self)


def _layer_entry(layer: LayerSpec, position: int, previous: str) -> Any:
    extras: dict[str, Any] = {}
    if layer.name != str(position):
        extras["name"] = int(layer.name) if layer.name_as_int else layer.name
    if layer.inputs != [previous]:
        extras["inputs"] = layer.inputs[0] if len(layer.inputs) == 1 else list(layer.inputs)
    if layer.activation:
        extras["activation"] = layer.activation
    op = layer.alias or layer.op
    if not layer.attrs and not extras:
        return op
    if layer.beside:
        return {op: dict(layer.attrs) or None, **extras}
    return {op: {**layer.attrs, **extras}}


@dataclass
class TrainingSetup:
    """What one training step of a case needs beside its input (`cnnc fuzz --train`): the
    loss, its reduction, the trainer's batch size and the targets (labels or values)."""

    loss: str
    reduction: str
    batch_size: int
    y: np.ndarray


@dataclass
class Case:
    """A model and the input it runs on. `x` holds the values (float32, C order); `layout`
    says how the array is presented to the model: its memory order or another dtype. A case
    of the training mode has a `training` setup and is judged by one training step."""

    spec: ModelSpec
    x: np.ndarray
    layout: str = "c"
    input_kind: str = "normal"
    schedule: dict[str, Any] = field(default_factory=dict)  # for the "-tiled" configs
    training: TrainingSetup | None = None


def load_with_seed(spec: ModelSpec) -> Graph:
    """`spec` loaded with parameters drawn from a seed: the frontend works out the shape of
    every parameter."""
    seeded = replace(spec, weights=None)
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-") as folder:
        return load(seeded.write(Path(folder)))


def present(x: np.ndarray, layout: str) -> np.ndarray:
    """The array a user might pass with these values: another memory order or dtype."""
    if layout == "fortran":
        return np.asfortranarray(x)
    if layout == "strided":
        wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), np.float32)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "float64":
        return x.astype(np.float64)
    if layout == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    if layout == "int32":
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(x, posinf=0, neginf=0).clip(-2**31, 2**31 - 1).astype(np.int32)
    return x
