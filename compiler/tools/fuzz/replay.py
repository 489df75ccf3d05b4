"""Case files: a failure written as model.yaml, model.weights.npz, input.npy and case.json
(and target.npy for the training mode) (`write_case`), read back and run again in this
process (`replay`, `cnnc fuzz --replay`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.tools.fuzz.configs import CONFIGS, TRAINING_CONFIGS
from cnnc.tools.fuzz.judge import Failure, Outcome, evaluate
from cnnc.tools.fuzz.model import (
    CASE_FILE,
    INPUT_FILE,
    MODEL_FILE,
    TARGET_FILE,
    Case,
    TrainingSetup,
    present,
)
from cnnc.tools.fuzz.training import evaluate_training, training_record


def write_case(directory: Path, case: Case, failure: Failure | None, configs: list[str],
               extra: dict[str, Any] | None = None) -> Path:
    """The files that reproduce `case`: model.yaml, model.weights.npz, input.npy, case.json
    and, for a training case, target.npy."""
    if directory.exists():
        shutil.rmtree(directory)
    case.spec.write(directory)
    np.save(directory / INPUT_FILE, present(case.x, case.layout)
            if case.layout.startswith(("float", "int")) else case.x)
    record: dict[str, Any] = {
        "configs": configs,
        "layout": case.layout,
        "input_kind": case.input_kind,
        "schedule": case.schedule,
        **(extra or {}),
    }
    if case.training is not None:
        np.save(directory / TARGET_FILE, case.training.y)
        record["training"] = training_record(case.training)
    if failure is not None:
        record["failure"] = {"config": failure.config, "kind": failure.kind,
                             "error": failure.error, "message": failure.message}
    (directory / CASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def read_case(directory: Path) -> tuple[Path, np.ndarray, str, list[str], dict[str, Any]]:
    """A written case: the model path, the input values, the layout, the configurations and
    the whole record of case.json."""
    record = json.loads((directory / CASE_FILE).read_text())
    x = np.load(directory / INPUT_FILE, allow_pickle=False)
    layout = record.get("layout", "c")
    if not layout.startswith(("float", "int")):
        x = np.ascontiguousarray(x, np.float32)
    known = TRAINING_CONFIGS if "training" in record else CONFIGS
    configs = list(record.get("configs") or known)
    unknown = [name for name in configs if name not in known]
    if unknown:
        raise ValueError(f"{directory / CASE_FILE} names the configuration '{unknown[0]}', "
                         f"which this cnnc does not know; known: {', '.join(known)}")
    return directory / MODEL_FILE, x, layout, configs, record


def case_dirs(root: Path) -> list[Path]:
    """`root` itself when it holds a case, else the cases in its subfolders, sorted."""
    if (root / CASE_FILE).exists():
        return [root]
    return sorted(path.parent for path in root.glob(f"*/{CASE_FILE}"))


def replay(directory: Path) -> Outcome:
    """Run a written case again on its configurations, in this process."""
    model, x, layout, configs, record = read_case(directory)
    if "training" in record:
        training = record["training"]
        setup = TrainingSetup(str(training["loss"]), str(training["reduction"]),
                              int(training["batch_size"]),
                              np.load(directory / TARGET_FILE, allow_pickle=False))
        return evaluate_training(model, x, "c" if layout.startswith(("float", "int"))
                                 else layout, setup, configs)
    # A case of another dtype holds the array as it was passed; others hold float32 values.
    return evaluate(model, x, "c" if layout.startswith(("float", "int")) else layout, configs,
                    schedule=record.get("schedule"))
