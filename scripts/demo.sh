#!/usr/bin/env bash
# Quick-start command 1: set up (scripts/setup_env.sh) and run the main job on its embedded
# default: `lrqat demo` (a small LLaMA trained on the standard library's pydoc text, then FP vs
# RTN vs LR-QAT at W4/W3, fused to INT4). Extra arguments go to `lrqat demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${LRQAT_VENV:-$ROOT/.venv}/bin/lrqat" demo "$@"
