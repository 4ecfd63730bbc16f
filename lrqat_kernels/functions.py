"""The public functional layer of the fused LR-QAT path: argument checks, then the op family.

:func:`fake_quant_weight`, :func:`lrqat_linear`, :func:`lrqat_linear_fused`, :func:`merge_weight`
have the signatures and semantics of their ``reference.py`` namesakes (``lrqat_kernels.<name>``
is these). Each checks its arguments (``_checks.py``) and calls its op family, which owns the
kernels, launchers, ``torch.library`` ops, fakes and autograd (STYLE.md: kernel -> launcher ->
autograd Function -> functional):

* ``ops/fake_quant.py``: ``lrqat::fake_quant_{fwd,bwd,w_int}``, :class:`FakeQuantWeightFunction`.
* ``ops/fused_linear.py``: ``lrqat::fused_linear_*``, :class:`LRQATLinearFunction`.

Each op picks its implementation per call: the Triton launcher on CUDA (and on CPU under
``TRITON_INTERPRET=1``, which is how CI runs the kernels), else eager PyTorch that follows
``reference.py`` op for op (CPU; fp64 for ``gradcheck``; ranks above ``MAX_RANK``).
``lrqat_kernels.ops._launch.use_kernels(False)`` forces the eager path everywhere.

This module imports no Triton and no kernel module: the op families load on the first call.
"""

from __future__ import annotations

import sys
import types
import warnings

import torch

from . import reference
from ._checks import check_fake_quant_args, check_linear_args
from .ops import _launch

__all__ = [
    "FakeQuantWeightFunction",
    "LRQATLinearFunction",
    "fake_quant_weight",
    "lrqat_linear",
    "lrqat_linear_fused",
    "merge_weight",
    "uses_kernels",
    "fused_gemm_enabled",
]

#: Deprecated test hook, kept for one release: tests that did
#: ``monkeypatch.setattr(functions, "_interpreting", lambda: False)`` still reach the eager CPU path
#: (the assignment is forwarded to ``ops/_launch.py``); use ``_launch.use_kernels(False)``.
_interpreting = _launch.interpreting


class _FunctionsModule(types.ModuleType):
    def __setattr__(self, name, value):
        if name == "_interpreting":
            if value is _launch.interpreting:
                _launch._interpreting_hook = None
            else:
                warnings.warn("patching lrqat_kernels.functions._interpreting is deprecated and stops working in the "
                              "next release; use lrqat_kernels.ops._launch.use_kernels(False)",
                              DeprecationWarning, stacklevel=2)
                _launch._interpreting_hook = value
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FunctionsModule

#: Names whose home is an op family module (imported on first access: it imports Triton).
_OP_FAMILY = {
    "FakeQuantWeightFunction": "fake_quant",
    "uses_kernels": "fake_quant",
    "_eager_bwd": "fake_quant",
    "_eager_fwd": "fake_quant",
    "_eager_w_int": "fake_quant",
    "LRQATLinearFunction": "fused_linear",
}


def __getattr__(name: str):
    home = _OP_FAMILY.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__package__}.ops.{home}"), name)


def _fake_quant_ops():
    from .ops import fake_quant

    return fake_quant


def _fused_linear_ops():
    from .ops import fused_linear

    return fused_linear


def fused_gemm_enabled() -> bool:
    """Whether :func:`lrqat_linear` takes the fused dequant-GEMM path when its ``fused_gemm``
    argument is None: ``kernel_options(fused_gemm=...)`` (``ops/_launch.py``), else the deprecated
    ``LRQAT_FUSED_GEMM=1``, else False."""
    return _launch.fused_gemm_default()


def _check_phi_layout(phi: torch.Tensor, phi_format: str) -> None:
    """The kernels address Phi0 as a dense row-major ``[out, in]`` (packed: ``[out, in // 2]``) array."""
    if not phi.is_contiguous():
        want = "[out, in // 2] uint8" if phi_format == "packed_int" else "[out, in]"
        raise ValueError(
            f"phi must be contiguous row-major {want} (got strides {tuple(phi.stride())} for shape "
            f"{tuple(phi.shape)}); pass phi.contiguous(), and store Phi0 untransposed"
        )


def fake_quant_weight(
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LR-QAT fake-quantised weight ``W_hat = s * (clip(round(Phi0 + C), qmin, qmax) - z)`` (fused).

    Same contract as :func:`lrqat_kernels.reference.fake_quant_weight`; differentiable in
    ``lora_A``, ``lora_B``, ``scale`` (:class:`FakeQuantWeightFunction`: saves only the inputs).

    Args:
        phi: stored Phi0, contiguous ``[out, in]`` (``[out, in // 2]`` uint8 for packed_int).
        lora_A: ``[r, in]`` float, trainable. lora_B: ``[out, r]``, same dtype.
        scale: float32 ``[out, 1]`` (per-channel) or ``[out, in // group_size]``, trainable.
        bits: 2..8 (2..4 for packed_int, 2..7 for fixed_point).
        phi_format: "packed_int", "fixed_point", "bf16", "fp16" or "fp32".
        alpha: LoRA scaling numerator (``C = alpha / r * lora_B @ lora_A``).
        zero_point: None (symmetric) or integer-valued tensor shaped like ``scale``; frozen.
        group_size: None for per-channel, else the number of contiguous input columns a group.
        out_dtype: dtype of ``W_hat``; default ``lora_A.dtype``.

    Returns:
        ``W_hat`` ``[out, in]`` in ``out_dtype``.
    """
    out_dtype = out_dtype or lora_A.dtype
    check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype,
    )
    _check_phi_layout(phi, phi_format)
    return _fake_quant_ops().FakeQuantWeightFunction.apply(phi, lora_A, lora_B, scale, zero_point, bits, phi_format,
                                                           float(alpha), out_dtype)


def _autocast_out_dtype(x) -> torch.dtype | None:
    """The dtype ``nn.Linear`` would compute an fp32 ``x`` in under ``torch.autocast``, else None."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type not in ("cpu", "cuda"):
        return None
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _lrqat_linear(x, phi, lora_A, lora_B, scale, bias, bits, phi_format, alpha, zero_point, group_size, out_dtype,
                  fused_gemm):
    # Under torch.autocast an fp32 x computes like nn.Linear there: W_hat, the GEMM and y in the
    # autocast dtype; C, Z and W_int stay fp32 (NUMERICS), and autocast is off inside the ops, so
    # every path (eager, Triton, fused) returns what its fake says.
    out_dtype = out_dtype or _autocast_out_dtype(x) or (x.dtype if isinstance(x, torch.Tensor) else None)
    shapes = check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, out_dtype=out_dtype,
    )
    check_linear_args(x, bias, shapes, lora_A.dtype, phi.device)
    _check_phi_layout(phi, phi_format)
    linear = _fused_linear_ops().LRQATLinearFunction
    with reference.no_autocast(x):
        y2d = linear.apply(x, phi, lora_A, lora_B, scale, zero_point, bias, bits, phi_format, float(alpha), out_dtype,
                           fused_gemm)
    return y2d.reshape(*x.shape[:-1], phi.shape[0])


def lrqat_linear(
    x: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
    fused_gemm: bool | None = None,
) -> torch.Tensor:
    """``y = x @ W_hat^T + bias`` with ``W_hat`` from :func:`fake_quant_weight` (fused, lean autograd).

    Same contract as :func:`lrqat_kernels.reference.lrqat_linear`. Autograd saves only the
    inputs (:class:`LRQATLinearFunction`).

    Args:
        x: ``[..., in]`` float (the compute dtype).
        bias: None or ``[out]``.
        out_dtype: dtype of ``W_hat`` and ``y``; default ``x.dtype``.
        fused_gemm: True: the fused dequant-GEMM path (:func:`lrqat_linear_fused`); False: the
            fake-quant kernel + cuBLAS; None: :func:`fused_gemm_enabled`.
        Others: as :func:`fake_quant_weight`.

    Returns:
        ``[..., out]`` in ``out_dtype``.
    """
    if fused_gemm is None:
        fused_gemm = fused_gemm_enabled()
    elif not isinstance(fused_gemm, bool):
        raise TypeError(f"fused_gemm must be True, False or None (got {fused_gemm!r})")
    return _lrqat_linear(x, phi, lora_A, lora_B, scale, bias, bits, phi_format, alpha, zero_point, group_size,
                         out_dtype, fused_gemm)


def lrqat_linear_fused(
    x: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`lrqat_linear` with ``fused_gemm=True``: the fused dequant-GEMM path (``ops/fused_linear.py``).

    No weight-sized tensor exists in the forward or the backward (``W_hat`` tiles are built in the
    GEMMs' K loops; ``G`` tiles inside the backward kernel). Meant for small token counts, where
    the memory traffic saved outweighs rebuilding weight tiles per token tile; its speed has not
    been measured on a GPU yet. Needs 16-bit activations (``out_dtype`` bf16/fp16): fp32 ones
    take the unfused kernels; falls back to eager math where :func:`lrqat_linear` would.
    """
    return _lrqat_linear(x, phi, lora_A, lora_B, scale, bias, bits, phi_format, alpha, zero_point, group_size,
                         out_dtype, True)


@torch.no_grad()
def merge_weight(
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fuse the trained layer into ``W_Z = W_int`` by the training forward's own code path.

    Same contract as :func:`lrqat_kernels.reference.merge_weight`. On CUDA (and under
    ``TRITON_INTERPRET=1``) ``W_int`` comes from the forward kernel in its int8 mode, so the
    deployed integers are bit-identical to the ones the fused training forward used; elsewhere
    from the eager path that the forward uses there.

    Returns:
        ``(w_int, scale, zero_point)``: int8 ``[out, in]``, a float32 copy of ``scale``, and
        ``zero_point`` as int8 (or None).
    """
    check_fake_quant_args(
        phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
        zero_point=zero_point, group_size=group_size, check_values=True,
    )
    _check_phi_layout(phi, phi_format)
    if not _fake_quant_ops().uses_kernels(phi, lora_A, scale):
        return reference.merge_weight(
            phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
            zero_point=zero_point, group_size=group_size,
        )
    w_int, n_nan = torch.ops.lrqat.fake_quant_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, float(alpha))
    if int(n_nan) > 0:
        raise ValueError("cannot merge: W_int contains NaN (lora_A/lora_B hold non-finite values)")
    zp = None if zero_point is None else zero_point.detach().round().to(torch.int8)
    return w_int, scale.detach().float().clone(), zp
