"""`cnnc train`: a small LeNet on the 8x8 digits from the command line, what it prints and
writes (weights that load with `weights:`, the history, a plot), and every mistake in its data
or options as one `error:` line with exit status 2."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import agree, run_cli
from numpy.testing import assert_allclose, assert_array_equal

import cnnc
from cnnc.cli import main
from cnnc.cli_train import EpochLog
from cnnc.compare import check_outputs
from cnnc.data import digits
from cnnc.training.trainer import describe

SMALL_LENET = """\
name: small_lenet
input: [1, 8, 8]
seed: 0
layers:
  - conv2d: {name: c1, out_channels: 4, kernel_size: 3, padding: 1}
  - relu
  - maxpool2d: {kernel_size: 2, stride: 2}
  - flatten
  - dense: {name: d1, units: 10}
"""
EPOCH_LINE = re.compile(r"epoch (\d+): loss (\d+\.\d{4}), train acc (\d\.\d{3}), "
                        r"test acc (\d\.\d{3}), [\d,]+ images/s")
TRAIN = ["--epochs", "2", "--lr", "0.9", "--init", "xavier_uniform", "--seed", "3",
         "--threads", "1"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "small_lenet.yaml"
    path.write_text(SMALL_LENET, encoding="utf-8")
    return path


def train(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["train", *map(str, args)])


def test_train_on_digits_prints_a_line_per_epoch_and_writes_what_it_is_asked(
        model: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")
    weights, history_file = tmp_path / "trained.npz", tmp_path / "history.json"
    result = run_cli("train", model, "--data", "digits", *TRAIN, "-o", weights,
                     "--json", history_file)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    lines = result.stdout.splitlines()
    assert lines[0] == ("training small_lenet on digits: 1,500 training and 297 test images, "
                        "batch 256, sgd lr 0.9, 1 thread")
    assert lines[3:] == [f"wrote {weights}", f"wrote {history_file}"]
    epochs = [EPOCH_LINE.fullmatch(line) for line in lines[1:3]]
    assert all(epochs), lines[1:3]

    # The same training in this process: the same losses, accuracies and weights.
    (x, y), test = digits()
    trainer = cnnc.compile_training(model, optimizer=cnnc.optim.SGD(lr=0.9), threads=1,
                                    init="xavier_uniform", seed=3)
    history = trainer.fit(x, y, 2, validation=test, seed=3, progress=False)
    for match, epoch in zip(epochs, history.epochs, strict=True):
        assert match is not None
        assert match.groups() == (str(epoch.epoch), f"{epoch.loss:.4f}",
                                  f"{epoch.train_accuracy:.3f}", f"{epoch.test_accuracy:.3f}")
    saved = json.loads(history_file.read_text(encoding="utf-8"))
    assert len(saved["losses"]) == 2 * 6  # ceil(1500 / 256) steps an epoch
    assert_allclose(saved["losses"], history.losses, rtol=1e-6)
    assert [epoch["epoch"] for epoch in saved["epochs"]] == [1, 2]
    assert sorted(saved["epochs"][0]) == ["epoch", "images_per_second", "loss",
                                          "test_accuracy", "train_accuracy"]
    assert saved["epochs"][1]["test_accuracy"] == history.epochs[1].test_accuracy
    with np.load(weights) as archive:
        assert sorted(archive.files) == ["c1.bias", "c1.weight", "d1.bias", "d1.weight"]
        for key, value in trainer.parameters().items():
            assert_array_equal(archive[key], value)

    # The weights file loads with `weights:`, and the model it gives computes the trainer's
    # scores.
    trained = tmp_path / "trained.yaml"
    trained.write_text(SMALL_LENET.replace("seed: 0", "weights: trained.npz"), encoding="utf-8")
    graph = cnnc.load(trained)
    assert_array_equal(graph.params("c1")["weight"], trainer.parameters()["c1.weight"])
    x_test = test[0]
    (check,) = check_outputs(cnnc.reference(graph, x_test), trainer.scores(x_test))
    assert check.ok, check


def test_cuda_sim_trains_as_the_cpu_does(model: Path, tmp_path: Path) -> None:
    """`--target cuda-sim` runs the same program as CUDA C: the trained weights agree with
    the CPU's (rtol=1e-4, atol=1e-5)."""
    data = bad_data(tmp_path)["ok"]
    options = ["--data", str(data), "--epochs", "3", "--lr", "0.5", "--batch-size", "4",
               "--test-fraction", "0.2"]
    cpu = train(model, *options, "--threads", "1", "-o", tmp_path / "cpu.npz")
    sim = train(model, *options, "--target", "cuda-sim", "-o", tmp_path / "sim.npz")
    assert cpu.exit_code == 0 and sim.exit_code == 0, (cpu.output, sim.output)
    assert "target cuda-sim" in sim.stdout.splitlines()[0]
    with np.load(tmp_path / "cpu.npz") as want, np.load(tmp_path / "sim.npz") as got:
        assert set(got.files) == set(want.files)
        for key in want.files:
            agree(got[key], want[key], key)


def test_plot_writes_a_png(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the digits data set ships with scikit-learn")
    pytest.importorskip("matplotlib", reason="--plot draws with matplotlib")
    plot = tmp_path / "loss.png"
    result = train(model, "--data", "digits", *TRAIN, "--plot", plot)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"wrote {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_squared_error_trains_on_one_hot_labels(model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x=rng.random((40, 8, 8)), y=np.arange(40) % 10,
             x_test=rng.random((5, 8, 8)), y_test=np.arange(5))
    result = train(model, "--data", data, "--loss", "squared_error", "--epochs", "1",
                   "--batch-size", "16")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"training small_lenet on {data}: 40 training and 5 test "
                               "images, batch 16, sgd lr 0.1, ")
    # No accuracy without class labels: squared error reports the loss alone.
    assert re.fullmatch(r"epoch 1: loss \d\.\d{4}, [\d,]+ images/s", lines[1]), lines[1]


def test_idx_files_gzipped_or_not_with_a_held_out_fraction(model: Path,
                                                           tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = tmp_path / "images.idx.gz"
    labels = tmp_path / "labels.idx"
    images.write_bytes(gzip.compress(idx_bytes(rng.integers(0, 256, (50, 8, 8), np.uint8))))
    labels.write_bytes(idx_bytes(np.arange(50, dtype=np.uint8) % 10))
    result = train(model, "--data", f"{images},{labels}", "--epochs", "1",
                   "--test-fraction", "0.1")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(
        f"training small_lenet on {images},{labels}: 45 training and 5 test images")
    assert EPOCH_LINE.fullmatch(result.stdout.splitlines()[1])


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, as MNIST ships."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(dim).to_bytes(4, "big") for dim in array.shape)
    return header + array.astype(np.uint8).tobytes()


def bad_data(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(2)
    files = {"lengths": tmp_path / "lengths.npz", "labels": tmp_path / "labels.npz",
             "shape": tmp_path / "shape.npz", "half_test": tmp_path / "half_test.npz",
             "truncated": tmp_path / "truncated.idx",
             "truncated_gz": tmp_path / "truncated.idx.gz",
             "label_file": tmp_path / "label_file.idx", "ok": tmp_path / "ok.npz"}
    np.savez(files["lengths"], x=rng.random((10, 1, 8, 8)), y=np.zeros(9, np.int64))
    np.savez(files["labels"], x=rng.random((10, 1, 8, 8)), y=np.arange(10) + 1)
    np.savez(files["shape"], x=rng.random((10, 1, 28, 28)), y=np.arange(10))
    np.savez(files["half_test"], x=rng.random((10, 8, 8)), y=np.arange(10),
             x_test=rng.random((2, 8, 8)))
    np.savez(files["ok"], x=rng.random((10, 8, 8)), y=np.arange(10))
    whole = idx_bytes(rng.integers(0, 256, (10, 8, 8), np.uint8))
    files["truncated"].write_bytes(whole[:-5])
    files["truncated_gz"].write_bytes(gzip.compress(whole)[:-10])
    files["label_file"].write_bytes(idx_bytes(np.arange(10, dtype=np.uint8)))
    return files


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "missing.npz"],
     "error: --data: no such file 'missing.npz'; expected mnist, digits, an .npz file or IDX "
     "files IMAGES,LABELS"),
    (["--data", "{lengths}"],
     "error: data file '{lengths}': x holds 10 images but y 9 targets; they must have one "
     "length"),
    (["--data", "{labels}"],
     "error: the training data: label 10 is out of range: the model has 10 classes, so labels "
     "must be 0 to 9"),
    (["--data", "{shape}"],
     "error: the training data: images of shape [1, 28, 28] do not fit model 'small_lenet', "
     "which expects [1, 8, 8]"),
    (["--data", "{half_test}"],
     "error: data file '{half_test}' has 'x_test' but not 'y_test'; give both or neither"),
    (["--data", "{truncated},{label_file}"],
     "error: IDX file '{truncated}' is truncated: shape [10, 8, 8] needs 640 bytes of "
     "data, found 635"),
    (["--data", "{truncated_gz},{label_file}"],
     "error: IDX file '{truncated_gz}' is a damaged or truncated gzip file (Compressed "
     "file ended before the end-of-stream marker was reached)"),
    (["--data", "a,b,c"],
     "error: --data 'a,b,c' is not a data set; expected mnist, digits, an .npz file or IDX "
     "files IMAGES,LABELS[,TEST_IMAGES,TEST_LABELS]"),
    (["--data", "digits", "--test-fraction", "0.1"],
     "error: --test-fraction applies to .npz and IDX data; digits has a test set of its own"),
    (["--data", "{ok}", "--test-fraction", "0.95"],
     "error: --test-fraction 0.95 of the 10 images of '{ok}' leaves none to train on"),
    (["--data", "{ok}", "--optimizer", "adam", "--momentum", "0.9"],
     "error: --momentum applies to --optimizer sgd; adam has betas"),
    (["--data", "{ok}", "-o", "no/such/dir/w.npz"],
     "error: --output: the directory 'no/such/dir' does not exist"),
    (["--data", "{ok}", "--plot", "loss.xyz"],
     "error: --plot: cannot tell the image format of 'loss.xyz'; name it .png (or .svg, .pdf: "
     "a suffix matplotlib knows)"),
    (["--data", "{ok}", "--target", "cuda-sim", "--threads", "2"],
     "error: --threads applies to --target llvm; cuda-sim runs a step on the simulated GPU"),
    (["--data", "{ok}", "--lr", "0"],
     "error: Invalid value for '--lr': 0.0 is not in the range x>0. (see `cnnc train --help`)"),
])
def test_a_mistake_is_one_error_line(model: Path, tmp_path: Path, args: list[str],
                                     message: str) -> None:
    if "--plot" in args:
        pytest.importorskip("matplotlib", reason="the plot's formats are matplotlib's")
    files = {name: str(path) for name, path in bad_data(tmp_path).items()}
    result = train(model, *[arg.format(**files) for arg in args])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr == message.format(**files) + "\n"


def test_plot_without_matplotlib_says_how_to_install_it(model: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import matplotlib` fail
    data = bad_data(tmp_path)["ok"]
    result = train(model, "--data", data, "--plot", tmp_path / "loss.png")
    assert result.exit_code == 2
    assert result.stderr == "error: --plot needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "loss.png").exists()


def test_the_progress_bar_goes_to_a_terminal_and_the_epoch_lines_to_stdout(
        model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    x, y = rng.random((20, 1, 8, 8), dtype=np.float32), np.arange(20) % 10
    trainer = cnnc.compile_training(model, batch_size=8, threads=1)
    history = trainer.fit(x, y, 2, log=EpochLog(bar=True))
    out, err = capsys.readouterr()
    assert out.splitlines() == [describe(epoch) for epoch in history.epochs]
    assert err.count("\r\x1b[K") == 2  # the bar is cleared before each epoch's line
    assert err.startswith("\repoch 1/2 [##########....................] loss ")

    trainer.fit(x, y, 1, log=EpochLog(bar=False))
    out, err = capsys.readouterr()
    assert (err, len(out.splitlines())) == ("", 1)


def test_help_shows_the_command_and_an_example() -> None:
    listing = CliRunner().invoke(main, ["--help"])
    assert re.search(r"^  train +Train MODEL on a data set", listing.stdout, re.MULTILINE)
    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    assert ("cnnc train lenet.yaml --data mnist --epochs 10 --lr 0.9 -o lenet.weights.npz "
            "--plot loss.png") in result.stdout
