"""Dynamic per-token activation fake quantisation in one Triton kernel.

Semantics: :func:`lrqat_kernels.reference.fake_quant_activation` (scale and zero point from the
row's min/max with 0 included, detached; straight-through backward).

Why a kernel: eager PyTorch does min, max, divide, round, clamp, multiply as separate passes over
the activations, each a full read and write of ``[tokens, hidden]``. Here one program owns one
row: the first loop reduces min/max (and a NaN flag) over the row, the second re-reads the row
(from L1/L2: a 4096-wide bf16 row is 8 KiB) and writes ``x_hat``. HBM sees one read and one write.
The backward is the identity (STE), so autograd saves nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import qrange
from .fake_quant import _round_clip, _round_half_even
from ..reference import check_act_args
from ..reference import fake_quant_activation as _reference_fake_quant_activation

_EPS = 1e-8


@triton.jit
def act_qparams(lo, hi, has_nan, QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Per-token ``(s, z)`` (fp32 scalars) from the row's range ``lo <= 0 <= hi`` and NaN flag,
    as :func:`lrqat_kernels.reference.act_quant_params`. Divisions are IEEE (``div_rn``): Triton's
    ``/`` on fp32 is ``div.full.f32`` (2 ulp) on NVIDIA GPUs and would move rounding boundaries."""
    if SYMMETRIC:
        s = tl.maximum(tl.div_rn(tl.maximum(hi, -lo), QMAX * 1.0), 1e-8)
        z = 0.0
    else:
        s = tl.maximum(tl.div_rn(hi - lo, (QMAX - QMIN) * 1.0), 1e-8)
        z = _round_half_even(QMIN - tl.div_rn(lo, s))
    return tl.where(has_nan, float("nan"), s), z


@triton.jit
def act_fake_quant(v, s, z, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """``s * (clip(round(v / s + z), qmin, qmax) - z)`` in fp32; NaN stays NaN, as torch.clamp."""
    q, _ = _round_clip(tl.div_rn(v, s) + z, QMIN, QMAX)
    return s * (q - z)


@triton.jit
def _act_fake_quant_kernel(
    x_ptr,
    y_ptr,
    n_cols,
    stride_x,
    stride_y,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2^31
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK)

    lo = tl.zeros([BLOCK], dtype=tl.float32)  # 0 is always in the range
    hi = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_cols, BLOCK):
        m = start + cols < n_cols
        v = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, v)
        hi = tl.maximum(hi, v)
        nan = nan | (v != v).to(tl.int32)
    s, z = act_qparams(tl.min(lo, axis=0), tl.max(hi, axis=0), tl.max(nan, axis=0) > 0, QMIN, QMAX, SYMMETRIC)
    for start in range(0, n_cols, BLOCK):
        m = start + cols < n_cols
        v = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(y_row + start + cols, act_fake_quant(v, s, z, QMIN, QMAX).to(y_ptr.dtype.element_ty), mask=m)


ACT_BLOCKS = (128, 256, 512, 1024, 2048, 4096, 8192)


def act_quant_config(n_cols: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` the launcher uses for rows of ``n_cols``; BLOCK is one of :data:`ACT_BLOCKS`.

    One chunk covers a typical hidden size (4096 / 5120 / 8192), so the second pass re-reads
    the row from L1/L2 rather than HBM; wider rows loop over 8192-wide chunks. Warps grow with
    the block so a thread holds at most 16 values: ptxas (sm_80/90) then needs <= 84 registers
    and never spills, and a memory-bound kernel wants the occupancy (BLOCK 8192 with 4 warps
    needs 255 registers and spills).
    """
    block = min(max(triton.next_power_of_2(n_cols), ACT_BLOCKS[0]), ACT_BLOCKS[-1])
    return block, (4 if block <= 512 else 8 if block <= 2048 else 16)


def act_fake_quant_forward(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Launch the kernel on ``x`` ``[..., hidden]`` (last dim contiguous); returns ``x_hat`` like ``x``."""
    qmin, qmax = qrange(bits)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    # The Triton interpreter rounds fp32 -> bf16 wrongly (truncation); there the kernel writes
    # fp32 and torch casts. On GPUs the kernel writes bf16 itself (round to nearest even).
    interp_bf16 = x.dtype == torch.bfloat16 and not x.is_cuda
    y = torch.empty(x2.shape, dtype=torch.float32 if interp_bf16 else x.dtype, device=x.device)
    n_rows, n_cols = x2.shape
    if n_rows:
        block, num_warps = act_quant_config(n_cols)
        _act_fake_quant_kernel[(n_rows,)](
            x2, y, n_cols, x2.stride(0), y.stride(0),
            QMIN=qmin, QMAX=qmax, SYMMETRIC=symmetric, BLOCK=block, num_warps=num_warps,
            enable_fp_fusion=False,  # keep each fp32 op rounded as in the reference
        )
    return y.to(x.dtype).reshape(x.shape)


def _use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (the same rule as functions.py)."""
    from ..functions import _interpreting

    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and (x.is_cuda or _interpreting())


@torch.library.custom_op("lrqat::fake_quant_activation", mutates_args=())
def _fake_quant_activation_op(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    if _use_triton(x):
        return act_fake_quant_forward(x, bits, symmetric)
    with torch.no_grad():
        return _reference_fake_quant_activation(x, bits, symmetric)


@_fake_quant_activation_op.register_fake
def _(x, bits, symmetric):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    # Straight-through: scale and zero point are detached and nothing clips.
    return grad, None, None


_fake_quant_activation_op.register_autograd(_backward, setup_context=_setup_context)


def fake_quant_activation(x: torch.Tensor, bits: int = 8, symmetric: bool = False) -> torch.Tensor:
    """Dynamic per-token fake quantisation of activations (Triton on CUDA / TRITON_INTERPRET=1).

    Args:
        x: ``[..., hidden]`` fp32 / bf16 / fp16; one scale (and zero point) per row of the last dim.
        bits: 4 or 8.
        symmetric: z = 0 when True, else an integer zero point per token.

    Returns:
        ``x_hat`` with ``x``'s shape and dtype. Backward: ``dL/dx = dL/dx_hat``.
    """
    check_act_args(x, bits, symmetric)
    return _fake_quant_activation_op(x, bits, symmetric)
