"""Compiled models beyond one process: pickling by recipe, the exported library through
ctypes, Dask (a LocalCluster of two worker processes) and Ray Data (where installed)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLES, ROOT, run_cli

import cnnc
from cnnc import pickling
from cnnc.pickling import ModelRef

LENET = EXAMPLES / "lenet.yaml"


def lenet(tmp_path: Path, seed: int) -> Path:
    """LeNet with weights drawn from `seed`: a model no other test has built in this process."""
    path = tmp_path / f"lenet_{seed}.yaml"
    path.write_text(LENET.read_text().replace("seed: 0", f"seed: {seed}"))
    return path


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 1, 28, 28), dtype=np.float32)


def test_import_cnnc_imports_neither_dask_nor_ray_nor_llvmlite() -> None:
    code = ("import sys, cnnc; print(sorted(m for m in ('dask', 'distributed', 'ray', "
            "'llvmlite') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


def test_unpickling_in_the_process_that_compiled_returns_the_model_itself() -> None:
    model = cnnc.compile(LENET, threads=1)
    before = pickling.build_count()
    assert pickle.loads(pickle.dumps(model)) is model
    assert pickling.build_count() == before


def test_a_pickle_carries_the_recipe_not_the_code(tmp_path: Path) -> None:
    model = cnnc.compile(lenet(tmp_path, 11), threads=1, schedule={"*": {}})
    payload = pickle.dumps(model)
    x = images(300)
    expected = model(x)
    del model  # the process forgets it, as a fresh worker would not have it
    before = pickling.build_count()
    rebuilt = pickle.loads(payload)
    again = pickle.loads(payload)
    assert again is rebuilt
    assert pickling.build_count() == before + 1
    np.testing.assert_array_equal(rebuilt(x), expected)
    assert b"ELF" not in payload  # no object code travels
    assert rebuilt._cnnc_recipe.options["schedule"] == {"*": {}}


def test_a_cuda_sim_model_pickles_by_its_recipe(tmp_path: Path) -> None:
    model = cnnc.compile(lenet(tmp_path, 12), target="cuda-sim")
    payload = pickle.dumps(model)
    x = images(5)
    expected = model(x)
    del model
    rebuilt = pickle.loads(payload)
    assert type(rebuilt).__name__ == "CudaModel" and rebuilt.target == "cuda-sim"
    np.testing.assert_array_equal(rebuilt(x), expected)


def _unpickle_and_run(model: Any, payload: bytes, x: np.ndarray) -> tuple[Any, ...]:
    """In a spawned process: the model it was sent, the same model unpickled once more."""
    again = pickle.loads(payload)
    return model(x), again(x), again is model, pickling.build_count(), model.threads


def test_a_model_sent_to_a_spawned_process_compiles_once_and_gives_the_same_bits() -> None:
    model = cnnc.compile(LENET, threads=2)
    x = images(500)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        first, second, same, builds, threads = pool.apply(
            _unpickle_and_run, (model, pickle.dumps(model), x))
    np.testing.assert_array_equal(first, model(x))
    np.testing.assert_array_equal(second, model(x))
    assert same and builds == 1 and threads == 2


def test_weights_that_fail_their_hash_are_refused(tmp_path: Path) -> None:
    model = cnnc.compile(lenet(tmp_path, 13), threads=1)
    rebuild, (state,) = model.__reduce__()
    graph = state["graph"].copy()
    layer = next(name for name in graph.order() if graph.params(name))
    key = next(iter(graph.params(layer)))
    graph.params(layer)[key] = graph.params(layer)[key] + np.float32(1e-3)
    for tampered in ({**state, "graph": graph}, {**state, "weights_sha256": "0" * 64}):
        payload = pickle.dumps(_Pickled(rebuild, tampered))
        with pytest.raises(cnnc.ModelError, match=r"^model 'lenet': its weights do not match "
                                                  r"the hash they were pickled with") as error:
            pickle.loads(payload)
        assert "\n" not in str(error.value)


class _Pickled:
    """Pickles as `function(state)`: a model's pickle with its state changed in transit."""

    def __init__(self, function: Any, state: dict[str, Any]) -> None:
        self.reduced = (function, (state,))

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced


def test_a_process_without_llvmlite_fails_to_unpickle_with_one_line(tmp_path: Path) -> None:
    payload = tmp_path / "model.pickle"
    payload.write_bytes(pickle.dumps(cnnc.compile(lenet(tmp_path, 14), threads=1)))
    code = ("import pickle, sys; sys.modules['llvmlite'] = None\n"
            "import cnnc\n"
            f"try: pickle.loads(open({str(payload)!r}, 'rb').read())\n"
            "except cnnc.CompileError as error: print(type(error).__name__, error)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    assert result.stdout.startswith("CompileError this worker cannot compile model 'lenet': ")
    assert "cnnc.load_library" in result.stdout and result.stdout.count("\n") == 1


def test_a_model_built_in_python_without_compile_refuses_to_pickle_clearly() -> None:
    model = cnnc.compile(LENET, threads=1)
    del model._cnnc_recipe
    with pytest.raises(cnnc.CnncError, match="was not made by cnnc.compile"):
        pickle.dumps(model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lenet_library")
    result = run_cli("compile", LENET, "-o", directory)
    assert result.returncode == 0, result.stderr
    return directory


def test_load_library_runs_the_exported_lenet_as_the_jit_model_does(exported: Path) -> None:
    library = cnnc.load_library(exported)
    x = images(37)
    np.testing.assert_array_equal(library(x), cnnc.compile(LENET, threads=1)(x))
    assert library.input_shape == (1, 28, 28) and library.output_shapes == [(10,)]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(library))(x), library(x))


def test_load_library_refuses_a_wrong_shape_and_a_missing_library(exported: Path,
                                                                   tmp_path: Path) -> None:
    library = cnnc.load_library(exported)
    with pytest.raises(cnnc.InputError,
                       match=r"library 'lenet' expects input \(N, 1, 28, 28\), got shape "
                             r"\(4, 1, 28, 27\)"):
        library(images(4)[..., :27])
    with pytest.raises(cnnc.CnncError, match="must hold exactly one NAME.so"):
        cnnc.load_library(tmp_path)


def test_a_library_changed_after_pickling_is_refused(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in exported.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    payload = pickle.dumps(cnnc.load_library(copy))
    with (copy / "lenet.so").open("ab") as file:
        file.write(b"\0")
    with pytest.raises(cnnc.CnncError, match="is not the library that was pickled"):
        pickle.loads(payload)


@pytest.fixture(scope="module")
def dask_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    distributed = pytest.importorskip("distributed", reason="needs cnnc[dask]")
    with pytest.MonkeyPatch.context() as patch:  # the workers inherit the private cache
        patch.setenv("CNNC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                      dashboard_address=None, silence_logs=logging.ERROR) \
                as cluster, distributed.Client(cluster) as client:
            yield client


def test_dask_predict_over_two_worker_processes_equals_the_local_call(dask_client: Any) -> None:
    import dask.array as da

    model = cnnc.compile(LENET, threads=2)
    # The images are made on the workers, as a real data source would be, and fetched too.
    x = da.random.default_rng(0).random((20_000, 1, 28, 28), chunks=(1000, 1, 28, 28),
                                        dtype=np.float32)
    y = cnnc.dask.predict(model, x)
    assert y.shape == (20_000, 10) and y.dtype == np.float32 and y.numblocks == (20, 1)
    local_x, remote_y = dask_client.gather(dask_client.compute([x, y]))
    np.testing.assert_array_equal(remote_y, model(local_x))
    builds = dask_client.run(pickling.build_count)
    assert sorted(builds.values()) == [1, 1]  # each worker process compiled once, not per task
    threads = dask_client.run(lambda: [built.threads for built in pickling._built.values()])
    assert sorted(threads.values()) == [[1], [1]]


def test_a_dask_worker_that_cannot_build_fails_the_task_with_one_line(dask_client: Any) -> None:
    import dask.array as da

    model = cnnc.compile(LENET, threads=1)
    bad = ModelRef.of(model, 1)
    bad._state = {**bad._state, "weights_sha256": "0" * 64}
    x = da.from_array(images(64), chunks=(32, 1, 28, 28))
    y = x.map_blocks(bad, dtype=np.float32, chunks=(x.chunks[0], (10,)), drop_axis=[2, 3],
                     meta=np.empty((0, 0), np.float32))
    with pytest.raises(cnnc.ModelError, match="weights do not match the hash") as error:
        dask_client.compute(y).result(timeout=60)
    assert "\n" not in str(error.value)


def test_dask_predict_refuses_images_of_the_wrong_shape() -> None:
    da = pytest.importorskip("dask.array", reason="needs cnnc[dask]")

    model = cnnc.compile(LENET, threads=1)
    with pytest.raises(cnnc.InputError, match=r"expects input f32\[N,1,28,28\], got shape "
                                              r"\(10, 1, 28, 27\)"):
        cnnc.dask.predict(model, da.zeros((10, 1, 28, 27), chunks=5))


def test_ray_data_map_batches_with_the_predictor_equals_the_local_call() -> None:
    pytest.importorskip("ray.data", reason="needs cnnc[ray] (ray[data])")
    import ray

    model = cnnc.compile(LENET, threads=1)
    x = images(2000)

    class Counting(cnnc.ray.Predictor):
        """The Predictor, reporting which actor and model ran each row."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            result = super().__call__(batch)
            rows = len(result["output"])
            result["actor"] = np.full(rows, os.getpid() * 1000 + id(self.model) % 1000)
            result["threads"] = np.full(rows, self.model.threads)
            return result

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"CNNC_CACHE_DIR": os.environ["CNNC_CACHE_DIR"]}})
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        dataset = ray.data.from_numpy(np.array_split(x, 4)).rename_columns({"data": "image"})
        for source in (str(LENET), model):  # a model file, and a compiled model pickled over
            rows = dataset.map_batches(Counting, fn_constructor_kwargs={"model": source},
                                       concurrency=2, batch_size=256).take_all()
            np.testing.assert_array_equal(np.stack([row["output"] for row in rows]), model(x))
            assert len({row["actor"] for row in rows}) <= 2  # one model per actor
            assert {row["threads"] for row in rows} == {1}  # the actor's one CPU
    finally:
        ray.shutdown()
