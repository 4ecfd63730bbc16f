"""SASQ: static activation scales trained with the LSQ gradient on a frozen, weight-quantised model.

Mao, Chen, Kang, "SASQ: Static Activation Scaling for QAT in LLMs" (arXiv 2512.14481). The weights
stay as a PTQ method left them (a ``QuantizedLinear``, or any frozen linear); each quantised
activation (a linear's input) gets one static, trainable step ``s``; nothing else trains. Per site::

    v   = x / s                                   s > 0: one fp32 scalar per activation site
    x_q = s * clip(round_half_even(v), Qn, Qp)    Qn = -2^(bits-1), Qp = 2^(bits-1) - 1

Backward (straight-through rounding, LSQ; ``G = dL/dx_q``, ``M = (Qn <= v <= Qp)`` inclusive)::

    dL/dx = G * M
    dL/ds = g * sum G * (M * (round(v) - v) + (1 - M) * clip(v, Qn, Qp))     (Qn or Qp outside)

Choices the paper leaves open (docs/METHODS.md, SASQ): per-tensor granularity (one scalar per
site, what static deployment means), the signed symmetric grid ``[-128, 127]`` at 8 bits (A4:
``bits=4``, ``[-8, 7]``), gradient scale ``g = 1`` by default (LSQ's ``1 / sqrt(numel * Qp)`` is
``grad_scale=``), initial ``s`` the mean over calibration batches of ``max|x| / Qp``.
The scale never depends on the batch: ``tests/test_sasq.py::test_t2_static_no_batch_dependence``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .formats import check_bits

__all__ = [
    "SASQFakeQuantFunction",
    "SASQLinear",
    "StaticActQuant",
    "calibrate_static_scale",
    "calibrating",
    "check_sasq_args",
    "deploy",
    "sasq_fake_quant",
    "sasq_freeze",
    "wrap_quantized",
]


def _grid(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _check_grad_scale(grad_scale) -> None:
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not (0 < grad_scale < math.inf):
        raise ValueError(f"grad_scale must be a positive number, got {grad_scale!r}")


def check_sasq_args(x, scale, *, bits, grad_scale) -> None:
    """Validate SASQ's inputs (one-line errors naming the argument).

    Args:
        x: float tensor, any shape. scale: float tensor with one element (``[1]`` or 0-d).
        bits: 2..8. grad_scale: a positive number.
    """
    check_bits(bits)
    for name, t in (("x", x), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one step (static per-tensor), got shape {tuple(scale.shape)}")
    _check_grad_scale(grad_scale)


def _cdt(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class SASQFakeQuantFunction(torch.autograd.Function):
    """``x_q = s * clip(round(x / s), Qn, Qp)``; saves ``x`` and ``scale``, recomputes ``v`` in backward."""

    @staticmethod
    def forward(ctx, x, scale, bits, grad_scale):
        cdt = _cdt(x, scale)
        qn, qp = _grid(bits)
        s = scale.to(cdt).reshape(())
        with torch.no_grad():
            x_q = s * torch.round(x.to(cdt) / s).clamp(qn, qp)
        ctx.save_for_backward(x, scale)
        ctx.args = (bits, grad_scale)
        return x_q.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        bits, grad_scale = ctx.args
        cdt = _cdt(x, scale)
        qn, qp = _grid(bits)
        s = scale.to(cdt).reshape(())
        v = x.to(cdt) / s
        inside = (v >= qn) & (v <= qp)
        g = dy.to(cdt)
        dx = torch.where(inside, g, torch.zeros((), dtype=cdt, device=g.device)).to(x.dtype) if ctx.needs_input_grad[0] else None
        ds = None
        if ctx.needs_input_grad[1]:
            dq_ds = torch.where(inside, torch.round(v) - v, v.clamp(qn, qp))
            ds = (grad_scale * (g * dq_ds).sum()).reshape(scale.shape).to(scale.dtype)
        return dx, ds, None, None


def sasq_fake_quant(x: torch.Tensor, scale: torch.Tensor, *, bits: int = 8, grad_scale: float = 1.0) -> torch.Tensor:
    """Static symmetric per-tensor fake quantisation of an activation (module docstring).

    Args:
        x: float ``[...]`` (bf16 / fp16 / fp32 / fp64); computed in fp32 (fp64 if an input is), cast last.
        scale: float ``[1]`` (or 0-d), the step ``s > 0``; trainable (LSQ gradient).
        bits: 2..8, grid ``[-2^(bits-1), 2^(bits-1) - 1]`` (8: A8, 4: A4).
        grad_scale: multiplies ``dL/dscale`` (1: none; LSQ: ``1 / sqrt(numel * Qp)``).

    Returns:
        ``x_q``, x's shape and dtype.
    """
    check_sasq_args(x, scale, bits=bits, grad_scale=grad_scale)
    return SASQFakeQuantFunction.apply(x, scale, bits, float(grad_scale))


def calibrate_static_scale(batches_absmax, *, bits: int = 8) -> torch.Tensor:
    """SASQ's initial step: the mean over calibration batches of ``max|x| / Qp``.

    Args:
        batches_absmax: a sequence of numbers or a float tensor ``[n_batches]``: each batch's ``max|x|``.
        bits: 2..8 (``Qp = 2^(bits-1) - 1``).

    Returns:
        fp32 ``[1]``, positive.
    """
    check_bits(bits)
    a = torch.as_tensor(batches_absmax, dtype=torch.float64).reshape(-1)
    if a.numel() == 0:
        raise ValueError("batches_absmax must hold at least one calibration batch, got none")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("batches_absmax must hold finite values >= 0")
    s = (a / _grid(bits)[1]).mean()
    if not s > 0:
        raise ValueError("batches_absmax must hold a value > 0 (all-zero activations give no step)")
    return s.to(torch.float32).reshape(1)


class StaticActQuant(nn.Module):
    """One SASQ activation site: ``x -> sasq_fake_quant(x, scale)`` with a trainable static step.

    Tensors:
        scale: parameter fp32 ``[1]`` (stays fp32 under ``module.to(torch.bfloat16)``).

    Calibration: inside :func:`calibrating` (or between :meth:`start_calibration` and
    :meth:`finish_calibration`) the forward passes ``x`` through unquantised and records each
    call's ``max|x|`` (one call = one calibration batch); finishing sets ``scale`` by
    :func:`calibrate_static_scale`.
    """

    def __init__(self, *, bits: int = 8, grad_scale: float = 1.0, device=None):
        super().__init__()
        check_bits(bits)
        _check_grad_scale(grad_scale)
        self.bits, self.grad_scale = bits, float(grad_scale)
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device))
        self._observed: list[torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        # A module-wide .to(bf16) moves the step but keeps it fp32, unrounded (as QuantizedLinear.scale).
        data, grad = self.scale.data, None if self.scale.grad is None else self.scale.grad.data
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale.data = data.to(device=self.scale.device)
            if grad is not None and self.scale.grad is not None:
                self.scale.grad.data = grad.to(device=self.scale.device)
        return self

    @property
    def calibrating(self) -> bool:
        return self._observed is not None

    def start_calibration(self) -> None:
        self._observed = []

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self._observed is None:
            raise RuntimeError("finish_calibration called without start_calibration")
        seen, self._observed = self._observed, None
        if not seen:
            raise ValueError("StaticActQuant saw no calibration batch (run the model inside calibrating())")
        self.scale.copy_(calibrate_static_scale(torch.stack(seen), bits=self.bits).to(self.scale.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            self._observed.append(x.detach().abs().amax().to(torch.float64).cpu())
            return x
        return sasq_fake_quant(x, self.scale, bits=self.bits, grad_scale=self.grad_scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grad_scale={self.grad_scale}, method=sasq, granularity=per-tensor"


class SASQLinear(nn.Module):
    """A frozen (weight-quantised) linear whose input goes through a static SASQ quantiser:
    ``y = linear(sasq_fake_quant(x, act_quant.scale))``.

    ``linear`` is a ``QuantizedLinear`` (or any frozen module with ``in_features``); its parameters
    are set ``requires_grad=False``. It must not quantise its input itself (``input_bits=None``):
    the static quantiser replaces the dynamic per-token one.
    """

    def __init__(self, linear: nn.Module, *, bits: int = 8, grad_scale: float = 1.0):
        super().__init__()
        if not isinstance(linear, nn.Module) or not isinstance(getattr(linear, "in_features", None), int):
            raise TypeError(f"linear must be a linear nn.Module with in_features, got {type(linear).__name__}")
        if getattr(linear, "input_bits", None) is not None:
            raise ValueError(f"linear.input_bits must be None (SASQ replaces the dynamic input quantiser), got {linear.input_bits}")
        linear.requires_grad_(False)
        self.linear = linear
        dev = next((t.device for t in linear.buffers()), None) or next((p.device for p in linear.parameters()), None)
        self.act_quant = StaticActQuant(bits=bits, grad_scale=grad_scale, device=dev)

    @property
    def scale(self) -> nn.Parameter:
        return self.act_quant.scale

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act_quant(x))

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """The deployed layer: a copy of the wrapped ``QuantizedLinear`` quantising its input with the
        learned step (``QuantizedLinear.set_static_input_quant``: no per-token max at run time);
        equal to this layer's forward bit for bit (the same fp32 operations)."""
        import copy

        if not hasattr(self.linear, "set_static_input_quant"):
            raise TypeError(f"to_quantized needs a wrapped QuantizedLinear, got {type(self.linear).__name__}")
        q = copy.deepcopy(self.linear)
        q.set_static_input_quant(self.scale.detach().float(), _grid(self.act_quant.bits))
        return q


@contextlib.contextmanager
def calibrating(model: nn.Module):
    """Calibrate every :class:`StaticActQuant` in ``model``: run calibration batches inside the
    ``with`` block (activations unquantised); on a clean exit each site's step is set to the
    mean of its per-batch ``max|x| / Qp``. On an exception the scales are left unchanged."""
    sites = [m for m in model.modules() if isinstance(m, StaticActQuant)]
    if not sites:
        raise ValueError("model holds no StaticActQuant to calibrate")
    for m in sites:
        m.start_calibration()
    try:
        yield sites
    except BaseException:
        for m in sites:
            m._observed = None
        raise
    for m in sites:
        m.finish_calibration()


def sasq_freeze(model: nn.Module) -> list[nn.Parameter]:
    """Make the SASQ steps the only trainable tensors of ``model``; returns them (for the optimizer)."""
    model.requires_grad_(False)
    scales = [m.scale for m in model.modules() if isinstance(m, StaticActQuant)]
    if not scales:
        raise ValueError("model holds no StaticActQuant (wrap its linears in SASQLinear first)")
    for p in scales:
        p.requires_grad_(True)
    return scales


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def wrap_quantized(model: nn.Module, *, bits: int = 8, grad_scale: float = 1.0) -> list[str]:
    """Wrap every ``QuantizedLinear`` of a converted model in :class:`SASQLinear` (in place); returns
    their names. Layers that quantise their input already (``input_bits`` or a static step) are an
    error: SASQ's static quantiser replaces them."""
    from .modules import QuantizedLinear

    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not names:
        raise ValueError("model holds no QuantizedLinear: SASQ trains static activation scales on a converted "
                         "(weight-quantised) model; convert it first")
    for n in names:
        q = model.get_submodule(n)
        if q.input_step is not None:
            raise ValueError(f"layer {n!r} already quantises its input statically")
        _swap(model, n, SASQLinear(q, bits=bits, grad_scale=grad_scale))
    return names


def deploy(model: nn.Module) -> nn.Module:
    """Replace every :class:`SASQLinear` by its deployed ``QuantizedLinear`` (:meth:`SASQLinear.to_quantized`),
    in place; the model then saves, loads and serves with static activation scales."""
    names = [n for n, m in model.named_modules() if isinstance(m, SASQLinear)]
    if not names:
        raise ValueError("model holds no SASQLinear to deploy")
    for n in names:
        _swap(model, n, model.get_submodule(n).to_quantized())
    return model
