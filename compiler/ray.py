"""`cnnc.ray.Predictor`: a compiled model as a Ray Data callable class.

    ds.map_batches(cnnc.ray.Predictor, fn_constructor_kwargs={"model": "lenet.yaml"},
                   concurrency=2, batch_size=256)

Ray builds one Predictor per actor, so the model compiles once per actor, with as many
threads as the CPUs Ray gave the actor (`num_cpus`, 1 unless asked). Ray does the scheduling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnc import pickling
from cnnc.errors import InputError
from cnnc.graph import Graph


class Predictor:
    """Runs `model` (a model file, a Graph or a compiled model) on batches {column: images}
    and returns the batch with the images replaced by "output" (by the output names for a
    model with several). Other keyword arguments go to `cnnc.compile`."""

    def __init__(self, model: str | Path | Graph | Any, *, column: str = "image",
                 threads: int | None = None, **compile_options: Any) -> None:
        threads = threads or pickling.worker_threads()
        if isinstance(model, (str, Path, Graph)):
            from cnnc.driver import compile as compile_model

            self.model = compile_model(model, threads=threads, **compile_options)
        else:  # a compiled model, unpickled here: built again with this actor's threads
            self.model = pickling.build(pickling.recipe_of(model).with_threads(threads))
        self.column = column
        self.outputs = ["output"] if len(self.model.output_shapes) == 1 else \
            list(self.model.graph.outputs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise InputError(f"batch has no column '{self.column}' (columns: "
                             f"{', '.join(batch) or 'none'}); pass column= to the Predictor")
        images = batch[self.column]
        if images.dtype == object:  # a column of arrays Ray did not stack into one tensor
            images = np.stack(list(images))
        result = self.model(images)
        outputs = result if isinstance(result, tuple) else (result,)
        kept = {name: values for name, values in batch.items() if name != self.column}
        return {**kept, **dict(zip(self.outputs, outputs))}
