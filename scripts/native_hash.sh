#!/usr/bin/env bash
# One hash of everything that goes into lrqat_kernels._C (csrc sources and headers, setup.py):
# scripts/build_device_ext.sh writes it into the stamp of a prebuilt .so, and
# scripts/gpu_session.sh compares it on the device before trusting a carried .so.
# Same bytes -> same hash on both machines (paths relative to the repo root, C-locale order).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name 'setup.py' \) -print0 \
  | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-32
