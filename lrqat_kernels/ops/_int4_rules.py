"""The rules every INT4 deployment backend shares: arguments, zero points, group size, ``W_hat``.

A leaf module (it imports only torch, :mod:`lrqat_kernels._checks` and :mod:`lrqat_kernels.formats`):
the dispatcher (:mod:`~lrqat_kernels.ops.int4_linear`), the CPU and CUDA wrappers and the Triton
launchers all import their rules from here and nothing from each other's rules.

Storage (``docs/NUMERICS.md``): ``qweight`` uint8 ``[N, K / 2]`` (``formats.pack_nibbles``),
``scale`` float ``[N, G]``, ``zero_point`` None or integer ``[N, G]`` in [-8, 7], with
``G = K / group_size`` groups of ``group_size`` consecutive input columns.

Group size, one spelling per meaning:

* ``None``: per channel (``scale`` ``[N, 1]``). The dispatcher ``int4_linear`` also reads the
  groups off ``scale``'s shape when given None (``[N, G]``, G > 1: groups of K / G).
* an int dividing K: groups of that many columns. ``group_size == K`` is one group spanning the
  row: numerically per channel (same ``[N, 1]`` scale), and treated as per channel; write None.
* ``-1`` (the native ops' per-channel code) is accepted by the Python API for one release with a
  ``DeprecationWarning`` (:func:`canonical_group_size`;
  ``tests/test_int4_gpu.py::test_deprecated_spellings_and_switches``).

``W_hat = scale * (W_int - zero_point)`` is formed in fp32 and cast to the compute dtype last:
:func:`dequantize_int4` is the one PyTorch dequantisation (the exact reference and fallback of
every backend; the Triton one-pass kernel ``int4_triton.int4_dequant_triton`` equals it bit for bit).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .._checks import check_zero_point_values
from ..formats import unpack_nibbles

__all__ = [
    "canonical_group_size",
    "check_int4_linear_args",
    "dequantize_int4",
    "effective_group_size",
    "zero_point_as_int",
]


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised by this module's caller that names the first frame
    outside ``lrqat_kernels`` (the user's call), however deep the package's own calls go."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def canonical_group_size(group_size, K: int) -> int | None:
    """``group_size`` as the one spelling: None for per channel (None, ``K``, or the deprecated
    ``-1``), else the int unchanged (its other checks are the caller's: they differ per kernel).

    Raises:
        TypeError: ``group_size`` is neither None nor an int.
    """
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int or None (per channel), got {type(group_size).__name__}")
    if group_size == -1:
        warnings.warn("group_size=-1 for per-channel scales is deprecated and will be removed in the next "
                      "release; pass group_size=None", DeprecationWarning, stacklevel=_caller_stacklevel())
        return None
    return None if group_size == K else group_size


def effective_group_size(K: int, scale: torch.Tensor, group_size) -> int | None:
    """The dispatcher's group size: :func:`canonical_group_size`, and for None the groups read off
    ``scale``'s shape (``[N, 1]``: per channel -> None; ``[N, G]``: ``K / G``).

    Raises:
        ValueError: ``scale`` is not 2-D, or its G does not divide K.
    """
    g = canonical_group_size(group_size, K)
    if group_size is not None:
        return g
    if not isinstance(scale, torch.Tensor) or scale.dim() != 2 or scale.shape[1] < 1:
        raise ValueError(f"scale must be [N, 1] or [N, K / group_size], got shape {tuple(getattr(scale, 'shape', ()))}")
    G = scale.shape[1]
    if G == 1:
        return None
    if K % G:
        raise ValueError(f"scale has {G} groups, which does not divide in_features K={K}")
    return K // G


def zero_point_as_int(zero_point: torch.Tensor | None) -> torch.Tensor | None:
    """Zero points as an integer tensor (int8 / int16 / int32 kept; floats holding integers rounded)."""
    if zero_point is None:
        return None
    if zero_point.dtype in (torch.int8, torch.int16, torch.int32):
        return zero_point
    if zero_point.is_floating_point():
        return zero_point.round().to(torch.int32)
    return zero_point.to(torch.int32)


def _zero_point_int(zero_point: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`zero_point_as_int` after checking the values (integers in the INT4 grid [-8, 7]) on CPU,
    eagerly (on a GPU the check would synchronise; a traced call cannot read values)."""
    if zero_point is not None and zero_point.device.type == "cpu" and not torch.compiler.is_compiling():
        check_zero_point_values(zero_point, 4)
    return zero_point_as_int(zero_point)


def check_int4_linear_args(x, qweight, scale, zero_point=None, group_size=None, bias=None) -> tuple[int, int, int]:
    """Validate the standard-layout W4A16 arguments; return ``(N, K, effective group size)``
    (``K`` for per channel).

    Args:
        x: ``[..., K]`` fp16 / bf16.
        qweight: uint8 ``[N, K / 2]`` (formats.pack_nibbles layout).
        scale: float ``[N, 1]`` (per-channel) or ``[N, K / group_size]``.
        zero_point: None or integer-valued ``[N, G]`` like scale, values in [-8, 7].
        group_size: None (per-channel) or a divisor of K (see :func:`canonical_group_size`).
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
    if group_size == -1:
        group_size = canonical_group_size(group_size, K)
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


def dequantize_int4(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W_hat = scale * (W_int - zero_point)`` ``[N, K]``, computed in fp32, cast to ``dtype`` last.

    Plain PyTorch on any device, differentiable in ``scale`` (the dispatcher's autograd path).

    Args:
        qweight: uint8 ``[N, K / 2]`` (``formats.pack_nibbles`` layout).
        scale: float ``[N, 1]`` (per channel) or ``[N, K / group_size]``.
        zero_point: None or integer ``[N, G]`` like scale, values in [-8, 7] (floats holding
            integers are rounded; values are checked on CPU).
        group_size: k per group; None: per channel, or inferred from scale's shape.
        dtype: result dtype.
        out: None, or an ``[N, K]`` tensor of ``dtype`` to copy the result into (returned).
    """
    K = 2 * qweight.shape[-1]
    g = effective_group_size(K, scale, group_size)
    g = K if g is None else g
    w = unpack_nibbles(qweight).to(torch.float32)
    zero_point = _zero_point_int(zero_point)
    if zero_point is not None:
        w = w - zero_point.to(torch.float32).repeat_interleave(g, dim=1)
    w_hat = (w * scale.to(torch.float32).repeat_interleave(g, dim=1)).to(dtype)
    return w_hat if out is None else out.copy_(w_hat)
