"""What importing cnnc costs: `import cnnc` loads neither llvmlite (a backend loads it when a
model is compiled) nor anything of `cnnc.tools` (the bench and the fuzzer), and the `cnnc`
command imports the fuzzer only when `cnnc fuzz` runs. Checked in a fresh interpreter with
`python -X importtime` and its sys.modules."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from cnnc.cli import main


def imported_by(statement: str) -> set[str]:
    """The modules that `statement` imports in a fresh interpreter: those `-X importtime`
    names, and those in sys.modules after it (importtime misses a module imported by
    importlib.import_module rather than by an import statement)."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          f"{statement}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True)
    # Lines read "import time:   self [us] |  cumulative | <indent>module".
    timed = {line.rsplit("|", 1)[1].strip() for line in run.stderr.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    return timed | set(run.stdout.split())


def test_importtime_lists_what_it_imports() -> None:
    # Without this the tests below would pass on an empty list.
    timed = imported_by("import cnnc.tools.fuzz.command") - imported_by("import sys")
    assert {"cnnc", "cnnc.reference", "cnnc.tools.fuzz.command", "cnnc.tools.workers",
            "click", "numpy"} <= timed


def test_import_cnnc_loads_neither_llvmlite_nor_the_tools() -> None:
    modules = imported_by("import cnnc")
    assert "cnnc.driver" in modules
    assert sorted(name for name in modules if name.split(".")[0] == "llvmlite") == []
    assert sorted(name for name in modules if name.startswith("cnnc.tools")) == []


def test_the_command_imports_the_fuzzer_and_the_bench_only_when_they_run() -> None:
    modules = imported_by("import cnnc.cli")
    assert "cnnc.cli" in modules
    assert sorted(name for name in modules if name.startswith("cnnc.tools")) == []
    lazily = imported_by("import click\nfrom cnnc.cli import main\n"
                         "main.get_command(click.Context(main), 'fuzz')")
    assert "cnnc.tools.fuzz.command" in lazily


def test_the_command_lists_and_runs_fuzz() -> None:
    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0 and "  fuzz " in listed.output
    helped = CliRunner().invoke(main, ["fuzz", "--help"])
    assert helped.exit_code == 0 and "--replay DIRECTORY" in helped.output
