"""What a new user met on a fresh machine (issue 10): each mistake gets one clear line, and
the documented commands work from anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cnnc
from cnnc.cli import _verdict, main
from cnnc.compare import check_output

ROOT = Path(__file__).parent.parent
LENET = ROOT / "examples" / "lenet.yaml"


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_nan_on_both_sides_is_agreement_in_run_check(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    x[0, 0, 3, 3] = np.nan  # image 0's logits are all NaN, in cnnc and in the reference
    np.save(tmp_path / "x.npy", x)
    code, out, err = _run("run", str(LENET), "--input", str(tmp_path / "x.npy"), "--check")
    assert code == 0, out + err
    assert "check %11: max abs error" in out and out.rstrip().endswith(": ok")
    assert "top-1: nan " in out  # a NaN row has no top-1 class, not class 0


def test_nan_on_one_side_is_a_mismatch_that_says_where() -> None:
    want = np.zeros((2, 3), np.float32)
    got = want.copy()
    got[1, 2] = np.nan
    result = check_output("y", got, want)
    assert not result.ok and result.first_bad == (1, 2) and result.bad == 1
    assert _verdict(result) == ("max abs error 0; 1 of 6 values beyond rtol=0.0001, "
                                "atol=1e-05; first at "
                                "[1, 2]: cnnc gives NaN where the reference does not: MISMATCH")
    flipped = check_output("y", want, got)
    assert "the reference gives NaN where cnnc does not" in _verdict(flipped)


def test_check_prints_only_what_decides_for_a_uint8_input(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 255, (2, 1, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    code, out, _ = _run("run", str(LENET), "--input", str(tmp_path / "x.npy"), "--check")
    assert code == 0
    assert "rel error" not in out
    assert "check %11: max abs error" in out


def test_an_empty_batch_prints_no_top1_line(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((0, 1, 28, 28), np.float32))
    code, out, _ = _run("run", str(LENET), "--input", str(tmp_path / "x.npy"))
    assert code == 0
    assert "output %11: f32[0,10]" in out and "top-1" not in out


def test_batch_zero_gives_empty_outputs_as_documented() -> None:
    model = cnnc.compile(LENET, threads=1)
    assert model(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    assert "N = 0 gives empty outputs" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("threads, error, message", [
    (0, ValueError, "threads must be an integer >= 1 or None (one per CPU), got 0"),
    (-4, ValueError, "got -4"),
    ("2", TypeError, "threads must be an integer >= 1 or None (one per CPU), got '2' (str)"),
    (1.5, TypeError, "got 1.5 (float)"),
])
def test_compile_refuses_a_bad_thread_count(threads: object, error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        cnnc.compile(LENET, threads=threads)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_reference_accepts_a_path_like_compile() -> None:
    x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    from_path = cnnc.reference(str(LENET), x)
    assert np.array_equal(from_path, cnnc.reference(cnnc.load(LENET), x))
    assert np.array_equal(from_path, cnnc.reference(LENET, x))


def test_every_error_a_user_can_meet_is_importable_from_cnnc() -> None:
    from cnnc import errors

    public = {name for name, value in vars(errors).items()
              if isinstance(value, type) and issubclass(value, Exception)}
    assert public <= set(cnnc.__all__)
    assert issubclass(cnnc.DeviceError, cnnc.CnncError)


def test_a_corrupt_onnx_file_gets_one_line(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="ONNX models need the onnx package (cnnc[onnx])")
    path = tmp_path / "net.onnx"
    path.write_bytes(b"\x08\x07\x12\x07pytorch\xa3\x00")
    code, _, err = _run("run", str(path))
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {path}: not a readable ONNX model (truncated or corrupted?): Error parsing "
        "message with type 'onnx.ModelProto': Wire format was corrupt"]


def test_a_binary_file_is_named_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "net.bin"
    path.write_bytes(b"\xa3\x01\x00\x02binary")
    code, _, err = _run("graph", str(path))
    assert code == 2
    assert err.startswith(f"error: {path}: not a text file;")
    assert "codec" not in err


def test_an_output_directory_that_cannot_be_made_is_one_line() -> None:
    code, _, err = _run("compile", str(LENET), "-o", "/proc/forbidden/out")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: --output-dir: cannot create the directory '/proc/forbidden/out': "
        "No such file or directory"]


def test_a_missing_cxx_for_cuda_sim_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    code, _, err = _run("run", str(LENET), "--target", "cuda-sim")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: target 'cuda-sim': CXX is '/nonexistent/g++', which is not an executable C++ "
        "compiler; fix CXX or unset it to use g++"]


def _readme_block(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index("```sh", text.index(heading)) + len("```sh")
    return [line for line in text[start: text.index("```", start)].splitlines() if line]


@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("readelf") is None,
                    reason="needs a C compiler and readelf")
def test_the_readme_c_example_runs_from_any_directory(tmp_path: Path) -> None:
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ['PATH']}"}
    commands = _readme_block("## Without Python")
    for command in commands[:-1]:  # compile, link; the last one runs the program
        subprocess.run(command, shell=True, check=True, cwd=work, env=env,
                       capture_output=True)
    dynamic = subprocess.run(["readelf", "-d", str(work / "out" / "lenet.so")], check=True,
                             capture_output=True, text=True).stdout
    assert "Library soname: [lenet.so]" in dynamic
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    program, *arguments = commands[-1].split()
    printed = subprocess.run([str(work / program), *arguments], cwd=elsewhere, check=True,
                             capture_output=True, text=True).stdout
    assert len(printed.split()) == 2 * 10


def test_gpu_check_without_a_gpu_says_so_in_one_line() -> None:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a GPU driver; the check would run")
    except OSError:
        pass
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no NVIDIA GPU driver here (libcuda.so.1 does not load); nothing to check"]
    assert "pip" not in done.stdout


def test_a_usage_mistake_is_one_line_too() -> None:
    code, out, err = _run("graph", str(ROOT / "examples"))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: Invalid value for 'MODEL': File '{ROOT / 'examples'}' is a directory. "
        "(see `cnnc graph --help`)"]
