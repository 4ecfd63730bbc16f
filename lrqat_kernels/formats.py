"""Storage formats for the frozen base ``Phi0`` and for deployed integer weights.

This module is the single source of truth for the integer grid, the fixed-point code and the
nibble order (``docs/NUMERICS.md``). Every other path (reference, Triton, C++/CUDA)
imports these rules or is tested against them.

Formats of ``Phi0 = phi(W0 / s0 + z)`` (``[out, in]`` logical shape):

============== ============== ======================= =========================================
phi_format      stored dtype   stored shape            bytes per weight
============== ============== ======================= =========================================
``packed_int``  uint8          ``[out, in // 2]``      0.5  (INT-b, b <= 4, two nibbles a byte)
``fixed_point`` int8           ``[out, in]``           1    (Q b.(8-b), b in 2..7)
``bf16``        bfloat16       ``[out, in]``           2
``fp16``        float16        ``[out, in]``           2
``fp32``        float32        ``[out, in]``           4
============== ============== ======================= =========================================

Nibble layout (ours; the authors never released a packed variant): column ``2j`` of a row is
the low nibble of byte ``j``, column ``2j + 1`` the high nibble; each nibble is a 4-bit two's
complement integer (``-8..7``), so any INT-b with ``b <= 4`` fits.
"""

from __future__ import annotations

import torch

PHI_FORMATS = ("packed_int", "fixed_point", "bf16", "fp16", "fp32")

#: Stored dtype of each ``phi_format``.
PHI_DTYPES = {
    "packed_int": torch.uint8,
    "fixed_point": torch.int8,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

#: Bytes of storage per logical weight of each ``phi_format``.
BYTES_PER_WEIGHT = {
    "packed_int": 0.5,
    "fixed_point": 1.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp32": 4.0,
}

#: Allowed bit widths per ``phi_format``.
BITS_ALLOWED = {
    "packed_int": range(2, 5),
    "fixed_point": range(2, 8),
    "bf16": range(2, 9),
    "fp16": range(2, 9),
    "fp32": range(2, 9),
}


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer grid of ``bits`` bits: ``(qmin, qmax) = (-2^(b-1), 2^(b-1) - 1)``."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_phi_format(phi_format: str) -> None:
    if phi_format not in PHI_FORMATS:
        raise ValueError(f"phi_format must be one of {PHI_FORMATS}, got {phi_format!r}")


def check_bits(bits: int, phi_format: str | None = None) -> None:
    """Raise unless ``bits`` is an int allowed for ``phi_format`` (2..8 when no format is given)."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    allowed = range(2, 9) if phi_format is None else BITS_ALLOWED[phi_format]
    if bits not in allowed:
        where = "" if phi_format is None else f" for phi_format={phi_format!r}"
        raise ValueError(f"bits must be in {allowed.start}..{allowed.stop - 1}{where}, got {bits}")


def fixed_point_frac_bits(bits: int) -> int:
    """Number of fractional bits of the Q b.(8-b) code (4 for Q4.4)."""
    return 8 - bits


def _native_nibble_op(name: str, device_type: str = "cpu"):
    """``torch.ops.lrqat.<name>`` (``csrc/nibble/``) when the extension is loaded and has a kernel
    for ``device_type`` (a CPU-only build has none for CUDA), else None.

    ``_ext`` is imported here, not at the top: this module stays a leaf of the package."""
    from . import _ext

    if not _ext.load_extension():
        return None
    if device_type != "cpu":
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lrqat::{name}", device_type.upper()):
                return None
        except RuntimeError:  # private API, or the op is missing from this build
            return None
    return getattr(torch.ops.lrqat, name)


def _native_layout(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the native nibble ops take ``t`` as it is: 2-D, contiguous, ``dtype``, CPU or CUDA."""
    return t.dtype == dtype and t.dim() == 2 and t.is_contiguous() and t.device.type in ("cpu", "cuda")


def pack_nibbles(w_int: torch.Tensor) -> torch.Tensor:
    """Pack a 4-bit signed integer matrix two values per byte.

    2-D contiguous int8 CPU / CUDA input runs the native op ``torch.ops.lrqat.pack_nibbles`` when
    the extension is built (same bytes; ``tests/test_ext.py::test_formats_route_to_native_nibble_ops``),
    anything else the PyTorch code below. The arguments are checked here either way.

    Args:
        w_int: integer tensor ``[..., in]`` (any integer dtype) with values in ``[-8, 7]``;
            ``in`` must be even.

    Returns:
        uint8 ``[..., in // 2]``: byte ``j`` holds column ``2j`` in its low nibble and column
        ``2j + 1`` in its high nibble (two's complement).
    """
    if not isinstance(w_int, torch.Tensor):
        raise TypeError(f"w_int must be a torch.Tensor, got {type(w_int).__name__}")
    if w_int.is_floating_point() or w_int.is_complex() or w_int.dtype == torch.bool:
        raise TypeError(f"w_int must have an integer dtype, got {w_int.dtype}")
    if w_int.dim() < 1 or w_int.shape[-1] % 2 != 0:
        raise ValueError(f"w_int's last dimension (in) must be even for nibble packing, got shape {tuple(w_int.shape)}")
    if w_int.is_meta:
        raise ValueError("w_int is on the meta device: pack_nibbles checks values, it needs a real tensor")
    if w_int.numel() and (int(w_int.min()) < -8 or int(w_int.max()) > 7):
        raise ValueError("w_int values must be in [-8, 7] to fit a signed nibble")
    if _native_layout(w_int, torch.int8):
        op = _native_nibble_op("pack_nibbles", w_int.device.type)
        if op is not None:
            return op(w_int)
    return _pack_nibbles_torch(w_int)


def _pack_nibbles_torch(w_int: torch.Tensor) -> torch.Tensor:
    """:func:`pack_nibbles` in PyTorch (the layout's definition; arguments already checked)."""
    w = w_int.to(torch.int16) & 0xF
    return (w[..., 0::2] | (w[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles` (2-D contiguous CPU / CUDA input: the native op
    ``torch.ops.lrqat.unpack_nibbles`` when the extension is built).

    Args:
        packed: uint8 ``[..., in // 2]``.

    Returns:
        int8 ``[..., in]`` with values in ``[-8, 7]``.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if _native_layout(packed, torch.uint8):
        op = _native_nibble_op("unpack_nibbles", packed.device.type)
        if op is not None:
            return op(packed)
    return _unpack_nibbles_torch(packed)


def _unpack_nibbles_torch(packed: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_nibbles` in PyTorch (the layout's definition; arguments already checked)."""
    p = packed.to(torch.int16)
    lo = p & 0xF
    hi = p >> 4
    # Sign-extend a 4-bit two's complement value: v - 16 when v >= 8.
    lo = lo - ((lo & 0x8) << 1)
    hi = hi - ((hi & 0x8) << 1)
    return torch.stack((lo, hi), dim=-1).flatten(-2).to(torch.int8)


def encode_phi(x: torch.Tensor, bits: int, phi_format: str) -> torch.Tensor:
    """Downcast ``x = W0 / s0 + z`` (grid units) to the stored ``Phi0``.

    Args:
        x: float tensor ``[out, in]`` (computed in fp32; cast to fp32 first).
        bits: weight bit width, allowed range depends on ``phi_format``.
        phi_format: one of :data:`PHI_FORMATS`.

    Returns:
        The stored tensor (see the table in the module docstring).
    """
    check_phi_format(phi_format)
    check_bits(bits, phi_format)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.is_meta:
        raise ValueError("x is on the meta device: encode_phi rounds values, it needs a real tensor")
    x = x.float()
    if phi_format in ("bf16", "fp16", "fp32"):
        return x.to(PHI_DTYPES[phi_format])
    qmin, qmax = qrange(bits)
    if phi_format == "fixed_point":
        f = fixed_point_frac_bits(bits)
        return torch.round(x.clamp(qmin, qmax) * (1 << f)).to(torch.int8)
    # packed_int
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"in (last dimension of x) must be even for phi_format='packed_int', got shape {tuple(x.shape)}")
    return pack_nibbles(torch.round(x).clamp(qmin, qmax).to(torch.int8))


def decode_phi(phi: torch.Tensor, bits: int, phi_format: str) -> torch.Tensor:
    """Upcast a stored ``Phi0`` to fp32 grid units (exact for every format).

    Args:
        phi: stored tensor, dtype and shape per ``phi_format`` (module docstring).
        bits: weight bit width.
        phi_format: one of :data:`PHI_FORMATS`.

    Returns:
        float32 ``[out, in]``.
    """
    check_phi_format(phi_format)
    check_bits(bits, phi_format)
    check_phi_dtype(phi, phi_format)
    if phi_format == "packed_int":
        return unpack_nibbles(phi).float()
    if phi_format == "fixed_point":
        return phi.float() / float(1 << fixed_point_frac_bits(bits))
    return phi.float()


def check_phi_dtype(phi: torch.Tensor, phi_format: str) -> None:
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"phi must be a torch.Tensor, got {type(phi).__name__}")
    want = PHI_DTYPES[phi_format]
    if phi.dtype != want:
        raise TypeError(f"phi must be {want} for phi_format={phi_format!r}, got {phi.dtype}")


def phi_in_features(phi: torch.Tensor, phi_format: str) -> int:
    """Logical ``in`` of a stored Phi0 (packed_int stores two columns per byte)."""
    return phi.shape[-1] * 2 if phi_format == "packed_int" else phi.shape[-1]
