#!/usr/bin/env bash
# GPU check for the CUDA backend, on a machine with an NVIDIA GPU and no network:
#
#   bash scripts/gpu_check.sh            (PYTHON=... to choose the interpreter)
#
# 1. installs this checkout into that Python offline (no index, no dependencies: numpy,
#    llvmlite, networkx, click, pyyaml, cuda-bindings and nvidia-cuda-nvrtc must be there);
# 2. runs the GPU tests, `pytest -m gpu`: every golden model fused and unfused on the GPU,
#    several batch sizes, agreement with cuda-sim, batch 1 as one CUDA graph, the cubin;
# 3. times LeNet on the GPU against PyTorch on the same GPU (`cnnc bench --target cuda
#    --against torch-cuda`; PyTorch is skipped with a note where it has no CUDA).
# Exits 0 only when both steps passed; 2 where there is no GPU driver.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
python="${PYTHON:-$(command -v python3 || command -v python)}"
echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(pwd), $("$python" --version 2>&1)"

if ! "$python" -c "import ctypes; ctypes.CDLL('libcuda.so.1')" >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU driver here (libcuda.so.1 does not load); nothing to check" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
    --format=csv,noheader | head -n 1

pip_log="$(mktemp)"
trap 'rm -f "$pip_log"' EXIT
if ! "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
        >"$pip_log" 2>&1 && ! "$python" -c "import cnnc" 2>/dev/null; then
    tail -n 5 "$pip_log" >&2
    echo "gpu_check: cannot install this checkout (set PYTHON to a virtual environment's" \
         "python that has cnnc's dependencies)" >&2
    exit 1
fi

status=0
echo "== python -m pytest -m gpu"
"$python" -m pytest -q -m gpu tests/test_cuda_gpu.py tests/test_training_cuda.py || status=1
echo "== cnnc bench examples/lenet.yaml --target cuda --against torch-cuda"
"$python" -m cnnc.cli bench examples/lenet.yaml --target cuda --against torch-cuda \
    --batch 1,256,4096 --threads 1 --rounds 5 || status=1
exit "$status"
