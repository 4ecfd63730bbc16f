"""Shared pytest setup for lrqat_kernels.

* Without a CUDA device, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` is set
  here, before anything imports triton (it reads the variable at import). An explicit value
  in the environment wins.
* The one switch between kernels and eager math is ``lrqat_kernels.ops._launch`` (``use_kernels``,
  ``kernel_options``); the ``set_kernel_options`` fixture sets its options for one test
  (``set_kernel_options(kernels=False)``: the eager path; ``gpu_tiles=True``: the GPU tile tables
  under the interpreter; ``bwd_programs=N``; ``fused_gemm=True``) and restores them after.
* ``@pytest.mark.gpu`` marks tests that need a CUDA device; they are skipped without one.
* The ``lrqat_ext`` fixture gates tests of the native ops (``lrqat_kernels._C``): a missing
  extension is a test failure (CI must prove the build) unless ``LRQAT_SKIP_EXT=1`` (or
  ``LRQAT_DISABLE_EXT=1``) says the Python-only install is intended, then they skip.
"""

import dataclasses
import os

import torch

CUDA_AVAILABLE = torch.cuda.is_available()
if not CUDA_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_numpy24_shim() -> None:
    """Triton < 3.7's interpreter does ``int(tensor.handle.data)`` on a shape-(1,) array for
    ``__index__`` (``range(0, n_cols, BLOCK)`` in a kernel), a TypeError since NumPy 2.4
    (triton-lang/triton#9171, fixed upstream with ``.squeeze()``). Same fix, applied only there:
    the GPU image runs Triton 3.6, and its interpreter tests must not fail for this."""
    try:
        import triton
        from triton.runtime import interpreter
    except Exception:  # no triton, or a layout without the interpreter module
        return
    major_minor = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if major_minor >= (3, 7) or original is None or getattr(original, "_lrqat_shim", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._lrqat_shim = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_interpreter_numpy24_shim()


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


@pytest.fixture
def set_kernel_options():
    """``lrqat_kernels.ops._launch.set_kernel_options`` for one test; the options are restored after."""
    from lrqat_kernels.ops import _launch

    saved = _launch.options()
    yield _launch.set_kernel_options
    _launch.set_kernel_options(**dataclasses.asdict(saved))


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
