"""Shrinking a failing case: greedily try smaller or simpler versions of it (fewer images,
outputs, layers, inputs; plainer attributes, names, weights and values) and keep each one
that still fails on the same configuration the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import numpy as np

from cnnc.errors import CnncError
from cnnc.graph import INPUT
from cnnc.tools.fuzz.judge import Failure
from cnnc.tools.fuzz.model import Case, ModelSpec, load_with_seed
from cnnc.tools.fuzz.runner import Runner
from cnnc.tools.fuzz.training import fit_targets


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


def _images(case: Case, chosen: slice) -> Case:
    """`case` with only the `chosen` images (and their targets)."""
    training = case.training
    if training is not None:
        training = replace(training, y=training.y[chosen].copy())
    return replace(case, x=case.x[chosen].copy(), training=training)


def _candidates(case: Case) -> Iterator[Case]:
    """Smaller or simpler versions of `case`, the most promising first."""
    spec, x = case.spec, case.x
    batch = len(x)
    if batch > 1:
        for image in range(min(batch, 4)):
            yield _images(case, slice(image, image + 1))
        yield _images(case, slice(0, batch // 2))
    if case.training is not None and case.training.batch_size > batch:
        yield replace(case, training=replace(case.training, batch_size=batch))
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
        seeded = load_with_seed(case.spec)
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
            if fitted is not None and fitted.training is not None:
                fitted = fit_targets(fitted)  # for the model's output now, or None
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
