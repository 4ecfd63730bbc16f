"""Triton quantiser helpers shared by every kernel: one rule each (docs/NUMERICS.md).

=========================== ====================================================================
``round_half_even``         ``torch.round`` on fp32 by the ``1.5 * 2^23`` trick (:data:`RNE_MAGIC`)
``round_clip``              ``(W_int, M)``: ``clip(round(z), qmin, qmax)`` and the inclusive mask
``center`` / ``dequant``    ``W_int - z`` / ``s * (W_int - z)`` in fp32
``int_to_f32``              exact int32 -> fp32 without an I2F instruction
``nibble_code[s]``          packed_int bytes -> offset-binary codes ``W_int + 8`` (the one nibble rule)
``decode_phi``              a Phi0 tile in fp32 grid units, every ``phi_format``
``cast`` / ``to_bf16_rne``  fp32 -> compute dtype, IEEE round-to-nearest-even on every backend
``dot``                     ``acc + a @ b`` with fp32 accumulation (IEEE where asked)
``l4q_v`` / ``l4q_mask``    L4Q's ``v = (Z - b) / s`` (IEEE division) and its inclusive mask on ``v``
``l4q_dequant``             L4Q's ``W_q = s * W_int + b`` in fp32 (two roundings, as the eager layer)
``and_scalar``              a block mask AND a scalar condition, as a select
=========================== ====================================================================

Kernels (``fake_quant.py``, ``fused_linear.py``, ``act_quant.py``, ``int4_triton.py``) import these
instead of repeating them, so a new quantiser mode (L4Q's scale inside the rounding, PE-QAT,
pQuant) is a new helper plus a constexpr switch. Host side: :data:`PHI_KIND` and
:func:`phi_constexprs`, the constexprs :func:`decode_phi` and :func:`round_clip` take.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..formats import fixed_point_frac_bits, qrange

__all__ = [
    "PHI_KIND",
    "RNE_LIMIT",
    "RNE_MAGIC",
    "and_scalar",
    "cast",
    "center",
    "decode_phi",
    "dequant",
    "dot",
    "int_to_f32",
    "l4q_dequant",
    "l4q_mask",
    "l4q_v",
    "nibble_code",
    "nibble_codes",
    "phi_constexprs",
    "round_clip",
    "round_half_even",
    "to_bf16_rne",
]

#: ``phi_format`` -> the kernels' ``PHI_KIND`` constexpr.
PHI_KIND = {"packed_int": 0, "fixed_point": 1, "bf16": 2, "fp16": 2, "fp32": 2}

#: 1.5 * 2^23: adding and subtracting it rounds an fp32 ``|x| < 2^22`` to the nearest integer, ties
#: to even, in the default rounding mode (the sum lands in ``[2^23, 2^24)``, where the ulp is 1).
RNE_MAGIC = tl.constexpr(12582912.0)
#: 2^22: :func:`round_half_even` passes larger magnitudes through (far outside any grid, ``|q| <= 128``).
RNE_LIMIT = tl.constexpr(4194304.0)


def phi_constexprs(bits: int, phi_format: str, group_size: int, gpt: int) -> dict:
    """The quantiser constexprs every kernel takes: ``PHI_KIND``, ``PHI_MUL``, ``PACKED_PAIRS``,
    ``QMIN``, ``QMAX`` (``gpt``: groups a column tile, see ``_tiles.column_tiling``)."""
    qmin, qmax = qrange(bits)
    phi_mul = 1.0 / (1 << fixed_point_frac_bits(bits)) if phi_format == "fixed_point" else 1.0
    # Tiles start on even columns unless one-group-a-tile with an odd group size.
    pairs = gpt > 1 or group_size % 2 == 0
    return dict(PHI_KIND=PHI_KIND[phi_format], PHI_MUL=phi_mul, PACKED_PAIRS=pairs, QMIN=qmin, QMAX=qmax)


@triton.jit
def int_to_f32(u, OFFSET: tl.constexpr):
    """``u - OFFSET`` as fp32 for int32 ``u`` in ``[0, 2^23)``, exactly: OR-ing ``u`` into the
    mantissa of 2^23 (ulp 1) gives ``2^23 + u``, one FADD removes the offsets. Replaces an
    int -> float conversion (I2F: 16 a clock per SM on sm_80 / sm_90, an eighth of the FP32 rate)."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def nibble_code(byte, shift):
    """The 4-bit two's-complement value at bit ``shift`` (0: low nibble, 4: high) of integer bytes,
    as its offset-binary code ``W_int + 8`` in ``0..15`` (``nibble ^ 8``), in ``byte``'s dtype.

    The packed_int layout (NUMERICS.md, ``formats.pack_nibbles``): byte ``j`` of a row holds column
    ``2j`` in its low nibble and ``2j + 1`` in its high one."""
    return ((byte >> shift) & 15) ^ 8


@triton.jit
def nibble_codes(byte):
    """``(low, high)`` offset-binary codes of packed bytes (:func:`nibble_code` at 0 and 4)."""
    return nibble_code(byte, 0), nibble_code(byte, 4)


@triton.jit
def decode_phi(phi_ptr, row_off, rmask, cols, cmask, col0, n_valid,
               PHI_KIND: tl.constexpr, PHI_MUL: tl.constexpr, PACKED_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Phi0 tile ``[BM, BN]`` in fp32 grid units (exact for every format).

    ``row_off``: ``[BM, 1]`` element (packed: byte) offsets of the rows; ``cols``/``cmask``:
    ``[BN]``; ``col0``/``n_valid``: the tile's first column and how many of its columns exist.
    """
    mask = rmask[:, None] & cmask[None, :]
    if PHI_KIND == 0:
        if PACKED_PAIRS:
            # Tile starts on an even column: load BN/2 whole bytes (vectorised, 0.5 B a weight)
            # and interleave the two nibbles back into column order.
            HALF: tl.constexpr = BLOCK_N // 2
            jj = tl.arange(0, HALF)
            pmask = rmask[:, None] & (jj < n_valid // 2)[None, :]
            byte = tl.load(phi_ptr + row_off + (col0 // 2 + jj)[None, :], mask=pmask, other=0).to(tl.int32)
            u_lo, u_hi = nibble_codes(byte)
            lo = int_to_f32(u_lo, 8)
            hi = int_to_f32(u_hi, 8)
            return tl.reshape(tl.join(lo, hi), (lo.shape[0], BLOCK_N))
        else:
            # Odd group size: a tile may start on a high nibble; two lanes share a byte (L1
            # merges them, HBM still sees 0.5 byte a weight).
            byte = tl.load(phi_ptr + row_off + (cols >> 1)[None, :], mask=mask, other=0).to(tl.int32)
            return int_to_f32(nibble_code(byte, ((cols & 1) * 4)[None, :]), 8)
    elif PHI_KIND == 1:
        # fixed_point Q b.(8-b): code / 2^(8-b), a power of two, so the product is exact.
        code = tl.load(phi_ptr + row_off + cols[None, :], mask=mask, other=0)
        return int_to_f32(code.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80, 128) * PHI_MUL
    else:
        return tl.load(phi_ptr + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def round_half_even(z):
    """``torch.round`` on fp32: exact for ``|z| < 2^22``; larger ``|z|``, +-inf and NaN pass through.

    Passing through is exact enough: beyond 2^22 every value clips to the grid's end and lies
    outside the mask, whatever its rounding. A result of zero is +0.0 where ``torch.round`` gives -0.0 (equal as
    numbers; tests/test_fake_quant.py::test_shared_quantiser_helpers). Two FADDs, no libdevice (portable to the interpreter); kernels run
    with ``enable_fp_fusion=False`` so nothing contracts them.
    """
    return tl.where(tl.abs(z) < RNE_LIMIT, (z + RNE_MAGIC) - RNE_MAGIC, z)


@triton.jit
def round_clip(z, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """``(W_int, M)``: ``clip(round(z), qmin, qmax)`` (NaN stays NaN) and the inclusive mask."""
    q = round_half_even(z)
    inside = (q >= QMIN) & (q <= QMAX)  # False for NaN, as in the reference
    w_int = tl.where(q < QMIN, QMIN, tl.where(q > QMAX, QMAX, q))
    return w_int, inside


@triton.jit
def center(w_int, zp, HAS_ZP: tl.constexpr):
    """``W_int - z`` (exact: small integers in fp32)."""
    if HAS_ZP:
        return w_int - zp
    else:
        return w_int


@triton.jit
def dequant(w_int, s, zp, HAS_ZP: tl.constexpr):
    """``W_hat = s * (W_int - z)`` in fp32 (one rounding, as the reference)."""
    return s * center(w_int, zp, HAS_ZP)


@triton.jit
def l4q_v(z, s, b):
    """L4Q's ``v = (Z - b) / s`` in fp32 with IEEE round-to-nearest division (``div_rn``: Triton's
    ``/`` on fp32 is the approximate ``div.full.f32`` on GPUs), as ``l4q._quantise`` divides
    (tests/test_l4q_kernels.py::test_forward_matches_eager_and_oracle)."""
    return tl.math.div_rn(z - b, s)


@triton.jit
def l4q_mask(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """L4Q's straight-through mask ``qmin <= v <= qmax`` on ``v`` before rounding (inclusive; False
    for NaN). LR-QAT's mask (:func:`round_clip`) is on ``round(Z)``."""
    return (v >= QMIN) & (v <= QMAX)


@triton.jit
def l4q_dequant(w_int, s, b):
    """L4Q's ``W_q = s * W_int + b`` in fp32: a product and a sum, each rounded (no FMA: the
    kernels run with ``enable_fp_fusion=False``), so the merged ``s * W_int + b`` equals it bit for bit."""
    return s * w_int + b


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, from integer ops (the interpreter's cast truncates)."""
    u = x.to(tl.uint32, bitcast=True)
    r = u + 0x7FFF + ((u >> 16) & 1)
    r = tl.where(x != x, u | 0x400000, r)  # NaN stays a (quiet) NaN
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast fp32 ``x`` to ``DTYPE`` with IEEE round-to-nearest-even on every backend."""
    if INTERPRET and DTYPE == tl.bfloat16:
        return to_bf16_rne(x)
    else:
        return x.to(DTYPE)


@triton.jit
def dot(a, b, acc, DOT_FP32: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``DOT_FP32``: widen the operands to fp32 and use an IEEE dot (fp32 factors: never TF32;
    the interpreter: its 16-bit arithmetic is not IEEE). Otherwise 16-bit operands go to the
    tensor cores with fp32 accumulation; products of 16-bit values are exact in fp32 either way.
    """
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def and_scalar(mask, cond):
    """``mask & cond`` for a block ``mask`` and a scalar ``cond`` (a comparison of scalars), as a select.

    Rule: a scalar condition never meets a block mask through ``&`` / ``|``. Triton's interpreter
    keeps a scalar comparison as int32 data and broadcasts it as int32, so ``mask & cond`` is an
    int32 block; Triton 3.9's interpreter rejects an int32 load/store mask ("mask has unsupported
    dtype"). ``tl.where`` keeps the bool dtype of ``mask`` (on a GPU either is one predicate op).
    Held by tests/test_fake_quant.py under Triton 3.9 (scripts/test_triton_range.sh).
    """
    return tl.where(cond, mask, False)
