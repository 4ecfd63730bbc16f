"""Launch plumbing shared by every Triton launcher, and the one switch between kernels and eager math.

Imports neither Triton nor a kernel module: the dispatch rule (:func:`kernels_run_on`) is asked
before any kernel module is needed.

Switch (tests and users; process-wide, or scoped with the context manager):

    from lrqat_kernels.ops._launch import kernel_options, use_kernels
    with use_kernels(False): ...                 # eager PyTorch (reference.py's math), every op family
    with kernel_options(gpu_tiles=True): ...     # the interpreter runs the GPU tile tables
    with kernel_options(fused_gemm=True): ...    # lrqat_linear's default path: the fused dequant-GEMMs
    with kernel_options(bwd_programs=3): ...     # the fake-quant backward's program count

Held by tests/test_launch.py. ``TRITON_INTERPRET=1`` (Triton's own process-wide switch) still
decides whether kernels can run on CPU at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = [
    "KernelOptions",
    "interpreting",
    "kernel_options",
    "kernels_run_on",
    "on_device",
    "options",
    "set_kernel_options",
    "use_kernels",
]


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``, or true / yes / on)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def on_device(t: torch.Tensor):
    """A context making ``t``'s CUDA device the current one for a Triton launch.

    Triton launches on the *current* CUDA device (and its current stream), not on the device of
    the tensors passed in; PyTorch custom ops implemented in Python get no device guard. Without
    this, a layer on ``cuda:1`` (e.g. a model sharded with ``device_map="auto"``) would run on
    ``cuda:0`` with foreign pointers. A no-op for CPU tensors (the interpreter) and when the
    device is already current (the common case: no device switch on the launch path).
    """
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class KernelOptions:
    """Process-wide kernel options (:func:`kernel_options` changes them).

    Attributes:
        kernels: False: every op family computes with eager PyTorch (reference.py's math), on
            CUDA too. True (default): Triton kernels where they can run (CUDA; CPU under
            ``TRITON_INTERPRET=1``).
        gpu_tiles: the interpreter uses the GPU tile tables (the exact constexprs a GPU gets)
            instead of its small tiles.
        fused_gemm: the default of ``lrqat_linear(..., fused_gemm=None)``: the fused
            dequant-GEMM path (``ops/fused_linear.py``). None: unset (False, or the deprecated
            ``LRQAT_FUSED_GEMM``).
        bwd_programs: program count the fake-quant backward aims at (None: about two waves of
            CTAs on a GPU, 4 under the interpreter; or the deprecated ``LRQAT_BWD_PROGRAMS``).
    """

    kernels: bool = True
    gpu_tiles: bool = False
    fused_gemm: bool | None = None
    bwd_programs: int | None = None


_OPTIONS = KernelOptions()
# Deprecated test hook: ``monkeypatch.setattr(lrqat_kernels.functions, "_interpreting", f)`` puts
# ``f`` here (functions.py forwards the assignment); :func:`kernels_run_on` asks it instead of
# :func:`interpreting`. Goes with the deprecation of ``functions._interpreting``.
_interpreting_hook: Callable[[], bool] | None = None


def _check_options(changes: dict) -> None:
    fields = {f.name for f in dataclasses.fields(KernelOptions)}
    for name, value in changes.items():
        if name not in fields:
            raise TypeError(f"kernel_options: unknown option {name!r}; allowed: {', '.join(sorted(fields))}")
        if name in ("kernels", "gpu_tiles") and not isinstance(value, bool):
            raise TypeError(f"kernel_options: {name} must be True or False (got {value!r})")
        if name == "fused_gemm" and value is not None and not isinstance(value, bool):
            raise TypeError(f"kernel_options: fused_gemm must be True, False or None (got {value!r})")
        if name == "bwd_programs" and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"kernel_options: bwd_programs must be None or an int >= 1 (got {value!r})")


def options() -> KernelOptions:
    """The kernel options in force."""
    return _OPTIONS


def set_kernel_options(**changes) -> KernelOptions:
    """Change kernel options process-wide (fields of :class:`KernelOptions`); returns the previous ones."""
    global _OPTIONS
    _check_options(changes)
    previous = _OPTIONS
    _OPTIONS = dataclasses.replace(_OPTIONS, **changes)
    return previous


@contextlib.contextmanager
def kernel_options(**changes) -> Iterator[KernelOptions]:
    """Change kernel options (fields of :class:`KernelOptions`) inside a ``with`` block, then restore them."""
    global _OPTIONS
    previous = set_kernel_options(**changes)
    try:
        yield _OPTIONS
    finally:
        _OPTIONS = previous


def use_kernels(enabled: bool):
    """``with use_kernels(False):`` every op family computes with eager PyTorch; ``True``: kernels
    where they can run. Shorthand for ``kernel_options(kernels=enabled)``."""
    return kernel_options(kernels=enabled)


def kernels_run_on(device: torch.device) -> bool:
    """Whether Triton kernels compute for tensors on ``device``: on CUDA, and on CPU under the
    Triton interpreter, unless ``use_kernels(False)`` is in force. Each op family adds its own
    dtype / shape conditions."""
    if not _OPTIONS.kernels:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (_interpreting_hook or interpreting)()


def _deprecated_env(name: str, replacement: str) -> str | None:
    """The value of a deprecated environment variable (None when unset), with a DeprecationWarning."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    warnings.warn(f"{name} is deprecated and goes in the next release; use {replacement}",
                  DeprecationWarning, stacklevel=3)
    return value.strip()


def fused_gemm_default() -> bool:
    """``lrqat_linear``'s path when its ``fused_gemm`` argument is None: the ``fused_gemm`` option,
    else the deprecated ``LRQAT_FUSED_GEMM=1``, else False."""
    if _OPTIONS.fused_gemm is not None:
        return _OPTIONS.fused_gemm
    value = _deprecated_env("LRQAT_FUSED_GEMM", "lrqat_linear(..., fused_gemm=True) or kernel_options(fused_gemm=True)")
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def bwd_programs_override() -> int | None:
    """The fake-quant backward's program count if set: the ``bwd_programs`` option, else the
    deprecated ``LRQAT_BWD_PROGRAMS``."""
    if _OPTIONS.bwd_programs is not None:
        return _OPTIONS.bwd_programs
    value = _deprecated_env("LRQAT_BWD_PROGRAMS", "kernel_options(bwd_programs=N)")
    return None if value is None else max(1, int(value))
