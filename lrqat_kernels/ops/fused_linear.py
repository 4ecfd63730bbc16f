"""The LR-QAT linear ``y = x @ W_hat^T + bias``: its autograd (:class:`LRQATLinearFunction`) and
the opt-in fused dequant-GEMM path (kernels, launchers, ``lrqat::fused_linear_*`` ops): no
``[out, in]`` tensor, ever.

The public function with argument checks is :func:`lrqat_kernels.functions.lrqat_linear`
(``fused_gemm=True``, or :func:`lrqat_kernels.functions.lrqat_linear_fused`, picks this path).

=============================== ==================================================================
``fused_linear_fwd``            ``y = x W_hat^T + b`` with no ``W_hat`` in memory
``fused_linear_dx``             ``dx = dy W_hat`` with no ``W_hat`` in memory
``fused_linear_param_grads``    ``(dA, dB, ds)`` from ``dy``, ``x`` with no ``G`` in memory
=============================== ==================================================================

The default path (``ops/fake_quant.py`` + cuBLAS) writes ``W_hat`` (forward), then ``W_hat``
again and ``G = dy^T x`` (backward): three weight-sized tensors per step. This module removes
all three:

* forward ``y = x @ W_hat^T (+ bias)`` (:func:`fused_linear_forward`): the GEMM's K loop walks
  the input columns and *builds* each ``[BLOCK_O, BLOCK_K]`` tile of ``W_hat`` from Phi0 and the
  lora slices in registers (the same helpers as the fake-quant kernel: decode, ``tl.dot`` of the
  rank-r slices, round/clip, dequant, cast to the compute dtype), then feeds it to ``tl.dot``.
* ``dx = dy @ W_hat`` (:func:`fused_linear_dx`): the same with the reduction over ``out``.
* ``dA, dB, ds`` (:func:`fused_linear_param_grads`): the fake-quant backward kernel with
  ``FUSED_G``: each tile computes ``G = dy^T x`` for itself from the ``[T, out]`` / ``[T, in]``
  activations and reduces it straight into the gradients.

Where it should win (not measured here: this was written without a GPU): small token counts.
Each weight tile is rebuilt once per token tile (``cdiv(T, BLOCK_T)`` times) and ``G`` tiles
cost ``T`` MACs an element, so the work grows with ``T`` while the saved HBM traffic does not:
at ``T`` <= 16-64 (decode-like micro-batches, long-sequence training with gradient accumulation
split very finely) the layer becomes one pass over Phi0 per GEMM instead of
``read Phi0 + write W_hat + read W_hat``, and peak memory drops by ``2 * out * in`` elements.
At 4096 tokens cuBLAS on a materialised ``W_hat`` is the better choice. Hence opt-in:
``lrqat_linear(..., fused_gemm=True)``, ``kernel_options(fused_gemm=True)`` (``ops/_launch.py``)
or :func:`lrqat_kernels.functions.lrqat_linear_fused`; the dispatch rule is not automatic until a
benchmark on a GPU says where the crossover is.

Activations must be bf16/fp16 (the ops send fp32 ones to the unfused kernels: an fp32
GEMM here would be a CUDA-core FMA loop whose operand tiles spill).

Numerics: ``W_hat`` tiles come from the fake-quant kernel's helpers (a test reads them back with
one-hot activations and finds them bit-identical to its ``W_hat``); the
GEMMs accumulate in fp32 like cuBLAS. The G-free backward keeps ``G`` in fp32 (the unfused path
rounds it to the compute dtype first), so its gradients are at least as accurate.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import interpreting, on_device
from ._tiles import (
    col_tile,
    column_tiling,
    load_qparams,
    lora_cols,
    lora_rows,
    needs_int64,
    rank_pad,
    row_tile,
    small_tiles,
    z_tile,
)
from ._triton_quant import cast, dequant, dot, phi_constexprs, round_clip
from .fake_quant import _fake_quant_bwd as fake_quant_bwd_op
from .fake_quant import _fake_quant_fwd as fake_quant_op
from .fake_quant import fake_quant_backward, uses_kernels

__all__ = [
    "LRQATLinearFunction",
    "FusedGemmConfig",
    "fused_gemm_config",
    "fused_linear_forward",
    "fused_linear_dx",
    "fused_linear_param_grads",
]


@triton.jit
def _w_hat_tile(phi_ptr, b_tile, a_tile, scale_ptr, zp_ptr, rows, rmask, cols, cmask, grp, col0, n_valid,
                n_groups, stride_phi, lr_scale,
                PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr,
                QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_ZP: tl.constexpr, GPT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
                W_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """``W_hat[rows, cols]`` in ``W_DTYPE``, zero outside the masks (so padding adds nothing to a GEMM)."""
    z = z_tile(phi_ptr, b_tile, a_tile, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N, DOT_FP32)
    w_int, _ = round_clip(z, QMIN, QMAX)
    s, zp = load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, HAS_ZP)
    w = dequant(w_int, s, zp, HAS_ZP)
    # Padding lanes hold s * 0, NaN if a real scale is inf: zero them before any GEMM sees them.
    w = tl.where(rmask[:, None] & cmask[None, :], w, 0.0)
    return cast(w, W_DTYPE, INTERPRET)


@triton.jit
def _fused_linear_fwd_kernel(
    x_ptr, phi_ptr, a_ptr, b_ptr, scale_ptr, zp_ptr, bias_ptr, y_ptr,
    n_tokens, out_features, in_features, rank, group_size, n_groups, chunks, n_tiles_k, stride_phi, lr_scale,
    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, GPT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, X_DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr, I64: tl.constexpr,
):
    """``y[T, out] = x[T, in] @ W_hat^T + bias`` with ``W_hat`` tiles built inside the K loop.

    Grid ``(cdiv(out, BLOCK_O), cdiv(T, BLOCK_T))``. The lora_B slice ``[BLOCK_O, R]`` is loaded
    once; each K step loads an ``[R, BLOCK_K]`` lora_A slice, a Phi0 tile and an x tile.
    """
    pid_o = tl.program_id(0)
    pid_t = tl.program_id(1)
    orows, omask = row_tile(pid_o, out_features, BLOCK_O, I64)
    toks, tmask = row_tile(pid_t, n_tokens, BLOCK_T, I64)
    b_tile = lora_rows(b_ptr, orows, omask, rank, R_PAD)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for kt in range(0, n_tiles_k):
        cols, cmask, grp, _, col0, n_valid = col_tile(kt, in_features, group_size, chunks, BLOCK_K, GPT)
        a_tile = lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD)
        w = _w_hat_tile(phi_ptr, b_tile, a_tile, scale_ptr, zp_ptr, orows, omask, cols, cmask, grp, col0, n_valid,
                        n_groups, stride_phi, lr_scale, PHI_KIND, PHI_MUL, PACKED_PAIRS, QMIN, QMAX, HAS_ZP, GPT,
                        BLOCK_O, BLOCK_K, DOT_FP32, y_ptr.dtype.element_ty, INTERPRET)
        x_t = tl.load(x_ptr + toks[:, None] * in_features + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        acc = dot(x_t, tl.trans(w), acc, X_DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + orows, mask=omask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + toks[:, None] * out_features + orows[None, :], cast(acc, y_ptr.dtype.element_ty, INTERPRET),
             mask=tmask[:, None] & omask[None, :])


@triton.jit
def _fused_linear_dx_kernel(
    dy_ptr, phi_ptr, a_ptr, b_ptr, scale_ptr, zp_ptr, dx_ptr,
    n_tokens, out_features, in_features, rank, group_size, n_groups, chunks, n_tiles_m, stride_phi, lr_scale,
    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_ZP: tl.constexpr, GPT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr, X_DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr, I64: tl.constexpr,
):
    """``dx[T, in] = dy[T, out] @ W_hat`` with ``W_hat`` tiles built inside the loop over ``out``.

    Grid ``(n_col_tiles, cdiv(T, BLOCK_T))``; column tiles follow the group-aligned tiling.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols, cmask, grp, _, col0, n_valid = col_tile(pid_n, in_features, group_size, chunks, BLOCK_N, GPT)
    toks, tmask = row_tile(pid_t, n_tokens, BLOCK_T, I64)
    a_tile = lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for mt in range(0, n_tiles_m):
        rows, rmask = row_tile(mt, out_features, BLOCK_M, I64)
        b_tile = lora_rows(b_ptr, rows, rmask, rank, R_PAD)
        w = _w_hat_tile(phi_ptr, b_tile, a_tile, scale_ptr, zp_ptr, rows, rmask, cols, cmask, grp, col0, n_valid,
                        n_groups, stride_phi, lr_scale, PHI_KIND, PHI_MUL, PACKED_PAIRS, QMIN, QMAX, HAS_ZP, GPT,
                        BLOCK_M, BLOCK_N, DOT_FP32, dx_ptr.dtype.element_ty, INTERPRET)
        dy_t = tl.load(dy_ptr + toks[:, None] * out_features + rows[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
        acc = dot(dy_t, w, acc, X_DOT_FP32)
    tl.store(dx_ptr + toks[:, None] * in_features + cols[None, :], cast(acc, dx_ptr.dtype.element_ty, INTERPRET),
             mask=tmask[:, None] & cmask[None, :])


@dataclass(frozen=True)
class FusedGemmConfig:
    """Launch configuration of the fused dequant-GEMM kernels (forward ``y`` and ``dx``)."""

    block_t: int
    block_m: int  # rows of W (out) per tile
    block_n: int  # columns of W (in) per tile
    r_pad: int
    gpt: int
    num_warps: int
    num_stages: int = 2
    block_n_max: int = 64


def fused_gemm_config(out_features: int, in_features: int, rank: int, group_size: int, n_tokens: int,
                      *, interpret: bool | None = None) -> FusedGemmConfig:
    """Fixed table: 64 x 64 weight tiles, 4 warps (8 from ``R_PAD = 128``), ``BLOCK_T = 16``
    (the minimum ``tl.dot`` M; this path targets small token counts) or 64 from 64 tokens.
    Under the interpreter: 32 x 64 weight tiles."""
    interpret = interpreting() if interpret is None else interpret
    r_pad = rank_pad(rank)
    if small_tiles(interpret):
        bt, bm, bn_max, warps = 16, 32, 64, 4
    else:
        bt = 16 if n_tokens <= 32 else 64
        bm, bn_max = 64, 64
        warps = 4 if r_pad <= 64 else 8
    bn, gpt, _, _ = column_tiling(in_features, group_size, bn_max)
    return FusedGemmConfig(block_t=bt, block_m=bm, block_n=bn, r_pad=r_pad, gpt=gpt, num_warps=warps, block_n_max=bn_max)


def _common(phi, lora_A, scale):
    out_features = phi.shape[0]
    in_features = lora_A.shape[1]
    rank = lora_A.shape[0]
    n_groups = scale.shape[1]
    return out_features, in_features, rank, n_groups, in_features // n_groups


def _dot_fp32(dtype: torch.dtype, interpret: bool) -> bool:
    return interpret or dtype == torch.float32


def fused_linear_forward(
    x2d: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
) -> torch.Tensor:
    """``y = x @ W_hat^T + bias`` without materialising ``W_hat``.

    Args:
        x2d: ``[T, in]`` in the compute dtype (fp32/bf16/fp16): also the dtype of ``W_hat``
            tiles and of ``y``.
        phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha: as
            :func:`lrqat_kernels.ops.fake_quant.fake_quant_forward`.
        bias: None or ``[out]`` (cast to the compute dtype by the caller).

    Returns:
        ``y`` ``[T, out]`` in ``x2d.dtype``.
    """
    phi = phi.contiguous()  # the kernels address it as dense rows (a no-op when it is)
    out_features, in_features, rank, n_groups, g = _common(phi, lora_A, scale)
    n_tokens = x2d.shape[0]
    interpret = interpreting()
    cfg = fused_gemm_config(out_features, in_features, rank, g, n_tokens, interpret=interpret)
    _, _, chunks, n_tiles_k = column_tiling(in_features, g, cfg.block_n_max)
    y = torch.empty(n_tokens, out_features, dtype=x2d.dtype, device=x2d.device)
    if y.numel() == 0:
        return y
    x2d = x2d.contiguous()
    s = scale.to(torch.float32).contiguous()
    zp = None if zero_point is None else zero_point.to(torch.float32).contiguous()
    grid = (triton.cdiv(out_features, cfg.block_m), triton.cdiv(n_tokens, cfg.block_t))
    with on_device(x2d):
        _fused_linear_fwd_kernel[grid](
            x2d, phi, lora_A.contiguous(), lora_B.contiguous(), s, s if zp is None else zp,
            y if bias is None else bias.contiguous(), y,
            n_tokens, out_features, in_features, rank, g, n_groups, chunks, n_tiles_k, phi.shape[1], float(alpha / rank),
            **phi_constexprs(bits, phi_format, g, cfg.gpt),
            HAS_ZP=zp is not None, HAS_BIAS=bias is not None, GPT=cfg.gpt,
            BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_m, BLOCK_K=cfg.block_n, R_PAD=cfg.r_pad,
            DOT_FP32=_dot_fp32(lora_A.dtype, interpret), X_DOT_FP32=_dot_fp32(x2d.dtype, interpret),
            INTERPRET=interpret, I64=needs_int64(phi.numel(), x2d.numel(), y.numel(), out_features * in_features),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    return y


def fused_linear_dx(
    dy2d: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
) -> torch.Tensor:
    """``dx = dy @ W_hat`` without materialising ``W_hat``.

    Args:
        dy2d: ``[T, out]`` in the compute dtype (also the dtype of ``W_hat`` tiles and of ``dx``).

    Returns:
        ``dx`` ``[T, in]`` in ``dy2d.dtype``.
    """
    phi = phi.contiguous()  # the kernels address it as dense rows (a no-op when it is)
    out_features, in_features, rank, n_groups, g = _common(phi, lora_A, scale)
    n_tokens = dy2d.shape[0]
    interpret = interpreting()
    cfg = fused_gemm_config(out_features, in_features, rank, g, n_tokens, interpret=interpret)
    _, _, chunks, n_tiles_n = column_tiling(in_features, g, cfg.block_n_max)
    dx = torch.empty(n_tokens, in_features, dtype=dy2d.dtype, device=dy2d.device)
    if dx.numel() == 0:
        return dx
    if out_features == 0:
        return dx.zero_()
    dy2d = dy2d.contiguous()
    s = scale.to(torch.float32).contiguous()
    zp = None if zero_point is None else zero_point.to(torch.float32).contiguous()
    grid = (n_tiles_n, triton.cdiv(n_tokens, cfg.block_t))
    with on_device(dy2d):
        _fused_linear_dx_kernel[grid](
            dy2d, phi, lora_A.contiguous(), lora_B.contiguous(), s, s if zp is None else zp, dx,
            n_tokens, out_features, in_features, rank, g, n_groups, chunks, triton.cdiv(out_features, cfg.block_m),
            phi.shape[1], float(alpha / rank),
            **phi_constexprs(bits, phi_format, g, cfg.gpt),
            HAS_ZP=zp is not None, GPT=cfg.gpt,
            BLOCK_T=cfg.block_t, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad,
            DOT_FP32=_dot_fp32(lora_A.dtype, interpret), X_DOT_FP32=_dot_fp32(dy2d.dtype, interpret),
            INTERPRET=interpret, I64=needs_int64(phi.numel(), dy2d.numel(), dx.numel(), out_features * in_features),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    return dx


def fused_linear_param_grads(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dlora_A, dL/dlora_B, dL/dscale)`` from ``dy`` ``[T, out]`` and ``x`` ``[T, in]``
    (same dtype) without materialising ``G = dy^T x``: the backward kernel builds each ``G``
    tile from the activations (``FUSED_G``)."""
    return fake_quant_backward(None, phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                               alpha=alpha, dy=dy2d, x=x2d)


# ----------------------------------------------------------------------------------------------
# torch.library ops (fall back to the unfused kernels, or eager math) and autograd
# ----------------------------------------------------------------------------------------------


def _fused_gemm_kernels(phi, lora_A, scale, *acts: torch.Tensor) -> bool:
    """The fused dequant-GEMM kernels take 16-bit activations only: with fp32 ones their GEMMs
    would be CUDA-core FMA loops (and their tiles spill); those run the unfused kernels instead."""
    return uses_kernels(phi, lora_A, scale, *(a.dtype for a in acts)) and all(
        a.dtype in (torch.bfloat16, torch.float16) for a in acts)


@torch.library.custom_op("lrqat::fused_linear_fwd", mutates_args=())
def _fused_linear_fwd(
    x2d: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> torch.Tensor:
    """``y = x2d @ W_hat^T + bias`` ``[T, out]`` in ``x2d.dtype`` (the compute dtype)."""
    if _fused_gemm_kernels(phi, lora_A, scale, x2d):
        return fused_linear_forward(x2d, phi, lora_A, lora_B, scale, zero_point, bias, bits=bits,
                                    phi_format=phi_format, alpha=alpha)
    w = fake_quant_op(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, x2d.dtype)
    return F.linear(x2d, w, bias)


@_fused_linear_fwd.register_fake
def _(x2d, phi, lora_A, lora_B, scale, zero_point, bias, bits, phi_format, alpha):
    return x2d.new_empty((x2d.shape[0], phi.shape[0]))


@torch.library.custom_op("lrqat::fused_linear_dx", mutates_args=())
def _fused_linear_dx(
    dy2d: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> torch.Tensor:
    """``dx = dy2d @ W_hat`` ``[T, in]`` in ``dy2d.dtype``."""
    if _fused_gemm_kernels(phi, lora_A, scale, dy2d):
        return fused_linear_dx(dy2d, phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                               alpha=alpha)
    return dy2d @ fake_quant_op(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, dy2d.dtype)


@_fused_linear_dx.register_fake
def _(dy2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return dy2d.new_empty((dy2d.shape[0], lora_A.shape[1]))


@torch.library.custom_op("lrqat::fused_linear_param_grads", mutates_args=())
def _fused_linear_param_grads(
    dy2d: torch.Tensor, x2d: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scale: torch.Tensor, zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dA, dB, ds)`` of ``y = x W_hat^T`` from ``dy2d`` ``[T, out]`` and ``x2d`` ``[T, in]``."""
    if _fused_gemm_kernels(phi, lora_A, scale, dy2d, x2d):
        return fused_linear_param_grads(dy2d, x2d, phi, lora_A, lora_B, scale, zero_point, bits=bits,
                                        phi_format=phi_format, alpha=alpha)
    return fake_quant_bwd_op(dy2d.T @ x2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)


@_fused_linear_param_grads.register_fake
def _(dy2d, x2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(scale)


class LRQATLinearFunction(torch.autograd.Function):
    """``y = x @ W_hat^T + bias`` that saves only its inputs and recomputes ``W_hat`` in the backward.

    Saved for backward: ``x, phi, lora_A, lora_B, scale, zero_point`` (never ``W_hat``, ``Z``,
    ``W_int``, masks or ``G``); peak extra memory in the backward is one ``W_hat`` and one ``G``
    (none with ``fused_gemm``). Chain rule, with ``x2 = x`` flattened to ``[T, in]``,
    ``dy2 = dL/dy`` ``[T, out]``, ``W = W_hat``, ``M = qmin <= round(Z) <= qmax``:

        dL/dx      = dy2 @ W                                  (W recomputed by the forward kernel)
        G          = dL/dW = dy2^T @ x2                       (one GEMM, in the compute dtype)
        dL/dZ      = s * G * M                                (straight-through rounding)
        dL/dlora_B = (alpha/r) * dL/dZ @ lora_A^T
        dL/dlora_A = (alpha/r) * lora_B^T @ dL/dZ
        dL/ds      = sum over the channel/group of G * (W_int - z)
        dL/dbias   = sum over tokens of dy2

    ``forward`` returns ``y2`` ``[tokens, out]`` (``x`` flattened to ``[tokens, in]``); callers
    reshape it (:func:`lrqat_linear`), so the output is not a view the caller could not modify in
    place. The last four come from one pass of the backward kernel over ``G``. With ``fused_gemm`` the
    forward is one dequant-GEMM, ``dL/dx`` another, and the backward kernel forms ``G`` tiles
    from ``dy2`` and ``x2`` itself: no weight-sized tensor at all.
    """

    @staticmethod
    def forward(ctx, x, phi, lora_A, lora_B, scale, zero_point, bias, bits, phi_format, alpha, out_dtype, fused_gemm):
        in_features = lora_A.shape[1]
        x2d = x.to(out_dtype).reshape(-1, in_features)
        b = None if bias is None else bias.to(out_dtype)
        if fused_gemm:
            y2d = torch.ops.lrqat.fused_linear_fwd(x2d, phi, lora_A, lora_B, scale, zero_point, b, bits, phi_format, alpha)
        else:
            w = torch.ops.lrqat.fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)
            y2d = F.linear(x2d, w, b)
        ctx.save_for_backward(x, phi, lora_A, lora_B, scale, zero_point)
        ctx.meta = (bits, phi_format, alpha, out_dtype, fused_gemm)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # [tokens, out]: the caller reshapes (a view returned from a Function cannot be modified in
        # place, and models do y += ... on a linear's output)
        return y2d

    @staticmethod
    def backward(ctx, dy):
        x, phi, lora_A, lora_B, scale, zero_point = ctx.saved_tensors
        bits, phi_format, alpha, out_dtype, fused_gemm = ctx.meta
        needs = ctx.needs_input_grad
        in_features = lora_A.shape[1]
        dy2d = dy.reshape(x.shape[:-1].numel(), phi.shape[0]).to(out_dtype).contiguous()  # out may be 0
        d_x = d_a = d_b = d_s = d_bias = None
        if needs[0]:
            if fused_gemm:
                d_x2d = torch.ops.lrqat.fused_linear_dx(dy2d, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)
            else:
                w = torch.ops.lrqat.fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)
                d_x2d = dy2d @ w
                del w
            d_x = d_x2d.reshape(x.shape).to(x.dtype)
        if needs[2] or needs[3] or needs[4]:
            x2d = x.to(out_dtype).reshape(-1, in_features)
            if fused_gemm:
                d_a, d_b, d_s = torch.ops.lrqat.fused_linear_param_grads(dy2d, x2d, phi, lora_A, lora_B, scale, zero_point,
                                                                         bits, phi_format, alpha)
            else:
                g = dy2d.T @ x2d  # [out, in], the only weight-sized tensor of the backward
                d_a, d_b, d_s = torch.ops.lrqat.fake_quant_bwd(g, phi, lora_A, lora_B, scale, zero_point, bits,
                                                               phi_format, alpha)
                del g
            d_a = d_a if needs[2] else None
            d_b = d_b if needs[3] else None
            d_s = d_s if needs[4] else None
        if needs[6]:
            d_bias = dy2d.sum(0).to(ctx.bias_dtype)
        return d_x, None, d_a, d_b, d_s, None, d_bias, None, None, None, None, None


def __getattr__(name: str):
    if name == "aot_specs":  # moved in the split of fake_quant.py (issue 18); goes in the next release
        from . import aot_specs

        warnings.warn(f"{__name__}.aot_specs moved to lrqat_kernels.ops.aot_specs.fused_linear_specs; the old name goes "
                      "in the next release", DeprecationWarning, stacklevel=2)
        return aot_specs.fused_linear_specs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
