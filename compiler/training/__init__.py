"""Compiled training (`cnnc.compile_training`): the backward pass and the optimizer's step
as kernels of the same IR, run by the same backend as inference (docs/training.md).

`program` plans a step's kernels and memory, `kernels` holds the kernels a step adds to
the forward ones, `trainer` is the Python side. Importing this package imports no backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnc.training.trainer import Trainer


def compile_training(*args: Any, **kwargs: Any) -> Trainer:
    """See `cnnc.training.trainer.compile_training`."""
    from cnnc.training.trainer import compile_training as compile_

    return compile_(*args, **kwargs)


__all__ = ["compile_training"]
