"""W4A16 GEMM in Triton: the portable deployment path for INT4 weights, and a cross-check.

Size: over 500 lines on purpose: one op family, two kernels sharing the nibble decoder, their
launchers and the launch-config heuristics, whose rules (BLOCK_K divides the group, split-K fills
the SMs) are the kernels' own constraints; most of the length is the numerics and layout notes.

``y = x @ (scale * (W_int - zero_point))^T + bias`` with ``W_int`` in the standard packed layout
of :mod:`lrqat_kernels.formats` (uint8 ``[N, K / 2]``, column ``2j`` in the low nibble of byte
``j``, two's complement), exactly the numerics of the CUDA kernel in ``csrc/int4_gpu/``:

* ``W_int - z`` is formed in integers and cast to x's dtype (exact: ``|W_int - z| <= 15``), the
  tensor cores multiply it with x and accumulate in fp32;
* default order: the scale is applied to that fp32 partial sum once per K-tile (a K-tile never
  straddles a group, ``BLOCK_K`` divides ``group_size``), or once at the end when per-channel. So
  no 16-bit rounding of ``s * (W_int - z)`` happens at all: the only roundings are x's own, fp32
  summation and the final cast, which is why the error stays within torch's own (which rounds
  ``W_hat`` to 16 bits first).
* ``swap_ab`` with group scales: ``W_hat = s * (W_int - z)`` is formed in fp32 and rounded to x's
  dtype (NUMERICS.md's W_hat, bit for bit what training and "dequantise + cuBLAS" multiply), so
  the result equals torch's up to fp32 summation order. Per-channel scales are still applied to
  the fp32 sums. Which order runs is the config's choice (the heuristics: the default order;
  the tuner times both); both are within the error contract. (fp16 caveat, shared with torch's
  path: scales below ~6e-5 make W_hat fp16 subnormal, with fewer significant bits than the
  default order keeps.)

Two ways to feed the tensor cores (``Int4TritonConfig.swap_ab``; the tuner times both per shape):

* default, ``y = x W^T``: two dots per tile, one per nibble. A byte holds columns ``2j`` and
  ``2j + 1``, so ``x @ W^T = x[:, 0::2] @ W_lo^T + x[:, 1::2] @ W_hi^T``: the low and high nibbles
  each form a ready ``[BLOCK_N, BLOCK_K / 2]`` operand and x (small at small M) is split into even
  and odd columns in registers, which avoids interleaving the big weight tile.
* ``swap_ab``, ``y^T = W x^T``: the weights are the MMA's A operand, interleaved back into column
  order (join + reshape). On sm_90 Triton lays the packed tile out so that the interleave lands
  directly in wgmma's register A fragment, and x is wgmma's B operand straight from shared memory
  (cp.async): the main loop stores nothing to shared memory. Without the swap, wgmma needs the
  dequantised weight tile (its B operand) in shared memory: a store and a fence per K tile. The
  AOT tests check both properties in the PTX / TTGIR. On sm_80 (mma.sync) both read operands
  from registers; the swap just changes which side is the 16-row fragment.

Nibble decoding: portable Triton element ops (the default), or opt-in inline PTX that decodes two
weights per instruction (``Int4TritonConfig.fast_decode``, NVIDIA only: see ``FAST_PRMT`` below).

Small M (decode) is memory bound: split-K (programs along K writing fp32 partials) fills the
GPU when ``N / BLOCK_N`` tiles are too few. The partials are reduced in the same launch (the last
program of a tile to arrive sums them in split order, adds the bias and writes y, as the CUDA
kernel does): one kernel per layer call, where a torch sum and cast would add two launches of
a few microseconds each to a decode GEMM of about ten.

Also here: :func:`int4_dequant_triton`, the one-pass dequantisation used by the ``"dequant"``
backend (prefill: dequantise once, then cuBLAS).
"""

from __future__ import annotations

import collections
import functools
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._int4_rules import check_int4_linear_args, zero_point_as_int
from ._launch import interpreting, on_device
from ._triton_quant import cast as _cast
from ._triton_quant import int_to_f32 as _int_to_f32
from ._triton_quant import nibble_codes

__all__ = [
    "Int4TritonConfig",
    "int4_triton_config",
    "int4_linear_triton",
    "int4_dequant_triton",
    "dequant_config",
]


# ---- nibble decoding -------------------------------------------------------------------------

# Fast decode (``Int4TritonConfig.fast_decode``, NVIDIA only): four packed bytes (eight weights) per
# 32-bit register, two weights per instruction, as Marlin / the CUDA kernel do, instead of Triton's
# one-element-at-a-time byte ops (~6 ALU instructions per weight; decode-time GEMMs at M <= 16 can
# be ALU bound there). Per 4 bytes ``b0..b3``:
#   prmt   t0 = [b0, 0, b1, 0], t1 = [b2, 0, b3, 0]       (one byte per 16-bit lane)
#   lop3   lane = 0x?300 | (nibble ^ 8) = magic + u       (mask, offset and magic in one op, LUT 0x6A:
#                                                           ``m ? a ^ c : c`` with c = magic | 8)
#   shr 4  then the same lop3 for the high nibbles
#   fma    lane * 1 + (-(magic + 8 + z)) = W_int - z       (x2 per instruction, exact: small integers)
# 12 instructions per 8 weights. It is the one nibble decoder not shared with
# ``_triton_quant.nibble_codes`` (which the portable path below uses): inline PTX exists only on
# NVIDIA GPUs. The constants are checked against a bit-level model of these PTX instructions in
# tests/test_int4_triton.py; the kernel path itself only runs on a GPU, so it is opt-in (an
# explicit config; the tuner times it after checking its outputs) until its GPU tests have passed.
FAST_PRMT = (0x4140, 0x4342)  # byte selectors: bytes (0, 1) and (2, 3) into the low byte of each lane
FAST_MASK = 0x000F000F  # the low nibble of each 16-bit lane
FAST_LUT = 0x6A  # lop3 truth table of m ? (a ^ c) : c, inputs (a, b = m, c)
FAST_MAGIC = {"bf16": 0x4300, "fp16": 0x6400}  # 128.0 / 1024.0: ulp 1, so magic | u = magic + u
FAST_ONE = {"bf16": 0x3F80, "fp16": 0x3C00}


def _fast_decode_asm(dtype: str) -> str:
    """The PTX of one inline-asm instance: ``$4`` = 4 packed bytes, ``$5, $6`` = -(magic + 8 + z) for
    elements (0, 1) / (2, 3); out ``$0, $1`` = low nibbles of bytes (0, 1) / (2, 3), ``$2, $3`` high."""
    c = FAST_MAGIC[dtype] | 8
    c2, m, one = (c << 16) | c, FAST_MASK, (FAST_ONE[dtype] << 16) | FAST_ONE[dtype]
    fma = "fma.rn.bf16x2" if dtype == "bf16" else "fma.rn.f16x2"
    return (
        "{\n.reg .b32 t0, t1, u, one;\n"
        f"prmt.b32 t0, $4, 0, {FAST_PRMT[0]:#06x};\n"
        f"prmt.b32 t1, $4, 0, {FAST_PRMT[1]:#06x};\n"
        f"lop3.b32 $0, t0, {m:#010x}, {c2:#010x}, {FAST_LUT:#04x};\n"
        f"lop3.b32 $1, t1, {m:#010x}, {c2:#010x}, {FAST_LUT:#04x};\n"
        "shr.u32 u, t0, 4;\n"
        f"lop3.b32 $2, u, {m:#010x}, {c2:#010x}, {FAST_LUT:#04x};\n"
        "shr.u32 u, t1, 4;\n"
        f"lop3.b32 $3, u, {m:#010x}, {c2:#010x}, {FAST_LUT:#04x};\n"
        f"mov.b32 one, {one:#010x};\n"
        f"{fma} $0, $0, one, $5;\n{fma} $1, $1, one, $6;\n"
        f"{fma} $2, $2, one, $5;\n{fma} $3, $3, one, $6;\n}}"
    )


_FAST_ASM_BF16: tl.constexpr = tl.constexpr(_fast_decode_asm("bf16"))
_FAST_ASM_FP16: tl.constexpr = tl.constexpr(_fast_decode_asm("fp16"))


@triton.jit
def _decode_fast(packed, zp, DTYPE: tl.constexpr):
    """:func:`_decode_nibbles`' unscaled result (``W_int - z`` in DTYPE, fp16 / bf16) by
    :func:`_fast_decode_asm`'s inline PTX."""
    if DTYPE == tl.bfloat16:
        neg = tl.broadcast_to((-(zp + 136)).to(tl.float32).to(tl.bfloat16)[:, None], packed.shape)
        return tl.inline_asm_elementwise(_FAST_ASM_BF16, "=r,=r,=r,=r,r,r,r", [packed, neg],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        neg = tl.broadcast_to((-(zp + 1032)).to(tl.float32).to(tl.float16)[:, None], packed.shape)
        return tl.inline_asm_elementwise(_FAST_ASM_FP16, "=r,=r,=r,=r,r,r,r", [packed, neg],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def _decode_nibbles(packed, zp, scale, DTYPE: tl.constexpr, SCALED: tl.constexpr, INTERPRET: tl.constexpr,
                    FAST: tl.constexpr = False):
    """Packed bytes ``[R, C]`` (uint8), zero points ``[R]`` (int32) -> the columns ``2j`` and
    ``2j + 1`` of byte ``j`` as two ``[R, C]`` tensors in ``DTYPE``: ``W_int - z`` (exact), or with
    ``SCALED`` ``W_hat = scale * (W_int - z)`` (``scale`` fp32 ``[R]``; product in fp32, cast to
    ``DTYPE`` last: NUMERICS.md's W_hat, as training and the dequantise + cuBLAS path use).

    Offset binary: ``u = c ^ 8 = W_int + 8`` in 0..15, kept in uint8 (the weight tile is the
    register-heavy operand). Magic-number conversion (as the CUDA kernel, csrc/int4_gpu/int4_gpu.h):
    OR-ing u into the mantissa of fp16 1024.0 (0x6400, ulp 1) or bf16 128.0 (0x4300, ulp 1) gives
    base + u exactly, and one subtraction of (base + 8 + z) leaves W_int - z, exact (|.| <= 15).
    This replaces a slow int -> float conversion (I2F runs at a quarter of the FP32 rate) per weight.
    ``INTERPRET``: round the scaled weights to bf16 from integer ops (the interpreter's cast truncates).
    ``FAST``: decode by :func:`_decode_fast` (NVIDIA GPUs only; see the comment above it)."""
    if FAST:
        w_lo, w_hi = _decode_fast(packed, zp, DTYPE)
        if SCALED:
            w_lo = _cast(w_lo.to(tl.float32) * scale[:, None], DTYPE, INTERPRET)
            w_hi = _cast(w_hi.to(tl.float32) * scale[:, None], DTYPE, INTERPRET)
        return w_lo, w_hi
    u_lo, u_hi = nibble_codes(packed)
    if DTYPE == tl.bfloat16 or SCALED:
        shift = (zp + 136).to(tl.float32)[:, None]
        w_lo = (u_lo.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True).to(tl.float32) - shift
        w_hi = (u_hi.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True).to(tl.float32) - shift
        if SCALED:
            w_lo = w_lo * scale[:, None]
            w_hi = w_hi * scale[:, None]
        w_lo = _cast(w_lo, DTYPE, INTERPRET)
        w_hi = _cast(w_hi, DTYPE, INTERPRET)
    else:
        shift = (zp + 1032).to(tl.float16)[:, None]
        w_lo = (u_lo.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - shift
        w_hi = (u_hi.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - shift
    return w_lo, w_hi


@triton.jit
def _fence_gpu(token, PTX: tl.constexpr):
    """``fence.acq_rel.gpu`` in every thread on NVIDIA GPUs; ``token`` (an int32 scalar) is passed
    through to order the calls. Elsewhere a no-op: the interpreter runs programs one after another,
    and on other GPUs the barrier + acq_rel atomic alone carry the ordering."""
    if PTX:
        token = tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [token],
                                          dtype=tl.int32, is_pure=False, pack=1)
    return token


@triton.jit
def _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym,
               HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """``y[m, n] = acc + bias`` (fp32, one rounding to y's dtype: round to nearest even)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, _cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int4_w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ym, stride_ws,
    group_size, k_tiles_per_split,
    HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PTX: tl.constexpr,
    FAST_DECODE: tl.constexpr,
    DOT_F32: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 (M tiles) varies fastest: the programs sharing a weight tile run together and all
    # but the first read it from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    HALF_K: tl.constexpr = BLOCK_K // 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF_K)  # packed bytes of a K tile = pairs of columns
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: N * K / 2 and M * K can pass 2^31 for large layers.
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = qw_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_zn

    n_k_tiles = tl.cdiv(K, BLOCK_K)
    kt_begin = pid_k * k_tiles_per_split
    kt_end = tl.minimum(kt_begin + k_tiles_per_split, n_k_tiles)

    zp = tl.zeros([BLOCK_N], dtype=tl.int32)
    if PER_CHANNEL:
        if HAS_ZP:
            zp = tl.load(z_rows, mask=mask_n, other=0).to(tl.int32)

    # SWAP_AB computes the transposed tile y^T = W x^T (weights as the MMA's A operand): on sm_90
    # wgmma then takes the dequantised weights straight from registers and x from shared memory
    # (cp.async), so the main loop writes nothing to shared memory. Without the swap the weights
    # are wgmma's B operand, which must sit in shared memory: every K tile is dequantised, stored
    # and fenced first. With the swap, group scales are folded into the weights (W_hat in x's
    # dtype, exactly the W_hat of training and of the dequantise + cuBLAS path) so that the
    # accumulator is only ever added to by the MMA itself, which lets wgmma run asynchronously
    # under the next tile's dequantisation; the default order scales fp32 partial sums instead
    # (no 16-bit rounding of W_hat at all). Both are within the error contract.
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(kt_begin, kt_end):
        k0 = kt * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        mask_k = k0 + 2 * offs_h < K  # K is even: a byte is in range iff its low column is
        packed = tl.load(q_rows + (k0 // 2 + offs_h)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        s = zp  # placeholder: per-channel scales are applied once, after the loop
        if not PER_CHANNEL:
            group = k0 // group_size  # one group per tile: BLOCK_K divides group_size
            if HAS_ZP:
                zp = tl.load(z_rows + group, mask=mask_n, other=0).to(tl.int32)
            s = tl.load(s_rows + group, mask=mask_n, other=0.0).to(tl.float32)
        if SWAP_AB:
            w_lo, w_hi = _decode_nibbles(packed, zp, s, x_ptr.dtype.element_ty, not PER_CHANNEL, DOT_F32, FAST_DECODE)
            # Nibbles interleaved back into column order in registers; Triton picks the load
            # layout so that this lands directly in wgmma's A-fragment layout (no shuffle).
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
            if DOT_F32:
                # Interpreter only: its bf16 x bf16 dot is wrong; fp32 holds every operand exactly.
                w = w.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(w, tl.trans(x), acc)  # [BLOCK_N, BLOCK_M]
        else:
            w_lo, w_hi = _decode_nibbles(packed, zp, s, x_ptr.dtype.element_ty, False, DOT_F32, FAST_DECODE)
            # Two dots per tile, one per nibble: x[:, 0::2] @ W_lo^T + x[:, 1::2] @ W_hi^T. x is
            # loaded contiguously (pipelined through shared memory by cp.async) and split into
            # even and odd columns in registers: x is [BLOCK_M, BLOCK_K], small next to the weights.
            x_lo, x_hi = tl.split(tl.reshape(x, (BLOCK_M, HALF_K, 2)))
            if DOT_F32:
                x_lo = x_lo.to(tl.float32)
                x_hi = x_hi.to(tl.float32)
                w_lo = w_lo.to(tl.float32)
                w_hi = w_hi.to(tl.float32)
            part = tl.dot(x_lo, tl.trans(w_lo))
            part = tl.dot(x_hi, tl.trans(w_hi), part)
            if PER_CHANNEL:
                acc += part
            else:
                acc += part * s[None, :]
    if SWAP_AB:
        acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]: one layout conversion, in the epilogue
    if PER_CHANNEL:
        s = tl.load(s_rows, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * s[None, :]

    if SPLIT_K:
        # Split-K in the same launch: every program writes its fp32 partial tile to the workspace
        # ws [splits, M, N]; the last program of a tile to arrive (atomic counter, the "last block
        # reduces" pattern of the CUDA kernel) sums the partials in split order (deterministic),
        # adds the bias and writes y. Saves the two extra launches of a torch sum + cast, which
        # at decode cost about as much as the whole weight stream. Per-thread fence before the
        # barrier and the arrival (publish the partial device-wide); fence and L2-only loads after.
        ws_tile = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask_y = mask_m[:, None] & mask_n[None, :]
        splits = tl.num_programs(2)
        tl.store(ws_tile + pid_k.to(tl.int64) * stride_ws, acc, mask=mask_y)
        token = _fence_gpu(pid_k, PTX)
        tl.debug_barrier()
        counter = cnt_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == splits - 1:
            _fence_gpu(token, PTX)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for _ in range(0, splits):
                acc += tl.load(ws_tile, mask=mask_y, other=0.0, cache_modifier=".cg")
                ws_tile += stride_ws  # 64-bit pointer arithmetic
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
            _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS, DOT_F32)
    else:
        _store_out(acc, y_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, HAS_BIAS, DOT_F32)


@triton.jit
def _int4_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr,
    N, K,
    stride_qn, stride_sn, stride_zn, stride_wn,
    group_size,
    HAS_ZP: tl.constexpr,
    ONE_GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``W_hat[n, k] = s * (W_int - z)`` for a ``[BLOCK_N, BLOCK_K]`` tile: the prefill path's
    dequantisation pass, memory bound (reads N*K/2 bytes, writes N*K*2). Contiguous byte loads,
    nibbles interleaved back into column order in registers (join + reshape), so loads and stores
    are 16-byte vectors. ``ONE_GROUP``: the tile lies in one group (``BLOCK_K`` divides the group
    size, or per-channel): one scale per row. Else (groups not a multiple of 32) a scale per column,
    the two columns of a byte looked up separately (with an odd group size they can straddle)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows64 = offs_n.to(tl.int64)[:, None]
    offs_b = pid_k * HALF_K + tl.arange(0, HALF_K)  # packed bytes = column pairs (K is even)
    mask_b = mask_n[:, None] & (offs_b < K // 2)[None, :]
    packed = tl.load(qw_ptr + rows64 * stride_qn + offs_b[None, :], mask=mask_b, other=0).to(tl.int32)
    u_lo, u_hi = nibble_codes(packed)  # W_int + 8, in 0..15
    if ONE_GROUP:
        grp = (pid_k * BLOCK_K) // group_size
        s_lo = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + grp, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        s_hi = s_lo
        if HAS_ZP:
            z_lo = tl.load(z_ptr + offs_n.to(tl.int64) * stride_zn + grp, mask=mask_n, other=0).to(tl.int32)[:, None]
            z_hi = z_lo
    else:
        g_lo = (2 * offs_b) // group_size
        g_hi = (2 * offs_b + 1) // group_size
        s_lo = tl.load(s_ptr + rows64 * stride_sn + g_lo[None, :], mask=mask_b, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + rows64 * stride_sn + g_hi[None, :], mask=mask_b, other=0.0).to(tl.float32)
        if HAS_ZP:
            z_lo = tl.load(z_ptr + rows64 * stride_zn + g_lo[None, :], mask=mask_b, other=0).to(tl.int32)
            z_hi = tl.load(z_ptr + rows64 * stride_zn + g_hi[None, :], mask=mask_b, other=0).to(tl.int32)
    # W_int - z as fp32 without an int -> float conversion (_triton_quant.int_to_f32): u - z + 2^22 is
    # in [0, 2^23) for any |z| < 2^22, so even out-of-contract zero points decode exactly.
    if HAS_ZP:
        w_lo = _int_to_f32(u_lo - z_lo + 4194304, 4194312)
        w_hi = _int_to_f32(u_hi - z_hi + 4194304, 4194312)
    else:
        w_lo = _int_to_f32(u_lo, 8)
        w_hi = _int_to_f32(u_hi, 8)
    # NUMERICS.md: W_hat = s * (W_int - z) in fp32, cast to the compute dtype last.
    v_lo = (s_lo * w_lo).to(w_ptr.dtype.element_ty)
    v_hi = (s_hi * w_hi).to(w_ptr.dtype.element_ty)
    w = tl.reshape(tl.join(v_lo, v_hi), (BLOCK_N, BLOCK_K))  # [n, j, 0/1] -> column 2j / 2j + 1
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rows64 * stride_wn + cols[None, :], w, mask=mask_n[:, None] & (cols < K)[None, :])


# ---- launchers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int4TritonConfig:
    """Tile shape and launch parameters of :func:`int4_linear_triton`."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    #: compute ``y^T = W x^T`` (weights as the MMA's A operand; see the module docstring)
    swap_ab: bool = False
    #: decode nibbles with inline PTX, 2 weights per instruction (NVIDIA only; elsewhere ignored).
    #: Opt-in: never chosen by the heuristics, only by an explicit config.
    fast_decode: bool = False


def _block_k(in_features: int, group_size: int | None, widest: int) -> int:
    """Largest of ``widest`` / 64 / 32 that divides the group (so a K tile has one scale)."""
    if group_size is None or group_size >= in_features:
        return widest
    for bk in (128, 64, 32):
        if bk <= widest and group_size % bk == 0:
            return bk
    raise ValueError(
        f"the Triton W4A16 kernel needs group_size to be a multiple of 32, got {group_size}; "
        "use backend='dequant' for such layers"
    )


_NOMINAL_SMS = 132  # H100 SXM: configs for a GPU can be computed (and AOT-compiled) without one


@functools.lru_cache(maxsize=None)
def _gpu_facts(index: int) -> tuple[int, str]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.name


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return _gpu_facts(device.index if device.index is not None else torch.cuda.current_device())[0]
    return _NOMINAL_SMS


def gpu_name(device: torch.device) -> str | None:
    """The CUDA device's name (cached), None without CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _gpu_facts(device.index if device.index is not None else torch.cuda.current_device())[1]


def int4_triton_config(M: int, N: int, K: int, group_size: int | None, device: torch.device | str = "cuda",
                       split_k: int | None = None, *, sms: int | None = None, device_name=None,
                       tuned=None) -> Int4TritonConfig:
    """The launch configuration :func:`int4_linear_triton` uses (tests compile exactly these).

    Heuristics (no measured per-GPU table ships; ``bench/tune_int4_gemm.py`` measures the
    alternatives on a GPU):

    * ``BLOCK_M`` = 16 / 32 / 64 by M (the tensor-core minimum is 16; small M wastes rows but is
      memory bound anyway), ``BLOCK_N`` = 64 for M <= 64 (more N tiles to spread the weight
      stream over SMs), 128 above.
    * ``BLOCK_K`` = 128 at M <= 32 (a K tile = 64 packed bytes per weight row: 16-byte vector
      loads, few loop trips), 64 above (register pressure of the bigger x tile), capped by the
      largest of 64 / 32 dividing ``group_size``.
    * ``split_k``: when there are fewer than 4 M x N tiles per SM, split K so that about 4
      programs (16 warps, ~48 KiB of weight loads in flight) run per SM, at most 16 splits and
      never more than K tiles. Provisional (unmeasured): tune on a GPU.
    * ``num_stages`` 4 (cp.async pipelining of the weight loads).

    Args:
        device: where the kernel runs (a CUDA device's SM count feeds the choice).
        split_k: force the number of K splits.
        sms: SM count to plan for (default: the device's, or 132 = H100 SXM without a GPU).
        device_name, tuned: deprecated, ignored (they selected tuning tables, which the package
            no longer reads); removed in the next release.
    """
    if device_name is not None or tuned is not None:
        warnings.warn("int4_triton_config(device_name=, tuned=) are deprecated and ignored (the package reads no "
                      "tuning tables); they will be removed in the next release", DeprecationWarning, stacklevel=2)
    device = device if isinstance(device, torch.device) else torch.device(device)
    interp = interpreting()
    if sms is None:
        sms = _num_sms(device)
    # Cached: a decode step asks the same question once per layer.
    return _config(M, N, K, group_size, device.type, split_k, sms, interp)


@functools.lru_cache(maxsize=16384)
def _config(M, N, K, group_size, device_type, split_k, sms, interp) -> Int4TritonConfig:
    bm, bn, bk_max, num_warps, num_stages = heuristic_tiles(M)
    return _finish(M, N, K, bm, bn, _block_k(K, group_size, bk_max), num_warps, num_stages, split_k, device_type,
                   sms, interp)


def heuristic_tiles(M: int) -> tuple[int, int, int, int, int]:
    """The built-in tiles: (BLOCK_M, BLOCK_N, widest BLOCK_K, num_warps, num_stages); ptxas -v on
    sm_80 / sm_90 with the JIT's usual 16-divisibility specialisation: <= 255 registers and no
    spills for every variant (tests/test_int4_triton.py compiles each)."""
    if M <= 16:
        return 16, 64, 128, 4, 4
    if M <= 32:
        return 32, 64, 128, 4, 4
    if M <= 64:
        return 64, 64, 64, 8, 4
    return 64, 128, 64, 8, 4


def _finish(M, N, K, bm, bn, bk, num_warps, num_stages, split_k, device_type, sms, interp,
            swap_ab=False, fast_decode=False) -> Int4TritonConfig:
    """Fill in split-K (the fill-the-GPU rule unless given) and clamp it to the K tiles."""
    k_tiles = triton.cdiv(K, bk)
    if split_k is None:
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        split_k = 1
        if tiles < 4 * sms and not (device_type == "cpu" and interp):
            split_k = min(-(-4 * sms // tiles), 16)
    split_k = max(1, min(int(split_k), k_tiles))
    return Int4TritonConfig(bm, bn, bk, split_k, num_warps, num_stages, bool(swap_ab), bool(fast_decode))


_COUNTERS: collections.OrderedDict = collections.OrderedDict()
_COUNTERS_MAX = 64  # (device, stream) buffers kept, least recently used dropped beyond


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 split-K arrival counters (at least ``n``).

    Eager: one cached buffer per (device, stream). Kernels on one stream run in order and the
    reducing program zeroes its counter again, so the buffer is all zero whenever a launch starts
    (a buffer outgrown on a stream is freed stream-ordered, after the kernels that used it; so is
    one dropped when more than ``_COUNTERS_MAX`` streams have been seen, and that stream's next
    launch gets a fresh zeroed buffer).
    CUDA-graph capture: a fresh buffer per call, zeroed by a memset node of that graph. A cached
    buffer would be unsafe there: one created during a capture is only zeroed when that graph is
    replayed (another graph or an eager call could use it first), and a graph would keep using a
    cached buffer after it is outgrown and freed. Graphs replayed concurrently never share one."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    _COUNTERS.move_to_end(key)
    while len(_COUNTERS) > _COUNTERS_MAX:  # streams come and go (a server's per-request streams)
        _COUNTERS.popitem(last=False)
    return buf


def int4_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
    config: Int4TritonConfig | None = None,
) -> torch.Tensor:
    """``x @ (scale * (W_int - zero_point))^T + bias`` with the Triton W4A16 kernel.

    Args:
        x: fp16 / bf16 ``[..., K]``.
        qweight: uint8 ``[N, K / 2]``, standard nibble layout (formats.py).
        scale: float ``[N, 1]`` per-channel or ``[N, K / group_size]`` (any float dtype; used in fp32).
        zero_point: None (symmetric) or integer-valued ``[N, G]``, values in [-8, 7].
        group_size: None (per-channel) or a multiple of 32 dividing K.
        bias: None or ``[N]`` (added in fp32).
        split_k: force the number of K splits (default: :func:`int4_triton_config`'s choice).
        config: force the whole launch configuration.

    Returns:
        ``[..., N]`` in x's dtype (fp32 accumulation).

    Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
    """
    N, K, g = check_int4_linear_args(x, qweight, scale, zero_point, group_size, bias)
    if K % 2:
        raise ValueError(f"K must be even, got {K}")
    if not x.is_cuda and not interpreting():
        raise ValueError(f"int4_linear_triton needs CUDA tensors (or TRITON_INTERPRET=1 for the Triton interpreter on "
                         f"CPU), got x on {x.device}; lrqat_kernels.int4_linear serves CPU tensors")
    per_channel = g == K
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return x.new_empty((*lead, N))
    cfg = config or int4_triton_config(M, N, K, None if per_channel else g, x.device, split_k)
    if not per_channel and g % cfg.block_k:
        raise ValueError(f"config.block_k={cfg.block_k} must divide group_size={g}")
    qw = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()  # the kernel reads bias[n] at b_ptr + n
    s = scale if scale.stride(-1) == 1 else scale.contiguous()
    z = zero_point_as_int(zero_point)
    if z is not None and z.stride(-1) != 1:
        z = z.contiguous()
    k_tiles = triton.cdiv(K, cfg.block_k)
    split = max(1, min(cfg.split_k, k_tiles))
    if x.is_cuda and torch.version.hip is not None:
        # The in-launch split-K reduction's ordering (fence + barrier + one thread's acq_rel
        # atomic) is argued for NVIDIA's memory model only; ROCm runs unsplit until tested there.
        split = 1
    k_tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, k_tiles_per_split)  # no empty split
    ptx = x.is_cuda and torch.version.hip is None and not interpreting()  # inline PTX allowed
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    with on_device(x2):  # x's device current: the capture check and the buffers follow its stream
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        if split > 1:
            ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
            counters = _split_counters(x.device, triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n))
        else:
            ws = counters = y  # unused
        _int4_w4a16_kernel[grid](
            x2, qw, s, z if z is not None else s, bias if bias is not None else s, y, ws, counters,
            M, N, K,
            x2.stride(0), qw.stride(0), s.stride(0), z.stride(0) if z is not None else 0, N, M * N,
            g, k_tiles_per_split,
            HAS_ZP=z is not None,
            HAS_BIAS=bias is not None,
            PER_CHANNEL=per_channel,
            SPLIT_K=split > 1,
            PTX=ptx,
            FAST_DECODE=cfg.fast_decode and ptx and x.dtype in (torch.float16, torch.bfloat16),
            DOT_F32=not x.is_cuda,
            SWAP_AB=cfg.swap_ab,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return y.reshape(*lead, N)


def dequant_config(K: int, group_size: int) -> tuple[int, int, bool]:
    """``(BLOCK_N, BLOCK_K, ONE_GROUP)`` of :func:`int4_dequant_triton`: tiles of 8192 weights (64
    a thread at 4 warps), 32 x 256, with ``BLOCK_K`` narrowed to the largest of 128 / 64 / 32 that
    divides the group (taller tiles then) so that a tile has one scale per row; per-column scales
    for other groups."""
    if group_size >= K:
        return 32, 256, True
    for bk in (256, 128, 64, 32):
        if group_size % bk == 0:
            return 8192 // bk, bk, True
    return 32, 256, False


def int4_dequant_triton(
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    group_size: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W_hat = scale * (W_int - zero_point)`` (fp32, cast to ``dtype`` last) in one pass.

    Args:
        qweight: uint8 ``[N, K / 2]`` (formats.py layout); scale / zero_point ``[N, G]``.
        group_size: None (per-channel) or a divisor of K.
        dtype: output dtype (fp16 / bf16 / fp32).
        out: None, or a ``[N, K]`` tensor of ``dtype`` on qweight's device with unit column
            stride (e.g. the first N rows of a reused buffer) to write into.

    Returns:
        ``[N, K]`` in ``dtype`` (``out`` when given).
    """
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    g = K if group_size is None else group_size
    if tuple(scale.shape) != (N, K // g) or K % g:
        raise ValueError(f"scale must be [N, K // group_size] = [{N}, {K // g}], got {tuple(scale.shape)}")
    if out is not None and (tuple(out.shape) != (N, K) or out.dtype != dtype or out.device != qweight.device
                            or (N > 1 and K > 1 and out.stride(1) != 1)):
        raise ValueError(f"out must be a [{N}, {K}] {dtype} tensor on {qweight.device} with unit column stride, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}")
    qw = qweight.contiguous()
    s = scale.contiguous()
    z = zero_point_as_int(zero_point)
    z = z.contiguous() if z is not None else None
    interp_bf16 = dtype == torch.bfloat16 and not qweight.is_cuda
    if out is not None and not interp_bf16:
        w = out
    else:
        w = torch.empty((N, K), dtype=torch.float32 if interp_bf16 else dtype, device=qweight.device)
    if N and K:
        bn, bk, one_group = dequant_config(K, g)
        grid = (triton.cdiv(N, bn), triton.cdiv(K, bk))
        with on_device(qw):
            _int4_dequant_kernel[grid](
                qw, s, z if z is not None else s, w, N, K,
                qw.stride(0), s.stride(0), z.stride(0) if z is not None else 0, w.stride(0),
                g, HAS_ZP=z is not None, ONE_GROUP=one_group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
            )
    if out is not None:
        return out.copy_(w) if w is not out else out
    return w.to(dtype)
