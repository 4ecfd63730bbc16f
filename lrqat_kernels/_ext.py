"""Lazy, never-failing loader of the compiled extension ``lrqat_kernels._C``.

``_C`` holds the native (C++/CUDA) ops, reachable as ``torch.ops.lrqat.<name>`` once it is
loaded. Nothing loads it at ``import lrqat_kernels`` (``tests/test_imports.py::test_import_is_lazy``):
every caller of a native op calls :func:`load_extension` (to choose a path) or
:func:`require_extension` (to call one) first, as ``ops/nibble.py``, ``ops/int4_*.py`` and
``formats.py`` do. It is optional: a Python-only install (``LRQAT_SKIP_EXT=1``) or a failed build
still imports, and callers fall back to the pure-PyTorch paths (``lrqat_kernels.formats``,
``lrqat_kernels.reference``). Only calling a native op without ``_C`` is an error, raised by
:func:`require_extension` with build instructions.

Loading ``_C`` runs its static op registrations; right after, the Python modules holding the
ops' fake (meta) impls are imported, so ``torch.compile`` can trace the ops. Those modules
are the ones named by ``m.set_python_module(...)`` in ``csrc/registration.cpp`` (read back
from the dispatcher), so adding an op family needs no edit here.

Environment:
    LRQAT_DISABLE_EXT=1  never load ``_C`` (behave as a Python-only install; used by tests).
"""

from __future__ import annotations

import importlib
import os
import warnings

__all__ = ["load_extension", "has_extension", "require_extension", "extension_error"]

_EXT_MODULE = "lrqat_kernels._C"
_NAMESPACE = "lrqat"
_DISABLE_ENV = "LRQAT_DISABLE_EXT"

# None: not tried yet; True / False: result of the one attempt (cached for the process).
_loaded: bool | None = None
# Why the extension is unavailable (None when loaded or not tried).
_error: str | None = None


def load_extension() -> bool:
    """Try once to import ``lrqat_kernels._C``; return whether the native ops are available.

    Never raises: a missing or broken ``_C`` (not built, built against another torch,
    disabled by ``LRQAT_DISABLE_EXT=1``) returns False and :func:`extension_error` says why.
    """
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if os.environ.get(_DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        _loaded, _error = False, f"disabled by {_DISABLE_ENV}=1"
        return False
    try:
        import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

        importlib.import_module(_EXT_MODULE)
    except Exception as exc:  # ImportError, or OSError for an ABI/undefined-symbol mismatch
        _loaded, _error = False, f"{type(exc).__name__}: {exc}"
        return False
    # Set before importing the fake-impl modules: they call load_extension() themselves.
    _loaded, _error = True, None
    _import_fake_impl_modules()
    return True


def has_extension() -> bool:
    """Whether the native ops ``torch.ops.lrqat.*`` are available (loads ``_C`` if needed)."""
    return load_extension()


def extension_error() -> str | None:
    """Why ``_C`` is unavailable, or None if it loaded (or was not tried yet)."""
    return _error


def require_extension(op_name: str) -> None:
    """Load ``_C`` or raise a RuntimeError that explains how to build it.

    Args:
        op_name: the native op about to be called (e.g. ``"pack_nibbles"``), named in the message.
    """
    if load_extension():
        return
    raise RuntimeError(
        f"lrqat_kernels: the native op torch.ops.{_NAMESPACE}.{op_name} needs the compiled "
        f"extension {_EXT_MODULE}, which is not available ({_error}).\n"
        "Build it from a source checkout, against the torch you already have installed:\n"
        "    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation .    (or -e . to develop)\n"
        "CUDA kernels are compiled when torch is a CUDA build and nvcc is found via CUDA_HOME, "
        "otherwise only the CPU kernels. An install made with LRQAT_SKIP_EXT=1 is Python-only "
        "by design: there, use the pure-PyTorch reference path (lrqat_kernels.formats, "
        "lrqat_kernels.reference) instead of the native ops."
    )


def _import_fake_impl_modules() -> None:
    """Import the modules named by m.set_python_module() for the ops of our namespace."""
    try:
        import torch

        modules = set()
        prefix = f"{_NAMESPACE}::"
        for qualname in torch._C._dispatch_get_all_op_names():
            if not qualname.startswith(prefix):
                continue
            name, _, overload = qualname.partition(".")
            stub = torch._C._dispatch_pystub(name, overload)
            if stub is not None:
                modules.add(stub[0])
    except Exception as exc:  # private torch API; degrade to "import the module yourself"
        warnings.warn(f"lrqat_kernels: could not list the fake-impl modules of torch.ops.{_NAMESPACE} ({exc})")
        return
    for module in sorted(modules):
        try:
            importlib.import_module(module)
        except Exception as exc:
            warnings.warn(
                f"lrqat_kernels: importing {module} (fake impls of torch.ops.{_NAMESPACE}) failed: {exc!r}; "
                "torch.compile will not be able to trace those ops"
            )
