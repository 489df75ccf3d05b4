"""Random valid models: layers drawn from the op registry and checked against it, weights in a
few styles, inputs of hostile values (huge, tiny, saturating, NaN, ±Inf), random schedules.

Model `index` of seed `seed` is always the same model (`generate(seed, index)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.graph import INPUT, Graph
from cnnc.tools.fuzz.model import Case, LayerSpec, ModelSpec, load_with_seed

MAX_VALUES = 1536  # per-sample values of any tensor a generated model makes
MAX_CHANNELS = 12
WIDE_VALUES, WIDE_CHANNELS = 4096, 32  # the same for the one model in five that is wider
MAX_FEATURES = 512
MAX_BATCH = 64

# How often each op is drawn, for image and for flat inputs: from the registry's fuzz forms.
IMAGE_OPS = {name: spec.fuzz.image for name, spec in ops.OPS.items()
             if spec.fuzz and spec.fuzz.image}
FLAT_OPS = {name: spec.fuzz.flat for name, spec in ops.OPS.items()
            if spec.fuzz and spec.fuzz.flat}
# Layer names are free text: these reach every backend's generated code (comments, symbols).
HOSTILE_NAMES = ["conv", "a'b", 'say "hi"', "semi;colon", "define", "float", "__global__",
                 "ret void", "%0", "@main", "{", "}", "*/", "/* c", "back\\slash", "new\nline",
                 "tab\there", "ünïcødé", "名前", "#include <x>", "1e3", "0x10", "-1", "a.b",
                 " ", "$x", "`", "null", "true", "?? =", "a.relu", "N", "batch", "image",
                 "point", "thread", "cnnc_max", "int", "return", "x" * 60]
INPUT_KINDS = {"normal": 5.0, "uniform": 2.0, "large": 1.0, "tiny": 1.0, "saturating": 1.0,
               "special": 1.2, "integers": 0.5, "zeros": 0.2}
INPUT_LAYOUTS = {"c": 6.0, "fortran": 1.0, "strided": 1.0, "float64": 1.0, "float16": 0.5,
                 "int32": 0.3}


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[name] for name in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


class _Builder:
    """Grows a valid model layer by layer, checking each against the op registry."""

    def __init__(self, rng: np.random.Generator, input_shape: tuple[int, int, int],
                 hostile_names: bool, wide: bool = False,
                 image_ops: dict[str, float] | None = None,
                 flat_ops: dict[str, float] | None = None,
                 activations: tuple[str, ...] = ops.ACTIVATIONS) -> None:
        self.rng = rng
        # The ops it draws, by weight (the training mode draws only those it can compile).
        self.image_ops = IMAGE_OPS if image_ops is None else image_ops
        self.flat_ops = FLAT_OPS if flat_ops is None else flat_ops
        self.activations = activations
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

    def grow(self) -> None:
        """Add 1 to 7 layers (as many as a few tries per layer give), else at least a relu."""
        wanted = int(self.rng.integers(1, 8))
        for _ in range(wanted * 6):
            if len(self.layers) >= wanted:
                break
            self.step()
        if not self.layers:
            self.try_add("relu", [INPUT], {})

    def step(self) -> None:
        rng = self.rng
        rank = len(self.shape(self.current))
        if self.layers and rng.random() < 0.15:
            # A branch: the next layer reads an earlier tensor; the one left behind may be
            # joined again later by add or concat, become an output, or stay unused.
            self.current = str(rng.choice([INPUT, *(layer.name for layer in self.layers)]))
            rank = len(self.shape(self.current))
        op = _pick(rng, self.image_ops if rank == 3 else self.flat_ops)
        shape = self.shape(self.current)
        activation = str(rng.choice(self.activations)) if rng.random() < 0.3 and \
            self.activations else None
        form = ops.OPS[op].fuzz
        assert form is not None
        if form.joins is not None:
            self._join(op, shape, form.joins)
            return
        limits = ops.FuzzLimits(self.max_channels, MAX_FEATURES)
        attrs = form.draw(rng, shape, limits)
        if attrs is not None:
            anchor = ops.OPS[op].kind == "anchor"  # only a conv2d or dense layer may name one
            self.try_add(op, [self.current], attrs, activation if anchor else None)

    def _join(self, op: str, shape: tuple[int, ...],
              joins: Callable[[tuple[int, ...], tuple[int, ...]], bool]) -> None:
        rng = self.rng
        names = [INPUT, *(layer.name for layer in self.layers)]
        fits = [name for name in names if joins(shape, self.shape(name))]
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
        form = ops.OPS[graph.op(name)].fuzz
        if form is not None and form.params is not None:
            values = form.params(rng, {key: array.shape for key, array in params.items()})
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
    builder.grow()
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
        spec.weights = _draw_weights(rng, load_with_seed(spec), scale)
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

