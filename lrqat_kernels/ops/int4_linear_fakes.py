"""Fake (meta) impls of the int4_cpu op family, so ``torch.compile`` can trace them.

``torch.ops.lrqat.int4_linear``, ``int4_prepack_cpu`` and ``int4_linear_prepacked_cpu`` (schemas in
``csrc/registration.cpp``, CPU kernels in ``csrc/int4_cpu/``, Python wrappers in
:mod:`lrqat_kernels.ops.int4_cpu`, dispatcher :mod:`lrqat_kernels.ops.int4_linear`). This module is
the one ``m.set_python_module`` names for them, and ``lrqat_kernels._ext`` imports it right after
loading ``_C`` (torch can only register a fake once the op is defined, and checks that the
registering module is the named one).
"""

from __future__ import annotations

import torch

from .. import _ext

_PANEL = 64
_KBLOCK = 8

# The checks mirror csrc/int4_cpu/int4_cpu.cpp, so eager and traced calls fail alike on shapes
# and dtypes (values, e.g. zero points in [-8, 7], can't be checked on fake tensors).

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _check(cond, msg) -> None:
    torch._check(cond, lambda: msg)


def _groups_fake(op: str, K, group_size: int):
    if group_size == -1 or group_size == K:
        return 1
    _check(group_size > 0, f"lrqat::{op}: group_size must be positive, or -1 for per-channel scales, got {group_size}")
    _check(K % group_size == 0, f"lrqat::{op}: group_size ({group_size}) must divide in_features K ({K})")
    _check(group_size % 8 == 0, f"lrqat::{op}: group_size must be a multiple of 8 (or -1 / K for per-channel scales), got {group_size}")
    return K // group_size


def _check_x_fake(op: str, x: torch.Tensor) -> None:
    _check(x.dtype in _FLOAT, f"lrqat::{op}: x must be torch.float32, torch.bfloat16 or torch.float16, got {x.dtype}")
    _check(x.dim() == 2, f"lrqat::{op}: x must be 2-D [M, K] (flatten leading dims first), got shape {list(x.shape)}")
    _check(x.shape[1] % 2 == 0, f"lrqat::{op}: in_features K = x.size(1) must be even (two nibbles per byte), got {x.shape[1]}")


def _check_standard_fake(op: str, qweight, scale, zero_point, group_size):
    _check(qweight.dtype == torch.uint8, f"lrqat::{op}: qweight must be torch.uint8, got {qweight.dtype}")
    _check(qweight.dim() == 2, f"lrqat::{op}: qweight must be 2-D [N, K / 2] (pack_nibbles layout), got shape {list(qweight.shape)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    G = _groups_fake(op, K, group_size)
    _check(scale.dtype in _FLOAT, f"lrqat::{op}: scale must be torch.float32, torch.bfloat16 or torch.float16, got {scale.dtype}")
    _check(scale.dim() == 2 and scale.shape[0] == N and scale.shape[1] == G,
           f"lrqat::{op}: scale must have shape [N, K / group_size] = [{N}, {G}], got {list(scale.shape)}")
    if zero_point is not None:
        _check(not zero_point.is_floating_point() and zero_point.dtype != torch.bool,
               f"lrqat::{op}: zero_point must have an integer dtype, got {zero_point.dtype}")
        _check(zero_point.dim() == 2 and zero_point.shape[0] == N and zero_point.shape[1] == G,
               f"lrqat::{op}: zero_point must have the shape of scale, [N, K / group_size] = [{N}, {G}], got {list(zero_point.shape)}")
    return N, K, G


def _int4_linear_fake(x, qweight, scale, zero_point, group_size, bias=None):
    op = "int4_linear"
    _check_x_fake(op, x)
    N, K, _ = _check_standard_fake(op, qweight, scale, zero_point, group_size)
    _check(x.shape[1] == K, f"lrqat::{op}: x's in_features K = {x.shape[1]} must equal 2 * qweight.size(1)")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == N, f"lrqat::{op}: bias must have shape [N] = [{N}], got {list(bias.shape)}")
    return x.new_empty((x.shape[0], N))


def _int4_prepack_cpu_fake(qweight, scale, zero_point, group_size):
    N, K, G = _check_standard_fake("int4_prepack_cpu", qweight, scale, zero_point, group_size)
    Np = (N + _PANEL - 1) // _PANEL
    nkb = (K + _KBLOCK - 1) // _KBLOCK
    pw = qweight.new_empty((Np, nkb, 4 * _PANEL), dtype=torch.uint8)
    ps = scale.new_empty((Np, G, _PANEL), dtype=torch.float32)
    pz = qweight.new_empty((Np, G, _PANEL) if zero_point is not None else (0,), dtype=torch.int32)
    return pw, ps, pz


def _int4_linear_prepacked_cpu_fake(x, packed_weight, packed_scale, packed_zero, out_features, group_size,
                                    bias=None, isa="auto"):
    op = "int4_linear_prepacked_cpu"
    _check_x_fake(op, x)
    K = x.shape[1]
    G = _groups_fake(op, K, group_size)
    _check(packed_weight.dtype == torch.uint8, f"lrqat::{op}: packed_weight must be torch.uint8, got {packed_weight.dtype}")
    _check(packed_weight.dim() == 3 and packed_weight.shape[1] == (K + _KBLOCK - 1) // _KBLOCK
           and packed_weight.shape[2] == 4 * _PANEL,
           f"lrqat::{op}: packed_weight must have shape [ceil(N / 64), ceil(K / 8), 256], got {list(packed_weight.shape)}")
    Np = packed_weight.shape[0]
    _check((out_features + _PANEL - 1) // _PANEL == Np,
           f"lrqat::{op}: out_features ({out_features}) does not match packed_weight, which holds {Np} panels of 64 columns")
    _check(packed_scale.dtype == torch.float32 and list(packed_scale.shape) == [Np, G, _PANEL],
           f"lrqat::{op}: packed_scale must be torch.float32 of shape [{Np}, {G}, 64], got {packed_scale.dtype} {list(packed_scale.shape)}")
    if bias is not None:
        _check(bias.dim() == 1 and bias.shape[0] == out_features,
               f"lrqat::{op}: bias must have shape [N] = [{out_features}], got {list(bias.shape)}")
    return x.new_empty((x.shape[0], out_features))


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    # register_fake checks (on first use) that this module is the one named by m.set_python_module(...).
    torch.library.register_fake("lrqat::int4_linear", _int4_linear_fake)
    torch.library.register_fake("lrqat::int4_prepack_cpu", _int4_prepack_cpu_fake)
    torch.library.register_fake("lrqat::int4_linear_prepacked_cpu", _int4_linear_prepacked_cpu_fake)
    _fakes_registered = True


if _ext.load_extension():
    _register_fakes()
