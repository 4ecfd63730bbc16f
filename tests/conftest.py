"""Shared pytest setup for lrqat_kernels.

* Without a CUDA device, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` is set
  here, before anything imports triton (it reads the variable at import). An explicit value
  in the environment wins.
* ``@pytest.mark.gpu`` marks tests that need a CUDA device; they are skipped without one.
* The ``lrqat_ext`` fixture gates tests of the native ops (``lrqat_kernels._C``): a missing
  extension is a test failure (CI must prove the build) unless ``LRQAT_SKIP_EXT=1`` (or
  ``LRQAT_DISABLE_EXT=1``) says the Python-only install is intended, then they skip.
"""

import os

import torch

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    if CUDA_AVAILABLE:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def lrqat_ext():
    """The loaded ``lrqat_kernels._C`` gate; use it in every test that calls ``torch.ops.lrqat``."""
    from lrqat_kernels import _ext

    if _ext.load_extension():
        return _ext
    reason = f"lrqat_kernels._C is not available: {_ext.extension_error()}"
    if _env_flag("LRQAT_SKIP_EXT") or _env_flag("LRQAT_DISABLE_EXT"):
        pytest.skip(f"{reason} (Python-only run: LRQAT_SKIP_EXT / LRQAT_DISABLE_EXT is set)")
    pytest.fail(
        f"{reason}. Build it with `CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .`, "
        "or set LRQAT_SKIP_EXT=1 to skip the native-op tests on purpose.",
        pytrace=False,
    )
