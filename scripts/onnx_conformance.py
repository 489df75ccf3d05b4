"""Runs the `onnx` package's backend test cases whose ops cnnc maps, through cnnc's ONNX
frontend, on the reference, llvm and cuda-sim; writes the per-op table into docs/onnx.md.

    python scripts/onnx_conformance.py [--targets reference,llvm,cuda-sim] [--write]

A case's first graph input is the model input; its other inputs (constant test data) become
initializers. Outputs are judged by cnnc.compare (rtol=1e-4, atol=1e-5).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cnnc
from cnnc.compare import check_outputs

KINDS = ("node", "pytorch-converted", "pytorch-operator")
DOC = Path(__file__).resolve().parent.parent / "docs" / "onnx.md"
BEGIN, END = "<!-- conformance:begin -->", "<!-- conformance:end -->"


@dataclass
class Case:
    name: str
    kind: str
    model: Any  # onnx.ModelProto
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    ops: tuple[str, ...]


def supported_cases(kinds: tuple[str, ...] = KINDS) -> tuple[list[Case], dict[str, int]]:
    """The cases whose every op has an entry in cnnc's ONNX table, and how many cases each
    op outside the table has."""
    import onnx
    from onnx.backend.test.loader import load_model_tests

    from cnnc.frontend.onnx_table import HANDLERS

    cases, skipped = [], defaultdict(int)
    for kind in kinds:
        for test in load_model_tests(kind=kind):
            if test.model is not None:  # generated in memory by the onnx package
                model, (inputs, outputs) = test.model, test.data_sets[0]
            elif test.model_dir is not None and (Path(test.model_dir) / "model.onnx").is_file():
                model = onnx.load(Path(test.model_dir) / "model.onnx")
                data = Path(test.model_dir) / "test_data_set_0"
                inputs, outputs = (_read_all(data, "input"), _read_all(data, "output"))
            else:
                continue
            ops = tuple(sorted({node.op_type for node in model.graph.node}))
            missing = [op for op in ops if op not in HANDLERS]
            if missing:
                for op in missing:
                    skipped[op] += 1
                continue
            cases.append(Case(test.name, kind, model, list(inputs), list(outputs), ops))
    return cases, dict(skipped)


def _read_all(folder: Path, kind: str) -> list[np.ndarray]:
    import onnx

    paths = sorted(folder.glob(f"{kind}_*.pb"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    arrays = []
    for path in paths:
        tensor = onnx.TensorProto()
        tensor.ParseFromString(path.read_bytes())
        arrays.append(np.asarray(onnx.numpy_helper.to_array(tensor)))
    return arrays


def prepare(case: Case, folder: Path) -> tuple[Path, np.ndarray, list[np.ndarray]]:
    """The case as a one-input model (other inputs as initializers), its input and outputs."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    constant = {tensor.name for tensor in model.graph.initializer}
    graph_inputs = [value for value in model.graph.input if value.name not in constant]
    for value, array in list(zip(graph_inputs, case.inputs))[1:]:
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, value.name))
        if model.ir_version >= 4:  # before IR 4 an initializer is also a graph input
            model.graph.input.remove(value)
    path = folder / f"{case.name}.onnx"
    onnx.save(model, path)
    return path, case.inputs[0], case.outputs


def run_case(case: Case, targets: tuple[str, ...], folder: Path) -> dict[str, str]:
    """'pass', 'fail: ...' or 'unsupported: ...' per target."""
    if not case.inputs or not all(isinstance(array, np.ndarray)
                                  for array in (*case.inputs, *case.outputs)):
        return {target: "unsupported: inputs or outputs that are not tensors"
                for target in targets}
    try:
        path, x, want = prepare(case, folder)
        graph = cnnc.load(path)
    except cnnc.CnncError as error:
        reason = str(error).split(": ", 1)[-1].splitlines()[0]
        return {target: f"unsupported: {reason}" for target in targets}
    if x.dtype != np.float32:
        return {target: f"unsupported: input of dtype {x.dtype}" for target in targets}
    results = {}
    for target in targets:
        try:
            got: Any = cnnc.reference(graph, x) if target == "reference" else \
                cnnc.compile(graph, target=target)(x)
        except Exception as error:  # noqa: BLE001 - a conformance run reports, never stops
            results[target] = f"fail: {type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        checks = check_outputs(got, tuple(want), graph.outputs)
        bad = [check for check in checks if not check.ok]
        results[target] = "pass" if not bad else \
            f"fail: max abs error {bad[0].max_abs:.3g} ({bad[0].problem or 'values'})"
    return results


def table(cases: list[Case], results: dict[str, dict[str, str]], targets: tuple[str, ...],
          skipped: dict[str, int]) -> str:
    by_op: dict[str, list[str]] = defaultdict(list)
    for case in cases:
        by_op[case.ops[-1] if len(case.ops) == 1 else "+".join(case.ops)].append(case.name)
    lines = ["| ops | cases | " + " | ".join(f"{target} pass/fail/unsupported"
                                            for target in targets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in targets) + " |"]
    for op, names in sorted(by_op.items()):
        cells = []
        for target in targets:
            states = [results[name][target].split(":")[0] for name in names]
            cells.append(f"{states.count('pass')}/{states.count('fail')}/"
                         f"{states.count('unsupported')}")
        lines.append(f"| {op} | {len(names)} | " + " | ".join(cells) + " |")
    lines += ["", "Cases that do not pass everywhere, with the reason:", ""]
    for case in cases:
        verdicts = results[case.name]
        if any(verdict != "pass" for verdict in verdicts.values()):
            first = next(verdict for verdict in verdicts.values() if verdict != "pass")
            where = ", ".join(target for target in targets if verdicts[target] != "pass")
            lines.append(f"- `{case.name}` ({where}): {first}")
    lines += ["", "Ops of the suites outside cnnc's ONNX table (cases skipped): " +
              ", ".join(f"{op} ({count})" for op, count in sorted(skipped.items())) + "."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="reference,llvm,cuda-sim")
    parser.add_argument("--write", action="store_true", help="update docs/onnx.md")
    args = parser.parse_args()
    targets = tuple(args.targets.split(","))
    cases, skipped = supported_cases()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for case in cases:
            results[case.name] = run_case(case, targets, Path(folder))
            print(f"{case.name}: {results[case.name]}", file=sys.stderr)
    text = table(cases, results, targets, skipped)
    print(text)
    if args.write:
        doc = DOC.read_text()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
