#!/usr/bin/env bash
# The Triton-version check: the Triton kernels' tests under a given Python (its torch + triton),
# this checkout's package, Python-only. .ci/run calls it in a second venv with the newest Triton;
# a developer calls it with any venv that has torch, triton, numpy and pytest:
#     bash scripts/test_triton_range.sh /path/to/venv/bin/python [pytest args]
# Selected (one place for CI and developers): the interpreter tests of every kernel file and the
# ahead-of-time compiles for sm_80 / sm_90 (registers, spills, PTX facts: test_aot_compile.py and
# the test_aot_* tests of test_act_quant.py / test_int4_triton.py). LRQAT_DISABLE_EXT=1: a _C built
# for another torch (the main venv's) is not loaded and the tests of native ops skip; the one
# int4 dispatch test that calls a native op without that gate is deselected.
#
# Proved (every selected test passes, TRITON_INTERPRET=1 on CPU):
#   Triton 3.9.0, torch 2.13.0 CPU   (CI's second venv)
#   Triton 3.8.0, torch 2.14.1       (CI's main venv)
#   Triton 3.6.0, torch 2.13.0 CPU   (the Triton of the GPU device image)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-python3}"
shift || true
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" LRQAT_DISABLE_EXT=1 LRQAT_SKIP_EXT=1
"$PY" -c 'import torch, triton; print("test_triton_range: torch", torch.__version__, "| triton", triton.__version__)'
exec "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_aot_compile.py tests/test_fake_quant.py tests/test_lrqat_linear.py tests/test_act_quant.py \
  tests/test_norm_act_quant.py tests/test_swiglu_act_quant.py tests/test_int4_triton.py tests/test_launch.py \
  --deselect tests/test_int4_triton.py::test_dispatch_env_and_cuda_backend "$@"
