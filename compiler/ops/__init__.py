"""The op registry: for every op, everything cnnc knows about it (`OpSpec`), one file per op
family. This is the one place that knows what an op means: the frontends ask it to check a
layer, passes what fuses, the reference how to compute, lowering how to lower, and the
profile, the bench engines and the fuzzer derive their tables from it.
"""

from __future__ import annotations

from cnnc.ops import activation, conv, dense, elementwise, pool, shape
from cnnc.ops.elementwise import batchnorm_scale_shift
from cnnc.ops.spec import (
    REQUIRED,
    Attr,
    AttrError,
    Attrs,
    FuzzForm,
    FuzzLimits,
    OnnxForm,
    OpKind,
    OpSpec,
    Params,
    Shape,
    ShapeError,
    WindowRule,
    window_out,
)

# The order is the one error messages list the ops in.
_ORDER = ("conv2d", "dense", "maxpool2d", "avgpool2d", "global_avgpool2d", "batchnorm2d",
          "sigmoid", "relu", "tanh", "softmax", "flatten", "add", "concat")
_SPECS = {spec.name: spec for family in (conv, dense, pool, elementwise, activation, shape)
          for spec in family.SPECS}
OPS: dict[str, OpSpec] = {
    **{name: _SPECS[name] for name in _ORDER if name in _SPECS},
    **{name: spec for name, spec in _SPECS.items() if name not in _ORDER},
}

ALIASES = {"linear": "dense"}

# The ops a layer may name as its `activation:`.
ACTIVATIONS = tuple(name for name, spec in OPS.items() if spec.activation)


def lookup(name: str) -> OpSpec | None:
    """The spec of op `name` (aliases included), or None."""
    return OPS.get(ALIASES.get(name, name))


__all__ = ["ACTIVATIONS", "ALIASES", "OPS", "REQUIRED", "Attr", "AttrError", "Attrs", "FuzzForm",
           "FuzzLimits", "OnnxForm", "OpKind", "OpSpec", "Params", "Shape", "ShapeError",
           "WindowRule", "batchnorm_scale_shift", "lookup", "window_out"]
