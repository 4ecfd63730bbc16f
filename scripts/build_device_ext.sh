#!/usr/bin/env bash
# Build lrqat_kernels._C HERE (CPU machine, no GPU needed) for the lent GPU machine's Python and
# torch, so that a GPU session spends none of its few device minutes compiling CUDA.
#
#     bash scripts/build_device_ext.sh          # then carry the two paths it prints
#
# The device image (`device` tool, KINDS.md) runs Python 3.12 with torch 2.11.0+cu130 and Triton
# 3.6.0. This script makes a side venv with the same Python minor version and torch build, compiles
# the extension in place for TORCH_CUDA_ARCH_LIST (default "8.0;9.0", as CI), and writes a stamp
# beside the .so:
#
#     lrqat_kernels/_C.<python 3.12 EXT_SUFFIX>     e.g. _C.cpython-312-x86_64-linux-gnu.so
#     lrqat_kernels/_C.device-stamp                 source hash, torch, python, arch list
#
# Both are git-ignored; name them in the device `run` call's `carry`. `scripts/gpu_session.sh build`
# uses the carried .so only if the stamp matches the tree's native sources (scripts/native_hash.sh)
# and the device's torch and Python, and it imports; otherwise it compiles there as before. The
# default 3.11 venv (.venv) keeps its own _C.cpython-311-*.so: the two live side by side.
#
# Then, in the same venv, the CPU tests of the native ops run against the device's torch / Triton
# versions (tests/test_ext.py, test_int4_gpu.py, test_int4_cpu.py): a version break shows up here,
# not in the device minutes. LRQAT_DEVICE_SKIP_TESTS=1 skips them.
#
# Knobs: LRQAT_DEVICE_PYTHON (an interpreter of the device's minor version; default: python3.12 on
# PATH or in ~/.pyenv), LRQAT_DEVICE_TORCH (default torch==2.11.0), LRQAT_DEVICE_VENV (default
# .device-venv), TORCH_CUDA_ARCH_LIST, CUDA_HOME (default /usr/local/cuda), MAX_JOBS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${LRQAT_DEVICE_VENV:-$ROOT/.device-venv}"
TORCH_REQ="${LRQAT_DEVICE_TORCH:-torch==2.11.0}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "build_device_ext: no CUDA toolkit (CUDA_HOME='${CUDA_HOME:-}'): set CUDA_HOME to a root with bin/nvcc" >&2
  exit 1
fi
export LRQAT_FORCE_CUDA=1  # a CPU-only _C would be useless on the GPU machine: fail instead

if [[ ! -x "$VENV/bin/python" ]]; then
  PYBOOT="${LRQAT_DEVICE_PYTHON:-}"
  if [[ -z "$PYBOOT" ]]; then
    PYBOOT="$(command -v python3.12 || true)"
    [[ -n "$PYBOOT" ]] || PYBOOT="$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1 || true)"
  fi
  if [[ -z "$PYBOOT" ]]; then
    echo "build_device_ext: no Python 3.12 found; set LRQAT_DEVICE_PYTHON" >&2
    exit 1
  fi
  echo "[device-ext] creating $VENV with $PYBOOT"
  "$PYBOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_REQ#torch==}')" 2>/dev/null; then
  echo "[device-ext] installing $TORCH_REQ (the device image's build; a few GB)"
  "$PY" -m pip install -q "$TORCH_REQ"
fi
"$PY" -c 'import ninja, setuptools, pybind11' 2>/dev/null || "$PY" -m pip install -q ninja pybind11 setuptools wheel
if [[ "${LRQAT_DEVICE_SKIP_TESTS:-0}" != "1" ]]; then
  "$PY" -c 'import pytest, hypothesis, numpy, safetensors, transformers' 2>/dev/null \
    || "$PY" -m pip install -q pytest hypothesis numpy safetensors tqdm transformers
fi

SUFFIX="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
SO="lrqat_kernels/_C$SUFFIX"
STAMP="lrqat_kernels/_C.device-stamp"
rm -f "$STAMP"  # never leave a stamp that vouches for an older .so
echo "[device-ext] compiling $SO (CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
t0=$SECONDS
# --force: setuptools' own up-to-date check looks at the .cpp/.cu files only, not the headers or
# setup.py that native_hash.sh covers; ninja keeps the rebuild incremental anyway.
"$PY" setup.py -q build_ext --inplace --force
echo "[device-ext] compiled in $((SECONDS - t0)) s"
(cd /tmp && PYTHONPATH="$ROOT" "$PY" -c '
import lrqat_kernels, torch
from lrqat_kernels import _ext
assert _ext.has_extension(), _ext.extension_error()
from lrqat_kernels.ops.int4_gpu import cuda_kernel_available
print("[device-ext] imports with torch", torch.__version__, "| CUDA sources built:", cuda_kernel_available())')
"$PY" scripts/check_cuda_build.py --so "$SO"

# The stamp: what gpu_session.sh compares before trusting the .so (one line each, key=value).
"$PY" - "$STAMP" <<EOF
import platform, sys, torch
lines = [
    "native_hash=$(bash scripts/native_hash.sh)",
    f"torch={torch.__version__}",
    f"python={platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}",
    "arch_list=$TORCH_CUDA_ARCH_LIST",
    "so=$SO",
    "commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +uncommitted)",
]
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
import os
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
EOF
cat "$STAMP"

if [[ "${LRQAT_DEVICE_SKIP_TESTS:-0}" != "1" ]]; then
  echo "[device-ext] CPU tests of the native ops under the device's torch / Triton"
  PYTHONPATH="$ROOT" "$PY" -m pytest -q -p no:cacheprovider tests/test_ext.py tests/test_int4_gpu.py tests/test_int4_cpu.py
fi
echo
echo "[device-ext] carry these to the device (run(..., carry=[...])):"
echo "    \"$SO\", \"$STAMP\""
