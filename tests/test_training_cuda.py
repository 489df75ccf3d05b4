"""Compiled training on the CUDA targets: the same training program printed as CUDA C, run on
cuda-sim (the host C++ compiler; every access checks its bounds), against the float64
reference backward and the reference trainer, and compiled by NVRTC for a GPU."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import LENET_8X8, agree
from conftest import build_graph as build
from numpy.testing import assert_allclose
from test_training_compiled import NORMALISED, VARIETY, _with, batch

import cnnc
from cnnc.backends.cuda import nvrtc
from cnnc.backends.cuda.driver_api import device_missing
from cnnc.backends.cuda.training import training_source
from cnnc.errors import InputError
from cnnc.optim import SGD, Adam
from cnnc.reference_backward import ReferenceTrainer, reference_backward
from cnnc.training.program import build as build_program

MODELS = [(LENET_8X8, (1, 8, 8)), (VARIETY, (3, 9, 10))]


def sim_trainer(graph: cnnc.Graph, **options: Any) -> Any:
    return cnnc.compile_training(graph, target="cuda-sim", check_bounds=True, **options)


@pytest.mark.parametrize(("layers", "shape"), MODELS, ids=["lenet8x8", "variety"])
@pytest.mark.parametrize(("loss", "reduction"), [("cross_entropy", "mean"),
                                                 ("squared_error", "sum")])
@pytest.mark.parametrize("count", [5, 37])
def test_cuda_sim_gradients_match_the_reference(layers: Any, shape: tuple[int, ...], loss: str,
                                                reduction: str, count: int) -> None:
    """The loss and every gradient of one step equal the float64 reference backward
    (rtol=1e-4, atol=1e-5): LeNet's conv+sigmoid and pool+sigmoid kernels are fused, the
    variety model's hardswish (whose gradient reads its input) is not."""
    graph = build(shape, layers)
    x, y = batch(graph, count, loss)
    expected = reference_backward(graph, x, y, loss=loss, reduction=reduction)
    trainer = sim_trainer(graph, loss=loss, reduction=reduction, optimizer=SGD(lr=0.0),
                          batch_size=48)
    assert_allclose(trainer.step(x, y), expected.loss, rtol=1e-5)
    gradients = trainer.gradients()
    assert set(gradients) == set(expected.gradients)
    for key, grad in expected.gradients.items():
        agree(gradients[key], grad, key)


def test_cuda_sim_batchnorm_and_dropout_train_as_the_reference() -> None:
    graph = build((2, 7, 7), NORMALISED)
    x, y = batch(graph, 21, "cross_entropy")
    expected = reference_backward(graph, x, y, training=True, seed=4, step=0)
    trainer = sim_trainer(graph, optimizer=SGD(lr=0.0), batch_size=32, seed=4)
    assert_allclose(trainer.step(x, y), expected.loss, rtol=1e-5)
    for key, grad in expected.gradients.items():
        agree(trainer.gradients()[key], grad, key)
    for key, value in expected.buffers.items():  # the running statistics
        agree(trainer.parameters()[key], value, key)
    scores = trainer.scores(x)  # eval mode, through the evaluate stages
    agree(scores, cnnc.reference(_with(graph, trainer.parameters()), x), "eval scores")


@pytest.mark.parametrize("optimizer", [SGD(lr=0.1, momentum=0.9, weight_decay=1e-3),
                                       Adam(lr=0.01)], ids=["sgd", "adam"])
def test_cuda_sim_steps_follow_the_reference_trainer(optimizer: Any) -> None:
    """Four steps of batches of different sizes follow the reference trainer, and the
    parameters after them agree with the CPU's compiled trainer's."""
    graph = build((1, 8, 8), LENET_8X8)
    sim = sim_trainer(graph, optimizer=optimizer, batch_size=20)
    cpu = cnnc.compile_training(graph, optimizer=optimizer, batch_size=20, threads=1)
    reference = ReferenceTrainer(graph, optimizer)
    for step in range(4):
        x, y = batch(graph, 20 - 3 * step, "cross_entropy", seed=step)
        want = reference.step(x, y)
        assert_allclose(sim.step(x, y), want, rtol=1e-4)
        assert_allclose(cpu.step(x, y), want, rtol=1e-4)
    for key, value in reference.parameters().items():
        agree(sim.parameters()[key], value, key)
        agree(sim.parameters()[key], cpu.parameters()[key], f"{key} (sim against llvm)")


def test_the_training_source_has_one_function_per_distinct_launch() -> None:
    """Every stage's launches are printed, the forward kernels that the step and the
    evaluation bind alike once."""
    program = build_program(build((1, 8, 8), LENET_8X8), "cross_entropy", SGD(lr=0.1), 16)
    source, stages = training_source(program)
    launches = [name for names in stages.values() for name in names]
    assert len(stages) == len(program.step) + len(program.evaluate)
    assert [len(stages[id(stage)]) for stage in program.step] == \
        [len(stage.launches) for stage in program.step]
    for name in set(launches):
        assert source.count(f'extern "C" __global__ void {name}(') == 1
    assert len(set(launches)) < len(launches)  # the evaluate stages reuse the forward's


@pytest.mark.skipif(nvrtc.available() is not None, reason="NVRTC is not installed")
def test_the_training_source_compiles_with_nvrtc() -> None:
    graph = build((2, 7, 7), NORMALISED)
    program = build_program(graph, "cross_entropy", Adam(lr=0.01), 16)
    source, stages = training_source(program)
    binary = nvrtc.compile_source(source, "cnnc_training.cu", "sm_90", use_cache=False)
    names = {name for names in stages.values() for name in names}
    assert names <= set(binary.resources), sorted(names - set(binary.resources))


@pytest.mark.gpu
@pytest.mark.skipif(device_missing() is not None, reason="no CUDA GPU")
def test_cuda_gpu_training_matches_the_reference() -> None:
    graph = build((3, 9, 10), VARIETY)
    x, y = batch(graph, 37, "cross_entropy")
    expected = reference_backward(graph, x, y)
    trainer = cnnc.compile_training(graph, optimizer=SGD(lr=0.0), batch_size=48,
                                    target="cuda")
    assert_allclose(trainer.step(x, y), expected.loss, rtol=1e-5)
    for key, grad in expected.gradients.items():
        agree(trainer.gradients()[key], grad, key)


def test_training_targets_are_checked() -> None:
    graph = build((1, 8, 8), LENET_8X8)
    with pytest.raises(InputError, match="unknown training target 'tpu'; expected llvm, "
                                         "cuda or cuda-sim"):
        cnnc.compile_training(graph, target="tpu")
    with pytest.raises(InputError, match="use target='cuda-sim' with it"):
        cnnc.compile_training(graph, target="llvm", check_bounds=True)
