"""Deployment INT4 GEMM: ``y = x @ W_hat^T + bias`` with ``W_hat = scale * (W_int - zero_point)``.

The one dispatcher of the INT4 deployment stack. The merged LR-QAT model stores ``W_int`` as real
4-bit integers (``formats.pack_nibbles``: uint8 ``[N, K / 2]``, column ``2j`` in the low nibble of
byte ``j``, two's complement) plus fp32 scales (per channel ``[N, 1]`` or per group
``[N, K / group_size]``) and optional integer zero points (rules: :mod:`._int4_rules`).
:func:`int4_linear` runs it without ever materialising ``W_hat`` where a kernel exists:

============ ======================================================================================
device        what runs
============ ======================================================================================
CPU           the C++ kernels (:mod:`.int4_cpu`) on a prepacked copy of the weight, cached per
              ``qweight`` for eager calls (weakly, invalidated by in-place updates but not by
              writes through ``.data``); under ``torch.compile`` the op ``lrqat::int4_linear``
              prepacks on every call. Without ``_C``: exact dequantisation + ``F.linear``.
CUDA          ``torch.ops.lrqat.int4_linear`` if the extension has a CUDA kernel for it; else, for
              fp16 / bf16 x, the backend (below); else exact dequantisation + ``F.linear``.
other         exact dequantisation + ``F.linear``.
============ ======================================================================================

CUDA backends (``backend=`` of :func:`int4_linear`, else :func:`set_int4_backend`, else "auto"):

============== =================================================================================
backend         what runs for CUDA tensors
============== =================================================================================
``"auto"``      M <= :data:`AUTO_DEQUANT_MIN_M` - 1: the Triton W4A16 kernel (decode, memory
                bound); larger M (prefill): dequantise once (Triton) then cuBLAS (``F.linear``).
                Never the CUDA kernel (opt-in until it has passed its GPU tests).
``"cuda"``      the CUDA kernel (:mod:`.int4_cuda`), prepacked on first use and cached per weight.
``"triton"``    the Triton W4A16 kernel (:mod:`.int4_triton`).
``"dequant"``   dequantise to x's dtype, then cuBLAS (:func:`dequant_linear`).
============== =================================================================================

A process-wide backend (:func:`set_int4_backend`, or the deprecated ``$LRQAT_INT4_BACKEND``) covers
every layer of a model: a layer it cannot run falls back to "auto" with one warning per layer
shape. The same backend passed as ``backend=`` raises instead.

Numerics (docs/NUMERICS.md): ``W_hat`` is ``scale * (W_int - z)`` in fp32 and the sums are fp32.
On CPU the result equals the fp32 product of x (as given) with that fp32 ``W_hat``, up to fp32
summation order: bf16 x takes the AVX-512 dot-product path with the exact integers
``W_int - z`` and applies the scale once per group in fp32 (no bf16 rounding of ``W_hat``);
fp32 / fp16 x use fp32 ``W_hat`` and FMA. The output is rounded once to x's dtype (bias added
before). vdpbf16ps treats bf16 subnormals in x as zero.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

from .. import _ext
from .._checks import check_group_size
from . import int4_cuda
from ._int4_rules import (
    _caller_stacklevel,
    _zero_point_int,
    check_int4_linear_args,
    dequantize_int4,
    effective_group_size,
)
from ._launch import interpreting
from .int4_cpu import (  # noqa: F401  (re-exported: the CPU API's names lived here)
    ISA_ENV,
    Int4PackedCPU,
    cpu_isas,
    int4_linear_prepacked,
    int4_prepack_cpu,
)
from .int4_cpu import _PREPACK_CACHE, cached_prepack, check_isa, flatten, op_group_size

__all__ = [
    "AUTO_DEQUANT_MIN_M",
    "BACKENDS",
    "BACKEND_ENV",
    "ISA_ENV",
    "Int4PackedCPU",
    "auto_backend",
    "cpu_isas",
    "dequant_linear",
    "dequantize_int4",
    "get_int4_backend",
    "int4_backend",
    "int4_linear",
    "int4_linear_prepacked",
    "int4_prepack_cpu",
    "register_cuda_int4_linear",
    "resolve_backend",
    "set_int4_backend",
]

BACKENDS = ("auto", "cuda", "triton", "dequant")
#: Deprecated (read for one release, with a DeprecationWarning): use :func:`set_int4_backend`.
BACKEND_ENV = "LRQAT_INT4_BACKEND"

#: ``backend="auto"`` switches from the Triton W4A16 kernel to dequantise + cuBLAS at this M
#: (M > 256). PROVISIONAL AND UNMEASURED: the M where a W4A16 kernel stops beating cuBLAS on bf16
#: weights, to be measured by ``bench/tune_int4_gemm.py`` on a GPU.
AUTO_DEQUANT_MIN_M = 257

_cached_prepack = cached_prepack  # the CPU cache (tests/test_int4_cpu.py reads it under this name)

# ---- the process-wide backend --------------------------------------------------------------

_backend: str | None = None
_WARNED: set[str] = set()


def _warn_once(msg: str, category=RuntimeWarning) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, category, stacklevel=_caller_stacklevel())  # the user's call


def _check_backend(backend: str, where: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"int4 backend must be one of {BACKENDS} ({where}), got {backend!r}")
    return backend


def set_int4_backend(backend: str | None) -> None:
    """Choose the CUDA backend of every :func:`int4_linear` call without ``backend=`` (process-wide;
    None: back to "auto"). A layer that backend cannot run falls back to "auto" with a warning."""
    global _backend
    _backend = None if backend is None else _check_backend(backend, "set_int4_backend")


def get_int4_backend() -> str | None:
    """The backend set by :func:`set_int4_backend` (None: not set)."""
    return _backend


@contextlib.contextmanager
def int4_backend(backend: str | None):
    """``with int4_backend("triton"): ...``: :func:`set_int4_backend` for the block, restored after."""
    old = _backend
    set_int4_backend(backend)
    try:
        yield
    finally:
        set_int4_backend(old)


def _process_backend() -> str | None:
    """:func:`set_int4_backend`'s choice, else the deprecated ``$LRQAT_INT4_BACKEND``, else None."""
    if _backend is not None:
        return _backend
    env = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not env:
        return None
    _warn_once(f"${BACKEND_ENV} is deprecated and will be removed in the next release: use "
               f"lrqat_kernels.ops.int4_linear.set_int4_backend({env!r}) or int4_linear(backend=...)",
               DeprecationWarning)
    return _check_backend(env, f"${BACKEND_ENV}")


def resolve_backend(backend: str | None = None) -> str:
    """``backend`` if given, else the process-wide one (:func:`set_int4_backend`, then the
    deprecated ``$LRQAT_INT4_BACKEND``), else ``"auto"``; validated."""
    if backend is None:
        backend = _process_backend() or "auto"
    return _check_backend(backend, "argument or set_int4_backend")


def auto_backend(device: torch.device, M: int, N: int, K: int, g: int) -> str:
    """What ``backend="auto"`` runs for ``M`` tokens through an ``[N, K]`` layer with groups of ``g``
    (``g == K``: per-channel) on ``device``: Triton below :data:`AUTO_DEQUANT_MIN_M` when it can
    tile the groups (a multiple of 32) and is installed, else dequantise + cuBLAS."""
    triton_ok = _unsupported("triton", K, g) is None
    return "triton" if (triton_ok and M < AUTO_DEQUANT_MIN_M) else "dequant"


def _unsupported(backend: str, K: int, g: int) -> str | None:
    """Why ``backend`` cannot run a layer with ``K`` inputs and groups of ``g`` (``g == K``:
    per-channel), or None."""
    if backend == "cuda":
        try:
            int4_cuda.check_cuda_shapes(K, None if g == K else g)
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


# ---- dequantise + GEMM -----------------------------------------------------------------------


def _dequant_linear(x2, qweight, scale, zero_point, group_size, bias):
    """Exact, differentiable fallback: PyTorch ``W_hat`` in x's dtype, then ``F.linear``."""
    w_hat = dequantize_int4(qweight, scale, zero_point, group_size, x2.dtype)
    return F.linear(x2, w_hat, None if bias is None else bias.to(x2.dtype))


def _dequantize(qweight, scale, zero_point, group_size, dtype, out=None):
    """``W_hat``: one Triton pass on CUDA, :func:`dequantize_int4` elsewhere (equal bit for bit)."""
    if qweight.is_cuda:
        try:
            from .int4_triton import int4_dequant_triton
        except ImportError:
            pass
        else:
            return int4_dequant_triton(qweight, scale, zero_point, group_size, dtype, out=out)
    return dequantize_int4(qweight, scale, zero_point, group_size, dtype, out=out)


def dequant_linear(x, qweight, scale, zero_point=None, group_size=None, bias=None, *, chunk_n: int | None = None):
    """Dequantise + cuBLAS (the "dequant" backend): ``x @ W_hat^T + bias`` with ``W_hat`` in x's dtype.

    ``chunk_n=None``: all of ``W_hat`` (``N * K`` elements, written to and read back from HBM)
    then one ``F.linear``. ``chunk_n``: ``chunk_n`` output rows of ``W_hat`` at a time into one
    reused ``[chunk_n, K]`` buffer, each followed by the GEMM that writes those columns of y
    (leading dimension N). A buffer that fits in L2 keeps the dequantised weight out of HBM and
    caps the transient memory; whether that wins is what ``bench/tune_int4_gemm.py`` measures
    (the dispatcher uses the whole ``W_hat``). Same numerics up to fp32 summation order. Calls
    that need autograd through x, and calls traced by ``torch.compile`` (``out=`` into a column
    slice is neither differentiable nor traceable), take the whole-``W_hat`` path.

    Args:
        x: fp16 / bf16 ``[..., K]``; qweight / scale / zero_point / group_size / bias as
            :func:`int4_linear`.
        chunk_n: None, or a positive number of output rows per chunk.

    Returns:
        ``[..., N]`` in x's dtype.
    """
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    group_size = effective_group_size(K, scale, group_size)
    b = None if bias is None else bias.to(x.dtype)
    if chunk_n is not None and (isinstance(chunk_n, bool) or not isinstance(chunk_n, int) or chunk_n < 1):
        raise ValueError(f"chunk_n must be None or a positive int, got {chunk_n!r}")
    whole = chunk_n is None or chunk_n >= N or torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)))
    if whole:
        return F.linear(x, _dequantize(qweight, scale, zero_point, group_size, x.dtype), b)
    x2 = x.reshape(-1, K)
    y = torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)
    buf = torch.empty((chunk_n, K), dtype=x.dtype, device=x.device)
    for n0 in range(0, N, chunk_n):
        n1 = min(N, n0 + chunk_n)
        rows = slice(n0, n1)
        w = _dequantize(qweight[rows], scale[rows], None if zero_point is None else zero_point[rows], group_size,
                        x.dtype, out=buf[: n1 - n0])
        if b is None:
            torch.mm(x2, w.t(), out=y[:, rows])
        else:
            torch.addmm(b[rows], x2, w.t(), out=y[:, rows])
    return y.reshape(*x.shape[:-1], N)


# ---- CUDA tensors: the backend choice ----------------------------------------------------------


def _int4_linear_cuda(x, qweight, scale, zero_point=None, group_size=None, bias=None, *, backend=None,
                      caller: str = "int4_linear"):
    """:func:`int4_linear` for fp16 / bf16 x by backend (module docstring). ``caller`` names the
    public function in errors. Runs on CPU tensors only for "dequant" or under the interpreter."""
    N, K, g = check_int4_linear_args(x, qweight, scale, zero_point, group_size, bias)
    group_size = None if g == K else g
    process_wide = backend is None
    backend = resolve_backend(backend)
    M = x.numel() // K if K else 0
    if process_wide and backend in ("cuda", "triton"):
        why = _unsupported(backend, K, g)
        if why is not None:
            where = f"${BACKEND_ENV}" if _backend is None else "set_int4_backend"
            _warn_once(f"{where}={backend}: {why} (layer {N}x{K}); those layers use backend='auto'")
            backend = "auto"
    if backend == "auto":
        backend = auto_backend(x.device, M, N, K, g)
    if not x.is_cuda and backend != "dequant" and not interpreting():
        raise ValueError(f"{caller} serves CUDA tensors, got x on {x.device} (backend={backend!r}); "
                         "lrqat_kernels.int4_linear serves CPU tensors (backend='dequant' runs anywhere)")
    if backend == "cuda":
        if not x.is_cuda:
            raise ValueError(f"backend='cuda' needs CUDA tensors, got x on {x.device}")
        if not int4_cuda.cuda_kernel_available():
            raise RuntimeError(
                "backend='cuda': lrqat_kernels._C has no CUDA kernel for int4_gpu_linear "
                f"({_ext.extension_error() or 'built without CUDA'}); rebuild with CUDA_HOME set, "
                "or use backend='triton' / 'dequant'"
            )
        scale_dtype = scale.dtype if scale.dtype in (torch.float32, x.dtype) else torch.float32
        w = int4_cuda.cached_prepack(qweight, scale, zero_point, group_size, scale_dtype)
        return int4_cuda.int4_cuda_linear(x, w, bias)
    if backend == "triton":
        from . import int4_triton

        return int4_triton.int4_linear_triton(x, qweight, scale, zero_point, group_size, bias)
    return dequant_linear(x, qweight, scale, zero_point, group_size, bias)


def _native_has_kernel(key: str) -> bool:
    if not _ext.load_extension():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("lrqat::int4_linear", key)
    except RuntimeError:  # op not defined by this build of _C
        return False


def register_cuda_int4_linear(fn) -> None:
    """Deprecated, no effect: CUDA tensors go through :func:`int4_linear`'s backends
    (:func:`set_int4_backend`). Removed in the next release."""
    warnings.warn("register_cuda_int4_linear is deprecated and has no effect (CUDA tensors use int4_linear's "
                  "backends: int4_linear(backend=...) or set_int4_backend); it will be removed in the next release",
                  DeprecationWarning, stacklevel=2)


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
        group_size: k per group (a multiple of 8 dividing K on CPU); None: per channel, or
            inferred from scale's shape (``-1`` deprecated; ``K`` is one group = per channel).
        bias: None or ``[N]``.
        isa: CPU instruction set ("auto", "scalar", "avx2", "avx512"); None reads
            ``$LRQAT_CPU_ISA`` (default auto). Ignored for CUDA tensors.
        bits: accepted for ``QuantizedLinear`` (must be <= 4); the kernel reads any INT-b, b <= 4.
        backend: CUDA tensors only: "auto", "cuda" (the opt-in CUDA kernel), "triton" or
            "dequant" (module docstring); None: :func:`set_int4_backend`'s, else "auto".
            Ignored for CPU tensors.

    Returns:
        ``[..., N]`` in x's dtype, on x's device.
    """
    if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 4):
        raise ValueError(f"int4_linear reads INT-b weights with b in 2..4, got bits={bits!r}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        raise TypeError(f"qweight must be a uint8 tensor [N, K / 2], got {getattr(qweight, 'shape', type(qweight))}")
    if qweight.dtype != torch.uint8:  # checked here for every device (meta included), before any dispatch
        raise TypeError(f"qweight must be uint8 [N, K / 2] (packed nibbles), got {qweight.dtype}")
    if qweight.shape[1] < 1:
        raise ValueError(f"qweight must be [N, K / 2] with K >= 2, got shape {tuple(qweight.shape)}")
    K = 2 * qweight.shape[1]
    x2 = flatten(x, K)
    if group_size is not None and group_size != -1:
        check_group_size(group_size, K)
    gs = effective_group_size(K, scale, group_size)  # None: per channel
    g = op_group_size(gs, K)  # the native ops' code: -1 for per channel
    zero_point_in, zero_point = zero_point, _zero_point_int(zero_point)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, scale, zero_point_in)):
        # The INT4 GEMMs have no autograd: a gradient that must flow through this layer (a trainable
        # layer in front) takes the exact, differentiable dequantise path instead of being dropped.
        return _dequant_linear(x2, qweight, scale, zero_point, gs, bias).reshape(*x.shape[:-1], qweight.shape[0])
    if x.device.type == "cuda":
        if backend is None and _native_has_kernel("CUDA"):
            y = torch.ops.lrqat.int4_linear(x2, qweight, scale, zero_point, g, bias)
        elif backend is not None or x.dtype in (torch.float16, torch.bfloat16):  # the W4A16 backends
            return _int4_linear_cuda(x, qweight, scale, zero_point, gs, bias, backend=backend)
        else:
            y = _dequant_linear(x2, qweight, scale, zero_point, gs, bias)
    elif x.device.type != "cpu":
        y = _dequant_linear(x2, qweight, scale, zero_point, gs, bias)
    elif not _ext.has_extension():  # a Python-only install: exact, slower
        _warn_no_extension()
        y = _dequant_linear(x2, qweight, scale, zero_point, gs, bias)
    else:
        isa = check_isa(isa)
        if torch.compiler.is_compiling():  # traced: the op prepacks inside (a fake exists for it)
            if isa == "auto":
                y = torch.ops.lrqat.int4_linear(x2, qweight, scale, zero_point, g, bias)
            else:
                pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qweight, scale, zero_point, g)
                y = torch.ops.lrqat.int4_linear_prepacked_cpu(
                    x2, pw, ps, pz if zero_point is not None else None, qweight.shape[0], g, bias, isa
                )
        else:
            packed = cached_prepack(qweight, scale, zero_point, g, zero_point_in)
            y = torch.ops.lrqat.int4_linear_prepacked_cpu(
                x2, packed.packed_weight, packed.packed_scale, packed.packed_zero, packed.out_features, g, bias, isa
            )
    return y.reshape(*x.shape[:-1], y.shape[-1])
