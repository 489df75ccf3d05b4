"""cnnc: a graph compiler for small convolutional networks.

`cnnc.load(path)` reads a model into an op graph, `cnnc.reference(graph, x)` runs the NumPy
oracle, and `cnnc.compile(model)` returns a JIT-compiled model called on NumPy arrays.
"""

from cnnc.driver import CompiledModel, compile
from cnnc.errors import CnncError, CompileError, InputError, ModelError
from cnnc.frontend import load
from cnnc.graph import Graph
from cnnc.reference import reference
from cnnc.version import __version__

__all__ = [
    "CnncError",
    "CompiledModel",
    "CompileError",
    "Graph",
    "InputError",
    "ModelError",
    "__version__",
    "compile",
    "load",
    "reference",
]
