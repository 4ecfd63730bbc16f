"""Native signed 4-bit packing: ``torch.ops.lrqat.pack_nibbles`` / ``unpack_nibbles``.

The C++/CUDA kernels live in ``csrc/nibble/``, the schemas in ``csrc/registration.cpp``; this
module holds their Python wrappers and fake (meta) impls. The layout is the ``packed_int`` one
of NUMERICS.md: byte ``j`` of a row holds column ``2j`` in its low nibble and column ``2j + 1`` in
its high nibble, two's complement. :func:`lrqat_kernels.formats.pack_nibbles` / ``unpack_nibbles``
call these ops for 2-D contiguous int8 / uint8 CPU and CUDA tensors when the extension is built,
and their PyTorch definition otherwise (``tests/test_ext.py`` holds both to the same bytes).

The native ops are stricter than the ``formats`` functions: exactly 2-D, int8 / uint8,
contiguous. On CPU ``pack_nibbles`` also checks that values lie in ``[-8, 7]``; on CUDA it does
not (that would need a device-to-host sync) and an out-of-range value keeps its low 4 bits.
"""

from __future__ import annotations

import torch

from .. import _ext

__all__ = ["pack_nibbles_native", "unpack_nibbles_native"]


def pack_nibbles_native(w_int: torch.Tensor) -> torch.Tensor:
    """Pack an int4 weight matrix two values per byte with the native kernel.

    Args:
        w_int: int8 ``[out, in]``, contiguous, values in ``[-8, 7]``, ``in`` even; CPU or CUDA.

    Returns:
        uint8 ``[out, in // 2]`` on the same device: byte ``j`` = column ``2j`` (low nibble)
        | column ``2j + 1`` (high nibble).

    Raises:
        RuntimeError: if ``lrqat_kernels._C`` is not built, or on invalid input.
    """
    _ext.require_extension("pack_nibbles")
    return torch.ops.lrqat.pack_nibbles(w_int)


def unpack_nibbles_native(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles_native`: sign-extend each nibble back to int8.

    Args:
        packed: uint8 ``[out, in // 2]``, contiguous; CPU or CUDA.

    Returns:
        int8 ``[out, in]`` with values in ``[-8, 7]``, on the same device.

    Raises:
        RuntimeError: if ``lrqat_kernels._C`` is not built, or on invalid input.
    """
    _ext.require_extension("unpack_nibbles")
    return torch.ops.lrqat.unpack_nibbles(packed)


# ---- fake impls -------------------------------------------------------------------------
# They only exist once _C has defined the ops. Messages mirror csrc/nibble/nibble_checks.h so
# eager and traced calls fail alike (value ranges can't be checked on fake tensors).


def _check(cond, msg) -> None:
    torch._check(cond, lambda: msg)


def _check_2d_contiguous(op: str, arg: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    _check(t.dtype == dtype, f"lrqat::{op}: {arg} must be {dtype}, got {t.dtype}")
    _check(t.dim() == 2, f"lrqat::{op}: {arg} must be 2-D, got shape {list(t.shape)}")
    if op == "pack_nibbles":
        _check(
            t.shape[1] % 2 == 0,
            f"lrqat::pack_nibbles: w_int's in dimension must be even (two nibbles per byte), got shape {list(t.shape)}",
        )
    _check(t.is_contiguous(), f"lrqat::{op}: {arg} must be contiguous (call .contiguous() first)")


def _pack_nibbles_fake(w_int: torch.Tensor) -> torch.Tensor:
    _check_2d_contiguous("pack_nibbles", "w_int", w_int, torch.int8)
    return w_int.new_empty((w_int.shape[0], w_int.shape[1] // 2), dtype=torch.uint8)


def _unpack_nibbles_fake(packed: torch.Tensor) -> torch.Tensor:
    _check_2d_contiguous("unpack_nibbles", "packed", packed, torch.uint8)
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=torch.int8)


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    # register_fake checks that this module is the one named by m.set_python_module(...).
    torch.library.register_fake("lrqat::pack_nibbles", _pack_nibbles_fake)
    torch.library.register_fake("lrqat::unpack_nibbles", _unpack_nibbles_fake)
    _fakes_registered = True


if _ext.load_extension():
    _register_fakes()
