#!/usr/bin/env bash
# Quick-start command 2: set up (scripts/setup_env.sh) and run the test suite.
# Without a GPU, Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
# and @pytest.mark.gpu tests are skipped. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${LRQAT_VENV:-$ROOT/.venv}/bin/python" -m pytest -q -rs tests "$@"
