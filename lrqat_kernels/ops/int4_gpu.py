"""INT4 deployment GEMM on GPUs: the CUDA W4A16 kernel and the CUDA-side backend choice.

Native ops (schemas in ``csrc/registration.cpp``, kernels in ``csrc/int4_gpu/``):

* ``torch.ops.lrqat.int4_gpu_prepack(qweight)`` (CPU and CUDA): the standard packed W_int
  (uint8 ``[N, K / 2]``, :mod:`lrqat_kernels.formats` nibble layout) -> int32
  ``[ceil(N / 128), K / 16, 256]``, the layout in which one 32-bit load gives each GPU thread
  exactly the nibbles of its ``mma.m16n8k16`` B fragments (``csrc/int4_gpu/int4_gpu.h``).
* ``torch.ops.lrqat.int4_gpu_linear(x, qweight, scale, zero_point, bias, out_features)`` (CUDA):
  ``y = x @ (scale * (W_int - zero_point))^T + bias``, tensor cores, fp32 accumulation.
* ``torch.ops.lrqat.int4_gpu_dequant_words(words, dtype, zero_point)`` (CPU): test hook that
  runs the kernel's magic-number dequantisation of 32-bit words on the host.

Use :func:`prepack_int4_gpu` once at load time and :func:`int4_gpu_linear` per call.

The CUDA kernel is OPT-IN until it has passed its tests on a real GPU: ``backend="cuda"`` (an
argument of :func:`int4_linear_gpu` and of ``lrqat_kernels.ops.int4_linear.int4_linear``) or
``LRQAT_INT4_BACKEND=cuda``. :func:`int4_linear_gpu` is the hook the generic ``int4_linear``
dispatcher calls for fp16 / bf16 CUDA tensors:

============== =================================================================================
backend         what runs for CUDA tensors
============== =================================================================================
``"auto"``      the GPU's tuning table when it has one (:func:`auto_backend`,
                :mod:`lrqat_kernels.ops.int4_tuning`); else M <= :data:`AUTO_DEQUANT_MIN_M` - 1:
                the Triton W4A16 kernel (decode, memory bound); larger M (prefill): dequantise
                once (Triton) then cuBLAS (``F.linear``). The CUDA kernel only where a table made
                with ``--allow-cuda`` (after its GPU tests passed) measured it fastest.
``"cuda"``      the CUDA kernel (csrc/int4_gpu), prepacked on first use and cached per weight.
``"triton"``    the Triton W4A16 kernel (:mod:`lrqat_kernels.ops.int4_triton`).
``"dequant"``   dequantise to x's dtype, then cuBLAS (:func:`dequant_linear`; in L2-sized row
                chunks where the GPU's tuning table measured that faster).
============== =================================================================================
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _ext
from ._launch import interpreting
from ._prepack_cache import PrepackCache

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "AUTO_DEQUANT_MIN_M",
    "Int4GPUWeight",
    "cuda_kernel_available",
    "int4_gpu_prepack",
    "prepare_scale",
    "prepare_zero_point",
    "prepack_int4_gpu",
    "int4_gpu_linear",
    "int4_gpu_dequant_words",
    "resolve_backend",
    "auto_backend",
    "dequant_weight",
    "dequant_linear",
    "dequant_chunk_candidates",
    "int4_linear_gpu",
    "check_int4_linear_args",
    "zero_point_as_int",
]

BACKENDS = ("auto", "cuda", "triton", "dequant")
BACKEND_ENV = "LRQAT_INT4_BACKEND"

#: ``backend="auto"`` switches from the Triton W4A16 kernel to dequantise + cuBLAS at this M
#: (M > 256) on GPUs WITHOUT a tuning table (a table, written by ``bench/tune_int4_gemm.py`` on
#: that GPU, replaces this rule by measured choices per shape and M). PROVISIONAL AND UNMEASURED:
#: no GPU was available when it was written. It should be the M where a W4A16 kernel stops
#: beating cuBLAS on bf16 weights. Note for that measurement: the dequantisation pass
#: writes N*K*2 bytes (~34 us for 4096x11008 on an H100), ~20 % of the bf16 GEMM at M = 1024.
AUTO_DEQUANT_MIN_M = 257

STRIP_N = 128  # output columns per prepacked strip (csrc/int4_gpu/int4_gpu.h kStripN)
STEP_K = 16  # K per mma step (kStepK)
WORDS_PER_STEP = 256


@dataclass(frozen=True)
class Int4GPUWeight:
    """A linear layer's INT4 weight in the CUDA kernel's layout (from :func:`prepack_int4_gpu`).

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


def int4_gpu_prepack(qweight: torch.Tensor) -> torch.Tensor:
    """Reorder the standard packed W_int into the CUDA kernel's layout (native op, CPU or CUDA).

    Args:
        qweight: uint8 ``[N, K / 2]``, contiguous, K a multiple of 16 (formats.py nibble layout).

    Returns:
        int32 ``[ceil(N / 128), K / 16, 256]`` on the same device; rows past N read as 0.
    """
    _ext.require_extension("int4_gpu_prepack")
    return torch.ops.lrqat.int4_gpu_prepack(qweight)


def int4_gpu_dequant_words(words: torch.Tensor, dtype: torch.dtype, zero_point: int = 0) -> torch.Tensor:
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


def _check_cuda_shapes(K: int, group_size: int | None) -> None:
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


def prepack_int4_gpu(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    *,
    scale_dtype: torch.dtype = torch.float32,
) -> Int4GPUWeight:
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
        :class:`Int4GPUWeight` on qweight's device.
    """
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be uint8 [N, K / 2], got {getattr(qweight, 'dtype', None)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    _check_cuda_shapes(K, group_size)
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
    return Int4GPUWeight(
        qweight=int4_gpu_prepack(qweight.contiguous()),
        scale=prepare_scale(scale, scale_dtype),
        zero_point=None if zero_point is None else prepare_zero_point(zero_point),
        out_features=N,
        in_features=K,
        group_size=None if g == K else g,
    )


def int4_gpu_linear(x: torch.Tensor, weight: Int4GPUWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (s * (W_int - z))^T + bias`` with the CUDA W4A16 kernel.

    Args:
        x: fp16 / bf16 ``[..., K]`` on a CUDA device.
        weight: :class:`Int4GPUWeight` on the same device (:func:`prepack_int4_gpu`).
        bias: None or ``[N]`` in x's dtype.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    if not x.is_cuda:
        raise ValueError(f"int4_gpu_linear (the CUDA W4A16 kernel) needs CUDA tensors, got x on {x.device}; "
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


def check_int4_linear_args(x, qweight, scale, zero_point=None, group_size=None, bias=None) -> tuple[int, int, int]:
    """Validate the standard-layout W4A16 arguments; return ``(N, K, effective group size)``.

    Args:
        x: ``[..., K]`` fp16 / bf16.
        qweight: uint8 ``[N, K / 2]`` (formats.pack_nibbles layout).
        scale: float ``[N, 1]`` (per-channel) or ``[N, K / group_size]``.
        zero_point: None or integer-valued ``[N, G]`` like scale, values in [-8, 7].
        group_size: None (per-channel) or a divisor of K.
        bias: None or ``[N]``.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(
            f"qweight must be uint8 [N, K / 2] (formats.pack_nibbles), got "
            f"{getattr(qweight, 'dtype', type(qweight).__name__)} {tuple(getattr(qweight, 'shape', ()))}"
        )
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K] = [..., {K}] to match qweight {tuple(qweight.shape)}, got {tuple(x.shape)}")
    if group_size is None:
        g = K
    else:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or K % group_size:
            raise ValueError(f"group_size must be None (per-channel) or a positive divisor of K={K}, got {group_size!r}")
        g = group_size
    n_groups = K // g
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (N, n_groups):
        raise ValueError(
            f"scale must be a float tensor [N, K // group_size] = [{N}, {n_groups}], got "
            f"{getattr(scale, 'dtype', None)} {tuple(getattr(scale, 'shape', ()))}"
        )
    if zero_point is not None:
        if not isinstance(zero_point, torch.Tensor) or tuple(zero_point.shape) != (N, n_groups):
            raise ValueError(f"zero_point must be None or [N, G] = [{N}, {n_groups}] like scale, got "
                             f"{tuple(getattr(zero_point, 'shape', ()))}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != N or not bias.is_floating_point():
            raise ValueError(f"bias must be None or a float tensor [N] = [{N}], got {tuple(getattr(bias, 'shape', ()))}")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero_point", zero_point), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")
    return N, K, g


def zero_point_as_int(zero_point):
    """Zero points as an integer tensor (floats holding integers are rounded)."""
    if zero_point is None:
        return None
    if zero_point.dtype in (torch.int8, torch.int16, torch.int32):
        return zero_point
    if zero_point.is_floating_point():
        return zero_point.round().to(torch.int32)
    return zero_point.to(torch.int32)


# ---- backend choice for CUDA tensors --------------------------------------------------------


def resolve_backend(backend: str | None = None) -> str:
    """``backend`` if given, else ``$LRQAT_INT4_BACKEND``, else ``"auto"``; validated."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"int4 backend must be one of {BACKENDS} (argument or ${BACKEND_ENV}), got {backend!r}")
    return backend


def dequant_weight(qweight, scale, zero_point=None, group_size=None, dtype=torch.bfloat16, *, out=None) -> torch.Tensor:
    """``W_hat = s * (W_int - z)`` computed in fp32 and cast to ``dtype`` (NUMERICS.md): one Triton
    pass on CUDA, plain PyTorch elsewhere. ``[N, K]``; written into ``out`` (``[N, K]``, ``dtype``,
    unit column stride) when given."""
    if qweight.is_cuda:
        try:
            from .int4_triton import int4_dequant_triton
        except ImportError:
            pass
        else:
            return int4_dequant_triton(qweight, scale, zero_point, group_size, dtype, out=out)
    from ..formats import unpack_nibbles

    w = unpack_nibbles(qweight).float()
    g = w.shape[1] if group_size is None else group_size
    if zero_point is not None:
        w = w - zero_point.float().round().repeat_interleave(g, dim=1)
    w = w * scale.float().repeat_interleave(g, dim=1)
    return w.to(dtype) if out is None else out.copy_(w)


def dequant_chunk_candidates(N: int, K: int, dtype: torch.dtype) -> list[int]:
    """The ``chunk_n`` values ``bench/tune_int4_gemm.py`` times for :func:`dequant_linear`: buffers
    of 8, 16 and 32 MiB (H100 L2: 50 MB), in multiples of 256 rows, each smaller than N."""
    row_bytes = K * torch.empty((), dtype=dtype).element_size()
    out = []
    for mib in (8, 16, 32):
        c = (mib << 20) // max(1, row_bytes) // 256 * 256
        if 256 <= c < N and c not in out:
            out.append(c)
    return out


def dequant_linear(x, qweight, scale, zero_point=None, group_size=None, bias=None, *, chunk_n: int | None = None):
    """Dequantise + cuBLAS (the "dequant" backend): ``x @ W_hat^T + bias`` with ``W_hat`` in x's dtype.

    ``chunk_n=None``: all of ``W_hat`` (``N * K`` elements, written to and read back from HBM)
    then one ``F.linear``. ``chunk_n``: ``chunk_n`` output rows of ``W_hat`` at a time into one
    reused ``[chunk_n, K]`` buffer, each followed by the GEMM that writes those columns of y
    (cuBLAS writes a column slice of y in place: leading dimension N). A buffer that fits in L2
    keeps the dequantised weight's write and re-read out of HBM, and caps the transient memory;
    the GEMMs get narrower. Whether and where that wins is measured per GPU by the tuner (the
    table's ``dequant_chunk_n``). Numerics are the same up to fp32 summation order (cuBLAS may
    pick another algorithm for a narrower GEMM): each output is one GEMM's fp32 dot product over
    all of K, plus bias, rounded once. Calls that need autograd through x, and calls traced by
    ``torch.compile`` (``out=`` into a column slice is neither differentiable nor traceable),
    take the whole-``W_hat`` path.

    Args:
        x: fp16 / bf16 ``[..., K]``; qweight / scale / zero_point / group_size / bias as
            :func:`int4_linear_gpu`.
        chunk_n: None, or a positive number of output rows per chunk.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    b = None if bias is None else bias.to(x.dtype)
    if chunk_n is not None and (isinstance(chunk_n, bool) or not isinstance(chunk_n, int) or chunk_n < 1):
        raise ValueError(f"chunk_n must be None or a positive int, got {chunk_n!r}")
    whole = chunk_n is None or chunk_n >= N or torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)))
    if whole:
        return F.linear(x, dequant_weight(qweight, scale, zero_point, group_size, x.dtype), b)
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    buf = torch.empty((chunk_n, K), dtype=x.dtype, device=x.device)
    for n0 in range(0, N, chunk_n):
        n1 = min(N, n0 + chunk_n)
        rows = slice(n0, n1)
        w = dequant_weight(qweight[rows], scale[rows], None if zero_point is None else zero_point[rows], group_size,
                           x.dtype, out=buf[: n1 - n0])
        if b is None:
            torch.mm(x2, w.t(), out=y[:, rows])
        else:
            torch.addmm(b[rows], x2, w.t(), out=y[:, rows])
    return y.reshape(*x.shape[:-1], N)


# Prepacked copies for backend="cuda" calls with standard-layout weights (see _prepack_cache): a
# decode loop prepacks once per layer, and the copy dies with the weight.
_PREPACK_CACHE = PrepackCache()


def _cached_prepack(qweight, scale, zero_point, group_size, scale_dtype) -> Int4GPUWeight:
    def build():
        return prepack_int4_gpu(qweight, scale, zero_point, group_size, scale_dtype=scale_dtype)

    if torch.compiler.is_compiling() or (qweight.is_cuda and torch.cuda.is_current_stream_capturing()):
        # Under CUDA-graph capture the prepack kernels are only recorded: a cached copy would hold
        # uninitialised memory for eager calls until that graph is replayed.
        return build()
    return _PREPACK_CACHE.get(qweight, (scale, zero_point), (group_size, scale_dtype), build)


def _device_name(device: torch.device) -> str | None:
    """The GPU's name (keys the tuning tables; cached); None off CUDA. A hook tests replace."""
    from .int4_triton import gpu_name

    return gpu_name(device)


def auto_backend(device: torch.device, M: int, N: int, K: int, g: int) -> str:
    """What ``backend="auto"`` runs for ``M`` tokens through an ``[N, K]`` layer with groups of ``g``
    (``g == K``: per-channel) on ``device``.

    With a tuning table for the GPU (:mod:`lrqat_kernels.ops.int4_tuning`): the measured winner of
    the nearest tuned ``(M, N, K)``. Else: Triton below :data:`AUTO_DEQUANT_MIN_M`, dequantise +
    cuBLAS from there. Either way a backend that cannot run this layer is replaced: "cuda" (only
    in a table made with ``--allow-cuda``) needs the built kernel and its shape rules, "triton" a
    group that is a multiple of 32 and Triton installed.
    """
    triton_ok = _unsupported("triton", K, g) is None
    rule = "triton" if (triton_ok and M < AUTO_DEQUANT_MIN_M) else "dequant"
    name = _device_name(device)
    if name is None:
        return rule
    from .int4_tuning import lookup

    hit = lookup(name, M, N, K, g)
    if hit is None:
        return rule
    backend = hit[0].backend
    if backend == "cuda" and (_unsupported("cuda", K, g) is not None or not cuda_kernel_available()):
        backend = rule
    if backend == "triton" and not triton_ok:
        backend = "dequant"
    return backend


def _dequant_chunk(device: torch.device, M: int, N: int, K: int, g: int) -> int | None:
    """The "dequant" backend's ``chunk_n`` for ``(M, N, K)`` from the tuning table's entry for it
    (None: one whole ``W_hat``). A chunk is a buffer size: for a layer looked up from another
    shape's entry it keeps that entry's bytes (``chunk_n * K_entry / K`` rows, a multiple of 256),
    so "auto" runs dequant as it was timed when it chose it."""
    name = _device_name(device)
    if name is None:
        return None
    from .int4_tuning import lookup

    hit = lookup(name, M, N, K, g)
    if hit is None or hit[0].dequant_chunk_n is None:
        return None
    entry, exact = hit
    if exact:
        return entry.dequant_chunk_n
    rows = max(256, round(entry.dequant_chunk_n * entry.K / K / 256) * 256)
    return rows if rows < N else None


def _unsupported(backend: str, K: int, g: int) -> str | None:
    """Why ``backend`` cannot run a layer with ``K`` inputs and groups of ``g`` (``g == K``:
    per-channel), or None."""
    if backend == "cuda":
        try:
            _check_cuda_shapes(K, None if g == K else g)
        except ValueError as exc:
            return str(exc).split(";")[0]
    if backend == "triton":
        if g != K and g % 32:
            return f"the Triton W4A16 kernel needs group_size to be a multiple of 32, got {g}"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    return None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def int4_linear_gpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ (scale * (W_int - zero_point))^T + bias`` for CUDA tensors, by ``backend``.

    The CUDA-side hook of the generic ``int4_linear`` dispatcher (same arguments). See the module
    docstring for the backends; ``backend=None`` reads ``$LRQAT_INT4_BACKEND`` (default "auto").
    A backend named by the variable that cannot run this layer (CUDA kernel: K % 16 or a group that
    is not a power of two >= 32; Triton: a group not a multiple of 32) gives way to "auto" with one
    warning per layer shape; the same backend passed as an argument raises instead.

    Args:
        x: fp16 / bf16 ``[..., K]``.
        qweight: uint8 ``[N, K / 2]`` (formats.py nibble layout).
        scale: float ``[N, 1]`` or ``[N, K / group_size]``.
        zero_point: None or integer-valued ``[N, G]`` in [-8, 7].
        group_size: None (per-channel) or a divisor of K.
        bias: None or ``[N]``.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    N, K, g = check_int4_linear_args(x, qweight, scale, zero_point, group_size, bias)
    from_env = backend is None
    backend = resolve_backend(backend)
    M = x.numel() // K if K else 0
    if from_env and backend in ("cuda", "triton"):
        # $LRQAT_INT4_BACKEND applies to every layer of a model: a layer that backend cannot run
        # (odd K, an unsupported group) falls back to "auto" with a warning instead of failing the
        # model. An explicit ``backend=`` argument stays strict (an error naming the alternatives).
        why = _unsupported(backend, K, g)
        if why is not None:
            _warn_once(f"${BACKEND_ENV}={backend}: {why} (layer {N}x{K}); those layers use backend='auto'")
            backend = "auto"
    if backend == "auto":
        backend = auto_backend(x.device, M, N, K, g)
    if not x.is_cuda and backend != "dequant" and not interpreting():
        raise ValueError(f"int4_linear_gpu serves CUDA tensors, got x on {x.device} (backend={backend!r}); "
                         "lrqat_kernels.int4_linear serves CPU tensors (backend='dequant' runs anywhere)")
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x.device}")
        if not cuda_kernel_available():
            raise RuntimeError(
                "backend='cuda': lrqat_kernels._C has no CUDA kernel for int4_gpu_linear "
                f"({_ext.extension_error() or 'built without CUDA'}); rebuild with CUDA_HOME set, "
                "or use backend='triton' / 'dequant'"
            )
        scale_dtype = scale.dtype if scale.dtype in (torch.float32, x.dtype) else torch.float32
        w = _cached_prepack(qweight, scale, zero_point, group_size, scale_dtype)
        return int4_gpu_linear(x, w, bias)
    if backend == "triton":
        from .int4_triton import int4_linear_triton

        return int4_linear_triton(x, qweight, scale, zero_point, group_size, bias)
    return dequant_linear(x, qweight, scale, zero_point, None if g == K else g, bias,
                          chunk_n=_dequant_chunk(x.device, M, N, K, g))


# ---- fake impls ---------------------------------------------------------------------------
# They only exist once _C has defined the ops. Messages mirror csrc/int4_gpu/*.


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


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    # register_fake checks that this module is the one named by m.set_python_module(...).
    torch.library.register_fake("lrqat::int4_gpu_prepack", _int4_gpu_prepack_fake)
    torch.library.register_fake("lrqat::int4_gpu_linear", _int4_gpu_linear_fake)
    torch.library.register_fake("lrqat::int4_gpu_dequant_words", _int4_gpu_dequant_words_fake)
    _fakes_registered = True


if _ext.load_extension():
    try:
        torch.ops.lrqat.int4_gpu_prepack  # noqa: B018  (an older _C may predate these ops)
    except (AttributeError, RuntimeError):
        pass
    else:
        _register_fakes()
