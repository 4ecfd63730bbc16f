"""The CUDA W4A16 kernel (``csrc/int4_gpu/``): prepack once, then :func:`int4_cuda_linear` per call.

Native ops (schemas in ``csrc/registration.cpp``; their C++ names keep the ``int4_gpu_`` prefix):

* ``torch.ops.lrqat.int4_gpu_prepack(qweight)`` (CPU and CUDA): the standard packed W_int
  (uint8 ``[N, K / 2]``, :mod:`lrqat_kernels.formats` nibble layout) -> int32
  ``[ceil(N / 128), K / 16, 256]``, the layout in which one 32-bit load gives each GPU thread
  exactly the nibbles of its ``mma.m16n8k16`` B fragments (``csrc/int4_gpu/int4_gpu.h``).
  Python: :func:`int4_cuda_prepack_qweight`.
* ``torch.ops.lrqat.int4_gpu_linear(x, qweight, scale, zero_point, bias, out_features)`` (CUDA):
  ``y = x @ (scale * (W_int - zero_point))^T + bias``, tensor cores, fp32 accumulation.
* ``torch.ops.lrqat.int4_gpu_dequant_words(words, dtype, zero_point)`` (CPU): test hook that
  runs the kernel's magic-number dequantisation of 32-bit words on the host.

Their fake impls are defined here; ``lrqat_kernels.ops.int4_gpu`` registers them, because it is the
module ``m.set_python_module`` names for these ops and torch checks that.

The kernel is opt-in (``backend="cuda"`` of ``int4_linear``) until it has passed its tests on a
real GPU; :mod:`lrqat_kernels.ops.int4_linear` chooses it and caches prepacked weights
(:func:`cached_prepack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ext
from ._int4_rules import canonical_group_size
from ._prepack_cache import PrepackCache

__all__ = [
    "Int4CudaWeight",
    "cuda_kernel_available",
    "int4_cuda_dequant_words",
    "int4_cuda_linear",
    "int4_cuda_prepack",
    "int4_cuda_prepack_qweight",
    "prepare_scale",
    "prepare_zero_point",
]

STRIP_N = 128  # output columns per prepacked strip (csrc/int4_gpu/int4_gpu.h kStripN)
STEP_K = 16  # K per mma step (kStepK)
WORDS_PER_STEP = 256


@dataclass(frozen=True)
class Int4CudaWeight:
    """A linear layer's INT4 weight in the CUDA kernel's layout (from :func:`int4_cuda_prepack`).

    Attributes:
        qweight: int32 ``[ceil(N / 128), K / 16, 256]`` (``int4_gpu_prepack``).
        scale: ``[G, ceil(N / 128) * 128]``, float32 or 16-bit, zero-padded columns.
        zero_point: None or int8 like ``scale``.
        out_features: N. in_features: K.
        group_size: None (per-channel) or the group size.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    out_features: int
    in_features: int
    group_size: int | None


def cuda_kernel_available() -> bool:
    """Whether ``torch.ops.lrqat.int4_gpu_linear`` has a CUDA kernel (``_C`` built with CUDA)."""
    if not _ext.load_extension():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("lrqat::int4_gpu_linear", "CUDA")
    except Exception:  # private API; assume a CUDA build has it
        return torch.version.cuda is not None


def int4_cuda_prepack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Reorder the standard packed W_int into the CUDA kernel's layout (native op, CPU or CUDA).

    Args:
        qweight: uint8 ``[N, K / 2]``, contiguous, K a multiple of 16 (formats.py nibble layout).

    Returns:
        int32 ``[ceil(N / 128), K / 16, 256]`` on the same device; rows past N read as 0.
    """
    _ext.require_extension("int4_gpu_prepack")
    return torch.ops.lrqat.int4_gpu_prepack(qweight)


def int4_cuda_dequant_words(words: torch.Tensor, dtype: torch.dtype, zero_point: int = 0) -> torch.Tensor:
    """Test hook: the kernel's in-register dequantisation of int32 ``words`` (CPU emulation).

    Returns:
        ``dtype`` ``[n, 8]``: for each word, pair a = 0..3 as (low half, high half) =
        ``(nibble a, nibble a + 4) - 8 - zero_point`` (nibbles offset-binary).
    """
    _ext.require_extension("int4_gpu_dequant_words")
    return torch.ops.lrqat.int4_gpu_dequant_words(words, dtype, zero_point)


def _padded_n(n: int) -> int:
    return -(-n // STRIP_N) * STRIP_N


def prepare_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[N, G]`` scales -> the kernel's ``[G, ceil(N / 128) * 128]`` (transposed so a CTA's 128
    columns of one group are one contiguous 16-byte-aligned run; padded with zeros)."""
    n, g = scale.shape
    out = torch.zeros((g, _padded_n(n)), dtype=dtype, device=scale.device)
    out[:, :n] = scale.t().to(dtype)
    return out


def prepare_zero_point(zero_point: torch.Tensor) -> torch.Tensor:
    """Integer-valued ``[N, G]`` zero points in [-8, 7] -> int8 ``[G, ceil(N / 128) * 128]``."""
    z = zero_point.round() if zero_point.is_floating_point() else zero_point
    n, g = z.shape
    out = torch.zeros((g, _padded_n(n)), dtype=torch.int8, device=z.device)
    out[:, :n] = z.t().to(torch.int8)
    return out


def check_cuda_shapes(K: int, group_size: int | None) -> None:
    """Raise ValueError unless the kernel tiles ``K`` inputs with groups of ``group_size`` (None or
    K: per channel): K a multiple of 16, a group a power of two >= 32."""
    if K % STEP_K:
        raise ValueError(
            f"the CUDA int4 kernel needs in_features to be a multiple of 16, got {K}; "
            "use backend='triton' or 'dequant'"
        )
    if group_size is not None and group_size != K:
        if group_size < 32 or group_size & (group_size - 1):
            raise ValueError(
                f"the CUDA int4 kernel needs group_size to be a power of two >= 32 (or per-channel), "
                f"got {group_size}; use backend='triton' or 'dequant'"
            )


def int4_cuda_prepack(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    *,
    scale_dtype: torch.dtype = torch.float32,
) -> Int4CudaWeight:
    """Convert a merged LR-QAT layer (``W_int`` packed, ``s``, ``z``) for the CUDA kernel, once.

    Args:
        qweight: uint8 ``[N, K / 2]`` (formats.pack_nibbles of ``W_int``), K % 16 == 0.
        scale: float ``[N, 1]`` (per-channel) or ``[N, K / group_size]``.
        zero_point: None (symmetric) or integer-valued ``[N, G]`` in [-8, 7].
        group_size: None (per-channel) or a power of two >= 32 dividing K.
        scale_dtype: float32 (default: exact, NUMERICS.md keeps ``s`` in fp32) or x's 16-bit
            dtype (half the scale bytes: 3 % of the weight stream at g = 128, 12 % at g = 32;
            the kernel applies it in fp32 after the dot product either way).

    Returns:
        :class:`Int4CudaWeight` on qweight's device.
    """
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be uint8 [N, K / 2], got {getattr(qweight, 'dtype', None)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    group_size = canonical_group_size(group_size, K)
    check_cuda_shapes(K, group_size)
    g = K if group_size is None else group_size
    if K % g or tuple(scale.shape) != (N, K // g):
        raise ValueError(f"scale must be [N, K // group_size] = [{N}, {K // g if K % g == 0 else '?'}], got {tuple(scale.shape)}")
    if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")
    if zero_point is not None:
        if tuple(zero_point.shape) != tuple(scale.shape):
            raise ValueError(f"zero_point must have scale's shape {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
        if zero_point.numel() and (float(zero_point.min()) < -8 or float(zero_point.max()) > 7):
            # The kernel builds 16-bit constants from z with integer bit arithmetic valid on [-8, 7].
            raise ValueError("zero_point values must be in [-8, 7] (the signed 4-bit grid)")
    return Int4CudaWeight(
        qweight=int4_cuda_prepack_qweight(qweight.contiguous()),
        scale=prepare_scale(scale, scale_dtype),
        zero_point=None if zero_point is None else prepare_zero_point(zero_point),
        out_features=N,
        in_features=K,
        group_size=None if g == K else g,
    )


def _linear(x: torch.Tensor, weight: Int4CudaWeight, bias: torch.Tensor | None, name: str) -> torch.Tensor:
    if not x.is_cuda:
        raise ValueError(f"{name} (the CUDA W4A16 kernel) needs CUDA tensors, got x on {x.device}; "
                         "lrqat_kernels.int4_linear serves CPU tensors")
    _ext.require_extension("int4_gpu_linear")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scale = weight.scale
    if scale.dtype != torch.float32 and scale.dtype != x.dtype:
        scale = scale.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = torch.ops.lrqat.int4_gpu_linear(x2, weight.qweight, scale, weight.zero_point, bias, weight.out_features)
    return y.reshape(*lead, weight.out_features)


def int4_cuda_linear(x: torch.Tensor, weight: Int4CudaWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (s * (W_int - z))^T + bias`` with the CUDA W4A16 kernel.

    Args:
        x: fp16 / bf16 ``[..., K]`` on a CUDA device.
        weight: :class:`Int4CudaWeight` on the same device (:func:`int4_cuda_prepack`).
        bias: None or ``[N]`` in x's dtype.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    return _linear(x, weight, bias, "int4_cuda_linear")


# Prepacked copies for backend="cuda" calls with standard-layout weights (see _prepack_cache): a
# decode loop prepacks once per layer, and the copy dies with the weight.
_PREPACK_CACHE = PrepackCache()


def cached_prepack(qweight, scale, zero_point, group_size, scale_dtype) -> Int4CudaWeight:
    """:func:`int4_cuda_prepack`, cached per ``qweight`` (invalidated by in-place updates of any input)."""
    def build():
        return int4_cuda_prepack(qweight, scale, zero_point, group_size, scale_dtype=scale_dtype)

    if torch.compiler.is_compiling() or (qweight.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Under CUDA-graph capture the prepack kernels are only recorded: a cached copy would hold
        # uninitialised memory for eager calls until that graph is replayed.
        return build()
    return _PREPACK_CACHE.get(qweight, (scale, zero_point), (group_size, scale_dtype), build)


# ---- fake impls (registered by lrqat_kernels.ops.int4_gpu, the module csrc names) -------------
# Messages mirror csrc/int4_gpu/*.


def _check(cond, msg) -> None:
    torch._check(cond, lambda: msg)


def _int4_gpu_prepack_fake(qweight: torch.Tensor) -> torch.Tensor:
    _check(qweight.dtype == torch.uint8, f"lrqat::int4_gpu_prepack: qweight must be torch.uint8, got {qweight.dtype}")
    _check(qweight.dim() == 2, f"lrqat::int4_gpu_prepack: qweight must be 2-D, got shape {list(qweight.shape)}")
    _check(
        (2 * qweight.shape[1]) % STEP_K == 0,
        "lrqat::int4_gpu_prepack: in_features (2 * qweight.size(1)) must be a multiple of 16",
    )
    strips = (qweight.shape[0] + STRIP_N - 1) // STRIP_N
    return qweight.new_empty((strips, 2 * qweight.shape[1] // STEP_K, WORDS_PER_STEP), dtype=torch.int32)


def _int4_gpu_linear_fake(x, qweight, scale, zero_point, bias, out_features):
    _check(x.dtype in (torch.float16, torch.bfloat16), f"lrqat::int4_gpu_linear: x must be torch.float16 or torch.bfloat16, got {x.dtype}")
    _check(x.dim() == 2, f"lrqat::int4_gpu_linear: x must be 2-D, got shape {list(x.shape)}")
    _check(qweight.dtype == torch.int32 and qweight.dim() == 3, "lrqat::int4_gpu_linear: qweight must be prepacked by lrqat::int4_gpu_prepack")
    _check(qweight.shape[1] * STEP_K == x.shape[1], "lrqat::int4_gpu_linear: x must be [M, K] with K = 16 * qweight.size(1)")
    return x.new_empty((x.shape[0], out_features))


def _int4_gpu_dequant_words_fake(words, dtype, zero_point):
    return words.new_empty((words.shape[0], 8), dtype=dtype)


#: op name -> fake impl, for lrqat_kernels.ops.int4_gpu to register.
FAKES = {
    "lrqat::int4_gpu_prepack": _int4_gpu_prepack_fake,
    "lrqat::int4_gpu_linear": _int4_gpu_linear_fake,
    "lrqat::int4_gpu_dequant_words": _int4_gpu_dequant_words_fake,
}
