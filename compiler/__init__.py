"""cnnc: a graph compiler for small convolutional networks.

`cnnc.load(path)` reads a model into an op graph, `cnnc.reference(graph, x)` runs the NumPy
oracle, and `cnnc.compile(model)` returns a JIT-compiled model called on NumPy arrays (it
pickles as its recipe). `cnnc.load_library(DIR)` runs an exported library; `cnnc.dask` and
`cnnc.ray`, imported on first use, map a model over their data (docs/scale-out.md);
`cnnc.optim` holds the optimizers training uses (docs/training.md).
"""

from typing import TYPE_CHECKING, Any

from cnnc.driver import compile
from cnnc.errors import (
    BatchMemoryError,
    BoundsError,
    CnncError,
    CompileError,
    DeviceError,
    InputError,
    ModelError,
    ScheduleError,
)
from cnnc.frontend import load
from cnnc.graph import Graph
from cnnc.library import load_library
from cnnc.model import Model
from cnnc.reference import reference
from cnnc.training import compile_training
from cnnc.version import __version__

if TYPE_CHECKING:
    from cnnc.backends.llvm.model import CompiledModel

__all__ = [
    "BatchMemoryError",
    "BoundsError",
    "CnncError",
    "CompiledModel",
    "CompileError",
    "DeviceError",
    "Graph",
    "InputError",
    "Model",
    "ModelError",
    "ScheduleError",
    "__version__",
    "compile",
    "compile_training",
    "load",
    "load_library",
    "reference",
]


def __getattr__(name: str) -> Any:
    """`cnnc.dask`, `cnnc.ray` and `cnnc.optim`, imported when first used;
    `cnnc.CompiledModel`, the LLVM backend's model class, too (`import cnnc` imports no
    backend)."""
    if name == "CompiledModel":
        from cnnc.backends.llvm.model import CompiledModel

        return CompiledModel
    if name in ("dask", "ray", "optim"):
        import importlib

        return importlib.import_module(f"cnnc.{name}")
    raise AttributeError(f"module 'cnnc' has no attribute {name!r}")
