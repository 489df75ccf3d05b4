#!/usr/bin/env bash
# GPU check for the CUDA backend, for a machine with an NVIDIA GPU and no network.
#
#   bash scripts/gpu_check.sh            (PYTHON=... to choose the interpreter)
#
# 1. installs this checkout into that Python, offline (no index, no dependencies, no build
#    isolation: numpy, llvmlite, networkx, click, pyyaml, setuptools>=64, cuda-bindings and
#    nvidia-cuda-nvrtc must be there); where pip cannot install but `import cnnc` already
#    finds this checkout, it goes on with that;
# 2. compiles every golden model (tests/golden) for the GPU present, fused and unfused, runs
#    each on the GPU and compares with the expected outputs (rtol 1e-4, atol 1e-5);
# 3. says whether LeNet at batch 1 ran as one CUDA graph, and times LeNet at batch 1, 256 and
#    4096 (images/s and milliseconds) against PyTorch CUDA eager, when PyTorch is importable
#    and sees the GPU, in the same process, in one table.
# Exits 0 only when every golden case and every LeNet batch matched and batch 1 ran as a CUDA
# graph; 2 where there is no GPU or NVRTC. Takes a minute or two on an H100.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    python="$(command -v python3 || command -v python || true)"
fi
if [[ -z "$python" ]] || ! "$python" -c "" >/dev/null 2>&1; then
    echo "gpu_check: no Python interpreter found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd)"
echo "== python: $("$python" --version 2>&1) ($(command -v "$python"))"
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "== nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
        --format=csv,noheader 2>/dev/null | head -n 1)"
fi

# No GPU driver, no check: say so before pip gets a chance to print anything.
if ! "$python" -c "import ctypes; ctypes.CDLL('libcuda.so.1')" >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU driver here (libcuda.so.1 does not load); nothing to check" >&2
    exit 2
fi

echo "== step 1: pip install --no-index --no-deps --no-build-isolation -e . (this checkout)"
pip_log="$(mktemp)"
trap 'rm -f "$pip_log"' EXIT
if ! "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
        >"$pip_log" 2>&1; then
    # Already installed from this checkout (an editable install): go on with it.
    if "$python" - "$(pwd)" <<'PY' 2>/dev/null
import sys
from pathlib import Path

import cnnc

sys.exit(0 if Path(cnnc.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()) else 1)
PY
    then
        echo "   pip could not install it, but cnnc is already installed from this checkout"
    else
        tail -n 5 "$pip_log" >&2
        echo "gpu_check: installing the checkout failed (pip and setuptools>=64 must be" \
             "installed, and the environment writable: set PYTHON to a virtual environment's" \
             "python)" >&2
        exit 1
    fi
fi
"$python" -c "import cnnc; print('   cnnc', cnnc.__version__, 'from', cnnc.__file__)"

echo "== steps 2 and 3: golden models on the GPU, then LeNet timings"
exec "$python" - <<'PY'
"""Golden cases on the GPU, then LeNet timed against PyTorch eager."""

import statistics
import sys
import time
from pathlib import Path

import numpy as np

import cnnc
from cnnc.backends.cuda import driver_api, nvrtc

GOLDEN = Path("tests/golden")
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}

arch, name = driver_api.probe()
if arch is None:
    print(f"gpu_check: no GPU to check: {name}", file=sys.stderr)
    sys.exit(2)
missing = nvrtc.available()
if missing is not None:
    print(f"gpu_check: {missing}", file=sys.stderr)
    sys.exit(2)
print(f"   GPU 0: {name} ({arch}); NVRTC {nvrtc.version()}")

# --- step 2: every golden case, fused and unfused --------------------------------------------

failures = 0
checked = 0
compile_arch = None
for path in sorted(GOLDEN.glob("*.yaml")):
    case = path.stem
    graph = cnnc.load(path)
    data = np.load(GOLDEN / f"{case}.io.npz")
    expected = [data["expected"]] if len(graph.outputs) == 1 else \
        [data[f"expected_{output}"] for output in graph.outputs]
    for fuse in (True, False):
        label = f"{case} ({'fused' if fuse else 'unfused'})"
        try:
            model = cnnc.compile(graph, target="cuda", fuse=fuse)
            compile_arch = model.arch
            errors = [0.0]
            launches = []
            for _ in range(2):  # kernel by kernel, then (a small batch) replaying a CUDA graph
                result = model(data["input"])
                launches.append(model.last_launch)
                actual = list(result) if isinstance(result, tuple) else [result]
                for got, want in zip(actual, expected, strict=True):
                    np.testing.assert_allclose(got, want, **TOLERANCE)
                    errors.append(float(np.max(np.abs(got - want))) if got.size else 0.0)
            spills = sum(used["spill_bytes"] for used in model.resources.values())
            print(f"   ok    {label:34s} {len(model.kernels):2d} kernels, max |error| "
                  f"{max(errors):.2e}, spill bytes {spills}, runs: {' then '.join(launches)}")
        except Exception as error:  # report every case, then fail at the end
            failures += 1
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            print(f"   FAIL  {label:34s} {type(error).__name__}: {first_line}")
        checked += 1
print(f"   golden: {checked - failures} of {checked} matched on the GPU "
      f"(compiled for {compile_arch})")

# --- step 3: LeNet timings -------------------------------------------------------------------

lenet_path = GOLDEN / "lenet.yaml"
graph = cnnc.load(lenet_path)
model = cnnc.compile(graph, target="cuda")
print(f"   LeNet kernels ({model.arch}):")
for kernel, used in model.resources.items():
    launch = next(item for item in model.program.launches if item.name == kernel)
    print(f"     {kernel:28s} block {launch.threads:4d}  {launch.mapping:15s} "
          f"registers {used['registers']:3d}  shared {used['shared_bytes']:5d} B  "
          f"spills {used['spill_bytes']} B")

torch_model = None
try:
    import torch
    from torch import nn

    if not torch.cuda.is_available():
        torch_note = f"PyTorch {torch.__version__} is installed but sees no GPU"
    else:
        # Plain float32 on both sides: no TF32 in PyTorch's convolutions and matrix products.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch_model = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, padding=2), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Sigmoid(),
            nn.AvgPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(400, 120), nn.Sigmoid(),
            nn.Linear(120, 84), nn.Sigmoid(),
            nn.Linear(84, 10),
        )
        weights = np.load(GOLDEN / "lenet.weights.npz")
        torch_model.load_state_dict({key: torch.from_numpy(weights[key])
                                     for key in weights.files})
        torch_model = torch_model.cuda().eval()
        torch_note = f"PyTorch {torch.__version__} CUDA eager"
except Exception as error:  # not installed, or installed but broken: time cnnc alone
    torch_model = None
    torch_note = f"PyTorch is not usable ({type(error).__name__}: {error}): its columns are empty"


def median_seconds(run, repeats):
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_device_seconds(x_gpu, repeats):
    with torch.inference_mode():
        torch_model(x_gpu)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch_model(x_gpu)
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1000 / repeats


def torch_end_to_end(x):
    with torch.inference_mode():
        return torch_model(torch.from_numpy(x).cuda()).cpu().numpy()


rows = []
rng = np.random.default_rng(0)
for batch, repeats in ((1, 300), (256, 100), (4096, 30)):
    x = rng.random((batch, 1, 28, 28), dtype=np.float32)
    row = {"batch": batch}
    try:
        expected = cnnc.reference(graph, x)
        for _ in range(3):  # the first call at a batch size launches plainly, then a graph
            np.testing.assert_allclose(model(x), expected, **TOLERANCE)
        row["cnnc"] = median_seconds(lambda x=x: model(x), repeats)
        row["launch"] = model.last_launch
        ours = model(x)
        np.testing.assert_allclose(ours, expected, **TOLERANCE)
        if row["launch"] == "graph":  # the same calls without the graph
            model.use_graphs = False
            row["plain"] = median_seconds(lambda x=x: model(x), repeats)
            model.use_graphs = True
        row["cnnc_device"] = model.time_kernels(batch, repeats)
    except Exception as error:
        failures += 1
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"   FAIL  LeNet at batch {batch}: {type(error).__name__}: {first_line}")
        rows.append(row)
        continue
    if torch_model is not None:
        theirs = torch_end_to_end(x)
        row["agree"] = float(np.max(np.abs(theirs - ours)))
        row["torch"] = median_seconds(lambda x=x: torch_end_to_end(x), repeats)
        row["torch_device"] = torch_device_seconds(torch.from_numpy(x).cuda(), repeats)
    rows.append(row)

batch_one = rows[0].get("launch")
print(f"   LeNet at batch 1 ran as one CUDA graph: {'yes' if batch_one == 'graph' else 'NO'} "
      f"(last launch: {batch_one})")
if batch_one != "graph":
    failures += 1


def ms(value):
    return f"{value * 1e3:9.3f}" if value is not None else f"{'-':>9}"


def per_second(batch, value):
    return f"{batch / value:10.0f}" if value else f"{'-':>10}"


def ratio(theirs, ours):
    return f"{theirs / ours:6.2f}x" if theirs and ours else f"{'-':>7}"


print()
print(f"LeNet on {name} ({model.arch}), float32; {torch_note}.")
print("  e2e: NumPy array in, NumPy array out, copies included (median ms per batch, images/s);")
print("  plain: cnnc e2e with kernels launched one by one instead of the CUDA graph;")
print("  dev: the input already on the GPU, kernels only (CUDA events, ms per batch).")
print(f"  {'batch':>6}  {'launch':>7}  {'cnnc e2e':>9}  {'cnnc img/s':>10}  {'plain':>9}  "
      f"{'torch e2e':>9}  {'torch img/s':>11}  {'speedup':>7}  {'cnnc dev':>9}  "
      f"{'torch dev':>9}  {'speedup':>7}  {'max |cnnc-torch|':>16}")
for row in rows:
    batch = row["batch"]
    agree = f"{row['agree']:16.2e}" if "agree" in row else f"{'-':>16}"
    print(f"  {batch:>6}  {row.get('launch') or 'FAILED':>7}  {ms(row.get('cnnc'))}  "
          f"{per_second(batch, row.get('cnnc'))}  {ms(row.get('plain'))}  "
          f"{ms(row.get('torch'))}  {per_second(batch, row.get('torch')):>11}  "
          f"{ratio(row.get('torch'), row.get('cnnc')):>7}  {ms(row.get('cnnc_device'))}  "
          f"{ms(row.get('torch_device'))}  "
          f"{ratio(row.get('torch_device'), row.get('cnnc_device')):>7}  {agree}")
print()
if failures:
    print(f"gpu_check: FAILED: {failures} check(s) failed (see FAIL and NO above)",
          file=sys.stderr)
    sys.exit(1)
print("gpu_check: passed: every golden case and LeNet batch matched on the GPU, and batch 1 "
      "ran as one CUDA graph")
PY
