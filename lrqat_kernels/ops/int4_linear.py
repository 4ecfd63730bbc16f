"""Deployment INT4 GEMM: ``y = x @ W_hat^T + bias`` with ``W_hat = scale * (W_int - zero_point)``.

The merged LR-QAT model stores ``W_int`` as real 4-bit integers (``formats.pack_nibbles``: uint8
``[N, K / 2]``, column ``2j`` in the low nibble of byte ``j``, two's complement) plus fp32 scales
(per channel ``[N, 1]`` or per group ``[N, K / group_size]``) and optional integer zero points.
:func:`int4_linear` runs it without ever materialising ``W_hat``:

============ ======================================================================================
device        what runs
============ ======================================================================================
CPU           the C++ kernels (``csrc/int4_cpu/``): AVX-512 (vdpbf16ps for bf16 x), AVX2 + FMA, or
              portable scalar code, chosen at run time, on a prepacked copy of the weight. Eager
              calls cache that copy per ``qweight`` (weakly, invalidated by in-place updates but
              not by writes through ``.data``); under ``torch.compile`` the op ``lrqat::int4_linear`` prepacks on every call. To
              manage the copy yourself: :func:`int4_prepack_cpu` once, then
              :func:`int4_linear_prepacked` (what the benchmark times).
CUDA          ``torch.ops.lrqat.int4_linear`` if the extension has a CUDA kernel for it; else the
              GPU hook :func:`lrqat_kernels.ops.int4_gpu.int4_linear_gpu` if that module is present
              (Triton / CUDA W4A16, see there); else exact dequantisation + ``F.linear``.
other         exact dequantisation + ``F.linear``.
============ ======================================================================================

Numerics (NUMERICS.md): ``W_hat`` is ``scale * (W_int - z)`` in fp32 and the sums are fp32.
On CPU the result equals the fp32 product of x (as given) with that fp32 ``W_hat``, up to fp32
summation order: bf16 x takes the AVX-512 dot-product path with the exact integers
``W_int - z`` and applies the scale once per group in fp32 (no bf16 rounding of ``W_hat``);
fp32 / fp16 x use fp32 ``W_hat`` and FMA. The output is rounded once to x's dtype (bias added
before). vdpbf16ps treats bf16 subnormals in x as zero.

CPU instruction set: ``isa="auto"|"scalar"|"avx2"|"avx512"`` (argument of the prepacked op and of
the Python functions here), else ``$LRQAT_CPU_ISA``, else the best the CPU has (avx512 needs
avx512f/bw/vl + avx512_bf16; avx2 needs avx2 + fma). Asking for an instruction set the CPU lacks
is an error naming what is available (a silent fallback would make a forced-path test
meaningless); a CPU without AVX2 runs the scalar path under ``"auto"``. :func:`cpu_isas`
lists what this CPU supports.

Prepacked CPU layout (``csrc/int4_cpu/int4_cpu.h``): panels of 64 output columns; per panel and
k block of 8, 64 little-endian 32-bit words, word ``l`` holding the 8 offset-binary nibbles
(``W_int + 8``) of column ``64 p + l``, even k in the low 16 bits, odd k in the high 16 bits.

Native ops (schemas in ``csrc/registration.cpp``; fakes for ``torch.compile`` in
:mod:`lrqat_kernels.ops.int4_linear_fakes`):
``int4_linear(x, qweight, scale, zero_point, group_size, bias)`` (device-generic, CPU impl),
``int4_prepack_cpu(qweight, scale, zero_point, group_size)`` and
``int4_linear_prepacked_cpu(x, packed_weight, packed_scale, packed_zero, out_features, group_size,
bias, isa)``. ``group_size`` is -1 for per-channel scales in the ops.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import _ext
from .._checks import check_zero_point_values
from ._prepack_cache import PrepackCache

__all__ = [
    "ISA_ENV",
    "Int4PackedCPU",
    "cpu_isas",
    "dequantize_int4",
    "int4_linear",
    "int4_linear_prepacked",
    "int4_prepack_cpu",
    "register_cuda_int4_linear",
]

#: Environment variable that forces the CPU instruction set (auto, scalar, avx2, avx512).
ISA_ENV = "LRQAT_CPU_ISA"
_ISAS = ("auto", "scalar", "avx2", "avx512")
_PANEL = 64
_KBLOCK = 8


class Int4PackedCPU(NamedTuple):
    """A weight prepacked for the CPU kernel by :func:`int4_prepack_cpu`.

    Attributes:
        packed_weight: uint8 ``[ceil(N / 64), ceil(K / 8), 256]``.
        packed_scale: fp32 ``[ceil(N / 64), G, 64]``.
        packed_zero: int32 ``[ceil(N / 64), G, 64]`` or None (symmetric).
        out_features: N.
        in_features: K.
        group_size: k per scale group, -1 for per-channel scales.
    """

    packed_weight: torch.Tensor
    packed_scale: torch.Tensor
    packed_zero: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int


# ---- instruction sets ----------------------------------------------------------------------


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


def _check_isa(isa: str | None) -> str:
    if isa is None:
        return "auto"
    if not isinstance(isa, str) or isa.lower() not in _ISAS:
        raise ValueError(f"isa must be one of {_ISAS} (or None: ${ISA_ENV}, else auto), got {isa!r}")
    return isa.lower()


# ---- argument normalisation ---------------------------------------------------------------


def _group_size(K: int, scale: torch.Tensor, group_size: int | None) -> int:
    """The op's group_size: -1 for per-channel scales; None infers it from scale's shape."""
    if group_size is None:
        if scale.dim() != 2 or scale.shape[1] < 1:
            raise ValueError(f"scale must be [N, 1] or [N, K / group_size], got shape {tuple(scale.shape)}")
        G = scale.shape[1]
        if G == 1:
            return -1
        if K % G:
            raise ValueError(f"scale has {G} groups, which does not divide in_features K={K}")
        return K // G
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    return -1 if group_size == K else group_size


def _zero_point_int(zero_point: torch.Tensor | None) -> torch.Tensor | None:
    """Integer zero points; floats are accepted only when they hold integers. The values (integers
    in the INT4 grid [-8, 7]) are checked on CPU (on a GPU the check would synchronise)."""
    from .int4_gpu import zero_point_as_int

    if zero_point is not None and zero_point.device.type == "cpu" and not torch.compiler.is_compiling():
        check_zero_point_values(zero_point, 4)
    return zero_point_as_int(zero_point)


def _flatten(x: torch.Tensor, K: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] = [..., {K}], got shape {tuple(x.shape)}")
    return x.reshape(-1, K)


# ---- exact dequantisation (reference / fallback) ------------------------------------------


def dequantize_int4(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat = scale * (W_int - zero_point)`` ``[N, K]``, computed in fp32, cast to ``dtype`` last.

    Args:
        qweight: uint8 ``[N, K / 2]`` (``formats.pack_nibbles`` layout).
        scale: float ``[N, 1]`` (per channel) or ``[N, K / group_size]``.
        zero_point: None or integer ``[N, G]`` like scale, values in [-8, 7].
        group_size: k per group; None infers it from scale's shape; -1 or K: per channel.
        dtype: result dtype.
    """
    from ..formats import unpack_nibbles

    K = 2 * qweight.shape[-1]
    g = _group_size(K, scale, group_size)
    g = K if g == -1 else g
    w = unpack_nibbles(qweight).to(torch.float32)
    zero_point = _zero_point_int(zero_point)
    if zero_point is not None:
        w = w - zero_point.to(torch.float32).repeat_interleave(g, dim=1)
    return (w * scale.to(torch.float32).repeat_interleave(g, dim=1)).to(dtype)


def _dequant_linear(x2, qweight, scale, zero_point, g, bias):
    w_hat = dequantize_int4(qweight, scale, zero_point, g, x2.dtype)
    return F.linear(x2, w_hat, None if bias is None else bias.to(x2.dtype))


# ---- CUDA hook -----------------------------------------------------------------------------

# A callable with int4_linear_gpu's signature (x, qweight, scale, zero_point, group_size, bias) ->
# y, used for CUDA tensors when the native op has no CUDA kernel. None: look for
# lrqat_kernels.ops.int4_gpu.int4_linear_gpu, else dequantise + F.linear.
_cuda_impl: Callable | None = None


def register_cuda_int4_linear(fn: Callable | None) -> None:
    """Plug a CUDA implementation into :func:`int4_linear` (None restores the default lookup).

    ``fn(x, qweight, scale, zero_point, group_size, bias)`` gets x ``[..., K]`` on CUDA, group_size
    None for per-channel scales, and returns ``[..., N]`` in x's dtype.
    """
    global _cuda_impl
    _cuda_impl = fn


def _native_has_kernel(key: str) -> bool:
    if not _ext.load_extension():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("lrqat::int4_linear", key)
    except RuntimeError:  # op not defined by this build of _C
        return False


def _cuda_int4_linear(x, qweight, scale, zero_point, g, bias, backend=None):
    K = qweight.shape[1] * 2
    if backend is None and _native_has_kernel("CUDA"):
        y = torch.ops.lrqat.int4_linear(x.reshape(-1, K), qweight, scale, zero_point, g, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    # -- int4_gpu hook: an explicit backend ("auto" | "cuda" | "triton" | "dequant") goes to the GPU
    # module's dispatcher (which also reads $LRQAT_INT4_BACKEND when backend is None).
    if backend is not None:
        from .int4_gpu import int4_linear_gpu

        return int4_linear_gpu(x, qweight, scale, zero_point, None if g == -1 else g, bias, backend=backend)
    # -- end int4_gpu hook
    fn = _cuda_impl
    if fn is None and x.dtype in (torch.float16, torch.bfloat16):  # the GPU module's W4A16 kernels
        try:
            from .int4_gpu import int4_linear_gpu as fn
        except ImportError:
            fn = None
    if fn is not None:
        return fn(x, qweight, scale, zero_point, None if g == -1 else g, bias)
    y = _dequant_linear(x.reshape(-1, K), qweight, scale, zero_point, g, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@functools.lru_cache(maxsize=1)
def _warn_no_extension() -> None:
    warnings.warn("lrqat_kernels._C is not built (" + (_ext.extension_error() or "a Python-only install") + "): "
                  "int4_linear on CPU dequantises and calls F.linear (same results, slower); "
                  "build the package with its extension for the INT4 CPU GEMM", stacklevel=3)


# ---- public API ----------------------------------------------------------------------------


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    *,
    isa: str | None = None,
    bits: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ (scale * (W_int - zero_point))^T + bias`` from the stored INT4 weight.

    Args:
        x: float32 / bfloat16 / float16 ``[..., K]``, K even.
        qweight: uint8 ``[N, K / 2]``, ``formats.pack_nibbles`` layout (values in [-8, 7]).
        scale: float32 (or bf16 / fp16, converted to fp32) ``[N, 1]`` or ``[N, K / group_size]``.
        zero_point: None (symmetric) or integer ``[N, G]`` like scale, in [-8, 7].
        group_size: k per group (a multiple of 8 dividing K on CPU); None infers it from
            scale's shape; -1 or K means per channel.
        bias: None or ``[N]``.
        isa: CPU instruction set ("auto", "scalar", "avx2", "avx512"); None reads
            ``$LRQAT_CPU_ISA`` (default auto). Ignored for CUDA tensors.
        bits: accepted for ``QuantizedLinear`` (must be <= 4); the kernel reads any INT-b, b <= 4.
        backend: CUDA tensors only: "auto", "cuda" (the opt-in CUDA kernel), "triton" or
            "dequant", see :mod:`lrqat_kernels.ops.int4_gpu`; None reads ``$LRQAT_INT4_BACKEND``
            (default "auto"). Ignored for CPU tensors.

    Returns:
        ``[..., N]`` in x's dtype, on x's device.
    """
    if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 4):
        raise ValueError(f"int4_linear reads INT-b weights with b in 2..4, got bits={bits!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise TypeError(f"qweight must be a uint8 tensor [N, K / 2], got {getattr(qweight, 'shape', type(qweight))}")
    K = 2 * qweight.shape[1]
    x2 = _flatten(x, K)
    g = _group_size(K, scale, group_size)
    zero_point_in, zero_point = zero_point, _zero_point_int(zero_point)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, scale, zero_point_in)):
        # The INT4 GEMMs have no autograd: a gradient that must flow through this layer (a trainable
        # layer in front) takes the exact, differentiable dequantise path instead of being dropped.
        return _dequant_linear(x2, qweight, scale, zero_point, g, bias).reshape(*x.shape[:-1], qweight.shape[0])
    if x.device.type == "cuda":
        return _cuda_int4_linear(x, qweight, scale, zero_point, g, bias, backend)
    if x.device.type != "cpu":
        y = _dequant_linear(x2, qweight, scale, zero_point, g, bias)
    elif not _ext.has_extension():  # a Python-only install: exact, slower
        _warn_no_extension()
        y = _dequant_linear(x2, qweight, scale, zero_point, g, bias)
    else:
        isa = _check_isa(isa)
        if torch.compiler.is_compiling():  # traced: the op prepacks inside (a fake exists for it)
            if isa == "auto":
                y = torch.ops.lrqat.int4_linear(x2, qweight, scale, zero_point, g, bias)
            else:
                pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qweight, scale, zero_point, g)
                y = torch.ops.lrqat.int4_linear_prepacked_cpu(
                    x2, pw, ps, pz if zero_point is not None else None, qweight.shape[0], g, bias, isa
                )
        else:
            packed = _cached_prepack(qweight, scale, zero_point, g, zero_point_in)
            y = torch.ops.lrqat.int4_linear_prepacked_cpu(
                x2, packed.packed_weight, packed.packed_scale, packed.packed_zero, packed.out_features, g, bias, isa
            )
    return y.reshape(*x.shape[:-1], y.shape[-1])


# Prepacked copies for eager CPU calls with standard-layout weights (see _prepack_cache): a decode
# loop prepacks each layer once; the copy costs the weight's memory once more.
_PREPACK_CACHE = PrepackCache()


def _cached_prepack(qweight, scale, zero_point, g, zero_point_in=None) -> Int4PackedCPU:
    """``zero_point_in``: the caller's zero-point tensor ``zero_point`` was converted from (the
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

    Args: as :func:`int4_linear` (CPU tensors).

    Returns:
        :class:`Int4PackedCPU`.
    """
    _ext.require_extension("int4_prepack_cpu")
    K = 2 * qweight.shape[1]
    g = _group_size(K, scale, group_size)
    zero_point = _zero_point_int(zero_point)
    pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qweight, scale, zero_point, g)
    return Int4PackedCPU(pw, ps, pz if zero_point is not None else None, qweight.shape[0], K, g)


def int4_linear_prepacked(
    x: torch.Tensor, packed: Int4PackedCPU, bias: torch.Tensor | None = None, *, isa: str | None = None
) -> torch.Tensor:
    """:func:`int4_linear` on a weight from :func:`int4_prepack_cpu` (CPU).

    Args:
        x: float32 / bfloat16 / float16 ``[..., K]`` on CPU.
        packed: :class:`Int4PackedCPU`.
        bias: None or ``[N]``.
        isa: as :func:`int4_linear`.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    _ext.require_extension("int4_linear_prepacked_cpu")
    x2 = _flatten(x, packed.in_features)
    y = torch.ops.lrqat.int4_linear_prepacked_cpu(
        x2,
        packed.packed_weight,
        packed.packed_scale,
        packed.packed_zero,
        packed.out_features,
        packed.group_size,
        bias,
        _check_isa(isa),
    )
    return y.reshape(*x.shape[:-1], packed.out_features)
