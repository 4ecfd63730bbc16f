"""The C++ INT4 GEMM for CPUs (``csrc/int4_cpu/``): prepack once, then :func:`int4_linear_prepacked`.

AVX-512 (vdpbf16ps for bf16 x), AVX2 + FMA, or portable scalar code, chosen at run time. The
dispatcher :func:`lrqat_kernels.ops.int4_linear.int4_linear` calls it for CPU tensors and caches
the prepacked copy per ``qweight`` (:func:`cached_prepack`).

CPU instruction set: ``isa="auto"|"scalar"|"avx2"|"avx512"``, else ``$LRQAT_CPU_ISA``, else the best
the CPU has (avx512 needs avx512f/bw/vl + avx512_bf16; avx2 needs avx2 + fma). ``LRQAT_CPU_ISA`` is
a process-wide switch for measuring one path (the convention of ``ATEN_CPU_CAPABILITY``); it is read
by the C++ op. Asking for an instruction set the CPU lacks is an error naming what is available (a
silent fallback would make a forced-path test meaningless); a CPU without AVX2 runs the scalar path
under ``"auto"``. :func:`cpu_isas` lists what this CPU supports.

Prepacked layout (``csrc/int4_cpu/int4_cpu.h``): panels of 64 output columns; per panel and k block
of 8, 64 little-endian 32-bit words, word ``l`` holding the 8 offset-binary nibbles (``W_int + 8``)
of column ``64 p + l``, even k in the low 16 bits, odd k in the high 16 bits.

Native ops (schemas in ``csrc/registration.cpp``; fakes in :mod:`~lrqat_kernels.ops.int4_linear_fakes`):
``int4_linear(x, qweight, scale, zero_point, group_size, bias)`` (CPU impl),
``int4_prepack_cpu(qweight, scale, zero_point, group_size)`` and
``int4_linear_prepacked_cpu(x, packed_weight, packed_scale, packed_zero, out_features, group_size,
bias, isa)``. ``group_size`` is -1 for per-channel scales in the ops (:func:`op_group_size`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import _ext
from ._int4_rules import _zero_point_int, effective_group_size
from ._prepack_cache import PrepackCache

__all__ = ["ISA_ENV", "Int4PackedCPU", "cpu_isas", "int4_linear_prepacked", "int4_prepack_cpu"]

#: Environment variable that forces the CPU instruction set (auto, scalar, avx2, avx512).
ISA_ENV = "LRQAT_CPU_ISA"
_ISAS = ("auto", "scalar", "avx2", "avx512")


class Int4PackedCPU(NamedTuple):
    """A weight prepacked for the CPU kernel by :func:`int4_prepack_cpu`.

    Attributes:
        packed_weight: uint8 ``[ceil(N / 64), ceil(K / 8), 256]``.
        packed_scale: fp32 ``[ceil(N / 64), G, 64]``.
        packed_zero: int32 ``[ceil(N / 64), G, 64]`` or None (symmetric).
        out_features: N.
        in_features: K.
        group_size: k per scale group, -1 for per-channel scales (the native ops' code).
    """

    packed_weight: torch.Tensor
    packed_scale: torch.Tensor
    packed_zero: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int


@functools.lru_cache(maxsize=1)
def cpu_isas() -> tuple[str, ...]:
    """Instruction-set paths of the CPU kernel this machine supports, e.g. ``("scalar", "avx2", "avx512")``.

    Read from ``/proc/cpuinfo`` (Linux, x86-64); elsewhere only ``"scalar"`` is promised. The C++
    op makes its own check (``__builtin_cpu_supports``) and raises if a forced path is missing.
    """
    isas = ["scalar"]
    try:
        with open("/proc/cpuinfo") as f:
            flags: set[str] = set()
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return tuple(isas)
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"} <= flags:
        isas.append("avx512")
    return tuple(isas)


def check_isa(isa: str | None) -> str:
    """``isa`` lower-cased and validated; None -> ``"auto"`` (the C++ op then reads ``$LRQAT_CPU_ISA``)."""
    if isa is None:
        return "auto"
    if not isinstance(isa, str) or isa.lower() not in _ISAS:
        raise ValueError(f"isa must be one of {_ISAS} (or None: ${ISA_ENV}, else auto), got {isa!r}")
    return isa.lower()


def op_group_size(group_size: int | None, K: int) -> int:
    """The native ops' group size: -1 for per channel (None or K), else ``group_size``."""
    return -1 if group_size is None or group_size == K else group_size


def flatten(x: torch.Tensor, K: int) -> torch.Tensor:
    """``x`` ``[..., K]`` as ``[M, K]``; TypeError / ValueError naming x otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] = [..., {K}], got shape {tuple(x.shape)}")
    return x.reshape(-1, K)


# Prepacked copies for eager CPU calls with standard-layout weights (see _prepack_cache): a decode
# loop prepacks each layer once; the copy costs the weight's memory once more.
_PREPACK_CACHE = PrepackCache()


def cached_prepack(qweight, scale, zero_point, g: int, zero_point_in=None) -> Int4PackedCPU:
    """The op's prepack of these inputs (``g``: the op's group size), cached per ``qweight``.
    ``zero_point_in``: the caller's zero-point tensor ``zero_point`` was converted from (the
    cache key: a converted float zero point is a new tensor every call)."""
    def build():
        pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qweight, scale, zero_point, g)
        return Int4PackedCPU(pw, ps, pz if zero_point is not None else None, qweight.shape[0], 2 * qweight.shape[1], g)

    key_zp = zero_point if zero_point_in is None else zero_point_in
    return _PREPACK_CACHE.get(qweight, (scale, key_zp), (g,), build)


def int4_prepack_cpu(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
) -> Int4PackedCPU:
    """Prepack a standard-layout INT4 weight for :func:`int4_linear_prepacked` (once, at load time).

    Args: as :func:`~lrqat_kernels.ops.int4_linear.int4_linear` (CPU tensors).

    Returns:
        :class:`Int4PackedCPU`.
    """
    _ext.require_extension("int4_prepack_cpu")
    K = 2 * qweight.shape[1]
    g = op_group_size(effective_group_size(K, scale, group_size), K)
    zero_point = _zero_point_int(zero_point)
    pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qweight, scale, zero_point, g)
    return Int4PackedCPU(pw, ps, pz if zero_point is not None else None, qweight.shape[0], K, g)


def int4_linear_prepacked(
    x: torch.Tensor, packed: Int4PackedCPU, bias: torch.Tensor | None = None, *, isa: str | None = None
) -> torch.Tensor:
    """``x @ W_hat^T + bias`` on a weight from :func:`int4_prepack_cpu` (CPU).

    Args:
        x: float32 / bfloat16 / float16 ``[..., K]`` on CPU.
        packed: :class:`Int4PackedCPU`.
        bias: None or ``[N]``.
        isa: CPU instruction set (module docstring).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    _ext.require_extension("int4_linear_prepacked_cpu")
    x2 = flatten(x, packed.in_features)
    y = torch.ops.lrqat.int4_linear_prepacked_cpu(
        x2,
        packed.packed_weight,
        packed.packed_scale,
        packed.packed_zero,
        packed.out_features,
        packed.group_size,
        bias,
        check_isa(isa),
    )
    return y.reshape(*x.shape[:-1], packed.out_features)
