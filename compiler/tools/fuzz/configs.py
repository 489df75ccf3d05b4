"""The configurations a fuzzed model is compiled and run on: target, fusion, threads, bounds
checking, and the model's random schedule; and which of them each model runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnnc.graph import Graph


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


@dataclass(frozen=True)
class TrainingConfig:
    """A configuration of the training mode (`cnnc fuzz --train`): one compiled training
    step on `threads` threads of `target` (cuda-sim checks the bounds of every access)."""

    name: str
    threads: int = 1
    target: str = "llvm"


# "train-2threads" must also give the bits of "train"; unless the targets are chosen,
# "train-cuda-sim" (a C++ compile per model) runs on every BOUNDS_EVERY-th model.
TRAINING_CONFIGS: dict[str, TrainingConfig] = {config.name: config for config in (
    TrainingConfig("train"),
    TrainingConfig("train-2threads", threads=2),
    TrainingConfig("train-cuda-sim", target="cuda-sim"),
)}


def training_configs_for(index: int, targets: list[str], chosen: bool) -> list[str]:
    """The training configurations model `index` runs on: every one of `targets` when the
    user `chosen` them, else cuda-sim only on every BOUNDS_EVERY-th model."""
    return [name for name in targets if chosen or TRAINING_CONFIGS[name].target == "llvm"
            or index % BOUNDS_EVERY == 0]


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
