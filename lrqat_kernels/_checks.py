"""Input validation shared by every LR-QAT path (reference, Triton, modules).

One place for the rules so the reference and the kernels reject the same inputs with the
same messages. Every error names the argument and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import check_bits, check_phi_dtype, check_phi_format, phi_in_features, qrange

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCALE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class LRQATShapes:
    out_features: int
    in_features: int
    rank: int
    group_size: int  # == in_features for per-channel
    n_groups: int


def check_tensor(name: str, t, *, dim: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")


def check_group_size(group_size, in_features: int, what: str = "in") -> int:
    """Return the effective group size (``in_features`` for per-channel)."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be None (per-channel) or a positive int, got {group_size!r}")
    if in_features % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide {what}={in_features}")
    return group_size


def check_fake_quant_args(
    phi,
    lora_A,
    lora_B,
    scale,
    *,
    bits,
    phi_format,
    alpha,
    zero_point=None,
    group_size=None,
    out_dtype=None,
    require_contiguous: bool = False,
    check_values: bool | None = None,
) -> LRQATShapes:
    """Validate the arguments of ``fake_quant_weight`` and return the problem's shapes.

    ``check_values``: also check ``zero_point``'s values (:func:`check_zero_point_values`); None
    checks them on CPU only, eagerly (on a GPU the check would synchronise every training step,
    and ``torch.compile`` cannot trace it; the merges pass True).

    Args:
        phi: stored Phi0 (dtype/shape per ``phi_format``), ``[out, in]`` or ``[out, in // 2]``.
        lora_A: ``[r, in]`` float. lora_B: ``[out, r]`` float, same dtype as lora_A.
        scale: float32 (or float64) ``[out, 1]`` per-channel or ``[out, in // group_size]``.
        zero_point: None or a tensor shaped like ``scale`` holding integers.
    """
    check_phi_format(phi_format)
    check_bits(bits, phi_format)
    check_tensor("phi", phi, dim=2)
    check_phi_dtype(phi, phi_format)
    check_tensor("lora_A", lora_A, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("lora_B", lora_B, dim=2, dtypes=FLOAT_DTYPES)
    check_tensor("scale", scale, dim=2, dtypes=SCALE_DTYPES)
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must have the same dtype, got {lora_A.dtype} and {lora_B.dtype}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of {FLOAT_DTYPES}, got {out_dtype}")

    out_features = phi.shape[0]
    in_features = phi_in_features(phi, phi_format)
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"rank (lora_A.shape[0]) must be >= 1, got {rank}")
    if lora_A.shape[1] != in_features:
        raise ValueError(
            f"lora_A must be [r, in] = [r, {in_features}] to match phi {tuple(phi.shape)} "
            f"({phi_format}), got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must be [out, r] = [{out_features}, {rank}], got {tuple(lora_B.shape)}")
    g = check_group_size(group_size, in_features)
    n_groups = 1 if group_size is None else in_features // g  # per-channel: one scale even for in = 0
    if tuple(scale.shape) != (out_features, n_groups):
        gran = "per-channel [out, 1]" if group_size is None else f"[out, in // group_size] for group_size={group_size}"
        raise ValueError(f"scale must be {gran} = [{out_features}, {n_groups}], got {tuple(scale.shape)}")
    tensors = {"phi": phi, "lora_A": lora_A, "lora_B": lora_B, "scale": scale}
    if zero_point is not None:
        check_tensor("zero_point", zero_point, dim=2)
        if zero_point.is_complex() or zero_point.dtype == torch.bool:
            raise TypeError(f"zero_point must be an integer or float tensor, got {zero_point.dtype}")
        if tuple(zero_point.shape) != tuple(scale.shape):
            raise ValueError(f"zero_point must have scale's shape {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
        if check_values or (check_values is None and zero_point.device.type == "cpu"
                            and not torch.compiler.is_compiling()):  # a data-dependent branch: no trace
            check_zero_point_values(zero_point, bits)
        tensors["zero_point"] = zero_point
    check_same_device(**tensors)
    if require_contiguous:
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (row-major); call .contiguous() first")
    return LRQATShapes(out_features, in_features, rank, g, n_groups)


def check_zero_point_values(zero_point: torch.Tensor, bits: int) -> None:
    """NUMERICS: integer zero points in ``[qmin, qmax]``. Others would train one ``W_hat`` and
    deploy another (the merge stores int8 zero points: 0.5 rounds to 0, 300 wraps to 44)."""
    qmin, qmax = qrange(bits)
    z = zero_point.detach()
    bad = (z < qmin) | (z > qmax)
    if z.is_floating_point():
        bad |= ~torch.isfinite(z) | (z != z.round())
    if bool(bad.any()):
        v = z[bad].flatten()[0].item()
        raise ValueError(f"zero_point must hold integers in [qmin, qmax] = [{qmin}, {qmax}] for bits={bits} "
                         f"(NUMERICS: integer zero points), got {v!r}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {desc}")


def check_linear_args(x, bias, shapes: LRQATShapes, lora_dtype, device) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] != shapes.in_features:
        raise ValueError(f"x must be [..., in] = [..., {shapes.in_features}], got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x must be on {device} (the weights' device), got {x.device}")
    if bias is not None:
        check_tensor("bias", bias, dim=1, dtypes=FLOAT_DTYPES)
        if bias.shape[0] != shapes.out_features:
            raise ValueError(f"bias must be [out] = [{shapes.out_features}], got {tuple(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"bias must be on {device}, got {bias.device}")


# ---- activation quantisation (weight-activation LR-QAT) ----------------------------------------

ACT_BITS = (4, 8)


def check_act_bits(name: str, bits, *, optional: bool = False) -> None:
    """``bits`` an int in :data:`ACT_BITS` (None too when ``optional``); 8.0 or True are refused."""
    if optional and bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ACT_BITS:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}one of {ACT_BITS} (a Python int), "
                         f"got {bits!r}")


def check_act_args(x, bits, symmetric) -> None:
    """The arguments of ``fake_quant_activation``: ``x`` a float tensor ``[..., hidden]`` with
    ``hidden >= 1``, ``bits`` in :data:`ACT_BITS`, ``symmetric`` a bool."""
    check_tensor("x", x)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    check_act_bits("bits", bits)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")


def check_rms_norm_args(x, weight, eps) -> None:
    """The arguments of ``rms_norm_fake_quant``: float ``x`` ``[..., hidden]``, float ``weight``
    ``[hidden]`` on x's device, ``eps`` a float >= 0."""
    check_tensor("x", x)
    check_tensor("weight", weight)
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"x and weight must be floating-point, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [hidden] = [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}: they must share a device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def check_swiglu_args(gate, up) -> None:
    """The arguments of ``swiglu_fake_quant``: ``gate`` and ``up`` float tensors of one dtype,
    shape ``[..., intermediate]`` and device."""
    check_tensor("gate", gate)
    check_tensor("up", up)
    if not gate.is_floating_point() or gate.dtype != up.dtype:
        raise TypeError(f"gate and up must be floating-point tensors of one dtype, got {gate.dtype} and {up.dtype}")
    if gate.shape != up.shape or gate.dim() < 1 or gate.shape[-1] < 1:
        raise ValueError(f"gate and up must have one non-empty shape [..., intermediate], got {tuple(gate.shape)} "
                         f"and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"gate is on {gate.device}, up on {up.device}: they must share a device")
