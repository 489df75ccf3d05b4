"""The fuzzer's training mode (`cnnc fuzz --train`): random valid models of the ops whose
gradient cnnc compiles, a random loss, reduction and batch, one compiled step with lr 0, and
its loss and every gradient judged against `cnnc.reference_backward` (by `cnnc.compare`'s
rule, widened only within the float32 envelope, as forward outputs are); and the same bits on
one thread and two, on a repeated step, and for an image alone after a full batch.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from cnnc import ops
from cnnc.compare import ATOL, RTOL, bad_elements
from cnnc.dropout import MASKED_OPS
from cnnc.frontend import load
from cnnc.graph import INPUT, Graph
from cnnc.tools.fuzz.configs import TRAINING_CONFIGS
from cnnc.tools.fuzz.generate import (
    FLAT_OPS,
    IMAGE_OPS,
    INPUT_KINDS,
    INPUT_LAYOUTS,
    _Builder,
    _draw_weights,
    _pick,
    draw_input,
)
from cnnc.tools.fuzz.judge import NOISE, NOISE_SLACK, Failure, Outcome, error_text, same_bits
from cnnc.tools.fuzz.model import Case, ModelSpec, TrainingSetup, load_with_seed, present
from cnnc.tools.fuzz.torch_step import torch_step

MAX_TRAINING_BATCH = 40  # one, two or three blocks of 16 images
LOSSES = {"cross_entropy": 1.0, "squared_error": 1.0}
REDUCTIONS = {"mean": 1.0, "sum": 1.0}
# NaN and ±Inf inputs leave nothing to compare once a step has summed them into every gradient.
TRAINING_INPUT_KINDS = {kind: weight for kind, weight in INPUT_KINDS.items() if kind != "special"}
STREAM = 1  # the training mode's models come from rng((seed, index, STREAM))
DROPOUT_SEED = 0  # of the trainer's dropout masks, and so of the reference's


@functools.cache
def compilable_ops() -> frozenset[str]:
    """The ops whose gradient `cnnc.compile_training` compiles, as `check_compilable` says."""
    from cnnc.training.program import TRAINABLE_OPS

    return frozenset(name for name, spec in ops.OPS.items() if name in TRAINABLE_OPS or (
        spec.gradient is not None and spec.gradient.lower is not None))


def _trainable(weights: dict[str, float]) -> dict[str, float]:
    return {name: weight for name, weight in weights.items() if name in compilable_ops()}


def generate_training(seed: int, index: int) -> Case:
    """Training model number `index` of seed `seed`: always the same one."""
    rng = np.random.default_rng([seed, index, STREAM])
    channels = int(rng.integers(1, 5))
    height, width = (int(value) for value in rng.integers(1, 15, size=2))
    if rng.random() < 0.7:
        height, width = max(height, 5), max(width, 5)
    activations = tuple(name for name in ops.ACTIVATIONS if name in compilable_ops())
    builder = _Builder(rng, (channels, height, width), bool(rng.random() < 0.3), False,
                       _trainable(IMAGE_OPS), _trainable(FLAT_OPS), activations)
    builder.grow()
    loss = _pick(rng, LOSSES)
    builder.current = builder.layers[-1].name  # the loss reads the last layer
    if loss == "cross_entropy" and len(builder.shape(builder.current)) != 1:
        builder.try_add("flatten", [builder.current], {})
    if len(builder.shape(builder.current)) == 1 and rng.random() < 0.6:
        builder.try_add("dense", [builder.current], {"units": int(rng.integers(1, 11))})
    layers = builder.layers
    if rng.random() < 0.1 and len(layers) > 1:  # any order is valid when outputs says which
        order = rng.permutation(len(layers))
        spec = ModelSpec((channels, height, width), [layers[int(at)] for at in order],
                         [layers[-1].name])
    else:
        spec = ModelSpec((channels, height, width), layers)
    input_kind = _pick(rng, TRAINING_INPUT_KINDS)
    if rng.random() < 0.25:
        spec.seed = int(rng.integers(0, 2**62)) if rng.random() < 0.5 else 0
    else:
        scale = 1.0 if input_kind == "large" else float(rng.choice([1.0, 1.0, 3.0]))
        spec.weights = _draw_weights(rng, load_with_seed(spec), scale)
    batch = int(rng.integers(1, MAX_TRAINING_BATCH + 1))
    x = draw_input(rng, input_kind, (batch, channels, height, width))
    batch_size = batch if rng.random() < 0.5 else int(rng.integers(batch, 49))
    setup = TrainingSetup(loss, _pick(rng, REDUCTIONS), batch_size, np.zeros(0))
    case = Case(spec, x, _pick(rng, INPUT_LAYOUTS), input_kind, training=setup)
    fitted = fit_targets(case, rng)
    assert fitted is not None and fitted.training is not None, \
        "a generated training model must compile"
    if batch == 1 and _least_batch(load_with_seed(spec), fitted.x, fitted.training) > 1:
        # Batch norm over one value per channel is no batch statistic (PyTorch refuses it).
        x = draw_input(rng, input_kind, (int(rng.integers(2, MAX_TRAINING_BATCH + 1)),
                                         channels, height, width))
        fitted = fit_targets(replace(fitted, x=x), rng)
        assert fitted is not None
    return fitted


def _least_batch(graph: Graph, x: np.ndarray, setup: TrainingSetup) -> int:
    """1, or 2 when the reference step refuses image 0 alone (batch norm over one value)."""
    try:
        _reference(graph, x[:1], setup, 0)
    except ops.ShapeError:
        return 2
    return 1


def fit_targets(case: Case, rng: np.random.Generator | None = None) -> Case | None:
    """`case` with targets for its model's output and batch (the old ones kept where they
    fit), or None when cnnc cannot compile a step of the model."""
    from cnnc.errors import CnncError
    from cnnc.training.program import check_compilable

    setup = case.training
    assert setup is not None
    try:
        graph = load_with_seed(case.spec)
        check_compilable(graph, setup.loss)
    except CnncError:
        return None
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = graph.shape(graph.outputs[0])
    count = len(case.x)
    y = setup.y
    if setup.loss == "cross_entropy":
        if y.dtype.kind != "i" or y.ndim != 1 or len(y) < count or \
                (y.size and y[:count].max() >= shape[0]):
            y = rng.integers(0, shape[0], count)
    elif y.dtype.kind != "f" or y.shape[1:] != shape or len(y) < count:
        y = rng.standard_normal((count, *shape)).astype(np.float32)
    batch_size = max(setup.batch_size, count)
    return Case(case.spec, case.x, case.layout, case.input_kind, case.schedule,
                TrainingSetup(setup.loss, setup.reduction, batch_size, y[:count].copy()))


Step = tuple[float, dict[str, np.ndarray]]  # a step's loss and gradients


def _reference(graph: Graph, x: np.ndarray, setup: TrainingSetup, step: int, noisy: int = 0,
               rng_seed: int = 0) -> list[Step]:
    """The float64 reference of training step `step` (batch norm on the batch's statistics,
    dropout's masks of that step, as the compiled step computes), or with `noisy` its runs
    with the input and every parameter perturbed by a relative NOISE (which shows where the
    step is ill-conditioned at this input, as `judge.reference_variants` does), two more
    with every value between ops stored in float32, rounded up and rounded down (which shows
    where float32 storage alone decides a gradient: sigmoid's `y (1 - y)` from an output that
    rounds to 1.0), and PyTorch's float32 step where PyTorch is installed (`torch_step`)."""
    from cnnc.reference_backward import reference_backward

    rng = np.random.default_rng(rng_seed)
    x64 = np.asarray(x, np.float64)
    params = {f"{name}.{key}": np.asarray(value, np.float64) for name in graph.order()
              for key, value in graph.params(name).items()}
    runs: list[Step] = []

    def wobble(value: np.ndarray, perturbed: bool) -> np.ndarray:
        return value * (1 + NOISE * rng.uniform(-1, 1, value.shape)) if perturbed else value

    roundings: list[str | None] = [None] * max(noisy, 1) + (["up", "down"] if noisy else [])
    for rounding in roundings:
        perturbed = bool(noisy) and rounding is None

        with np.errstate(all="ignore"):
            backward = reference_backward(
                graph, wobble(x64, perturbed), setup.y[:len(x)], loss=setup.loss,  # type: ignore[arg-type]
                reduction=setup.reduction,  # type: ignore[arg-type]
                training=True, seed=DROPOUT_SEED, step=step,
                params={key: wobble(value, perturbed) for key, value in params.items()},
                float32_values=rounding)
        runs.append((backward.loss, backward.gradients))
    if noisy:
        with np.errstate(all="ignore"):
            theirs = torch_step(graph, x, setup.y[:len(x)], setup.loss, setup.reduction,
                                backward.masks)
        if theirs is not None:
            runs.append(theirs)
    return runs


def compare_step(got: Step, want: Step, noisy: Callable[[], list[Step]]
                 ) -> tuple[str | None, int]:
    """None when the loss and every gradient there is match the reference, else what differs;
    and how many values matched only within the float32 envelope (see `_reference`). Missing
    gradients are `_judge_steps`'s to report."""
    (loss, gradients), (want_loss, want_gradients) = got, want
    unknown = sorted(set(gradients) - set(want_gradients))
    if unknown:
        return f"gradients of {unknown}, which the model does not have", 0
    envelope: list[Step] | None = None
    excused = 0
    for key in ["loss", *sorted(set(want_gradients) & set(gradients))]:
        # The loss as an array of one value, so that it is judged as every gradient is.
        actual = np.atleast_1d(loss if key == "loss" else gradients[key])
        expected = np.atleast_1d(np.asarray(want_loss if key == "loss" else
                                            want_gradients[key], np.float64))
        if actual.shape != expected.shape:
            return f"gradient of {key} has shape {actual.shape}, expected {expected.shape}", 0
        bad = bad_elements(actual, expected)
        if not bad.any():
            continue
        envelope = envelope if envelope is not None else noisy()
        runs = [np.atleast_1d(run[0] if key == "loss" else run[1][key]) for run in envelope]
        with np.errstate(invalid="ignore", over="ignore"):
            spread = np.zeros(expected.shape)
            for run in runs:
                difference = np.abs(run - expected)
                difference[np.isnan(run) & np.isnan(expected)] = 0.0
                difference[np.isnan(difference)] = np.inf
                spread = np.maximum(spread, difference)
        still = bad & bad_elements(actual, expected, NOISE_SLACK * spread)
        for run in runs:
            still &= bad_elements(actual, run, NOISE_SLACK * spread)
        excused += int(bad.sum() - still.sum())
        if still.any():
            where = tuple(int(i) for i in np.argwhere(still)[0])
            what = "the loss" if key == "loss" else f"gradient of {key}"
            return (f"{what}: {int(still.sum())} of {still.size} values differ from the "
                    f"reference (rtol={RTOL:g}, atol={ATOL:g}); at {list(where)} got "
                    f"{actual[where]!r}, expected {expected[where]!r}"), excused
    return None, excused


def _same_step(first: Step, second: Step) -> bool:
    if set(first[1]) != set(second[1]):
        return False
    losses = np.array([first[0], second[0]], np.float32)
    return same_bits(losses[:1], losses[1:]) and all(
        same_bits(first[1][key], second[1][key]) for key in first[1])


def _judge_steps(steps: list[Step], counts: list[int], references: Callable[[int], Step],
                 noisy: Callable[[int], Callable[[], list[Step]]], masked: bool,
                 outcome: Outcome) -> tuple[str, str] | None:
    """(kind, message) of what is wrong with a trainer's steps 0, 1 and 2 (the batch, the
    same again and its first image or two, of `counts` images; `references(k)` is step k's
    reference); None when nothing is."""
    problem, excused = compare_step(steps[0], references(0), noisy(0))
    outcome.excused += excused
    if problem is not None:
        return "mismatch", f"batch {counts[0]}: {problem}"
    missing = sorted(set(references(0)[1]) - set(steps[0][1]))
    if missing:  # a kind of its own, so that it is shrunk apart from wrong values
        zero = all(not references(0)[1][key].any() for key in missing)
        return "missing", (f"gradients() has no {', '.join(missing)}; the reference's are "
                           f"{'zeros (the loss does not depend on them)' if zero else 'not zero'}")
    # lr 0 keeps every parameter, unless a gradient is not finite (0 * inf is NaN).
    if not all(np.isfinite(grad).all() for grad in steps[0][1].values()):
        return None
    if not masked and not _same_step(steps[0], steps[1]):
        return "nondeterministic", "a second step on the same batch gave other bits"
    for step, what in ((1, f"batch {counts[1]} again"), (2, f"batch {counts[2]} after it")):
        if step == 1 and not masked:
            continue  # the same bits as step 0
        problem, excused = compare_step(steps[step], references(step), noisy(step))
        outcome.excused += excused
        if problem is not None:
            return "mismatch", f"{what}: {problem}"
    return None


def evaluate_training(model: Path, x: np.ndarray, layout: str, setup: TrainingSetup,
                      configs: list[str], progress: Callable[[str], None] | None = None
                      ) -> Outcome:
    """Load `model` and judge a compiled training step of it on each configuration: the batch
    `x` (presented as `layout`) against the reference, the same batch again (the same bits:
    a step leaves nothing behind), image 0 alone, and two threads against one."""
    from cnnc.optim import SGD
    from cnnc.training.trainer import compile_training

    start = time.perf_counter()
    outcome = Outcome(list(configs))
    try:
        graph = load(model)
    except Exception as error:
        outcome.failures.append(Failure("load", "load", error_text(error), type(error).__name__))
        return outcome
    outcome.ops = sorted({graph.op(name) for name in graph.order() if name != INPUT})
    presented = present(x, layout)
    y = setup.y
    try:
        small = _least_batch(graph, presented, setup)
    except Exception as error:
        outcome.failures.append(Failure("reference", "reference", error_text(error),
                                        type(error).__name__))
        return outcome
    batches = {0: presented, 1: presented, 2: presented[:small]}  # step -> its images
    wants: dict[int, Step] = {}
    envelopes: dict[int, list[Step]] = {}

    def references(step: int) -> Step:
        if step not in wants:
            wants[step] = _reference(graph, batches[step], setup, step)[0]
        return wants[step]

    def noisy(step: int) -> Callable[[], list[Step]]:
        def make() -> list[Step]:
            if step not in envelopes:
                envelopes[step] = _reference(graph, batches[step], setup, step, noisy=3)
            return envelopes[step]
        return make

    try:
        references(0)
    except Exception as error:
        outcome.failures.append(Failure("reference", "reference", error_text(error),
                                        type(error).__name__))
        return outcome
    masked = any(graph.op(name) in MASKED_OPS for name in graph.order())
    results: dict[str, Step] = {}
    for name in configs:
        if progress is not None:
            progress(name)
        try:
            config = TRAINING_CONFIGS[name]
            trainer = compile_training(graph, setup.loss, setup.reduction, SGD(lr=0.0),
                                       setup.batch_size, config.threads, seed=DROPOUT_SEED,
                                       target=config.target,
                                       check_bounds=config.target == "cuda-sim")
        except Exception as error:
            outcome.failures.append(Failure(name, "compile", error_text(error),
                                            type(error).__name__))
            continue
        try:
            steps = [(trainer.step(images, y[:len(images)]), trainer.gradients())
                     for images in batches.values()]
        except Exception as error:
            outcome.failures.append(Failure(name, "crash", error_text(error),
                                            type(error).__name__))
            continue
        results[name] = steps[0]
        problem = _judge_steps(steps, [len(images) for images in batches.values()],
                               references, noisy, masked, outcome)
        if problem is not None:
            outcome.failures.append(Failure(name, *problem))
    one, two = results.get("train"), results.get("train-2threads")
    if one is not None and two is not None and not _same_step(one, two):
        outcome.failures.append(Failure("train-2threads", "nondeterministic",
                                        "two threads gave other bits than one"))
    outcome.seconds = time.perf_counter() - start
    return outcome


def evaluate_training_case(case: Case, configs: list[str],
                           progress: Callable[[str], None] | None = None) -> Outcome:
    """`evaluate_training` on a case held in memory: its model written to a temporary folder."""
    assert case.training is not None
    with tempfile.TemporaryDirectory(prefix="cnnc-fuzz-") as folder:
        path = case.spec.write(Path(folder))
        return evaluate_training(path, case.x, case.layout, case.training, configs, progress)


def training_record(setup: TrainingSetup) -> dict[str, Any]:
    """What case.json says of a training case (its targets are in target.npy)."""
    return {"loss": setup.loss, "reduction": setup.reduction, "batch_size": setup.batch_size}
