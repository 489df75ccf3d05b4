"""Compiled models that pickle as their recipe: the graph with its weights, options, schedule.

What travels is never JIT code or a pointer: a process that unpickles a model rebuilds it
once (from the compile cache on disk when it has the code) and keeps it in a module-level
cache keyed by the weights' content hash, the options and the threads, so that a thousand
tasks on one worker compile once. `ModelRef` is the lazy form for schedulers that unpickle
tasks where they do not run them (Dask's scheduler does): it builds on its first call.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any

from cnnc import cache
from cnnc.errors import CnncError, CompileError, ModelError
from cnnc.graph import Graph
from cnnc.version import __version__

FORMAT = 1  # of the pickled state; bumped when its fields change

_lock = threading.Lock()  # one build at a time: two threads asking for one model build it once
_built: dict[str, Any] = {}  # models this process rebuilt, kept for the life of the process
_local: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()  # compiled here
_builds = 0


def content_hash(graph: Graph) -> str:
    """SHA-256 over everything a graph computes: its printed form, every node's attributes
    and every parameter's dtype, shape and bytes."""
    digest = hashlib.sha256(graph.to_text().encode())
    for name in graph.order():
        digest.update(f"\n{name} {sorted(graph.attrs(name).items())!r}".encode())
        for key, array in sorted(graph.params(name).items()):
            digest.update(f"\n{key} {array.dtype.str} {array.shape}\n".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Recipe:
    """What `cnnc.compile` was called with, in values that pickle: the graph (before the
    passes), the options of `compile` with the schedules read, and `threads` (None: the
    process's choice, see `worker_threads`)."""

    graph: Graph
    options: dict[str, Any]
    threads: int | None
    weights_sha256: str = ""

    def hashed(self) -> Recipe:
        if self.weights_sha256:
            return self
        return replace(self, weights_sha256=content_hash(self.graph))

    def with_threads(self, threads: int | None) -> Recipe:
        return replace(self.hashed(), threads=threads)

    def key(self, threads: int | None) -> str:
        """The module-level cache key of this recipe built with `threads`."""
        return _key(self.hashed().weights_sha256, self.options, threads)

    def state(self) -> dict[str, Any]:
        recipe = self.hashed()
        return {"format": FORMAT, "cnnc": __version__, "graph": recipe.graph,
                "weights_sha256": recipe.weights_sha256, "options": dict(recipe.options),
                "threads": recipe.threads}

    @staticmethod
    def from_state(state: dict[str, Any]) -> Recipe:
        """The recipe in `state`, refused with a clear error when it comes from another cnnc
        or its weights do not match their hash."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CnncError("not a pickled cnnc model of this version's format "
                            f"({FORMAT}); pickle it again with this cnnc")
        if state["cnnc"] != __version__:
            raise CnncError(f"model pickled by cnnc {state['cnnc']} cannot be rebuilt by cnnc "
                            f"{__version__}: install the same cnnc on every worker")
        graph = state["graph"]
        found = content_hash(graph)
        if found != state["weights_sha256"]:
            raise ModelError(f"model '{graph.name}': its weights do not match the hash they were "
                             f"pickled with (sha256 {state['weights_sha256'][:12]}... expected, "
                             f"{found[:12]}... found): the pickle was changed or damaged")
        return Recipe(graph, dict(state["options"]), state["threads"], found)


def remember(model: Any, graph: Graph, options: dict[str, Any], threads: int | None) -> Any:
    """Attach its recipe to a model `cnnc.compile` made; returns the model."""
    model._cnnc_recipe = Recipe(graph, options, threads)
    return model


def recipe_of(model: Any) -> Recipe:
    recipe = getattr(model, "_cnnc_recipe", None)
    if recipe is None:
        raise CnncError(f"model '{getattr(model, 'name', model)}' was not made by cnnc.compile "
                        "and cannot be pickled: compile it with cnnc.compile")
    if not recipe.weights_sha256:  # hashed once, when first pickled
        recipe = model._cnnc_recipe = recipe.hashed()
    return recipe


def reduce(model: Any) -> tuple[Any, tuple[dict[str, Any]]]:
    """`model.__reduce__`: rebuild from the recipe. An unpickle in this same process gets
    `model` itself back, as long as it is alive."""
    recipe = recipe_of(model)
    _local[recipe.key(_effective(recipe.threads))] = model
    return rebuild, (recipe.state(),)


def rebuild(state: dict[str, Any]) -> Any:
    """The model a pickled state describes, built at most once per process."""
    return build(Recipe.from_state(state))


def build(recipe: Recipe) -> Any:
    """The compiled model of `recipe` in this process, compiled on the first ask only."""
    global _builds
    threads = _effective(recipe.threads)
    key = recipe.key(threads)
    model = _find(key)
    if model is None:
        with _lock:
            model = _find(key)
            if model is None:
                model = _compile(recipe, threads)
                _built[key] = model
                _builds += 1
    return model


def _find(key: str) -> Any:
    model = _built.get(key)
    return model if model is not None else _local.get(key)


def _key(weights_sha256: str, options: dict[str, Any], threads: int | None) -> str:
    options_text = json.dumps(options, sort_keys=True, default=repr)
    return cache.key_of(weights_sha256, options_text, str(threads), __version__)


def _effective(threads: int | None) -> int | None:
    return threads if threads is not None else worker_threads()


def _compile(recipe: Recipe, threads: int | None) -> Any:
    from cnnc.driver import compile as compile_model

    options = dict(recipe.options)
    try:
        model = compile_model(recipe.graph, threads=threads,
                              disable_passes=tuple(options.pop("disable_passes")), **options)
    except ImportError as error:  # a worker installed without the compiler's dependencies
        raise CompileError(f"this worker cannot compile model '{recipe.graph.name}': {error}; "
                           "install cnnc with its dependencies, or ship an exported library "
                           "(cnnc.load_library)") from None
    model._cnnc_recipe = recipe  # re-pickled, it picks its threads where it lands
    return model


def build_count() -> int:
    """How many models this process has built from a pickle or a `ModelRef` (each compiled
    or loaded from the compile cache): at most one per model, options and threads."""
    return _builds


def worker_threads() -> int | None:
    """The threads a model built in this process may use: 1 in a Dask worker (one per worker
    thread, each running its own task), the CPUs Ray assigned in a Ray worker, otherwise
    None (the model's default: every CPU of this process)."""
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            get_worker()
            return 1
        except ValueError:  # not in a worker
            pass
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            if context.worker.mode == ray.WORKER_MODE:
                cpus = context.get_assigned_resources().get("CPU")
                return max(1, int(cpus)) if cpus else 1
    return None


class ModelRef:
    """A compiled model's recipe that builds the model in the process of its first call: a
    task function for schedulers that unpickle tasks where they do not run them."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state
        self._model: Any = None

    @classmethod
    def of(cls, model: Any, threads: int | None) -> ModelRef:
        return cls(recipe_of(model).with_threads(threads).state())

    @property
    def key(self) -> str:
        return _key(self._state["weights_sha256"], self._state["options"],
                    self._state["threads"])

    def model(self) -> Any:
        if self._model is None:
            self._model = rebuild(self._state)
        return self._model

    def __call__(self, x: Any) -> Any:
        return self.model()(x)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        return ModelRef, (self._state,)

    def __dask_tokenize__(self) -> str:
        return self.key
