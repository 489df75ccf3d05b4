"""Every option the README's command table documents exists and runs: the table is parsed,
and each documented option must appear in one of the invocations below, which all succeed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from cnnc.cli import main

ROOT = Path(__file__).parent.parent
LENET = str(ROOT / "examples" / "lenet.yaml")
SMALL = "input: [1, 6, 6]\nseed: 0\nlayers:\n  - conv2d: {out_channels: 2, kernel_size: 3}\n" \
        "  - relu\n  - flatten\n  - dense: {units: 3}\n"


def _documented() -> dict[str, set[str]]:
    """{command: the --options its table row and the shared-options paragraph name}."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| command | what it does |"):]
    table = table[: table.index("\n\n")]
    options: dict[str, set[str]] = {}
    for row in table.splitlines()[2:]:
        command = re.match(r"\| `cnnc (\w+)", row)
        assert command, row
        options[command.group(1)] = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", row))
    shared = text[text.index("`compile`, `run` and `bench` share"):]
    shared = shared[: shared.index("\n\n")]
    for name in ("compile", "run", "bench"):
        options[name] |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", shared))
    return options


def _invocations(tmp: Path) -> list[list[str]]:
    model = tmp / "small.yaml"
    model.write_text(SMALL)
    schedule = tmp / "schedule.json"
    schedule.write_text('{"*": {"oc_block": 1}}')
    tuned = tmp / "tuned.jsonl"
    x = tmp / "x.npy"
    import numpy as np

    np.save(x, np.random.default_rng(0).random((2, 1, 6, 6), dtype=np.float32))
    data = tmp / "data.npz"
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.random((40, 1, 6, 6), dtype=np.float32), y=rng.integers(0, 3, 40))
    return [
        ["graph", str(model), "--format", "dot"],
        ["run", str(model), "--input", str(x), "-o", str(tmp / "y.npy"), "--target",
         "reference", "--check"],
        ["run", str(model), "--batch", "2", "--seed", "1", "--check", "--no-fuse",
         "--schedule", str(schedule), "--disable-pass", "prune", "--threads", "2"],
        ["compile", str(model), "-o", str(tmp / "out"), "--emit", "ll,asm,obj,so",
         "--dump-ir", str(tmp / "ir"), "--no-fuse", "--schedule", str(schedule),
         "--disable-pass", "prune", "--threads", "1"],
        ["bench", str(model), "--against", "numpy", "--batch", "1,2", "--threads", "1",
         "--rounds", "3", "--profile", "--plot", str(tmp / "bench.png"), "--json",
         str(tmp / "bench.json"), "--quiet", "--no-fuse", "--schedule", str(schedule),
         "--disable-pass", "prune"],
        ["convert", str(model), "-o", str(tmp / "small.onnx")],
        ["convert", str(tmp / "small.onnx"), "--input-shape", "1,6,6", "-o",
         str(tmp / "back.yaml")],
        ["tune", str(model), "-o", str(tuned), "--seconds", "1", "--seed", "0"],
        ["run", str(model), "--schedule", str(tuned)],
        ["fuzz", "--seed", "0", "--count", "1", "--jobs", "0", "--out", str(tmp / "fuzz"),
         "--sample", "1"],
        ["fuzz", "--train", "--seed", "0", "--count", "1", "--jobs", "0"],
        ["bench", str(model), "--train", "--batch", "16", "--threads", "1", "--rounds", "3",
         "--lr", "0.1", "--quiet"],
        ["train", str(model), "--data", str(data), "--epochs", "1", "--batch-size", "16",
         "--lr", "0.01", "--optimizer", "adam", "--init", "xavier_uniform", "--threads", "1",
         "-o", str(tmp / "trained.npz"), "--plot", str(tmp / "loss.png")],
        ["train", str(model), "--data", str(data), "--epochs", "1", "--batch-size", "16",
         "--target", "cuda-sim"],
    ]


def test_every_documented_option_is_run_once(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the convert rows need onnx (pip install -e '.[onnx]')")
    invocations = _invocations(tmp_path)
    run_options: dict[str, set[str]] = {}
    for arguments in invocations:
        run_options.setdefault(arguments[0], set()).update(
            item for item in arguments if item.startswith("--"))
    documented = _documented()
    assert set(documented) == set(run_options)
    everything_run = set().union(*run_options.values())
    for command, options in documented.items():
        # The tune row's `--schedule` is the replay by `compile`/`run`, run below too.
        missing = options - (run_options[command] if command != "tune" else everything_run)
        missing -= {"--replay"}  # run on its own below
        assert not missing, f"README documents {sorted(missing)} for `cnnc {command}`"
    for arguments in invocations:
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 0, f"cnnc {' '.join(arguments)}:\n{result.output}"
    (tmp_path / "empty").mkdir()
    replay = CliRunner().invoke(main, ["fuzz", "--replay", str(tmp_path / "empty")])
    assert replay.exit_code == 2 and "no cases" in replay.output  # --replay is parsed and run
