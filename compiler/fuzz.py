"""Differential fuzzing (`cnnc fuzz`): random valid models, compiled for every target and run
against the NumPy reference; a failure is shrunk to a small model and written as files that
reproduce it (`cnnc fuzz --replay DIR`).

Models are written in the model format (YAML plus a weights .npz) and read back with
`cnnc.load`, so the fuzzer makes exactly what a user can write. Everything random is drawn from
`numpy.random.default_rng((seed, index))`: a seed always gives the same models, in any number
of worker processes. The reference is the only judge; nothing here imports a pass or a backend.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml

from cnnc import ops
from cnnc.errors import CnncError
from cnnc.graph import INPUT, Graph

RTOL, ATOL = 1e-4, 1e-5
MAX_VALUES = 1536  # per-sample values of any tensor a generated model makes
MAX_CHANNELS = 12
WIDE_VALUES, WIDE_CHANNELS = 4096, 32  # the same for the one model in five that is wider
MAX_FEATURES = 512
MAX_BATCH = 64
CASE_TIMEOUT = 300.0  # seconds one model may take in a worker before it counts as hung
JOBS_PER_WORKER = 100  # then a fresh worker: the code of compiled models is never unloaded
NOISE = 2.0**-20  # relative perturbation of the noisy references (16 float32 ulps)
NOISE_SLACK = 8.0  # how many times the noisy references' spread a result may stray

# --- configurations --------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One way to compile and run a model."""

    name: str
    target: str = "llvm"
    fuse: bool = True
    threads: int = 1
    check_bounds: bool = False
    tiled: bool = False  # with the model's random schedule instead of the tiling pass's

    def compile(self, graph: Graph, schedule: dict[str, Any] | None = None) -> Any:
        from cnnc.driver import compile as compile_model

        overrides = {"*": schedule} if self.tiled and schedule else None
        return compile_model(graph, target=self.target, fuse=self.fuse, threads=self.threads,
                             check_bounds=self.check_bounds, schedule=overrides)


CONFIGS: dict[str, Config] = {config.name: config for config in (
    Config("llvm"),
    Config("llvm-unfused", fuse=False),
    Config("llvm-2threads", threads=2),
    Config("cuda-sim", target="cuda-sim"),
    Config("cuda-sim-unfused", target="cuda-sim", fuse=False),
    Config("llvm-tiled", tiled=True),
    Config("cuda-sim-tiled", target="cuda-sim", tiled=True),
    Config("llvm-bounds", check_bounds=True),
    Config("cuda-sim-bounds", target="cuda-sim", check_bounds=True),
)}
BOUNDS_EVERY = 4  # without --sample, the bounds-checking configs run on every 4th model


def configs_for(index: int, targets: list[str], sample: int | None) -> list[str]:
    """The configurations model `index` runs on: all of `targets` (the bounds-checking ones on
    every BOUNDS_EVERY-th model), or with `sample` the first target plus `sample` of the
    others, taken in turn so that every one gets its share of the models."""
    if sample is None:
        return [name for name in targets
                if not CONFIGS[name].check_bounds or index % BOUNDS_EVERY == 0]
    first, others = targets[0], targets[1:]
    if not others:
        return [first]
    count = min(sample, len(others))
    start = index * count % len(others)
    return [first, *(others[(start + step) % len(others)] for step in range(count))]


# --- the model, as a user would write it -----------------------------------------------------


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


MODEL_FILE = "model.yaml"
WEIGHTS_FILE = "model.weights.npz"
INPUT_FILE = "input.npy"
CASE_FILE = "case.json"


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


# --- generating models -----------------------------------------------------------------------

IMAGE_OPS = {"conv2d": 5.0, "maxpool2d": 2.0, "avgpool2d": 2.0, "global_avgpool2d": 0.4,
             "batchnorm2d": 1.2, "relu": 0.8, "sigmoid": 0.8, "tanh": 0.8, "softmax": 0.6,
             "flatten": 1.0, "add": 1.3, "concat": 1.3}
FLAT_OPS = {"dense": 5.0, "relu": 0.8, "sigmoid": 0.8, "tanh": 0.8, "softmax": 0.8, "add": 1.0,
            "concat": 1.0}
# Layer names are free text: these reach every backend's generated code (comments, symbols).
HOSTILE_NAMES = ["conv", "a'b", 'say "hi"', "semi;colon", "define", "float", "__global__",
                 "ret void", "%0", "@main", "{", "}", "*/", "/* c", "back\\slash", "new\nline",
                 "tab\there", "ünïcødé", "名前", "#include <x>", "1e3", "0x10", "-1", "a.b",
                 " ", "$x", "`", "null", "true", "?? =", "a.relu", "N", "batch", "image",
                 "point", "thread", "cnnc_max", "int", "return", "x" * 60]
ACTIVATIONS = ("relu", "sigmoid", "tanh")
INPUT_KINDS = {"normal": 5.0, "uniform": 2.0, "large": 1.0, "tiny": 1.0, "saturating": 1.0,
               "special": 1.2, "integers": 0.5, "zeros": 0.2}
INPUT_LAYOUTS = {"c": 6.0, "fortran": 1.0, "strided": 1.0, "float64": 1.0, "float16": 0.5,
                 "int32": 0.3}


@dataclass
class Case:
    """A model and the input it runs on. `x` holds the values (float32, C order); `layout`
    says how the array is presented to the model: its memory order or another dtype."""

    spec: ModelSpec
    x: np.ndarray
    layout: str = "c"
    input_kind: str = "normal"
    schedule: dict[str, Any] = field(default_factory=dict)  # for the "-tiled" configs


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[name] for name in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _pair(rng: np.random.Generator, first: int, second: int) -> int | list[int]:
    """An int when both are equal (sometimes), else [h, w]."""
    if first == second and rng.random() < 0.7:
        return first
    return [first, second]


def _padding(rng: np.random.Generator, limit_h: int, limit_w: int) -> Any:
    """A padding in one of its three written forms, each side at most its limit."""
    form = rng.integers(0, 3)
    if form == 0:
        return int(rng.integers(0, min(limit_h, limit_w) + 1))
    if form == 1:
        return [int(rng.integers(0, limit_h + 1)), int(rng.integers(0, limit_w + 1))]
    return [[int(rng.integers(0, limit_h + 1)), int(rng.integers(0, limit_h + 1))],
            [int(rng.integers(0, limit_w + 1)), int(rng.integers(0, limit_w + 1))]]


def _conv_attrs(rng: np.random.Generator, shape: tuple[int, ...],
                max_channels: int) -> dict[str, Any]:
    channels, height, width = shape
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    groups = int(rng.choice(divisors)) if rng.random() < 0.35 else 1
    per_group = int(rng.integers(1, max(1, max_channels // groups // 2) + 1))
    attrs: dict[str, Any] = {"out_channels": groups * per_group}
    kh, kw = (int(value) for value in rng.integers(1, 6, size=2))
    if rng.random() < 0.5:
        kw = kh
    attrs["kernel_size"] = _pair(rng, kh, kw)
    if rng.random() < 0.5:
        attrs["stride"] = _pair(rng, *(int(value) for value in rng.integers(1, 4, size=2)))
    if rng.random() < 0.6:
        attrs["padding"] = _padding(rng, 3, 3)
    if rng.random() < 0.25:
        attrs["dilation"] = _pair(rng, *(int(value) for value in rng.integers(1, 4, size=2)))
    if groups > 1 or rng.random() < 0.1:
        attrs["groups"] = groups
    if rng.random() < 0.3:
        attrs["bias"] = bool(rng.random() < 0.5)
    return attrs


def _pool_attrs(rng: np.random.Generator, op: str) -> dict[str, Any]:
    kh, kw = (int(value) for value in rng.integers(1, 5, size=2))
    if rng.random() < 0.5:
        kw = kh
    attrs: dict[str, Any] = {"kernel_size": _pair(rng, kh, kw)}
    if rng.random() < 0.6:
        attrs["stride"] = _pair(rng, *(int(value) for value in rng.integers(1, 4, size=2)))
    if rng.random() < 0.5:
        attrs["padding"] = _padding(rng, kh // 2, kw // 2)
    if rng.random() < 0.5:
        attrs["ceil_mode"] = bool(rng.random() < 0.7)
    if op == "avgpool2d" and rng.random() < 0.5:
        attrs["count_include_pad"] = bool(rng.random() < 0.5)
    return attrs


class _Builder:
    """Grows a valid model layer by layer, checking each against the op registry."""

    def __init__(self, rng: np.random.Generator, input_shape: tuple[int, int, int],
                 hostile_names: bool, wide: bool = False) -> None:
        self.rng = rng
        self.max_values = WIDE_VALUES if wide else MAX_VALUES
        self.max_channels = WIDE_CHANNELS if wide else MAX_CHANNELS
        self.graph = Graph("fuzz", input_shape)
        self.layers: list[LayerSpec] = []
        self.output_of: dict[str, str] = {INPUT: INPUT}
        self.taken = {INPUT}  # graph node names in use, activation nodes included
        self.hostile_names = hostile_names
        self.current = INPUT

    def shape(self, name: str) -> tuple[int, ...]:
        return self.graph.shape(self.output_of[name])

    def fresh_name(self, op: str) -> tuple[str, bool]:
        position = str(len(self.layers))
        if not self.hostile_names or self.rng.random() < 0.25:
            if position not in self.taken:
                return position, False
        for _ in range(100):
            choice = self.rng.random()
            if choice < 0.15:
                name, as_int = str(int(self.rng.integers(100, 10000))), True
            elif choice < 0.3:
                name, as_int = f"{op}_{len(self.layers)}", False
            else:
                base = str(self.rng.choice(HOSTILE_NAMES))
                name = base if self.rng.random() < 0.5 else f"{base}{len(self.layers)}"
                as_int = False
            if name not in self.taken:
                return name, as_int
        return f"layer_{len(self.layers)}", False

    def try_add(self, op: str, operands: list[str], attrs: dict[str, Any],
                activation: str | None = None) -> bool:
        """Add the layer if it is valid and its tensors stay small; True when added."""
        spec = ops.OPS[op]
        try:
            normal = spec.check_attrs(attrs)
            shape = spec.infer(normal, [self.shape(operand) for operand in operands])
        except (ops.AttrError, ops.ShapeError):
            return False
        if math.prod(shape) > self.max_values or min(shape) < 1 or \
                (len(shape) == 3 and shape[0] > self.max_channels):
            return False
        name, as_int = self.fresh_name(op)
        if activation and f"{name}.{activation}" in self.taken:
            activation = None
        self.graph.add(name, op, [self.output_of[operand] for operand in operands], normal)
        self.taken.add(name)
        self.output_of[name] = name
        if activation:
            node = f"{name}.{activation}"
            self.graph.add(node, activation, [name])
            self.taken.add(node)
            self.output_of[name] = node
        rng = self.rng
        alias = "linear" if op == "dense" and rng.random() < 0.2 else None
        self.layers.append(LayerSpec(op, name, list(operands), attrs, activation, alias,
                                     beside=bool(rng.random() < 0.3), name_as_int=as_int))
        self.current = name
        return True

    def step(self) -> None:
        rng = self.rng
        rank = len(self.shape(self.current))
        if self.layers and rng.random() < 0.15:
            # A branch: the next layer reads an earlier tensor; the one left behind may be
            # joined again later by add or concat, become an output, or stay unused.
            self.current = str(rng.choice([INPUT, *(layer.name for layer in self.layers)]))
            rank = len(self.shape(self.current))
        op = _pick(rng, IMAGE_OPS if rank == 3 else FLAT_OPS)
        shape = self.shape(self.current)
        activation = str(rng.choice(ACTIVATIONS)) if rng.random() < 0.3 else None
        if op == "conv2d":
            self.try_add(op, [self.current], _conv_attrs(rng, shape, self.max_channels),
                         activation)
        elif op == "dense":
            features = math.prod(shape)
            attrs: dict[str, Any] = {"units": int(rng.integers(1, 17))}
            if rng.random() < 0.3:
                attrs["bias"] = bool(rng.random() < 0.5)
            if features <= MAX_FEATURES:
                self.try_add(op, [self.current], attrs, activation)
        elif op in ("maxpool2d", "avgpool2d"):
            self.try_add(op, [self.current], _pool_attrs(rng, op))
        elif op == "batchnorm2d":
            attrs = {}
            if rng.random() < 0.4:
                attrs["eps"] = float(rng.choice([1e-5, 1e-3, 0.1, 1.0, 1e-9]))
            self.try_add(op, [self.current], attrs)
        elif op in ("add", "concat"):
            self._join(op, shape)
        elif op == "flatten" and math.prod(shape) <= MAX_FEATURES:
            self.try_add(op, [self.current], {})
        elif op != "flatten":
            self.try_add(op, [self.current], {})

    def _join(self, op: str, shape: tuple[int, ...]) -> None:
        rng = self.rng
        names = [INPUT, *(layer.name for layer in self.layers)]
        if op == "add":
            fits = [name for name in names if self.shape(name) == shape]
        else:
            fits = [name for name in names if len(self.shape(name)) == len(shape)
                    and self.shape(name)[1:] == shape[1:]]
        others = [name for name in fits if name != self.current]
        count = int(rng.integers(1, 3))
        chosen = [str(rng.choice(others or fits)) for _ in range(count)]
        operands = [self.current, *chosen]
        rng.shuffle(operands)
        self.try_add(op, operands, {})


def _draw_weights(rng: np.random.Generator, graph: Graph, scale: float) -> dict[str, np.ndarray]:
    """Parameters for every layer of `graph`, drawn in one of a few styles per layer."""
    weights: dict[str, np.ndarray] = {}
    for name in graph.order():
        params = graph.params(name)
        if not params:
            continue
        if graph.op(name) == "batchnorm2d":
            channels = params["weight"].shape
            values = {"weight": rng.normal(1.0, 0.5, channels),
                      "bias": rng.normal(0.0, 0.5, channels),
                      "running_mean": rng.normal(0.0, 1.0, channels),
                      "running_var": rng.uniform(0.05, 4.0, channels)}
            if rng.random() < 0.1:
                values["running_var"] = rng.uniform(0.0, 1e-3, channels)
        else:
            shape = params["weight"].shape
            fan_in = max(1, math.prod(shape[1:]))
            style = _pick(rng, {"uniform": 4.0, "normal": 2.0, "positive": 1.0,
                                "integers": 0.7, "zeros": 0.3, "large": 0.5, "small": 0.5})
            bound = scale / math.sqrt(fan_in)
            values = {}
            for param, array in params.items():
                if style == "uniform":
                    values[param] = rng.uniform(-bound, bound, array.shape)
                elif style == "normal":
                    values[param] = rng.normal(0.0, bound, array.shape)
                elif style == "positive":
                    values[param] = rng.uniform(0.0, bound, array.shape)
                elif style == "integers":
                    values[param] = rng.integers(-2, 3, array.shape).astype(np.float64)
                elif style == "zeros":
                    values[param] = np.zeros(array.shape)
                elif style == "large":
                    values[param] = rng.uniform(-bound, bound, array.shape) * 100.0
                else:
                    values[param] = rng.uniform(-bound, bound, array.shape) * 1e-3
        for param, array in values.items():
            weights[f"{name}.{param}"] = np.asarray(array, np.float32)
    return weights


def draw_input(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Input values of one kind: unit noise, large, tiny, saturating, NaN and ±Inf..."""
    if kind == "normal":
        values = rng.standard_normal(shape)
    elif kind == "uniform":
        values = rng.random(shape)
    elif kind == "large":
        values = rng.standard_normal(shape) * 10.0 ** rng.uniform(2, 8)
    elif kind == "tiny":
        values = rng.standard_normal(shape) * 10.0 ** -rng.uniform(20, 44)
    elif kind == "saturating":
        values = rng.choice([-1.0, 1.0], shape) * rng.uniform(20, 1e4, shape)
    elif kind == "special":
        values = rng.standard_normal(shape)
        # Not finite values near float32's largest: one op's products could overflow in
        # float32 where the float64 reference's do not, which is float32, not a bug.
        specials = rng.choice([np.nan, np.inf, -np.inf], shape)
        values = np.where(rng.random(shape) < 0.06, specials, values)
    elif kind == "integers":
        values = rng.integers(-3, 4, shape).astype(np.float64)
    else:
        values = np.zeros(shape)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(values, dtype=np.float32)


def generate(seed: int, index: int) -> Case:
    """Model number `index` of seed `seed`: always the same one."""
    rng = np.random.default_rng([seed, index])
    wide = bool(rng.random() < 0.2)
    channels = int(rng.integers(1, 17 if wide else 5))
    height, width = (int(value) for value in rng.integers(1, 15, size=2))
    if wide:
        width = int(rng.integers(8, 41))
    if rng.random() < 0.7:
        height, width = max(height, 5), max(width, 5)
    builder = _Builder(rng, (channels, height, width), bool(rng.random() < 0.3), wide)
    wanted = int(rng.integers(1, 8))
    for _ in range(wanted * 6):
        if len(builder.layers) >= wanted:
            break
        builder.step()
    if not builder.layers:
        builder.try_add("relu", [INPUT], {})
    layers = builder.layers

    outputs: list[str] | None = None
    if rng.random() < 0.3:
        extra = [layer.name for layer in layers[:-1]]
        count = min(len(extra), int(rng.integers(1, 3)))
        picked = [str(name) for name in rng.choice(extra, count, replace=False)] if count else []
        outputs = [layers[-1].name, *picked]
        rng.shuffle(outputs)
    if rng.random() < 0.1 and len(layers) > 1:
        # Any order is valid once every layer names its inputs: write them shuffled.
        outputs = outputs or [layers[-1].name]
        order = rng.permutation(len(layers))
        layers = [layers[int(position)] for position in order]
    input_kind = _pick(rng, INPUT_KINDS)
    spec = ModelSpec((channels, height, width), layers, outputs)
    if rng.random() < 0.25:
        spec.seed = int(rng.integers(0, 2**62)) if rng.random() < 0.5 else 0
    else:
        # Large inputs meet unit-scale weights only, so that no intermediate value overflows
        # float32 where the float64 reference would not.
        scale = 1.0 if input_kind in ("large", "special") else float(rng.choice([1.0, 1.0, 3.0]))
        spec.weights = _draw_weights(rng, _load_with_seed(spec), scale)
    if rng.random() < 0.2:
        spec.name = str(rng.choice(HOSTILE_NAMES))
    batch = int(rng.integers(1, MAX_BATCH + 1)) if rng.random() < 0.5 else \
        int(rng.integers(1, 9))
    x = draw_input(rng, input_kind, (batch, channels, height, width))
    return Case(spec, x, _pick(rng, INPUT_LAYOUTS), input_kind, random_schedule(rng))


def random_schedule(rng: np.random.Generator) -> dict[str, Any]:
    """Schedule fields for every kernel (what `--schedule` or `cnnc tune` could give): the
    register tiles, unrolling and thread mapping the tiling pass might not pick itself."""
    return {"oc_block": int(rng.choice([1, 2, 3, 4, 8])),
            "x_block": int(rng.choice([1, 2, 3, 4, 7])),
            "unroll_max": int(rng.choice([0, 4, 64])),
            "gpu_threads": int(rng.choice([32, 64, 96, 128, 256])),
            "gpu_batch_inner": bool(rng.random() < 0.4),
            "gpu_shared_tiles": bool(rng.random() < 0.4)}


def _load_with_seed(spec: ModelSpec) -> Graph:
    """`spec` loaded with parameters drawn from a seed: the frontend works out the shape of
    every parameter."""
    from cnnc.frontend import load

    seeded = replace(spec, weights=None)
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-") as folder:
        return load(seeded.write(Path(folder)))


# --- presenting the input --------------------------------------------------------------------


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


# --- judging outputs -------------------------------------------------------------------------


def _as_tuple(outputs: Any) -> tuple[np.ndarray, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def reference_variants(graph: Graph, x: np.ndarray, rng_seed: int = 0,
                       noisy: int = 3) -> tuple[list[tuple[np.ndarray, ...]],
                                                list[tuple[np.ndarray, ...]]]:
    """What float32 arithmetic could fairly give: the reference with every op's result
    rounded to float32, and `noisy` runs with each operand and parameter perturbed by a
    relative NOISE (which shows where the model is ill-conditioned at this input)."""
    from cnnc.reference import check_input

    x64 = check_input(graph, x).astype(np.float64)
    rng = np.random.default_rng(rng_seed)

    def run(round32: bool, perturb: bool) -> tuple[np.ndarray, ...]:
        def noisy_copy(array: np.ndarray) -> np.ndarray:
            if not perturb:
                return array
            return array * (1 + NOISE * rng.uniform(-1, 1, array.shape))

        values: dict[str, np.ndarray] = {INPUT: x64}
        for name in graph.order():
            if name == INPUT:
                continue
            spec = ops.OPS[graph.op(name)]
            operands = [noisy_copy(values[operand]) for operand in graph.operands(name)]
            params = {key: noisy_copy(value.astype(np.float64))
                      for key, value in graph.params(name).items()}
            with np.errstate(all="ignore"):
                result = spec.compute(graph.attrs(name), params, operands)
                if round32:
                    result = result.astype(np.float32).astype(np.float64)
            values[name] = result
        with np.errstate(all="ignore"):
            return tuple(values[name].astype(np.float32) for name in graph.outputs)

    rounded = [run(True, False)]
    return rounded, [run(False, True) for _ in range(noisy)]


def _bad_elements(got: np.ndarray, want: np.ndarray, slack: np.ndarray | float = 0.0
                  ) -> np.ndarray:
    """Where `got` is not `want`: NaN for NaN, the same infinity, else within tolerance."""
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(got64) & np.isnan(want64)
    with np.errstate(invalid="ignore", over="ignore"):
        same_inf = np.isinf(want64) & (got64 == want64)
        close = np.abs(got64 - want64) <= ATOL + RTOL * np.abs(want64) + slack
    finite = np.isfinite(got64) & np.isfinite(want64)
    return ~(both_nan | same_inf | (finite & close))


def compare(got: Any, want: tuple[np.ndarray, ...], names: list[str],
            variants: Callable[[], tuple[list[tuple[np.ndarray, ...]],
                                         list[tuple[np.ndarray, ...]]]]
            ) -> tuple[str | None, int]:
    """None when every output matches, else what differs; and how many elements matched only
    within the float32 envelope of an ill-conditioned model (see `reference_variants`)."""
    outputs = _as_tuple(got)
    if len(outputs) != len(want):
        return f"{len(outputs)} outputs, expected {len(want)}", 0
    envelope: tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]]] | None = None
    excused = 0
    for number, (actual, expected, name) in enumerate(zip(outputs, want, names)):
        if not isinstance(actual, np.ndarray) or actual.shape != expected.shape or \
                actual.dtype != np.float32:
            shape = getattr(actual, "shape", None)
            dtype = getattr(actual, "dtype", type(actual).__name__)
            return (f"output %{name} is {dtype} {shape}, expected float32 "
                    f"{expected.shape}"), excused
        bad = _bad_elements(actual, expected)
        if not bad.any():
            continue
        if envelope is None:
            envelope = variants()
        rounded, noisy = envelope
        with np.errstate(invalid="ignore", over="ignore"):
            spread = np.zeros(expected.shape)
            for run in noisy:
                difference = np.abs(run[number].astype(np.float64) - expected)
                difference[np.isnan(run[number]) & np.isnan(expected)] = 0.0
                difference[np.isnan(difference)] = np.inf
                spread = np.maximum(spread, difference)
        still = bad & _bad_elements(actual, expected, NOISE_SLACK * spread)
        for run in [*rounded, *noisy]:
            still &= _bad_elements(actual, run[number], NOISE_SLACK * spread)
        excused += int(bad.sum() - still.sum())
        if still.any():
            where = tuple(int(i) for i in np.argwhere(still)[0])
            return (f"output %{name}: {int(still.sum())} of {still.size} values differ from "
                    f"the reference (rtol={RTOL:g}, atol={ATOL:g}); at {list(where)} got "
                    f"{actual[where]!r}, expected {expected[where]!r}"), excused
    return None, excused


# --- evaluating one model --------------------------------------------------------------------


@dataclass
class Failure:
    """What went wrong with one configuration. `kind` is "load", "reference", "compile",
    "crash" (an exception while running, or the process died), "bounds", "mismatch",
    "nondeterministic" or "hang"; `error` is the exception's type, if any."""

    config: str
    kind: str
    message: str
    error: str = ""

    @property
    def signature(self) -> tuple[str, str, str]:
        return self.config, self.kind, self.error

    def describe(self) -> str:
        head = self.message.strip().splitlines()[0] if self.message.strip() else ""
        return f"{self.config}: {self.kind}{f' ({self.error})' if self.error else ''}: {head}"


@dataclass
class Outcome:
    """The result of running one model on its configurations."""

    configs: list[str]
    failures: list[Failure] = field(default_factory=list)
    excused: int = 0  # output values accepted only within the float32 envelope
    seconds: float = 0.0
    ops: list[str] = field(default_factory=list)


def evaluate(model: Path, x: np.ndarray, layout: str, configs: list[str],
             progress: Callable[[str], None] | None = None,
             schedule: dict[str, Any] | None = None) -> Outcome:
    """Load `model`, run it on `x` (presented as `layout`) for every configuration and judge
    each result against the reference."""
    from cnnc.errors import BoundsError
    from cnnc.frontend import load
    from cnnc.reference import reference

    start = time.perf_counter()
    outcome = Outcome(list(configs))
    try:
        graph = load(model)
    except Exception as error:  # a valid model refused, or the loader itself broke
        outcome.failures.append(Failure("load", "load", _error_text(error), type(error).__name__))
        return outcome
    outcome.ops = sorted({graph.op(name) for name in graph.order() if name != INPUT})
    presented = present(x, layout)
    try:
        want = _as_tuple(reference(graph, presented))
        want_one = _as_tuple(reference(graph, presented[:1]))
    except Exception as error:
        outcome.failures.append(Failure("reference", "reference", _error_text(error),
                                        type(error).__name__))
        return outcome
    variants_cache: dict[int, Any] = {}

    def variants_of(batch: int) -> Callable[[], Any]:
        def make() -> Any:
            if batch not in variants_cache:
                variants_cache[batch] = reference_variants(graph, presented[:batch])
            return variants_cache[batch]
        return make

    results: dict[str, tuple[np.ndarray, ...]] = {}
    for name in configs:
        config = CONFIGS[name]
        if progress is not None:
            progress(name)
        try:
            compiled = config.compile(graph, schedule)
        except Exception as error:
            outcome.failures.append(Failure(name, "compile", _error_text(error),
                                            type(error).__name__))
            continue
        try:
            got = compiled(presented)
            got_one = compiled(presented[:1])  # a batch of one: the other CPU layout
        except BoundsError as error:
            outcome.failures.append(Failure(name, "bounds", str(error), type(error).__name__))
            continue
        except Exception as error:
            outcome.failures.append(Failure(name, "crash", _error_text(error),
                                            type(error).__name__))
            continue
        mismatched = False
        for batch, actual, expected in ((len(presented), got, want), (1, got_one, want_one)):
            problem, excused = compare(actual, expected, graph.outputs, variants_of(batch))
            outcome.excused += excused
            if problem is not None:
                outcome.failures.append(Failure(name, "mismatch", f"batch {batch}: {problem}"))
                mismatched = True
                break
        if not mismatched and config.target == "llvm" and not all(
                same_bits(alone, together[:1])
                for alone, together in zip(_as_tuple(got_one), _as_tuple(got))):
            # Each image's bits do not depend on the batch it came in (llvm.fma everywhere).
            outcome.failures.append(Failure(name, "nondeterministic",
                                            f"image 0 alone gives other bits than in a batch "
                                            f"of {len(presented)}"))
        results[name] = _as_tuple(got)
    _check_determinism(results, outcome)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _check_determinism(results: dict[str, tuple[np.ndarray, ...]], outcome: Outcome) -> None:
    """One thread and two must give the same bits (the README promises it)."""
    one, two = results.get("llvm"), results.get("llvm-2threads")
    if one is None or two is None:
        return
    for first, second in zip(one, two):
        if not same_bits(first, second):
            outcome.failures.append(Failure("llvm-2threads", "nondeterministic",
                                            "two threads gave other bits than one"))
            return


def same_bits(first: np.ndarray, second: np.ndarray) -> bool:
    """Bitwise equal float32 arrays, but that any NaN equals any other NaN."""
    if first.shape != second.shape:
        return False
    both_nan = np.isnan(first) & np.isnan(second)
    return bool(np.all((first.view(np.uint32) == second.view(np.uint32)) | both_nan))


def _error_text(error: BaseException) -> str:
    if isinstance(error, CnncError):
        return str(error)
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))[-4000:]


def evaluate_case(case: Case, configs: list[str],
                  progress: Callable[[str], None] | None = None) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-") as folder:
        path = case.spec.write(Path(folder))
        return evaluate(path, case.x, case.layout, configs, progress, case.schedule)


# --- worker processes ------------------------------------------------------------------------
# Each model runs in a worker process, so that a model that kills its process (a crash in
# native code) is reported as a failure of that model and the fuzzing goes on.


@dataclass
class Job:
    """A model to evaluate: generated from (seed, index), or given as a Case."""

    configs: list[str]
    seed: int = 0
    index: int = 0
    case: Case | None = None

    def resolve(self) -> Case:
        return self.case if self.case is not None else generate(self.seed, self.index)


def _worker_main(connection: Connection, cache_dir: str | None) -> None:
    if cache_dir is not None:
        os.environ["CNNC_CACHE_DIR"] = cache_dir
    connection.send(("ready", None))
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            outcome = evaluate_case(job.resolve(), job.configs,
                                    lambda name: connection.send(("config", name)))
        except Exception as error:  # the fuzzer's own bug: report it, keep the worker
            outcome = Outcome(job.configs, [Failure("fuzz", "internal", _error_text(error),
                                                    type(error).__name__)])
        connection.send(("done", outcome))


class _Worker:
    def __init__(self, context: Any, cache_dir: str | None) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, cache_dir),
                                       daemon=True)
        self.process.start()
        child.close()
        self.job: tuple[int, Job] | None = None
        self.done = 0
        self.ready = False  # it has started (a worker that dies before is the fuzzer's fault)
        self.config = ""
        self.started = 0.0

    def submit(self, key: int, job: Job) -> None:
        self.job, self.config, self.started = (key, job), "", time.monotonic()
        self.connection.send(job)

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.connection.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class Runner:
    """Evaluates jobs in `jobs` worker processes (0: in this process, without isolation)."""

    def __init__(self, jobs: int, cache_dir: str | None = None) -> None:
        self.jobs = jobs
        self.cache_dir = cache_dir
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def run(self, jobs: Iterator[Job], deadline: float | None = None
            ) -> Iterator[tuple[int, Job, Outcome]]:
        """(position, job, outcome) for each job, as they finish; no job starts after
        `deadline` (a time.monotonic() value)."""
        if self.jobs <= 0:
            for key, job in enumerate(jobs):
                if deadline is not None and time.monotonic() >= deadline:
                    return
                with _cache_env(self.cache_dir):
                    yield key, job, evaluate_case(job.resolve(), job.configs)
            return
        pending = enumerate(jobs)
        busy: list[_Worker] = []
        idle = list(self._workers)
        exhausted = False
        while True:
            while not exhausted and (idle or len(self._workers) < self.jobs):
                if deadline is not None and time.monotonic() >= deadline:
                    exhausted = True
                    break
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                worker = idle.pop() if idle else self._spawn()
                worker.submit(*item)
                busy.append(worker)
            if not busy:
                return
            ready = wait([w.connection for w in busy] + [w.process.sentinel for w in busy],
                         timeout=5.0)
            for worker in list(busy):
                assert worker.job is not None
                key, job = worker.job
                finished: Outcome | None = None
                if worker.connection in ready:
                    try:
                        while worker.connection.poll():
                            kind, value = worker.connection.recv()
                            if kind == "ready":
                                worker.ready = True
                            elif kind == "config":
                                worker.config = value
                            else:
                                finished = value
                    except (EOFError, OSError):
                        pass
                if finished is not None:
                    busy.remove(worker)
                    worker.job = None
                    worker.done += 1
                    if worker.done < JOBS_PER_WORKER:
                        idle.append(worker)
                    else:
                        worker.stop()
                        self._workers.remove(worker)
                    yield key, job, finished
                    continue
                hung = time.monotonic() - worker.started > CASE_TIMEOUT
                if worker.process.is_alive() and not hung:
                    continue
                if hung:
                    worker.process.kill()
                worker.process.join()
                if not worker.ready:
                    raise RuntimeError(f"a fuzzing worker process failed to start (exit code "
                                       f"{worker.process.exitcode}); is the main module "
                                       "guarded by `if __name__ == '__main__'`?")
                failure = Failure(worker.config or "load", "hang" if hung else "crash",
                                  f"the worker took more than {CASE_TIMEOUT:g} s" if hung else
                                  f"the process died (exit code {worker.process.exitcode})",
                                  "Timeout" if hung else "ProcessDied")
                busy.remove(worker)
                self._workers.remove(worker)
                yield key, job, Outcome(job.configs, [failure])

    def evaluate(self, case: Case, configs: list[str]) -> Outcome:
        return next(self.run(iter([Job(configs, case=case)])))[2]

    def _spawn(self) -> _Worker:
        worker = _Worker(self._context, self.cache_dir)
        self._workers.append(worker)
        return worker


@contextlib.contextmanager
def _cache_env(cache_dir: str | None) -> Iterator[None]:
    if cache_dir is None:
        yield
        return
    old = os.environ.get("CNNC_CACHE_DIR")
    os.environ["CNNC_CACHE_DIR"] = cache_dir
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CNNC_CACHE_DIR", None)
        else:
            os.environ["CNNC_CACHE_DIR"] = old


# --- shrinking -------------------------------------------------------------------------------


def _removed(spec: ModelSpec, position: int) -> ModelSpec:
    """`spec` without layer `position`: its readers read its first input instead."""
    smaller = spec.copy()
    layer = smaller.layers.pop(position)
    substitute = layer.inputs[0]
    for other in smaller.layers:
        other.inputs = [substitute if name == layer.name else name for name in other.inputs]
    if smaller.outputs is not None:
        outputs = [substitute if name == layer.name else name for name in smaller.outputs]
        outputs = [name for name in dict.fromkeys(outputs) if name != INPUT]
        smaller.outputs = outputs or None
    if smaller.weights is not None:
        smaller.weights = {key: value for key, value in smaller.weights.items()
                           if not key.startswith(f"{layer.name}.")}
    return smaller


SIMPLER_ATTRS = {"stride": 1, "padding": 0, "dilation": 1, "groups": None, "bias": None,
                 "ceil_mode": None, "count_include_pad": None, "eps": None, "kernel_size": 1}


def _candidates(case: Case) -> Iterator[Case]:
    """Smaller or simpler versions of `case`, the most promising first."""
    spec, x = case.spec, case.x
    batch = len(x)
    if batch > 1:
        for image in range(min(batch, 4)):
            yield replace(case, x=x[image:image + 1].copy())
        yield replace(case, x=x[: batch // 2].copy())
    if spec.outputs is not None and len(spec.outputs) > 1:
        for name in spec.outputs:
            smaller = spec.copy()
            smaller.outputs = [name]
            yield replace(case, spec=smaller)
    if spec.outputs is not None:
        yield replace(case, spec=replace(spec.copy(), outputs=None))
    for position in reversed(range(len(spec.layers))):
        if len(spec.layers) > 1:
            yield replace(case, spec=_removed(spec, position))
    for position, layer in enumerate(spec.layers):
        if len(layer.inputs) > 2:
            for drop in range(len(layer.inputs)):
                smaller = spec.copy()
                del smaller.layers[position].inputs[drop]
                yield replace(case, spec=smaller)
        if layer.activation:
            smaller = spec.copy()
            smaller.layers[position].activation = None
            yield replace(case, spec=smaller)
        for attr, simple in SIMPLER_ATTRS.items():
            if attr in layer.attrs and layer.attrs[attr] != simple:
                smaller = spec.copy()
                if simple is None:
                    del smaller.layers[position].attrs[attr]
                else:
                    smaller.layers[position].attrs[attr] = simple
                yield replace(case, spec=smaller)
        for attr in ("out_channels", "units"):
            value = layer.attrs.get(attr)
            groups = layer.attrs.get("groups", 1)
            if isinstance(value, int) and value > groups:
                smaller = spec.copy()
                smaller.layers[position].attrs[attr] = max(groups, value // 2 // groups * groups)
                yield replace(case, spec=smaller)
    channels, height, width = spec.input
    for new_shape in ((1, height, width), (channels, max(1, height // 2), width),
                      (channels, height, max(1, width // 2)), (channels, height - 1, width),
                      (channels, height, width - 1)):
        if new_shape != spec.input and min(new_shape) >= 1:
            smaller = spec.copy()
            smaller.input = new_shape
            yield replace(case, spec=smaller, x=x[:, :new_shape[0], :new_shape[1],
                                                  :new_shape[2]].copy())
    if spec.weights is not None:
        yield replace(case, spec=replace(spec.copy(), weights=None))
        rounded = spec.copy()
        assert rounded.weights is not None
        rounded.weights = {key: np.round(value, 1) for key, value in rounded.weights.items()}
        if any(not np.array_equal(rounded.weights[key], spec.weights[key])
               for key in spec.weights):
            yield replace(case, spec=rounded)
    if spec.name is not None:
        yield replace(case, spec=replace(spec.copy(), name=None))
    if any(layer.name != str(position) for position, layer in enumerate(spec.layers)):
        yield replace(case, spec=_plain_names(spec))
    if case.layout != "c":
        yield replace(case, layout="c")
    with np.errstate(invalid="ignore"):
        simple_x = np.where(np.isfinite(x), np.round(x, 1), x).astype(np.float32)
    if not np.array_equal(simple_x, x, equal_nan=True):
        yield replace(case, x=simple_x)


def _plain_names(spec: ModelSpec) -> ModelSpec:
    """`spec` with every layer named by its position, as when no layer has a name."""
    renamed = spec.copy()
    names = {layer.name: str(position) for position, layer in enumerate(spec.layers)}
    for layer in renamed.layers:
        layer.name = names[layer.name]
        layer.name_as_int = False
        layer.inputs = [names.get(name, name) for name in layer.inputs]
    if renamed.outputs is not None:
        renamed.outputs = [names[name] for name in renamed.outputs]
    if renamed.weights is not None:
        renamed.weights = {f"{names[key.rsplit('.', 1)[0]]}.{key.rsplit('.', 1)[1]}": value
                           for key, value in renamed.weights.items()}
    return renamed


def _fit_weights(case: Case) -> Case | None:
    """`case` with weights of the shapes its model now needs (old ones kept where they fit),
    or None when the model is no longer valid."""
    try:
        seeded = _load_with_seed(case.spec)
    except CnncError:
        return None
    if case.spec.weights is None:
        return case
    rng = np.random.default_rng(0)
    weights: dict[str, np.ndarray] = {}
    for name in seeded.order():
        for param, array in seeded.params(name).items():
            key = f"{name}.{param}"
            old = case.spec.weights.get(key)
            if old is not None and old.shape == array.shape:
                weights[key] = old
            elif param == "running_var":
                weights[key] = np.ones(array.shape, np.float32)
            else:
                weights[key] = rng.uniform(-1, 1, array.shape).astype(np.float32)
    spec = case.spec.copy()
    spec.weights = weights
    return replace(case, spec=spec)


def shrink(case: Case, failure: Failure, runner: Runner, seconds: float = 60.0,
           attempts: int = 300, log: Callable[[str], None] | None = None) -> Case:
    """A smaller case that still fails on `failure.config` the same way (same kind and error
    type): greedy, trying every candidate in turn until none still fails."""
    deadline = time.monotonic() + seconds
    tried = 0
    improved = True
    while improved and time.monotonic() < deadline and tried < attempts:
        improved = False
        for candidate in _candidates(case):
            if time.monotonic() >= deadline or tried >= attempts:
                break
            fitted = _fit_weights(candidate)
            if fitted is None:
                continue
            tried += 1
            outcome = runner.evaluate(fitted, [failure.config])
            if any(found.signature == failure.signature for found in outcome.failures):
                case = fitted
                improved = True
                if log is not None:
                    log(f"  shrunk to {len(case.spec.layers)} layers, input "
                        f"{list(case.spec.input)}, batch {len(case.x)}")
                break
    return case


# --- writing and replaying failures ----------------------------------------------------------


def write_case(directory: Path, case: Case, failure: Failure | None, configs: list[str],
               extra: dict[str, Any] | None = None) -> Path:
    """The files that reproduce `case`: model.yaml, model.weights.npz, input.npy, case.json."""
    if directory.exists():
        shutil.rmtree(directory)
    case.spec.write(directory)
    np.save(directory / INPUT_FILE, present(case.x, case.layout)
            if case.layout.startswith(("float", "int")) else case.x)
    record: dict[str, Any] = {
        "configs": configs,
        "layout": case.layout,
        "input_kind": case.input_kind,
        "schedule": case.schedule,
        **(extra or {}),
    }
    if failure is not None:
        record["failure"] = {"config": failure.config, "kind": failure.kind,
                             "error": failure.error, "message": failure.message}
    (directory / CASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def read_case(directory: Path) -> tuple[Path, np.ndarray, str, list[str], dict[str, Any]]:
    """A written case: the model path, the input values, the layout, the configurations and
    the whole record of case.json."""
    record = json.loads((directory / CASE_FILE).read_text())
    x = np.load(directory / INPUT_FILE, allow_pickle=False)
    layout = record.get("layout", "c")
    if not layout.startswith(("float", "int")):
        x = np.ascontiguousarray(x, np.float32)
    configs = list(record.get("configs") or CONFIGS)
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        raise ValueError(f"{directory / CASE_FILE} names the configuration '{unknown[0]}', "
                         f"which this cnnc does not know; known: {', '.join(CONFIGS)}")
    return directory / MODEL_FILE, x, layout, configs, record


def case_dirs(root: Path) -> list[Path]:
    """`root` itself when it holds a case, else the cases in its subfolders, sorted."""
    if (root / CASE_FILE).exists():
        return [root]
    return sorted(path.parent for path in root.glob(f"*/{CASE_FILE}"))


def replay(directory: Path) -> Outcome:
    """Run a written case again on its configurations, in this process."""
    model, x, layout, configs, record = read_case(directory)
    # A case of another dtype holds the array as it was passed; others hold float32 values.
    return evaluate(model, x, "c" if layout.startswith(("float", "int")) else layout, configs,
                    schedule=record.get("schedule"))


# --- the fuzzing loop ------------------------------------------------------------------------


@dataclass
class Report:
    """What a fuzzing run did and found."""

    seed: int
    models: int = 0
    runs: int = 0  # (model, configuration) pairs
    seconds: float = 0.0
    excused: int = 0
    failures: list[tuple[int, Failure]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    runs_per_config: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        configs = ", ".join(f"{name} {count}" for name, count in
                            sorted(self.runs_per_config.items()))
        lines = [f"fuzzed {self.models} models (seed {self.seed}) in {self.seconds:.1f} s: "
                 f"{self.runs} runs ({configs}); {len(self.failures)} failures"]
        if self.excused:
            lines.append(f"{self.excused} output values matched only within the float32 "
                         "envelope of an ill-conditioned model")
        for index, failure in self.failures[:20]:
            lines.append(f"  model {index}: {failure.describe()}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more")
        lines += [f"wrote {path}" for path in self.written]
        return "\n".join(lines)


def fuzz(seed: int = 0, count: int | None = None, seconds: float | None = None,
         targets: list[str] | None = None, sample: int | None = None, jobs: int = 1,
         out: Path | None = None, shrink_seconds: float = 60.0, max_shrunk: int = 5,
         log: Callable[[str], None] | None = None) -> Report:
    """Generate and check models `seed`/0, 1, 2, ... until `count` models or `seconds` have
    passed; shrink up to `max_shrunk` failures of distinct kinds and write them under `out`."""
    targets = list(targets or CONFIGS)
    unknown = [name for name in targets if name not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown fuzzing target {unknown[0]!r}; targets: "
                         f"{', '.join(CONFIGS)}")
    if count is None and seconds is None:
        count = 100
    report = Report(seed)
    start = time.monotonic()
    deadline = start + seconds if seconds is not None else None
    limit = count if count is not None else 1 << 62
    jobs_iter = (Job(configs_for(index, targets, sample), seed, index) for index in range(limit))
    found: list[tuple[int, Job, Outcome]] = []
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-cache-") as cache, \
            Runner(jobs, os.environ.get("CNNC_CACHE_DIR", cache)) as runner:
        for _, job, outcome in runner.run(jobs_iter, deadline):
            report.models += 1
            report.runs += len(outcome.configs)
            report.excused += outcome.excused
            for name in outcome.configs:
                report.runs_per_config[name] = report.runs_per_config.get(name, 0) + 1
            for op in outcome.ops:
                report.ops[op] = report.ops.get(op, 0) + 1
            if outcome.failures:
                found.append((job.index, job, outcome))
                for failure in outcome.failures:
                    report.failures.append((job.index, failure))
                    if log is not None:
                        log(f"model {job.index}: {failure.describe()}")
            if log is not None and report.models % 50 == 0:
                log(f"{report.models} models, {len(report.failures)} failures, "
                    f"{time.monotonic() - start:.0f} s")
        report.seconds = time.monotonic() - start
        found.sort(key=lambda item: item[0])
        if out is not None and found:
            _write_failures(found, runner, out, seed, shrink_seconds, max_shrunk, report, log)
    return report


def _write_failures(found: list[tuple[int, Job, Outcome]], runner: Runner, out: Path,
                    seed: int, shrink_seconds: float, max_shrunk: int, report: Report,
                    log: Callable[[str], None] | None) -> None:
    # Distinct kinds of failure are shrunk first, then more of the same, up to max_shrunk.
    seen: set[tuple[str, str, str]] = set()
    firsts = []
    for item in found:
        if item[2].failures[0].signature not in seen:
            seen.add(item[2].failures[0].signature)
            firsts.append(item[0])
    chosen = set((firsts + [item[0] for item in found if item[0] not in firsts])[:max_shrunk])
    for index, job, outcome in found:
        failure = outcome.failures[0]
        case = job.resolve()
        directory = out / f"seed{seed}-model{index}-{failure.config}-{failure.kind}"
        shrunk = False
        if index in chosen:
            if log is not None:
                log(f"shrinking model {index} ({failure.describe()})")
            case = shrink(case, failure, runner, shrink_seconds, log=log)
            shrunk = True
            again = runner.evaluate(case, [failure.config])
            failure = next((item for item in again.failures
                            if item.signature == failure.signature), failure)
        elif len(report.written) >= 20:
            continue
        report.written.append(write_case(directory, case, failure, job.configs,
                                         {"seed": seed, "index": index, "shrunk": shrunk}))


# --- the command -----------------------------------------------------------------------------


class _Failure(click.ClickException):
    """A mistake in the command's options or files: `error: ...` and exit status 2, as every
    cnnc command reports one."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _target_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        raise _Failure(f"unknown target '{unknown[0] if unknown else text}'; expected some "
                       f"of {', '.join(CONFIGS)}")
    return names


@click.command("fuzz")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The seed: model i of seed S is always the same model.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="How many models to check.  [default: 100, or unlimited with --seconds]")
@click.option("--seconds", type=click.FloatRange(min=0), default=None,
              help="Stop starting new models after this many seconds.")
@click.option("--targets", default=",".join(CONFIGS), show_default=True,
              help="Comma-separated configurations to compile each model for.")
@click.option("--sample", type=click.IntRange(min=0), default=None,
              help="Run each model on the first target and this many of the others, in turn "
                   "(faster); by default every target, and the bounds-checking ones on every "
                   f"{BOUNDS_EVERY}th model.")
@click.option("--jobs", "-j", type=click.IntRange(min=0), default=None,
              help="Worker processes (0: run in this process).  [default: all cores]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fuzz-failures"), show_default=True,
              help="Where each failure is written, shrunk, as model.yaml, model.weights.npz, "
                   "input.npy and case.json.")
@click.option("--shrink-seconds", type=click.FloatRange(min=0), default=60.0,
              show_default=True, help="Time spent shrinking each distinct failure.")
@click.option("--replay", "replay_dir", type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path),
              default=None, help="Run the cases written in DIR (or its subfolders) again.")
def fuzz_command(seed: int, count: int | None, seconds: float | None, targets: str,
                 sample: int | None, jobs: int | None, out_dir: Path, shrink_seconds: float,
                 replay_dir: Path | None) -> None:
    """Check random valid models against the NumPy reference on every target.

    Each model is written in the model format, loaded, compiled for each target (llvm fused
    and unfused, on 1 and 2 threads, cuda-sim, and with bounds checking) and run on inputs of
    large, tiny, saturating, NaN and infinite values; every output is compared with the
    reference at rtol=1e-4, atol=1e-5. A crash, a compile error or a mismatch is shrunk and
    written under --out. Exits with status 1 when anything failed.
    """
    if replay_dir is not None:
        failed = 0
        directories = case_dirs(replay_dir)
        if not directories:
            raise _Failure(f"no cases (folders with {CASE_FILE}) in {replay_dir}")
        for directory in directories:
            try:
                outcome = replay(directory)
            except (ValueError, OSError) as error:
                raise _Failure(str(error)) from None
            status = "ok" if not outcome.failures else "FAILED"
            click.echo(f"{directory}: {status} ({', '.join(outcome.configs)})")
            for failure in outcome.failures:
                click.echo(f"  {failure.describe()}")
            failed += bool(outcome.failures)
        click.echo(f"{len(directories) - failed} of {len(directories)} cases pass")
        if failed:
            raise SystemExit(1)
        return
    report = fuzz(seed, count, seconds, _target_list(targets), sample,
                  jobs if jobs is not None else (os.cpu_count() or 1), out_dir,
                  shrink_seconds, log=lambda line: click.echo(line, err=True))
    click.echo(report.summary())
    if report.failures:
        raise SystemExit(1)
