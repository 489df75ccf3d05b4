"""Throughput of LeNet over many images: one local process, 2 Dask workers, 2 Ray actors.

    python scripts/bench_scale_out.py local|dask|ray [--images 100000]

Prints images per second and, for Dask and Ray, the time per task and per image beyond the
local single-thread cost (the overhead of scheduling and moving data). Numbers for
docs/scale-out.md; run one engine at a time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

import cnnc
from cnnc.util import ceil_div

LENET = str(Path(__file__).resolve().parent.parent / "examples" / "lenet.yaml")


def seconds(function: object, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def local(count: int) -> None:
    x = np.random.default_rng(0).random((count, 1, 28, 28), dtype=np.float32)
    for threads in (1, 2):
        model = cnnc.compile(LENET, threads=threads)
        model(x[:1000])
        took = seconds(lambda model=model: model(x))
        print(f"local threads={threads}: {took:.3f} s, {count / took:,.0f} images/s, "
              f"{took / count * 1e6:.2f} us/image")


def dask(count: int) -> None:
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    model = cnnc.compile(LENET, threads=1)
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        for chunk in (10_000, 1_000, 256):
            x = client.persist(da.random.default_rng(0).random(
                (count, 1, 28, 28), chunks=(chunk, 1, 28, 28), dtype=np.float32))
            wait(x)
            start = time.perf_counter()
            cnnc.dask.predict(model, x[:chunk]).compute()  # the workers compile here
            cold = time.perf_counter() - start
            took = seconds(lambda x=x: cnnc.dask.predict(model, x).compute())
            tasks = ceil_div(count, chunk)
            print(f"dask 2 workers, chunks of {chunk} ({tasks} tasks): {took:.3f} s, "
                  f"{count / took:,.0f} images/s (first call {cold:.2f} s)")


def ray(count: int) -> None:
    import ray
    import ray.data

    x = np.random.default_rng(0).random((count, 1, 28, 28), dtype=np.float32)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        blocks = ray.data.from_numpy(np.array_split(x, 20)).rename_columns({"data": "image"})
        blocks = blocks.materialize()
        for batch_size in (4096, 256):
            def run(batch_size: int = batch_size) -> None:
                out = blocks.map_batches(cnnc.ray.Predictor, fn_constructor_kwargs={"model": LENET},
                                         concurrency=2, batch_size=batch_size)
                out.materialize()
            took = seconds(run, repeats=2)  # each run starts its 2 actors (and compiles)
            batches = ceil_div(count, batch_size)
            print(f"ray 2 actors, batch_size={batch_size} ({batches} batches): {took:.3f} s, "
                  f"{count / took:,.0f} images/s (actor start and compile included)")
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", choices=("local", "dask", "ray"))
    parser.add_argument("--images", type=int, default=100_000)
    arguments = parser.parse_args()
    {"local": local, "dask": dask, "ray": ray}[arguments.engine](arguments.images)


if __name__ == "__main__":
    main()
