"""Fake-quantised weight (NUMERICS.md "Forward", "Backward"): Triton kernels, launchers, the
``lrqat::fake_quant_*`` ops with their fakes, and autograd.

Size: about 870 lines on purpose: one op family (LR-QAT's quantiser and L4Q's mode of the same two
kernels), read top to bottom in the order of its chain; what other kernels share lives in
``_triton_quant.py`` and ``_tiles.py``.

    C     = (alpha / r) * lora_B @ lora_A                 [out, in], grid units, fp32
    Z     = decode(Phi0) + C
    W_int = clip(round_half_even(Z), qmin, qmax)          M = qmin <= round(Z) <= qmax
    W_hat = s * (W_int - z)                               cast to the compute dtype last

One op family, in the order of the chain (STYLE.md): kernels -> launchers
(:func:`fake_quant_forward`, :func:`fake_quant_backward`) -> ``torch.library`` ops -> autograd
(:class:`FakeQuantWeightFunction`). The public function with argument checks is
:func:`lrqat_kernels.functions.fake_quant_weight`. Quantiser math comes from ``_triton_quant.py``,
tile plumbing and the launch tables from ``_tiles.py``, compile specs from ``aot_specs.py``.

Forward (:func:`fake_quant_forward`): one program owns a ``[BLOCK_M, BLOCK_N]`` tile of
``W_hat``. It reads the tile of Phi0 once (0.5 to 4 bytes a weight), builds the tile of ``C`` on
the fly with one ``tl.dot`` of a ``[BLOCK_M, R]`` slice of lora_B and an ``[R, BLOCK_N]`` slice of
lora_A (fp32 factors above rank 32: a loop of 32-wide rank slices, ``_tiles.lowrank_chunked``;
both tiny and L2-resident: the low-rank factors are never expanded to ``[out, in]`` in HBM),
quantises in registers and writes the tile once. HBM traffic is the roofline minimum:
``bytes(Phi0) + bytes(W_hat)``. ``write_int=True`` writes ``W_int`` as int8 instead (the merge
path: the deployed integers come from the very code the training forward runs).

Backward (:func:`fake_quant_backward`): given ``G = dL/dW_hat``, every tile recomputes ``Z``,
``W_int`` and ``M`` (cheaper than saving any of them: recomputing costs one extra read of Phi0,
saving would cost a weight-sized write plus read), forms ``dZ = s * G * M`` in registers and
reduces it straight into the three small gradients:

    dL/dlora_B = (alpha/r) dZ @ lora_A^T     (reduced along in:  a register accumulator)
    dL/dlora_A = (alpha/r) lora_B^T @ dZ     (reduced along out: per-row-band partial buffer)
    dL/ds      = sum_group G * (W_int - z)   (reduced along in:  register accumulator)

``G`` is read exactly once and nothing weight-sized is written. The cross-program reductions
are deterministic two-stage ones (no float atomics): a program owns a band of ``TM`` row tiles x
``TN`` column tiles; ``dB``/``ds`` partials are indexed by column band, ``dA`` partials by row band,
and the launcher sums the bands with ``torch.sum``. Partial bytes are
``4 r (P_n * out + P_m * in)`` for a ``P_m x P_n`` grid, minimised for a given program count by
``P_m / P_n = sqrt(out / in)`` (``_tiles.bwd_grid``).

Numerics shared with the eager reference (``reference.py``): ``C`` is the fp32 sum of exact
products (16-bit factors go to tensor cores with fp32 accumulation; fp32 factors use an IEEE
fp32 dot, never TF32, so ``W_int`` matches the reference except where ``Z`` is within a few ulps
of a ``.5`` tie and the summation order decides); round half to even by the ``1.5 * 2^23`` trick;
NaN stays NaN, +-inf clip to the grid's ends, as ``torch.round`` + ``torch.clamp``. Kernels are
launched with ``enable_fp_fusion=False`` so ``Phi0 + C`` and ``s * (W_int - z)`` round as the
reference does (no FMA contraction). The backward's rank reductions multiply the fp32 ``dZ``
by the factors: bf16 factors as two bf16 tensor-core dots of ``dZ = hi + lo`` (~2^-17
relative, far below the bf16 gradients' rounding), fp32/fp16 factors as IEEE FMA dots.

Under ``TRITON_INTERPRET=1`` (CPU CI) the kernels run in Triton's interpreter, whose bf16
arithmetic and fp32->bf16 cast are not IEEE: 16-bit operands are widened to fp32 before every
dot (exact) and bf16 stores go through ``_triton_quant.to_bf16_rne``.

Ops (namespace ``lrqat``; the C++ ops of ``csrc/registration.cpp`` share it: Python
``custom_op`` registers through a library *fragment*, which coexists with the one
``TORCH_LIBRARY(lrqat, m)`` in either import order). Each picks its implementation per call
(:func:`uses_kernels`): the Triton launcher, else eager PyTorch that follows ``reference.py`` op
for op (CPU; fp64 for ``gradcheck``; ranks above ``MAX_RANK``):

=============================== ==================================================================
``fake_quant_fwd``              ``W_hat`` ``[out, in]`` (differentiable: ``register_autograd``)
``fake_quant_w_int``            int8 ``W_int`` and the NaN count (merge)
``fake_quant_bwd``              ``(dA, dB, ds)`` from ``G = dL/dW_hat``
``l4q_fwd``                     L4Q's ``W_q`` (differentiable); kernels only (``l4q.py`` dispatches)
``l4q_w_int``                   L4Q's int8 ``W_int`` and the NaN count (merge)
``l4q_bwd``                     L4Q's ``(dA, dB, ds, db)`` from ``G = dL/dW_q``
=============================== ==================================================================

L4Q (``l4q.py``) runs on the same two kernels with the ``L4Q`` constexpr: Phi0 is the float ``W0``
and the zero-point pointer carries the fp32 offset ``b``; ``v = (Z - b) / s`` (IEEE ``div_rn``),
``W_q = s * W_int + b``, the mask on ``v``, ``dZ = M G``, and the offset's group sums of
``G (1 - M)`` go to a second partial buffer with ds's layout (:func:`l4q_forward`,
:func:`l4q_backward`).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ..formats import decode_phi as decode_phi_eager
from ._launch import interpreting, kernels_run_on, on_device
from ._tiles import (  # FMA_RANK_CHUNK, rank_pad, small_tiles: re-exported (their home until the split)
    FMA_RANK_CHUNK,
    MAX_RANK,
    BwdConfig,
    FwdConfig,
    bwd_config,
    bwd_grid,
    col_tile,
    column_tiling,
    fwd_config,
    load_qparams,
    lora_cols,
    lora_rows,
    lowrank_chunked,
    needs_int64,
    rank_pad,
    row_tile,
    small_tiles,
    target_programs,
    z_from_lowrank,
    z_tile,
)
from ._triton_quant import (
    PHI_KIND,
    and_scalar,
    cast,
    center,
    dequant,
    dot,
    l4q_dequant,
    l4q_mask,
    l4q_v,
    phi_constexprs,
    round_clip,
)

__all__ = [
    "FMA_RANK_CHUNK",
    "FakeQuantWeightFunction",
    "FwdConfig",
    "BwdConfig",
    "MAX_RANK",
    "PHI_KIND",
    "bwd_config",
    "bwd_grid",
    "column_tiling",
    "fake_quant_backward",
    "fake_quant_forward",
    "fwd_config",
    "interpreting",
    "L4Q_W0_FORMAT",
    "l4q_backward",
    "l4q_forward",
    "l4q_uses_kernels",
    "needs_int64",
    "phi_constexprs",
    "rank_pad",
    "small_tiles",
    "uses_kernels",
]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fake_quant_fwd_kernel(
    phi_ptr, a_ptr, b_ptr, scale_ptr, zp_ptr, out_ptr, nan_ptr,
    out_features, in_features, rank, group_size, n_groups, chunks, stride_phi, lr_scale,
    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_ZP: tl.constexpr, GPT: tl.constexpr, WRITE_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, R_CHUNK: tl.constexpr,
    DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr, I64: tl.constexpr, L4Q: tl.constexpr = False,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``W_hat`` (or int8 ``W_int``): one read of Phi0, one write.

    Grid: ``(n_col_tiles, n_row_tiles)``; axis 0 walks along a row band, so consecutive programs
    stream contiguous Phi0 rows and reuse the same lora_B slice from L1/L2.

    ``L4Q``: Phi0 is the float ``W0`` and ``zp_ptr`` the fp32 offset ``b``: ``v = (Z - b) / s``,
    ``W_int = clip(round(v))``, ``W_q = s * W_int + b`` (``write_int``: L4Q's ``W_int``).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows, rmask = row_tile(pid_m, out_features, BLOCK_M, I64)
    cols, cmask, grp, _, col0, n_valid = col_tile(pid_n, in_features, group_size, chunks, BLOCK_N, GPT)
    mask = rmask[:, None] & cmask[None, :]

    if R_CHUNK < R_PAD:
        ba = lowrank_chunked(b_ptr, a_ptr, rows, rmask, cols, cmask, rank, in_features, BLOCK_M, BLOCK_N, R_CHUNK,
                              DOT_FP32)
        z = z_from_lowrank(phi_ptr, ba, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                            PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N)
    else:
        b_tile = lora_rows(b_ptr, rows, rmask, rank, R_PAD)
        a_tile = lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD)
        z = z_tile(phi_ptr, b_tile, a_tile, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                    PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N, DOT_FP32)
    if L4Q:
        s, off = load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, True, 1.0)
        w_int, _ = round_clip(l4q_v(z, s, off), QMIN, QMAX)
    else:
        w_int, _ = round_clip(z, QMIN, QMAX)

    offs = rows[:, None] * in_features + cols[None, :]
    if WRITE_INT:
        is_nan = w_int != w_int
        tl.store(out_ptr + offs, tl.where(is_nan, 0.0, w_int).to(tl.int8), mask=mask)
        # One int per program (no atomics): the launcher raises if any W_int is NaN.
        n_nan = tl.sum(tl.sum((is_nan & mask).to(tl.int32), axis=1), axis=0)
        tl.store(nan_ptr + pid_m * tl.num_programs(0) + pid_n, n_nan)
    else:
        if L4Q:
            w_hat = l4q_dequant(w_int, s, off)
        else:
            s, zp = load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, HAS_ZP)
            w_hat = dequant(w_int, s, zp, HAS_ZP)
        tl.store(out_ptr + offs, cast(w_hat, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _g_tile_from_dy_x(dy_ptr, x_ptr, rows, rmask, cols, cmask, n_tokens, out_features, in_features,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      DOT_FP32: tl.constexpr, I64: tl.constexpr):
    """``G[rows, cols] = dy[:, rows]^T @ x[:, cols]`` in fp32, looping over token chunks.

    Used by the G-free backward (fused_linear.py): the ``[out, in]`` gradient never exists in HBM.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        tmask = tt < n_tokens
        if I64:
            tt = tt.to(tl.int64)
        dy_t = tl.load(dy_ptr + tt[None, :] * out_features + rows[:, None], mask=rmask[:, None] & tmask[None, :], other=0.0)
        x_t = tl.load(x_ptr + tt[:, None] * in_features + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        acc = dot(dy_t, x_t, acc, DOT_FP32)
    return acc


@triton.jit
def _rank_reduce(dz, a_tile, b_tile, db_acc, SPLIT_BF16: tl.constexpr, DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr):
    """``(db_acc + dZ @ A^T, B^T @ dZ)`` for one tile, fp32 results.

    ``dZ`` is fp32 and not representable in 16 bits. ``SPLIT_BF16`` (bf16 factors): write
    ``dZ = hi + lo`` with ``hi = bf16(dZ)``, ``lo = bf16(dZ - hi)`` (relative error <= 2^-17)
    and run two bf16 tensor-core dots each; products with the bf16 factors are exact, so the
    result is fp32-accumulated to ~2^-17 relative, far below the bf16 gradients' own rounding.
    Otherwise (fp32/fp16 factors) IEEE fp32 dots: exact products, CUDA-core FMAs.
    """
    if SPLIT_BF16:
        hi = cast(dz, tl.bfloat16, INTERPRET)
        hi32 = hi.to(tl.float32)
        # inf/NaN stay in hi (lo = 0), so they propagate as they would through an fp32 dot.
        lo = cast(tl.where(tl.abs(hi32) < float("inf"), dz - hi32, 0.0), tl.bfloat16, INTERPRET)
        a_t = tl.trans(a_tile)
        b_t = tl.trans(b_tile)
        db_acc = dot(hi, a_t, db_acc, DOT_FP32)
        db_acc = dot(lo, a_t, db_acc, DOT_FP32)
        da = tl.zeros((b_t.shape[0], dz.shape[1]), dtype=tl.float32)
        da = dot(b_t, hi, da, DOT_FP32)
        da = dot(b_t, lo, da, DOT_FP32)
    else:
        db_acc = tl.dot(dz, tl.trans(a_tile.to(tl.float32)), db_acc, input_precision="ieee")
        da = tl.dot(tl.trans(b_tile.to(tl.float32)), dz, input_precision="ieee")
    return db_acc, da


@triton.jit
def _fake_quant_bwd_kernel(
    g_ptr, dy_ptr, x_ptr, phi_ptr, a_ptr, b_ptr, scale_ptr, zp_ptr,
    da_part_ptr, db_part_ptr, ds_ptr, dof_ptr,
    out_features, in_features, rank, group_size, n_groups, chunks, stride_phi,
    n_tiles_m, n_tiles_n, tiles_m_per_prog, tiles_n_per_prog, n_tokens, ds_band_stride, lr_scale,
    PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    HAS_ZP: tl.constexpr, GPT: tl.constexpr, FUSED_G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SPLIT_BF16: tl.constexpr, DOT_FP32: tl.constexpr, G_DOT_FP32: tl.constexpr, INTERPRET: tl.constexpr,
    I64: tl.constexpr, L4Q: tl.constexpr = False,
):
    """Recompute ``Z, W_int, M`` per tile and reduce ``G`` into dA, dB, ds partials in one pass.

    Grid ``(P_n, P_m)``: program ``(j, i)`` owns row tiles ``[i*TM, (i+1)*TM)`` x column tiles
    ``[j*TN, (j+1)*TN)``. Outputs (all fp32, unscaled by alpha/r):

    * ``da_part[i, r, col]``: sum over the band's rows of ``B^T dZ`` (read-modify-write over the
      band's row tiles; a CTA barrier orders the revisit).
    * ``db_part[j, row, r]``: sum over the band's columns of ``dZ A^T`` (register accumulator).
    * ``ds[j * ds_band_stride + row * n_groups + grp]``: group sums of ``G (W_int - z)``; bands
      write disjoint entries, so ``ds_band_stride`` is 0 when a group never crosses a band.

    ``L4Q`` (Phi0 the float ``W0``, ``zp_ptr`` the offset ``b``): ``v = (Z - b) / s``, ``M`` on ``v``,
    ``dZ = M G``; ``ds`` takes ``G (M (W_int - v) + (1 - M) clip(v))`` and ``dof`` (same layout)
    ``G (1 - M)``, both unscaled by the LSQ gradient scale (the launcher applies it).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rr = tl.arange(0, R_PAD)
    rank_mask = rr < rank
    if I64:
        da_band = da_part_ptr + pid_m.to(tl.int64) * rank * in_features
        db_band = db_part_ptr + pid_n.to(tl.int64) * out_features * rank
        ds_band = ds_ptr + pid_n.to(tl.int64) * ds_band_stride
        if L4Q:
            dof_band = dof_ptr + pid_n.to(tl.int64) * ds_band_stride
    else:
        da_band = da_part_ptr + pid_m * rank * in_features
        db_band = db_part_ptr + pid_n * out_features * rank
        ds_band = ds_ptr + pid_n * ds_band_stride
        if L4Q:
            dof_band = dof_ptr + pid_n * ds_band_stride

    for tm in range(0, tiles_m_per_prog):
        tile_m = pid_m * tiles_m_per_prog + tm
        rows, rmask = row_tile(tile_m, out_features, BLOCK_M, I64)
        b_tile = lora_rows(b_ptr, rows, rmask, rank, R_PAD)
        db_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if L4Q:
            dof_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for tn in range(0, tiles_n_per_prog):
            tile_n = pid_n * tiles_n_per_prog + tn
            cols, cmask, grp, chunk, col0, n_valid = col_tile(tile_n, in_features, group_size, chunks, BLOCK_N, GPT)
            n_valid = tl.where(tile_n < n_tiles_n, n_valid, 0)
            cmask = and_scalar(cmask, tile_n < n_tiles_n)
            mask = rmask[:, None] & cmask[None, :]

            a_tile = lora_cols(a_ptr, cols, cmask, rank, in_features, R_PAD)
            z = z_tile(phi_ptr, b_tile, a_tile, rows[:, None] * stride_phi, rmask, cols, cmask, col0, n_valid, lr_scale,
                        PHI_KIND, PHI_MUL, PACKED_PAIRS, BLOCK_N, DOT_FP32)
            if L4Q:
                s, off = load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, True, 1.0)
                v = l4q_v(z, s, off)
                w_int, _ = round_clip(v, QMIN, QMAX)
                inside = l4q_mask(v, QMIN, QMAX)
            else:
                w_int, inside = round_clip(z, QMIN, QMAX)
            if FUSED_G:
                g = _g_tile_from_dy_x(dy_ptr, x_ptr, rows, rmask, cols, cmask, n_tokens, out_features, in_features,
                                      BLOCK_M, BLOCK_N, BLOCK_T, G_DOT_FP32, I64)
            else:
                g = tl.load(g_ptr + rows[:, None] * in_features + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if L4Q:
                # dZ = M G; outside the mask clip(v) == W_int (NaN stays NaN), so the LSQ step
                # term is G * where(M, W_int - v, W_int); the offset term is G (1 - M).
                dz = tl.where(inside & mask, g, 0.0)
                gw = tl.where(mask, g * tl.where(inside, w_int - v, w_int), 0.0)
                gof = tl.where(inside, 0.0, tl.where(mask, g, 0.0))
            else:
                s, zp = load_qparams(scale_ptr, zp_ptr, rows, rmask, grp, n_groups, BLOCK_M, BLOCK_N, GPT, HAS_ZP)

                # STE through the rounding, inclusive clip mask; padding lanes contribute exact zeros.
                dz = tl.where(inside & mask, s * g, 0.0)
                gw = tl.where(mask, g * center(w_int, zp, HAS_ZP), 0.0)

            # dB rows (reduced along in) stay in registers for the whole column band; dA columns
            # (this row tile's share) go to the band's partial.
            db_acc, da = _rank_reduce(dz, a_tile, b_tile, db_acc, SPLIT_BF16, DOT_FP32, INTERPRET)
            da_ptrs = da_band + rr[:, None] * in_features + cols[None, :]
            da_mask = rank_mask[:, None] & cmask[None, :]
            if tm > 0:
                da = da + tl.load(da_ptrs, mask=da_mask, other=0.0)
            tl.store(da_ptrs, da, mask=da_mask)

            if GPT == 1:
                ds_acc += tl.sum(gw, axis=1)
                flush = (chunk == chunks - 1) | (tn == tiles_n_per_prog - 1)
                tl.store(ds_band + rows * n_groups + grp, ds_acc, mask=and_scalar(rmask, flush & (tile_n < n_tiles_n)))
                ds_acc = tl.where(flush, 0.0, ds_acc)
                if L4Q:
                    dof_acc += tl.sum(gof, axis=1)
                    tl.store(dof_band + rows * n_groups + grp, dof_acc,
                             mask=and_scalar(rmask, flush & (tile_n < n_tiles_n)))
                    dof_acc = tl.where(flush, 0.0, dof_acc)
            else:
                G: tl.constexpr = BLOCK_N // GPT
                ds_tile = tl.sum(tl.reshape(gw, (BLOCK_M, GPT, G)), axis=2)
                gidx = grp + tl.arange(0, GPT)
                tl.store(ds_band + rows[:, None] * n_groups + gidx[None, :], ds_tile,
                         mask=and_scalar(rmask[:, None] & (gidx < n_groups)[None, :], tile_n < n_tiles_n))
                if L4Q:
                    dof_tile = tl.sum(tl.reshape(gof, (BLOCK_M, GPT, G)), axis=2)
                    tl.store(dof_band + rows[:, None] * n_groups + gidx[None, :], dof_tile,
                             mask=and_scalar(rmask[:, None] & (gidx < n_groups)[None, :], tile_n < n_tiles_n))

        tl.store(db_band + rows[:, None] * rank + rr[None, :], db_acc, mask=rmask[:, None] & rank_mask[None, :])
        # The next row tile revisits this band's dA partial: make this tile's stores visible to
        # every thread of the CTA first (a thread may read what another one wrote).
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _qparams(scale: torch.Tensor, zero_point: torch.Tensor | None):
    """fp32 contiguous scale / zero point (tiny ``[out, n_groups]`` tensors)."""
    s = scale.to(torch.float32).contiguous()
    zp = None if zero_point is None else zero_point.to(torch.float32).contiguous()
    return s, zp


def _dot_fp32(lora_dtype: torch.dtype, interpret: bool) -> bool:
    return interpret or lora_dtype == torch.float32


def fake_quant_forward(
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    out_dtype: torch.dtype,
    write_int: bool = False,
    l4q: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Launch the forward kernel (inputs already validated by ``_checks.check_fake_quant_args``).

    Args:
        phi: stored Phi0, contiguous ``[out, in]`` (uint8 ``[out, in // 2]`` for packed_int).
        lora_A: ``[r, in]`` fp32/bf16/fp16. lora_B: ``[out, r]``, same dtype.
        scale: ``[out, n_groups]`` float (per-channel: ``n_groups = 1``); the group size is
            ``in // n_groups``. zero_point: None or shaped like scale.
        out_dtype: fp32, bf16 or fp16: dtype of ``W_hat``.
        write_int: write int8 ``W_int`` instead of ``W_hat``.
        l4q: L4Q's quantiser (:func:`l4q_forward`): ``phi`` is the float ``W0``, ``zero_point``
            the fp32 offset ``b`` and the result ``W_q = s * W_int + b``.

    Returns:
        ``W_hat`` ``[out, in]`` in ``out_dtype``; with ``write_int``, ``(W_int int8 [out, in],
        number of NaN entries of W_int)`` (NaNs are written as 0).
    """
    phi = phi.contiguous()  # the kernels address it as dense rows (a no-op when it is)
    out_features = phi.shape[0]
    in_features = lora_A.shape[1]
    rank = lora_A.shape[0]
    n_groups = scale.shape[1]
    g = in_features // n_groups
    interpret = interpreting()
    cfg = fwd_config(out_features, in_features, rank, g, lora_A.dtype, interpret=interpret)
    _, _, chunks, n_tiles_n = column_tiling(in_features, g, cfg.block_n_max)
    n_tiles_m = triton.cdiv(out_features, cfg.block_m)
    a = lora_A.contiguous()
    b = lora_B.contiguous()
    s, zp = _qparams(scale, zero_point)
    device = phi.device
    if write_int:
        out = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        nan_count = torch.zeros(n_tiles_m * n_tiles_n, dtype=torch.int32, device=device)
    else:
        out = torch.empty(out_features, in_features, dtype=out_dtype, device=device)
        nan_count = out  # unused
    if out.numel() == 0:
        return (out, 0) if write_int else out
    grid = (n_tiles_n, n_tiles_m)
    with on_device(phi):
        _fake_quant_fwd_kernel[grid](
            phi, a, b, s, s if zp is None else zp, out, nan_count,
            out_features, in_features, rank, g, n_groups, chunks, phi.shape[1], float(alpha / rank),
            **phi_constexprs(bits, phi_format, g, cfg.gpt),
            HAS_ZP=zp is not None, GPT=cfg.gpt, WRITE_INT=write_int,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, R_CHUNK=cfg.r_chunk,
            DOT_FP32=_dot_fp32(lora_A.dtype, interpret), INTERPRET=interpret,
            I64=needs_int64(out.numel(), phi.numel()), L4Q=l4q,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    if write_int:
        return out, int(nan_count.sum().item())
    return out


def fake_quant_backward(
    grad: torch.Tensor | None,
    phi: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    phi_format: str,
    alpha: float,
    dy: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    l4q: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel: ``(dL/dlora_A, dL/dlora_B, dL/dscale)``.

    Args:
        grad: ``G = dL/dW_hat`` ``[out, in]`` (any float dtype; read once), or None with ``dy``
            and ``x`` given: then each tile builds ``G = dy^T x`` itself (the G-free backward of
            the fused linear; ``dy`` ``[T, out]``, ``x`` ``[T, in]``, same 16/32-bit dtype).
        phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha: as the forward.
        l4q: L4Q's gradients (:func:`l4q_backward`): a fourth result, the offset's, and the step's
            LSQ term; both without the LSQ gradient scale.

    Returns:
        ``dA`` ``[r, in]`` in lora_A's dtype, ``dB`` ``[out, r]`` in lora_B's dtype, ``ds`` like
        ``scale`` (fp32); with ``l4q`` also the offset's, fp32 ``[out, n_groups]``.
    """
    phi = phi.contiguous()  # the kernels address it as dense rows (a no-op when it is)
    out_features = phi.shape[0]
    in_features = lora_A.shape[1]
    rank = lora_A.shape[0]
    n_groups = scale.shape[1]
    g = in_features // n_groups
    device = phi.device
    interpret = interpreting()
    fused_g = grad is None
    cfg = bwd_config(out_features, in_features, rank, g, lora_A.dtype, fused_g=fused_g, interpret=interpret)
    _, _, chunks, n_tiles_n = column_tiling(in_features, g, cfg.block_n_max)
    n_tiles_m = triton.cdiv(out_features, cfg.block_m)
    if out_features == 0 or in_features == 0:
        zeros = (torch.zeros_like(lora_A), torch.zeros_like(lora_B), torch.zeros_like(scale))
        return zeros + (torch.zeros_like(scale),) if l4q else zeros
    p_m, p_n, tm, tn = bwd_grid(out_features, in_features, n_tiles_m, n_tiles_n,
                                target_programs=target_programs(device), chunks=chunks, gpt=cfg.gpt)
    a = lora_A.contiguous()
    b = lora_B.contiguous()
    s, zp = _qparams(scale, zero_point)
    # Partials in fp32. dA/dB bands are fully overwritten (empty); ds needs zeros only when a
    # group can span two column bands (then each band writes only its own part).
    da_part = torch.empty(p_m, rank, in_features, dtype=torch.float32, device=device)
    db_part = torch.empty(p_n, out_features, rank, dtype=torch.float32, device=device)
    ds_in_place = cfg.gpt > 1 or tn % chunks == 0
    if ds_in_place:
        ds_part = torch.empty(1, out_features, n_groups, dtype=torch.float32, device=device)
        ds_band_stride = 0
    else:
        ds_part = torch.zeros(p_n, out_features, n_groups, dtype=torch.float32, device=device)
        ds_band_stride = out_features * n_groups
    dof_part = torch.zeros_like(ds_part) if l4q else ds_part  # the offset's partials: ds's layout
    if fused_g:
        if dy is None or x is None:
            raise ValueError("fake_quant_backward: give grad, or both dy and x")
        dy = dy.contiguous()
        x = x.contiguous()
        n_tokens = dy.shape[0]
        g_arg = dy
        big = (dy.numel(), x.numel())
    else:
        grad = grad.contiguous()
        n_tokens = 0
        g_arg = grad
        dy = x = grad
        big = (grad.numel(),)
    grid = (p_n, p_m)
    with on_device(g_arg):
        _fake_quant_bwd_kernel[grid](
            g_arg, dy, x, phi, a, b, s, s if zp is None else zp,
            da_part, db_part, ds_part, dof_part,
            out_features, in_features, rank, g, n_groups, chunks, phi.shape[1],
            n_tiles_m, n_tiles_n, tm, tn, n_tokens, ds_band_stride, float(alpha / rank),
            **phi_constexprs(bits, phi_format, g, cfg.gpt),
            HAS_ZP=zp is not None, GPT=cfg.gpt, FUSED_G=fused_g,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, R_PAD=cfg.r_pad, BLOCK_T=cfg.block_t,
            SPLIT_BF16=lora_A.dtype == torch.bfloat16, DOT_FP32=_dot_fp32(lora_A.dtype, interpret),
            G_DOT_FP32=_dot_fp32(g_arg.dtype, interpret), INTERPRET=interpret,
            I64=needs_int64(out_features * in_features, phi.numel(), da_part.numel(), db_part.numel(), ds_part.numel(), *big),
            L4Q=l4q, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        )
    lr = alpha / rank
    d_a = (da_part.sum(0) if p_m > 1 else da_part[0]) * lr
    d_b = (db_part.sum(0) if p_n > 1 else db_part[0]) * lr
    d_s = ds_part.sum(0) if ds_part.shape[0] > 1 else ds_part[0]
    if l4q:
        d_of = dof_part.sum(0) if dof_part.shape[0] > 1 else dof_part[0]
        return d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_s.to(scale.dtype), d_of
    return d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_s.to(scale.dtype)


# ----------------------------------------------------------------------------------------------
# Which implementation runs; the eager one (reference.py, op for op): CPU, fp64 and fallbacks
# ----------------------------------------------------------------------------------------------


def uses_kernels(phi: torch.Tensor, lora_A: torch.Tensor, scale: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Whether the Triton kernels (rather than eager PyTorch) compute for these inputs.

    True where kernels run (``_launch.kernels_run_on``: CUDA, and CPU under ``TRITON_INTERPRET=1``,
    unless ``use_kernels(False)``) when every float involved is fp32/bf16/fp16 (fp64 is for
    ``gradcheck``: eager), the scale is fp32, the rank is at most ``MAX_RANK`` and the weight is
    not empty.
    """
    if not kernels_run_on(phi.device):
        return False
    if lora_A.dtype not in _KERNEL_DTYPES or scale.dtype != torch.float32:
        return False
    if any(d not in _KERNEL_DTYPES for d in dtypes):
        return False
    if phi.numel() == 0 or lora_A.shape[1] == 0 or lora_A.shape[0] > MAX_RANK:
        return False
    return True


def _group_size_of(lora_A: torch.Tensor, scale: torch.Tensor) -> int | None:
    """The ``group_size`` argument the reference takes, from the scale's shape."""
    n_groups = scale.shape[1]
    if n_groups == 0:  # a weight with 0 input columns: any group size fits (test_hypothesis)
        return 1
    return None if n_groups == 1 else lora_A.shape[1] // n_groups


def _eager_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    """``(Z, W_int, M, compute dtype)`` as ``reference._w_int_and_dequant`` computes them."""
    cdt = reference._compute_dtype(lora_A, scale)
    z = decode_phi_eager(phi, bits, phi_format).to(cdt) + reference.lowrank_product(lora_A, lora_B, alpha, cdt)
    w_int, mask = reference.quantize_z(z, bits)  # the reference's rounding rule (no graph here)
    return z, w_int, mask, cdt


def _eager_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype):
    with torch.no_grad():
        return reference.fake_quant_weight(
            phi, lora_A, lora_B, scale, bits=bits, phi_format=phi_format, alpha=alpha,
            zero_point=zero_point, group_size=_group_size_of(lora_A, scale), out_dtype=out_dtype,
        )


def _eager_bwd(grad, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    """The reference's autograd, written out (NUMERICS "Backward"):

    ``dZ = s G M``, ``dB = (alpha/r dZ) A^T``, ``dA = B^T (alpha/r dZ)``, ``ds = sum_group G (W_int - z)``.
    """
    _, w_int, mask, cdt = _eager_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)
    g = lora_A.shape[1] // scale.shape[1]
    s = reference.expand_groups(scale.to(cdt), g)
    gf = grad.to(cdt)
    dz = torch.where(mask, s * gf, torch.zeros((), dtype=cdt, device=gf.device)) * (alpha / lora_A.shape[0])
    centered = w_int if zero_point is None else w_int - reference.expand_groups(zero_point.to(cdt), g)
    d_s = (gf * centered).reshape(gf.shape[0], scale.shape[1], g).sum(-1)
    with reference.no_autocast(dz):  # the factor gradients in the compute dtype, as the kernels give them
        d_b = dz @ lora_A.to(cdt).T
        d_a = lora_B.to(cdt).T @ dz
    return d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_s.to(scale.dtype)


# ----------------------------------------------------------------------------------------------
# torch.library ops and autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("lrqat::fake_quant_fwd", mutates_args=())
def _fake_quant_fwd(
    phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float, out_dtype: torch.dtype,
) -> torch.Tensor:
    """``W_hat`` ``[out, in]`` in ``out_dtype``; the group size is ``in // scale.shape[1]``."""
    if uses_kernels(phi, lora_A, scale, out_dtype):
        return fake_quant_forward(phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                                  alpha=alpha, out_dtype=out_dtype)
    return _eager_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)


@_fake_quant_fwd.register_fake
def _(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype):
    return phi.new_empty((phi.shape[0], lora_A.shape[1]), dtype=out_dtype)


@torch.library.custom_op("lrqat::fake_quant_w_int", mutates_args=())
def _fake_quant_w_int(
    phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_int int8 [out, in], NaN count int64 [])``: the forward's integers (NaN written as 0)."""
    if uses_kernels(phi, lora_A, scale):
        w_int, n_nan = fake_quant_forward(phi, lora_A, lora_B, scale, zero_point, bits=bits, phi_format=phi_format,
                                          alpha=alpha, out_dtype=torch.float32, write_int=True)
        return w_int, torch.tensor(n_nan, dtype=torch.int64, device=phi.device)
    with torch.no_grad():
        _, w_int, _, _ = _eager_w_int(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)
    nan = torch.isnan(w_int)
    return torch.where(nan, 0, w_int).to(torch.int8), nan.sum()


@_fake_quant_w_int.register_fake
def _(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return (phi.new_empty((phi.shape[0], lora_A.shape[1]), dtype=torch.int8),
            phi.new_empty((), dtype=torch.int64))


@torch.library.custom_op("lrqat::fake_quant_bwd", mutates_args=())
def _fake_quant_bwd(
    grad: torch.Tensor, phi: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
    zero_point: Optional[torch.Tensor], bits: int, phi_format: str, alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dlora_A, dL/dlora_B, dL/dscale)`` from ``grad = dL/dW_hat`` ``[out, in]``."""
    if uses_kernels(phi, lora_A, scale, grad.dtype):
        return fake_quant_backward(grad, phi, lora_A, lora_B, scale, zero_point, bits=bits,
                                   phi_format=phi_format, alpha=alpha)
    return _eager_bwd(grad, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha)


@_fake_quant_bwd.register_fake
def _(grad, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(scale)


def _fake_quant_fwd_setup_context(ctx, inputs, output):
    phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype = inputs
    ctx.save_for_backward(phi, lora_A, lora_B, scale, zero_point)
    ctx.meta = (bits, phi_format, alpha)


def _fake_quant_fwd_backward(ctx, grad):
    phi, lora_A, lora_B, scale, zero_point = ctx.saved_tensors
    bits, phi_format, alpha = ctx.meta
    d_a, d_b, d_s = torch.ops.lrqat.fake_quant_bwd(grad.contiguous(), phi, lora_A, lora_B, scale, zero_point,
                                                   bits, phi_format, alpha)
    return None, d_a, d_b, d_s, None, None, None, None, None


_fake_quant_fwd.register_autograd(_fake_quant_fwd_backward, setup_context=_fake_quant_fwd_setup_context)


class FakeQuantWeightFunction(torch.autograd.Function):
    """``W_hat = s (clip(round(Phi0 + alpha/r B A), qmin, qmax) - z)`` with a recomputing backward.

    Saves ``phi, lora_A, lora_B, scale, zero_point`` (the inputs: no ``Z``, ``W_int`` or mask).
    With ``G = dL/dW_hat`` and ``M = qmin <= round(Z) <= qmax`` (straight-through rounding):

        dL/dZ      = s * G * M
        dL/dlora_B = (alpha/r) * dL/dZ @ lora_A^T            [out, r]
        dL/dlora_A = (alpha/r) * lora_B^T @ dL/dZ            [r, in]
        dL/ds      = sum over the channel/group of G * (W_int - z)

    computed by one pass of the backward kernel over ``G``. No gradient for Phi0 or ``z``.
    """

    @staticmethod
    def forward(ctx, phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype):
        ctx.save_for_backward(phi, lora_A, lora_B, scale, zero_point)
        ctx.meta = (bits, phi_format, alpha)
        return torch.ops.lrqat.fake_quant_fwd(phi, lora_A, lora_B, scale, zero_point, bits, phi_format, alpha, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        phi, lora_A, lora_B, scale, zero_point = ctx.saved_tensors
        bits, phi_format, alpha = ctx.meta
        if not any(ctx.needs_input_grad[1:4]):
            return (None,) * 9
        d_a, d_b, d_s = torch.ops.lrqat.fake_quant_bwd(grad.contiguous(), phi, lora_A, lora_B, scale, zero_point,
                                                       bits, phi_format, alpha)
        return (None, d_a if ctx.needs_input_grad[1] else None, d_b if ctx.needs_input_grad[2] else None,
                d_s if ctx.needs_input_grad[3] else None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# L4Q on the same kernels (``L4Q`` constexpr; the layer, its eager path and formulas: ``l4q.py``)
# ----------------------------------------------------------------------------------------------

#: ``W0`` dtype -> the float Phi0 format the kernels decode it with (exactly, to fp32).
L4Q_W0_FORMAT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def l4q_uses_kernels(w0: torch.Tensor, lora_A: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                     *dtypes: torch.dtype) -> bool:
    """:func:`uses_kernels` for L4Q: also a fp32/bf16/fp16 ``W0`` and an fp32 offset."""
    return (w0.dtype in L4Q_W0_FORMAT and offset.dtype == torch.float32
            and uses_kernels(w0, lora_A, scale, *dtypes))


def l4q_forward(w0, lora_A, lora_B, scale, offset, *, bits: int, alpha: float, out_dtype: torch.dtype,
                write_int: bool = False):
    """L4Q's ``W_q = s * clip(round((W0 + (alpha/r) B A - b) / s)) + b`` ``[out, in]`` in ``out_dtype``
    (``write_int``: ``(W_int int8, NaN count)``) by the forward kernel with ``L4Q``.

    Args: ``w0`` fp32/bf16/fp16 ``[out, in]``; ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``;
    ``scale``, ``offset`` fp32 ``[out, G]`` (validated by ``l4q.check_l4q_args``).
    """
    return fake_quant_forward(w0, lora_A, lora_B, scale, offset, bits=bits, phi_format=L4Q_W0_FORMAT[w0.dtype],
                              alpha=alpha, out_dtype=out_dtype, write_int=write_int, l4q=True)


def l4q_backward(grad, w0, lora_A, lora_B, scale, offset, *, bits: int, alpha: float, grad_scale: float,
                 dy: torch.Tensor | None = None, x: torch.Tensor | None = None):
    """L4Q's ``(dL/dlora_A, dL/dlora_B, dL/dscale, dL/doffset)`` from ``G = dL/dW_q`` ``[out, in]`` (or
    ``dy`` ``[T, out]`` and ``x`` ``[T, in]``: G tiles built in the kernel) in one pass; the step and
    offset gradients times the LSQ ``grad_scale`` (formulas: ``l4q.py``)."""
    d_a, d_b, d_s, d_of = fake_quant_backward(grad, w0, lora_A, lora_B, scale, offset, bits=bits,
                                              phi_format=L4Q_W0_FORMAT[w0.dtype], alpha=alpha, dy=dy, x=x, l4q=True)
    return d_a, d_b, (grad_scale * d_s).to(scale.dtype), (grad_scale * d_of).to(offset.dtype)


def _l4q_check_kernels(op: str, w0, lora_A, scale, offset, *dtypes) -> None:
    if not l4q_uses_kernels(w0, lora_A, scale, offset, *dtypes):
        raise RuntimeError(
            f"lrqat::{op} runs the Triton kernels only (CUDA, or CPU under TRITON_INTERPRET=1; fp32/bf16/fp16 w0, "
            f"factors and output, fp32 scale and offset, rank <= {MAX_RANK}, non-empty): call lrqat_kernels.l4q, "
            "which falls back to eager PyTorch")


@torch.library.custom_op("lrqat::l4q_fwd", mutates_args=())
def _l4q_fwd(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
             bits: int, alpha: float, grad_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """L4Q's ``W_q`` ``[out, in]`` in ``out_dtype`` (differentiable; ``grad_scale`` is the LSQ one)."""
    _l4q_check_kernels("l4q_fwd", w0, lora_A, scale, offset, out_dtype)
    return l4q_forward(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, out_dtype=out_dtype)


@_l4q_fwd.register_fake
def _(w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale, out_dtype):
    return w0.new_empty((w0.shape[0], lora_A.shape[1]), dtype=out_dtype)


@torch.library.custom_op("lrqat::l4q_w_int", mutates_args=())
def _l4q_w_int(w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor, bits: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_int int8 [out, in], NaN count int64 [])``: L4Q's integers as the training forward forms them."""
    _l4q_check_kernels("l4q_w_int", w0, lora_A, scale, offset)
    w_int, n_nan = l4q_forward(w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, out_dtype=torch.float32,
                               write_int=True)
    return w_int, torch.tensor(n_nan, dtype=torch.int64, device=w0.device)


@_l4q_w_int.register_fake
def _(w0, lora_A, lora_B, scale, offset, bits, alpha):
    return w0.new_empty((w0.shape[0], lora_A.shape[1]), dtype=torch.int8), w0.new_empty((), dtype=torch.int64)


@torch.library.custom_op("lrqat::l4q_bwd", mutates_args=())
def _l4q_bwd(grad: torch.Tensor, w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: torch.Tensor,
             offset: torch.Tensor, bits: int, alpha: float, grad_scale: float,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dlora_A, dL/dlora_B, dL/dscale, dL/doffset)`` from ``grad = dL/dW_q`` ``[out, in]``."""
    _l4q_check_kernels("l4q_bwd", w0, lora_A, scale, offset, grad.dtype)
    return l4q_backward(grad, w0, lora_A, lora_B, scale, offset, bits=bits, alpha=alpha, grad_scale=grad_scale)


@_l4q_bwd.register_fake
def _(grad, w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale):
    return torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(scale), torch.empty_like(offset)


def _l4q_fwd_setup_context(ctx, inputs, output):
    w0, lora_A, lora_B, scale, offset, bits, alpha, grad_scale, out_dtype = inputs
    ctx.save_for_backward(w0, lora_A, lora_B, scale, offset)
    ctx.meta = (bits, alpha, grad_scale)


def _l4q_fwd_backward(ctx, grad):
    w0, lora_A, lora_B, scale, offset = ctx.saved_tensors
    bits, alpha, grad_scale = ctx.meta
    d_a, d_b, d_s, d_of = torch.ops.lrqat.l4q_bwd(grad.contiguous(), w0, lora_A, lora_B, scale, offset, bits, alpha,
                                                  grad_scale)
    return None, d_a, d_b, d_s, d_of, None, None, None, None


_l4q_fwd.register_autograd(_l4q_fwd_backward, setup_context=_l4q_fwd_setup_context)


# Names that moved in the split of this module (issue 18). The public ones warn and go in the next
# release; the private helpers stay importable (other modules imported them) until their importers move.
_MOVED_TO_AOT_SPECS = {"KernelSpec": "KernelSpec", "aot_specs": "fake_quant_specs"}
_PRIVATE_ALIASES = {
    "_cast": "cast", "_int_to_f32": "int_to_f32", "_round_clip": "round_clip", "_round_half_even": "round_half_even",
    "_dequant": "dequant", "_dot": "dot", "_decode_phi": "decode_phi", "_to_bf16_rne": "to_bf16_rne",
    "_center": "center", "_and_scalar": "and_scalar",
}


def __getattr__(name: str):
    if name in _PRIVATE_ALIASES:
        from . import _triton_quant

        return getattr(_triton_quant, _PRIVATE_ALIASES[name])
    if name in _MOVED_TO_AOT_SPECS:
        from . import aot_specs

        new = _MOVED_TO_AOT_SPECS[name]
        warnings.warn(f"{__name__}.{name} moved to lrqat_kernels.ops.aot_specs.{new}; the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(aot_specs, new)
    if name == "FORCE_GPU_TILES":
        raise AttributeError(f"{__name__}.FORCE_GPU_TILES is gone: use "
                             "lrqat_kernels.ops._launch.kernel_options(gpu_tiles=True)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
