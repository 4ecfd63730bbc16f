"""Deprecated home of the GPU INT4 names (removed in the next release), and the fakes' registrar.

What lived here moved (every old name still works through this module, with a
``DeprecationWarning`` naming its new home; ``tests/test_int4_gpu.py::test_deprecated_int4_gpu_names``):

=============================== ==================================================================
old name (here)                  new home
=============================== ==================================================================
``int4_linear_gpu``             ``int4_linear.int4_linear`` (CUDA tensors, ``backend=``)
``int4_gpu_linear``             ``int4_cuda.int4_cuda_linear``
``prepack_int4_gpu``            ``int4_cuda.int4_cuda_prepack``
``int4_gpu_prepack``            ``int4_cuda.int4_cuda_prepack_qweight``
``int4_gpu_dequant_words``      ``int4_cuda.int4_cuda_dequant_words``
``Int4GPUWeight``               ``int4_cuda.Int4CudaWeight``
``dequant_weight``              ``int4_linear.dequantize_int4`` (the one dequantisation)
``dequant_chunk_candidates``    ``bench/_int4_tuning.py`` (tuner only)
backend choice, ``dequant_linear`` ``int4_linear`` (same names)
argument / zero-point rules     ``_int4_rules`` (same names)
=============================== ==================================================================

This module stays the one ``csrc/registration.cpp`` names (``m.set_python_module``) for the native
``lrqat::int4_gpu_*`` ops, so it registers their fake impls (defined in :mod:`.int4_cuda`): torch
requires the registering module to be the named one.
"""

from __future__ import annotations

import warnings

import torch

from .. import _ext
from . import _int4_rules, int4_cuda, int4_linear

__all__: list[str] = []  # nothing new lives here


def _int4_linear_gpu(x, qweight, scale, zero_point=None, group_size=None, bias=None, *, backend=None):
    return int4_linear._int4_linear_cuda(x, qweight, scale, zero_point, group_size, bias, backend=backend,
                                         caller="int4_linear_gpu")


def _int4_gpu_linear(x, weight, bias=None):
    return int4_cuda._linear(x, weight, bias, "int4_gpu_linear")


def _dequant_weight(qweight, scale, zero_point=None, group_size=None, dtype=torch.bfloat16, *, out=None):
    return _int4_rules.dequantize_int4(qweight, scale, zero_point, group_size, dtype, out=out)


def _dequant_chunk_candidates(N: int, K: int, dtype: torch.dtype) -> list[int]:
    row_bytes = K * torch.empty((), dtype=dtype).element_size()
    out = []
    for mib in (8, 16, 32):
        c = (mib << 20) // max(1, row_bytes) // 256 * 256
        if 256 <= c < N and c not in out:
            out.append(c)
    return out


# old name -> (object, where it lives now)
_MOVED = {
    "int4_linear_gpu": (_int4_linear_gpu, "lrqat_kernels.ops.int4_linear.int4_linear(..., backend=)"),
    "int4_gpu_linear": (_int4_gpu_linear, "lrqat_kernels.ops.int4_cuda.int4_cuda_linear"),
    "prepack_int4_gpu": (int4_cuda.int4_cuda_prepack, "lrqat_kernels.ops.int4_cuda.int4_cuda_prepack"),
    "int4_gpu_prepack": (int4_cuda.int4_cuda_prepack_qweight, "lrqat_kernels.ops.int4_cuda.int4_cuda_prepack_qweight"),
    "int4_gpu_dequant_words": (int4_cuda.int4_cuda_dequant_words,
                               "lrqat_kernels.ops.int4_cuda.int4_cuda_dequant_words"),
    "Int4GPUWeight": (int4_cuda.Int4CudaWeight, "lrqat_kernels.ops.int4_cuda.Int4CudaWeight"),
    "dequant_weight": (_dequant_weight, "lrqat_kernels.ops.int4_linear.dequantize_int4"),
    "dequant_chunk_candidates": (_dequant_chunk_candidates, "bench/_int4_tuning.py (tuner only)"),
    "_cached_prepack": (int4_cuda.cached_prepack, "lrqat_kernels.ops.int4_cuda.cached_prepack"),
}
for _name in ("cuda_kernel_available", "prepare_scale", "prepare_zero_point"):
    _MOVED[_name] = (getattr(int4_cuda, _name), f"lrqat_kernels.ops.int4_cuda.{_name}")
for _name in ("BACKENDS", "BACKEND_ENV", "AUTO_DEQUANT_MIN_M", "resolve_backend", "auto_backend", "dequant_linear",
              "_WARNED"):
    _MOVED[_name] = (getattr(int4_linear, _name), f"lrqat_kernels.ops.int4_linear.{_name}")
for _name in ("check_int4_linear_args", "zero_point_as_int"):
    _MOVED[_name] = (getattr(_int4_rules, _name), f"lrqat_kernels.ops._int4_rules.{_name}")


#: old names already announced: one DeprecationWarning per name and process (a decode loop that
#: reads ``int4_gpu.int4_linear_gpu`` per layer call would otherwise warn per call).
_ANNOUNCED: set[str] = set()


def __getattr__(name: str):
    try:
        obj, home = _MOVED[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    if name not in _ANNOUNCED:
        _ANNOUNCED.add(name)
        warnings.warn(f"lrqat_kernels.ops.int4_gpu.{name} is deprecated and will be removed in the next release; "
                      f"use {home}", DeprecationWarning, stacklevel=2)
    return obj


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED])


# ---- fake impls of lrqat::int4_gpu_* (they exist only once _C has defined the ops) ---------------

_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    for op, fake in int4_cuda.FAKES.items():
        torch.library.register_fake(op, fake)
    _fakes_registered = True


if _ext.load_extension():
    try:
        torch.ops.lrqat.int4_gpu_prepack  # noqa: B018  (an older _C may predate these ops)
    except (AttributeError, RuntimeError):
        pass
    else:
        _register_fakes()
