"""Triton W4A16 kernel (lrqat_kernels/ops/int4_triton.py): outputs, dequantisation, AOT builds.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``), so shapes stay small (K = 256, N = 72). Tolerance rule (STYLE.md): the
error against ``x @ W_hat^T`` computed in fp32 is at most 2x the error of torch's own fp16/bf16
matmul on the same W_hat, plus a tiny atol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lrqat_kernels.formats import pack_nibbles
from lrqat_kernels.ops.int4_triton import (
    Int4TritonConfig,
    int4_dequant_triton,
    int4_linear_triton,
    int4_triton_config,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
GROUPS = [None, 32, 64, 128]


def _case(m, n, k, g, zp, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    w_int = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    groups = 1 if g is None else k // g
    s = torch.rand(n, groups, generator=gen) * 0.02 + 0.005
    z = torch.randint(-8, 8, (n, groups), dtype=torch.int8, generator=gen) if zp else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), w_int, to(pack_nibbles(w_int)), to(s), to(z), to(b)


def _w_hat(w_int, s, z, g):
    k = w_int.shape[1]
    g = k if g is None else g
    w = w_int.float()
    if z is not None:
        w = w - z.float().cpu().repeat_interleave(g, dim=1)
    return s.float().cpu().repeat_interleave(g, dim=1) * w


def _check(y, x, w_int, s, z, g, b):
    w_hat = _w_hat(w_int, s, z, g).to(x.device)
    ref = x.float() @ w_hat.t()
    if b is not None:
        ref = ref + b.float()
    torch_y = torch.nn.functional.linear(x, w_hat.to(x.dtype), b)
    assert y.shape == torch_y.shape and y.dtype == x.dtype
    err = (y.float() - ref).abs().max().item()
    err_torch = (torch_y.float() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-5 * ref.abs().max().item() + 1e-6, f"error {err} vs torch's {err_torch}"


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("g", GROUPS, ids=lambda g: f"g{g}" if g else "per_channel")
def test_matches_reference(g, zp, dtype, m):
    x, w_int, q, s, z, b = _case(m, 72, 256, g, zp, dtype, seed=m)
    _check(int4_linear_triton(x, q, s, z, g, b), x, w_int, s, z, g, b)


def test_large_m_cheap_config():
    x, w_int, q, s, z, b = _case(1000, 72, 64, None, False, torch.bfloat16)
    _check(int4_linear_triton(x, q, s, z, None, b), x, w_int, s, z, None, b)


@pytest.mark.parametrize(
    "n,k,g", [(200, 384, 128), (72, 96, 32), (130, 320, 64), (72, 1040, None), (9, 48, None)], ids=lambda v: str(v)
)
def test_odd_shapes(n, k, g):
    """K and N not powers of two; K not a multiple of the K tile (per-channel: masked tail)."""
    x, w_int, q, s, z, b = _case(5, n, k, g, True, torch.bfloat16, seed=n + k)
    _check(int4_linear_triton(x, q, s, z, g, b), x, w_int, s, z, g, b)


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("g", [None, 64])
def test_split_k(split_k, g):
    x, w_int, q, s, z, b = _case(3, 72, 512, g, True, torch.float16, seed=split_k)
    y = int4_linear_triton(x, q, s, z, g, b, split_k=split_k)
    _check(y, x, w_int, s, z, g, b)
    # Partials are summed in a fixed order: deterministic.
    assert torch.equal(y, int4_linear_triton(x, q, s, z, g, b, split_k=split_k))
    # The reducing program of each tile zeroed its arrival counter again (else the next launch
    # would elect the wrong reducer).
    from lrqat_kernels.ops.int4_triton import _COUNTERS

    assert _COUNTERS and all(int(c.abs().sum()) == 0 for c in _COUNTERS.values())


def test_split_k_counters_kept_for_a_bounded_number_of_streams(monkeypatch):
    """One counter buffer per (device, stream), least recently used dropped past _COUNTERS_MAX
    (a server creating streams per request grew the cache without bound)."""
    from lrqat_kernels.ops import int4_triton as it

    monkeypatch.setattr(it, "_COUNTERS", type(it._COUNTERS)())
    for i in range(it._COUNTERS_MAX + 10):  # buffers of streams seen earlier
        it._COUNTERS[("cuda", 0, 1000 + i)] = torch.zeros(4, dtype=torch.int32)
    buf = it._split_counters(torch.device("cpu"), 8)
    assert len(it._COUNTERS) == it._COUNTERS_MAX and next(reversed(it._COUNTERS)) == ("cpu", None, 0)
    assert ("cuda", 0, 1000) not in it._COUNTERS and it._split_counters(torch.device("cpu"), 8) is buf


def _swap(cfg: Int4TritonConfig, **kw) -> Int4TritonConfig:
    return Int4TritonConfig(**{**cfg.__dict__, "swap_ab": True, **kw})


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("g,zp", [(None, False), (None, True), (32, True), (64, False), (128, True)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 17, 40])
def test_swap_ab_matches_reference(m, g, zp, dtype):
    """The y^T = W x^T path: same numerics, every group / zero-point form, partial M and N tiles,
    bias in the kernel."""
    x, w_int, q, s, z, b = _case(m, 72, 256, g, zp, dtype, seed=m + 1)
    cfg = _swap(int4_triton_config(m, 72, 256, g, "cpu"), split_k=1)
    y = int4_linear_triton(x, q, s, z, g, b, config=cfg)
    _check(y, x, w_int, s, z, g, b)
    if g is not None:
        # Group scales are folded into the weights: W_hat rounded to x's dtype once (round to
        # nearest even), exactly training's W_hat; only fp32 summation order and the final cast differ.
        w_hat = _w_hat(w_int, s, z, g).to(dtype).float()
        ref = (x.float() @ w_hat.t() + b.float()).to(dtype).float()
        bound = (x.float().abs() @ w_hat.abs().t()).max().item()
        torch.testing.assert_close(y.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-5 * bound)


@pytest.mark.parametrize("n,k,g,bm,bn,bk,split", [
    (130, 320, 64, 32, 64, 64, 1),    # N tail, K = 5 tiles
    (72, 1040, None, 16, 64, 128, 3),  # per-channel K tail (masked), split-K partials
    (200, 384, 128, 64, 32, 32, 2),    # tall M tile, narrow N tile, 4 K tiles per group
    (72, 256, 64, 8, 64, 64, 2),       # 8-wide x tile (the native N = 8 of the MMA), 5 M tiles
], ids=str)
def test_swap_ab_odd_shapes_and_split_k(n, k, g, bm, bn, bk, split):
    x, w_int, q, s, z, b = _case(37, n, k, g, True, torch.float16, seed=n)
    cfg = Int4TritonConfig(bm, bn, bk, split, 4, 3, swap_ab=True)
    y = int4_linear_triton(x, q, s, z, g, b, config=cfg)
    _check(y, x, w_int, s, z, g, b)
    # Both operand orders add the same products in the same K order: equal up to fp32 summation
    # order inside a dot.
    ref = int4_linear_triton(x, q, s, z, g, b, config=Int4TritonConfig(bm, bn, bk, split, 4, 3))
    torch.testing.assert_close(y, ref, rtol=2e-3, atol=2e-3)


# ---- the fast (inline PTX) nibble decode: its asm text run by a bit-level model of PTX ------------


def _run_ptx(asm: str, regs: dict) -> dict:
    """Execute the straight-line PTX of ``_fast_decode_asm`` on numpy uint32 arrays (one element per
    asm instance): ``prmt.b32`` (default mode), ``lop3.b32``, ``shr.u32``, ``mov.b32`` and
    ``fma.rn.{bf16x2,f16x2}`` as the PTX ISA defines them. ``regs`` maps ``$n`` to inputs; returns
    every register."""
    import re as _re

    import numpy as np

    def val(tok):
        tok = tok.strip()
        return regs[tok] if tok in regs else np.uint32(int(tok, 0))

    def lanes(v, kind):  # uint32 -> two float32 lanes (low, high)
        halves = [(v & 0xFFFF).astype(np.uint16), (v >> 16).astype(np.uint16)]
        if kind == "bf16x2":
            return [torch.from_numpy(h.astype(np.int32) << 16).view(torch.float32).numpy() for h in halves]
        return [torch.from_numpy(h.view(np.int16)).view(torch.float16).float().numpy() for h in halves]

    def pack(lo, hi, kind):  # two float32 lanes -> uint32, round to nearest even
        dt = torch.bfloat16 if kind == "bf16x2" else torch.float16
        bits = [torch.from_numpy(np.asarray(x, dtype=np.float32)).to(dt).view(torch.int16).numpy().astype(np.uint16)
                for x in (lo, hi)]
        return bits[0].astype(np.uint32) | (bits[1].astype(np.uint32) << 16)

    for stmt in asm.replace("{", "").replace("}", "").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        args = [a.strip() for a in args.split(",")]
        d, src = args[0], args[1:]
        if op == "prmt.b32":
            a, b, sel = val(src[0]), val(src[1]), int(src[2], 0)
            pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
            assert all(((sel >> (4 * i)) & 0x8) == 0 for i in range(4)), "sign-replicate mode not modelled"
            out = np.zeros_like(regs["$4"])
            for i in range(4):
                out = out | (np.asarray(pool[(sel >> (4 * i)) & 0x7], dtype=np.uint32) << (8 * i))
            regs[d] = out.astype(np.uint32)
        elif op == "lop3.b32":
            a, b, c, lut = val(src[0]), val(src[1]), val(src[2]), int(src[3], 0)
            out = np.zeros_like(regs["$4"])
            for idx in range(8):  # bit idx of the LUT is f(a, b, c) for (a, b, c) = bits of idx (4, 2, 1)
                if (lut >> idx) & 1:
                    ma = a if idx & 4 else ~a
                    mb = b if idx & 2 else ~b
                    mc = c if idx & 1 else ~c
                    out = out | (ma & mb & mc)
            regs[d] = np.asarray(out, dtype=np.uint32)
        elif op == "shr.u32":
            regs[d] = (val(src[0]) >> int(src[1], 0)).astype(np.uint32)
        elif op == "mov.b32":
            regs[d] = np.broadcast_to(val(src[0]), regs["$4"].shape).astype(np.uint32)
        elif _re.fullmatch(r"fma\.rn\.(bf16x2|f16x2)", op):
            kind = op.split(".")[-1]
            a, b, c = (lanes(val(t), kind) for t in src)
            res = [np.float64(0) + a[i].astype(np.float64) * b[i] + c[i] for i in range(2)]  # exact, one rounding
            regs[d] = pack(res[0], res[1], kind)
        else:
            raise AssertionError(f"instruction not modelled: {op}")
    return regs


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fast_decode_ptx_is_exact_for_every_byte_and_zero_point(dtype):
    """The inline PTX of the fast decode, executed instruction by instruction: for every byte value
    in every byte position of the register and every zero point, the four output registers hold
    W_int - z of each byte's low / high nibble, in the element order of Triton's ``pack=4``
    (register $0 = low nibbles of bytes 0 and 1, $1 = bytes 2 and 3; $2, $3 the high nibbles)."""
    import numpy as np

    from lrqat_kernels.formats import unpack_nibbles
    from lrqat_kernels.ops.int4_triton import _fast_decode_asm

    rng = np.random.default_rng(0)
    words = np.concatenate([np.arange(256, dtype=np.uint32) * 0x01010101,  # each byte value everywhere
                            rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)])
    magic8 = {"bf16": 136, "fp16": 1032}[dtype]
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    byts = torch.from_numpy(words.view(np.uint8).reshape(-1, 4).copy())  # little endian: byte i of each word
    w_int = unpack_nibbles(byts).to(torch.int32)  # [n, 8]: column 2i = low nibble of byte i
    for z in range(-8, 8):
        neg = torch.tensor([-(magic8 + z)] * 2, dtype=tdt).view(torch.int16).numpy().astype(np.uint16)
        neg_reg = np.full(words.shape, neg[0] | (np.uint32(neg[1]) << 16), dtype=np.uint32)
        out = _run_ptx(_fast_decode_asm(dtype), {"$4": words.copy(), "$5": neg_reg, "$6": neg_reg.copy()})
        got = np.stack([out[r] for r in ("$0", "$1", "$2", "$3")], 1).astype(np.uint32)  # [n, 4]
        halves = np.stack([got & 0xFFFF, got >> 16], 2).reshape(-1, 8).astype(np.uint16)  # [n, 8]: lo0 lo1 lo2 lo3 hi0..
        vals = torch.from_numpy(halves.view(np.int16)).view(tdt).float()
        want = (w_int - z).float()
        assert torch.equal(vals[:, :4], want[:, 0::2]), (dtype, z)  # low nibbles of bytes 0..3
        assert torch.equal(vals[:, 4:], want[:, 1::2]), (dtype, z)  # high nibbles


def test_fast_decode_config_is_exact_off_nvidia():
    """Off NVIDIA GPUs (here: the interpreter) ``fast_decode`` falls back to the portable decode."""
    x, w_int, q, s, z, b = _case(5, 72, 256, 64, True, torch.bfloat16)
    for swap in (False, True):
        cfg = Int4TritonConfig(16, 64, 64, 2, 4, 3, swap_ab=swap, fast_decode=True)
        _check(int4_linear_triton(x, q, s, z, 64, b, config=cfg), x, w_int, s, z, 64, b)


def test_no_bias_3d_input_and_float_zero_point():
    x, w_int, q, s, z, _ = _case(6, 72, 256, 64, True, torch.float16)
    y = int4_linear_triton(x.reshape(2, 3, 256), q, s, z.float(), 64)
    assert y.shape == (2, 3, 72)
    _check(y.reshape(6, 72), x, w_int, s, z, 64, None)


def test_empty_m():
    x, _, q, s, _, _ = _case(1, 72, 256, None, False, torch.float16)
    assert int4_linear_triton(x[:0], q, s).shape == (0, 72)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("g,zp", [(None, False), (32, True), (128, False), (64, True)], ids=lambda v: str(v))
def test_dequant_is_exact(g, zp, dtype):
    """W_hat = s * (W_int - z) in fp32, cast last: bitwise equal to the reference rounding."""
    _, w_int, q, s, z, _ = _case(1, 72, 256, g, zp, torch.float16)
    w = int4_dequant_triton(q, s, z, g, dtype)
    assert w.dtype == dtype and torch.equal(w.cpu(), _w_hat(w_int, s, z, g).to(dtype))


@pytest.mark.parametrize("k,g", [(252, 3), (252, 9), (252, 14), (252, 36), (200, None), (160, 32), (192, 96),
                                 (384, 128), (96, 48)])
@pytest.mark.parametrize("zp", [False, True])
def test_dequant_any_group_and_k_tail_exact(k, g, zp):
    """Per-row-scale tiles (BLOCK_K divides the group) and per-column-scale tiles (other groups,
    odd ones included: the two columns of one byte can sit in different groups), K tails."""
    from lrqat_kernels.ops.int4_triton import dequant_config

    _, w_int, q, s, z, _ = _case(1, 40, k, g, zp, torch.float16)
    bn, bk, one_group = dequant_config(k, k if g is None else g)
    assert one_group == (g is None or g % 32 == 0) and bn * bk == 8192
    w = int4_dequant_triton(q, s, z, g, torch.float32)
    assert torch.equal(w.cpu(), _w_hat(w_int, s, z, g))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=["fp16", "bf16", "fp32"])
def test_dequant_into_rows_of_a_buffer(dtype):
    """``out=``: the chunked prefill path dequantises into the first rows of one reused buffer."""
    _, w_int, q, s, z, _ = _case(1, 72, 256, 64, True, torch.float16)
    buf = torch.full((100, 256), 7.0, dtype=dtype, device=DEVICE)
    rows = slice(8, 48)
    got = int4_dequant_triton(q[rows], s[rows], z[rows], 64, dtype, out=buf[:40])
    assert got.data_ptr() == buf.data_ptr() and torch.equal(buf[:40].cpu(), _w_hat(w_int, s, z, 64)[rows].to(dtype))
    assert (buf[40:] == 7).all()  # nothing past the chunk written
    with pytest.raises(ValueError, match="out must be a \\[40, 256\\]"):
        int4_dequant_triton(q[rows], s[rows], z[rows], 64, dtype, out=buf[:41])
    with pytest.raises(ValueError, match="unit column stride"):
        int4_dequant_triton(q[rows], s[rows], z[rows], 64, dtype, out=torch.empty(256, 40, dtype=dtype, device=DEVICE).t())


@pytest.mark.parametrize("chunk_n", [None, 16, 50, 71, 72, 500])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_dequant_linear_in_row_chunks(chunk_n, dtype):
    """The "dequant" backend in L2-sized row chunks (``chunk_n`` rows of W_hat into one reused
    buffer, one GEMM writing those columns of y): same result as one whole W_hat; chunk sizes that
    divide N, that leave a tail, of N - 1, N and more; with bias and zero points; 3-D x."""
    from lrqat_kernels.ops.int4_linear import dequant_linear

    x, w_int, q, s, z, b = _case(24, 72, 256, 64, True, dtype, seed=5)
    y = dequant_linear(x.reshape(2, 12, 256), q, s, z, 64, b, chunk_n=chunk_n)
    assert y.shape == (2, 12, 72)
    _check(y.reshape(24, 72), x, w_int, s, z, 64, b)
    whole = dequant_linear(x, q, s, z, 64, b)
    torch.testing.assert_close(y.reshape(24, 72), whole, rtol=0, atol=float(whole.abs().max()) * 2 ** -7)
    _check(dequant_linear(x, q, s, None, 64, None, chunk_n=chunk_n), x, w_int, s, None, 64, None)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_n must be None or a positive int"):
            dequant_linear(x, q, s, z, 64, b, chunk_n=bad)


def test_dequant_linear_chunks_fall_back_for_autograd_and_compile():
    """``out=`` into a column slice of y supports neither autograd nor ``torch.compile``: those
    calls take the whole-W_hat path (same result, gradients flow)."""
    from lrqat_kernels.ops.int4_linear import dequant_linear

    x, w_int, q, s, z, b = _case(6, 72, 256, 64, True, torch.bfloat16, seed=2)
    xg = x.clone().requires_grad_(True)
    y = dequant_linear(xg, q, s, z, 64, b, chunk_n=16)
    y.float().sum().backward()
    w_hat = _w_hat(w_int, s, z, 64).to(x.device)
    torch.testing.assert_close(xg.grad.float(), w_hat.to(torch.bfloat16).float().sum(0).expand_as(x), rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # no autograd: the chunked path, same values
        torch.testing.assert_close(dequant_linear(xg, q, s, z, 64, b, chunk_n=16), y.detach(), rtol=0, atol=1e-2)
    if DEVICE == "cpu":  # the Triton dequant kernel is not traceable under the interpreter; the torch path is
        fn = torch.compile(lambda a: dequant_linear(a, q, s, z, 64, b, chunk_n=16), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(fn(x), dequant_linear(x, q, s, z, 64, b), rtol=0, atol=1e-2)


def test_dequant_exact_for_out_of_range_zero_points():
    """Zero points outside [-8, 7] are out of contract, but the dequantisation pass must not turn
    them into NaN or garbage (it agrees with the CPU reference, as before the mantissa trick)."""
    gen = torch.Generator().manual_seed(3)
    w_int = torch.randint(-8, 8, (40, 128), dtype=torch.int8, generator=gen)
    s = torch.rand(40, 2, generator=gen) + 0.5
    for zval in (15, -100, 1000):
        z = torch.full((40, 2), zval, dtype=torch.int32)
        got = int4_dequant_triton(pack_nibbles(w_int).to(DEVICE), s.to(DEVICE), z.to(DEVICE), 64, torch.float32)
        assert torch.equal(got.cpu(), _w_hat(w_int, s, z, 64)), zval


def test_noncontiguous_bias():
    x, w_int, q, s, z, b = _case(5, 72, 256, 64, True, torch.float16)
    b2 = torch.stack([b, torch.full_like(b, 1e3)], dim=1)[:, 0]  # stride 2
    assert b2.stride(0) == 2
    for split in (1, 2):  # bias added in the kernel / after the split-K sum
        _check(int4_linear_triton(x, q, s, z, 64, b2, split_k=split), x, w_int, s, z, 64, b)


@pytest.mark.parametrize(
    "kwargs,err,pattern",
    [
        (dict(x=torch.zeros(2, 256)), TypeError, "x must be a float16 or bfloat16"),
        (dict(qweight=torch.zeros(72, 128, dtype=torch.int8)), TypeError, "qweight must be uint8"),
        (dict(x=torch.zeros(2, 128, dtype=torch.float16)), ValueError, r"x must be \[..., K\]"),
        (dict(group_size=48), ValueError, "group_size must be None"),
        (dict(scale=torch.ones(72, 3)), ValueError, "scale must be a float tensor"),
        (dict(zero_point=torch.zeros(72, 2)), ValueError, "zero_point must be None or"),
        (dict(bias=torch.zeros(71)), ValueError, "bias must be None or"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_rejects_bad_input(kwargs, err, pattern):
    args = dict(x=torch.zeros(2, 256, dtype=torch.float16), qweight=torch.zeros(72, 128, dtype=torch.uint8),
                scale=torch.ones(72, 1), zero_point=None, group_size=None, bias=None)
    args.update(kwargs)
    with pytest.raises(err, match=pattern):
        int4_linear_triton(**args)
    with pytest.raises(ValueError, match="multiple of 32"):
        int4_linear_triton(torch.zeros(2, 256, dtype=torch.float16), torch.zeros(72, 128, dtype=torch.uint8),
                           torch.ones(72, 16), group_size=16)


def test_config_choices():
    small = int4_triton_config(1, 11008, 4096, 128, "cuda")
    assert (small.block_m, small.block_n, small.block_k) == (16, 64, 128) and small.split_k > 1
    assert int4_triton_config(1, 4096, 4096, 32, "cuda").block_k == 32
    big = int4_triton_config(4096, 11008, 4096, None, "cuda")
    assert big.block_m == 64 and big.split_k == 1
    assert int4_triton_config(1, 72, 64, None, "cuda").split_k == 1  # never more splits than K tiles


# ---- dispatcher (CUDA-side hook; the backend choice is device-independent) ----------------------


def test_dispatch_auto_picks_triton_then_dequant(monkeypatch):
    from lrqat_kernels.ops import int4_gpu, int4_triton

    calls = []
    real = int4_triton.int4_linear_triton

    def spy(*a, **kw):
        calls.append(a[0].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(int4_triton, "int4_linear_triton", spy)
    monkeypatch.delenv(int4_gpu.BACKEND_ENV, raising=False)
    for m in (1, int4_gpu.AUTO_DEQUANT_MIN_M - 1, int4_gpu.AUTO_DEQUANT_MIN_M):
        x, w_int, q, s, z, b = _case(m, 72, 64, 32, True, torch.float16)
        _check(int4_gpu.int4_linear_gpu(x, q, s, z, 32, b), x, w_int, s, z, 32, b)
    assert calls == [1, int4_gpu.AUTO_DEQUANT_MIN_M - 1]  # the largest M went to dequant + F.linear


def test_dispatch_env_and_cuda_backend(monkeypatch):
    from lrqat_kernels.ops import int4_gpu

    x, w_int, q, s, z, b = _case(2, 72, 64, None, False, torch.float16, device="cpu")
    monkeypatch.setenv(int4_gpu.BACKEND_ENV, "dequant")
    _check(int4_gpu.int4_linear_gpu(x, q, s, z, None, b), x, w_int, s, z, None, b)
    monkeypatch.setenv(int4_gpu.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="int4 backend must be one of"):
        int4_gpu.int4_linear_gpu(x, q, s, z, None, b)
    monkeypatch.delenv(int4_gpu.BACKEND_ENV)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors, no interpreter: errors naming the device
    for backend in ("cuda", "triton", "auto"):
        with pytest.raises(ValueError, match="int4_linear_gpu serves CUDA tensors, got x on cpu"):
            int4_gpu.int4_linear_gpu(x, q, s, z, None, b, backend=backend)
    with pytest.raises(ValueError, match="int4_linear_triton needs CUDA tensors"):
        int4_linear_triton(x, q, s, z, None, b)
    with pytest.raises(ValueError, match="int4_gpu_linear .* needs CUDA tensors"):
        int4_gpu.int4_gpu_linear(x, int4_gpu.prepack_int4_gpu(q, s, z))


def test_env_backend_falls_back_for_layers_it_cannot_run(monkeypatch):
    """$LRQAT_INT4_BACKEND covers a whole model: a layer the chosen backend cannot run uses "auto"
    (one warning per layer shape); an explicit backend= argument stays an error."""
    from lrqat_kernels.ops import int4_gpu

    int4_gpu._WARNED.clear()
    x, w_int, q, s, z, b = _case(3, 40, 96, 48, True, torch.float16, device="cpu")  # group 48: no kernel tiles it
    monkeypatch.setenv(int4_gpu.BACKEND_ENV, "triton")
    with pytest.warns(RuntimeWarning, match=r"LRQAT_INT4_BACKEND=triton: .*multiple of 32, got 48 \(layer 40x96\)"):
        _check(int4_gpu.int4_linear_gpu(x, q, s, z, 48, b), x, w_int, s, z, 48, b)
    with pytest.raises(ValueError, match="needs group_size to be a multiple of 32"):
        int4_gpu.int4_linear_gpu(x, q, s, z, 48, b, backend="triton")
    x, w_int, q, s, z, b = _case(2, 24, 72, None, False, torch.bfloat16, device="cpu")  # K = 72: not a multiple of 16
    monkeypatch.setenv(int4_gpu.BACKEND_ENV, "cuda")
    with pytest.warns(RuntimeWarning, match="LRQAT_INT4_BACKEND=cuda: the CUDA int4 kernel needs in_features to be a multiple of 16"):
        _check(int4_gpu.int4_linear_gpu(x, q, s, z, None, b), x, w_int, s, z, None, b)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per message: the next call of that layer is quiet
        int4_gpu.int4_linear_gpu(x, q, s, z, None, b)
    int4_gpu._WARNED.clear()


# ---- ahead-of-time compilation for sm_80 / sm_90: registers and spills --------------------------

# Runs in a subprocess without TRITON_INTERPRET (interpreted kernels cannot be compiled). Integer
# arguments and pointers get the 16-divisibility attribute the JIT gives them at real shapes
# (K = 4096 etc.): without it Triton can neither vectorise nor pipeline the loads, and the
# resource numbers would describe a kernel that never runs.
_AOT_SCRIPT = r"""
import json, re, sys
from lrqat_kernels.ops import aot
from lrqat_kernels.ops.int4_triton import _int4_w4a16_kernel as fn

DIVISIBLE = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "ws_ptr", "cnt_ptr", "N", "K",
             "stride_xm", "stride_qn", "stride_ym", "stride_ws"]
out = []
for spec in json.loads(sys.stdin.read()):
    dt = spec["dtype"]
    sig = dict(x_ptr=f"*{dt}", qw_ptr="*u8", s_ptr="*fp32", z_ptr="*i8", b_ptr=f"*{dt}", y_ptr=f"*{dt}",
               ws_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32", K="i32", stride_xm="i32", stride_qn="i32",
               stride_sn="i32", stride_zn="i32", stride_ym="i32", stride_ws="i32", group_size="i32",
               k_tiles_per_split="i32")
    consts = dict(HAS_ZP=spec["zp"], HAS_BIAS=True, PER_CHANNEL=spec["per_channel"], SPLIT_K=spec["split"], PTX=True,
                  FAST_DECODE=spec.get("fast", False),
                  DOT_F32=False, SWAP_AB=spec.get("swap", False), BLOCK_M=spec["bm"], BLOCK_N=spec["bn"],
                  BLOCK_K=spec["bk"])
    sig.update({k: "constexpr" for k in consts})
    r, ptx = aot._compile(fn, sig, consts, spec["arch"], spec["num_warps"], spec["num_stages"], divisible=DIVISIBLE,
                          return_ptx=True)
    sync = sorted(set(re.findall(r"fence\.acq_rel\.gpu|atom\.global\.gpu\.acq_rel\.add|ld\.global\.cg|bar\.sync", ptx)))
    # The split-K protocol in program order: partial stores, fence, barrier, arrival atomic,
    # fence, then (only then) the L2 reads of the other programs' partials.
    ops = [m.group(0) for m in re.finditer(
        r"st\.global|fence\.acq_rel\.gpu|bar\.sync|atom\.global\.gpu\.acq_rel\.add|ld\.global\.cg", ptx)]
    order_ok = None
    if "atom.global.gpu.acq_rel.add" in ops:
        a = ops.index("atom.global.gpu.acq_rel.add")
        before, after = ops[:a], ops[a + 1:]
        f1 = max((i for i, o in enumerate(before) if o == "fence.acq_rel.gpu"), default=-1)
        order_ok = (f1 > 0 and "st.global" in before[:f1] and "bar.sync" in before[f1:]
                    and "st.global" not in before[f1:] and "fence.acq_rel.gpu" in after
                    and "ld.global.cg" in after
                    and after.index("fence.acq_rel.gpu") < after.index("ld.global.cg"))
    n_instr = len([l for l in ptx.splitlines() if re.match(r"\s+@?%?[a-z]", l)])
    fast_ops = sorted(set(re.findall(r"\b(lop3\.b32|prmt\.b32|fma\.rn\.(?:bf16|f16)x2)", ptx)))
    out.append(dict(spec, sync=sync, order_ok=order_ok, n_instr=n_instr, fast_ops=fast_ops, regs=r.registers, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                    shared=r.shared_bytes, mma=r.mma_ops, loop_smem_stores=r.loop_smem_stores,
                    pendings=r.loop_wgmma_pendings, global_ops=r.global_ops))
print(json.dumps(out))
"""


def _launcher_specs():
    """Every distinct kernel specialisation the launcher picks over decode/prefill LLaMA shapes."""
    seen, specs = set(), []
    for m in (1, 16, 32, 64, 1000):
        for n, k in ((11008, 4096), (4096, 11008)):
            for g in GROUPS:
                cfg = int4_triton_config(m, n, k, g, "cuda")
                per_channel = g is None
                for zp in ([False] if per_channel else [True]):  # zp variant is the heavier one
                    key = (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                           cfg.split_k > 1, per_channel, zp, cfg.swap_ab)
                    if key in seen:
                        continue
                    seen.add(key)
                    for arch in (80, 90):
                        specs.append(dict(bm=cfg.block_m, bn=cfg.block_n, bk=cfg.block_k, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages, split=cfg.split_k > 1,
                                          per_channel=per_channel, zp=zp, dtype="bf16", arch=arch,
                                          swap=cfg.swap_ab))
    return specs


def _run_aot(specs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], input=json.dumps(specs), capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(specs)
    return results


def test_aot_swap_ab_feeds_wgmma_from_registers():
    """The swap-AB path's point, checked in the compiled code: on sm_90 every wgmma takes the
    dequantised weights from registers, the main loop stores nothing to shared memory (only
    cp.async copies) and never waits for its last wgmma (it overlaps the next tile's loads and
    dequantisation). The default operand order stores the weight tile (wgmma's B operand) in
    shared memory each K tile and waits, which shows the checks can fail. No spills for the
    tuner's swap-AB tiles: bf16 and fp16, grouped with zero point (the heavier variant) and
    per-channel; the 256-wide prefill tiles on sm_90 only (the tuner offers them for sm_90's
    register file; on sm_80 they spill and simply lose)."""
    specs = []
    tiles = ((16, 64, 128, 4, 4, True, (80, 90)), (64, 128, 64, 8, 3, False, (80, 90)),
             (128, 128, 64, 8, 3, False, (80, 90)), (256, 128, 64, 8, 3, False, (90,)), (128, 256, 64, 8, 3, False, (90,)))
    for bm, bn, bk, warps, stages, split, archs in tiles:
        for arch in archs:
            for dtype, per_channel in (("bf16", False), ("fp16", False), ("bf16", True)):
                specs.append(dict(bm=bm, bn=bn, bk=bk, num_warps=warps, num_stages=stages, split=split,
                                  per_channel=per_channel, zp=not per_channel, dtype=dtype, arch=arch, swap=True))
    narrow = [dict(bm=8, bn=bn, bk=128, num_warps=4, num_stages=4, split=True, per_channel=False, zp=True,
                   dtype="bf16", arch=arch, swap=True) for bn in (64, 128) for arch in (80, 90)]
    specs.append(dict(bm=128, bn=128, bk=64, num_warps=8, num_stages=3, split=False, per_channel=False, zp=True,
                      dtype="bf16", arch=90, swap=False))  # the default order, for contrast
    *swapped, plain = _run_aot(specs)
    for r in _run_aot(narrow):
        # An 8-wide x tile (decode, M <= 8) is the MMA's native N = 8: no padding to 16 rows
        # (wgmma m64n8k16 with Triton >= 3.7 on sm_90, mma.sync m16n8k16 otherwise), no spills.
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"spills: {r}"
        assert r["mma"] in ("wgmma.m64n8k16.f32.bf16.bf16(A=reg)", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"), r
    for r in swapped:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"spills: {r}"
        if r["arch"] == 90:
            assert r["mma"].startswith("wgmma.") and "(A=reg)" in r["mma"] and "(A=smem)" not in r["mma"], r
            assert r["loop_smem_stores"] == 0, f"register -> shared stores in the main loop: {r}"
            assert r["pendings"] and "0" not in r["pendings"].split(","), f"the loop waits for every wgmma: {r}"
        else:
            assert r["mma"].startswith("mma.sync.aligned.m16n8k16"), r
    assert plain["mma"].startswith("wgmma.") and plain["loop_smem_stores"] > 0 and plain["pendings"] == "0", plain


def test_aot_fast_decode_compiles_and_cuts_instructions():
    """The inline-PTX decode assembles for sm_80 / sm_90 (ptxas), without spills, for both operand
    orders, fp16 and bf16, grouped (swap: scaled weights) and per-channel, and the kernel it gives
    has fewer instructions than the portable decode's (its point: decode GEMMs are ALU bound)."""
    base = []
    for bm, bn, bk, warps, stages, split, swap in ((16, 64, 128, 4, 4, True, False), (8, 64, 128, 4, 4, True, True),
                                                   (64, 64, 64, 8, 4, True, True)):
        for arch in (80, 90):
            for dtype, per_channel in (("bf16", False), ("fp16", False), ("bf16", True)):
                base.append(dict(bm=bm, bn=bn, bk=bk, num_warps=warps, num_stages=stages, split=split, swap=swap,
                                 per_channel=per_channel, zp=not per_channel, dtype=dtype, arch=arch))
    results = _run_aot(base + [dict(b, fast=True) for b in base])
    slow, fast = results[: len(base)], results[len(base):]
    for a, b in zip(slow, fast):
        assert b["spill_stores"] == 0 and b["spill_loads"] == 0, f"spills: {b}"
        want = {"lop3.b32", "prmt.b32", "fma.rn.bf16x2" if b["dtype"] == "bf16" else "fma.rn.f16x2"}
        assert want <= set(b["fast_ops"]) and "lop3.b32" not in a["fast_ops"], (a, b)
        assert b["n_instr"] < 0.95 * a["n_instr"], f"no fewer instructions: {a['n_instr']} -> {b['n_instr']} {b}"


def test_aot_compiles_without_spills_for_launcher_configs():
    specs = _launcher_specs()
    results = _run_aot(specs)
    for r in results:
        where = {k: r[k] for k in ("bm", "bn", "bk", "num_warps", "per_channel", "zp", "split", "arch")}
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"spills: {r}"
        assert r["regs"] <= 255 and r["shared"] > 0, where
        # cp.async pipelining actually happened: more than one stage of weights in shared memory.
        assert r["shared"] >= 2 * r["bn"] * r["bk"] // 2, f"loads not pipelined: {r}"
        # In-kernel split-K reduction: per-thread fence, barrier, acq_rel arrival, L2-only reads.
        want = {"fence.acq_rel.gpu", "atom.global.gpu.acq_rel.add", "ld.global.cg", "bar.sync"}
        assert (want <= set(r["sync"])) == r["split"] and r["order_ok"] is (True if r["split"] else None), r
    assert any(r["split"] for r in results) and not all(r["split"] for r in results)


_AOT_DEQUANT_SCRIPT = r"""
import json, sys
from lrqat_kernels.ops import aot
from lrqat_kernels.ops.int4_triton import _int4_dequant_kernel as fn

out = []
for spec in json.loads(sys.stdin.read()):
    sig = dict(qw_ptr="*u8", s_ptr="*fp32", z_ptr="*i32", w_ptr="*" + spec["dtype"], N="i32", K="i32",
               stride_qn="i32", stride_sn="i32", stride_zn="i32", stride_wn="i32", group_size="i32",
               HAS_ZP="constexpr", ONE_GROUP="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr")
    consts = dict(HAS_ZP=spec["zp"], ONE_GROUP=spec["one"], BLOCK_N=spec["bn"], BLOCK_K=spec["bk"])
    r = aot._compile(fn, sig, consts, spec["arch"], 4, 3, divisible=[
        "qw_ptr", "s_ptr", "z_ptr", "w_ptr", "N", "K", "stride_qn", "stride_sn", "stride_zn", "stride_wn"])
    out.append(dict(spec, regs=r.registers, spills=r.spill_stores + r.spill_loads, global_ops=r.global_ops,
                    i2f=r.i2f_ops))
print(json.dumps(out))
"""


def test_aot_dequant_kernel_vector_stores_no_spills():
    """The prefill path's dequantisation pass is memory bound and writes 4x what it reads: every
    store must be a 16-byte vector (the nibbles are interleaved back in registers), no spills, no
    int -> float conversions (the 2^23 mantissa trick instead)."""
    from lrqat_kernels.ops.int4_triton import dequant_config

    specs = []
    for g in (None, 128, 64, 32, 48):
        bn, bk, one = dequant_config(4096, 4096 if g is None else g)
        for dtype in ("bf16", "fp16", "fp32"):
            for arch in (80, 90):
                specs.append(dict(g=g, bn=bn, bk=bk, one=one, zp=g is not None, dtype=dtype, arch=arch))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_DEQUANT_SCRIPT], input=json.dumps(specs), capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert r["spills"] == 0, r
        stores = [op for op in r["global_ops"].split(",") if op.startswith("st.")]
        assert stores == ["st.global.v4.b32"], r
        assert r["i2f"] == "", r


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64, 300])
@pytest.mark.parametrize("g", [None, 128])
def test_gpu_llama_shape(m, g):
    x, w_int, q, s, z, b = _case(m, 4096, 4096, g, g is not None, torch.bfloat16)
    _check(int4_linear_triton(x, q, s, z, g, b), x, w_int, s, z, g, b)


@pytest.mark.gpu
def test_gpu_matches_interpreter_semantics_config_override():
    x, w_int, q, s, z, b = _case(8, 1024, 2048, 64, True, torch.float16)
    for swap in (False, True):
        cfg = Int4TritonConfig(16, 64, 64, 4, 4, 3, swap_ab=swap)
        _check(int4_linear_triton(x, q, s, z, 64, b, config=cfg), x, w_int, s, z, 64, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("g,zp", [(None, False), (None, True), (128, False), (64, True), (32, True)], ids=str)
@pytest.mark.parametrize("swap", [False, True], ids=["ab", "swap"])
@pytest.mark.parametrize("m", [1, 8, 33])
def test_gpu_fast_decode(m, swap, g, zp, dtype):
    """The inline-PTX decode on the hardware (it cannot run elsewhere), against the fp32 reference
    and equal to the portable decode up to summation order (the same W_int - z enter the same
    dots; a wrong nibble or zero point would be off by whole multiples of s * x)."""
    x, w_int, q, s, z, b = _case(m, 1024, 2048, g, zp, dtype, seed=m)
    bm = 8 if swap and m <= 8 else 16 if m <= 16 else 64
    cfgs = [Int4TritonConfig(bm, 64, 64, 2, 4, 4, swap_ab=swap, fast_decode=f) for f in (False, True)]
    slow, fast = (int4_linear_triton(x, q, s, z, g, b, config=c) for c in cfgs)
    _check(fast, x, w_int, s, z, g, b)
    torch.testing.assert_close(fast, slow, rtol=torch.finfo(dtype).eps, atol=1e-3 * slow.abs().max().item())


@pytest.mark.gpu
def test_gpu_split_k_under_cuda_graphs():
    """In-kernel split-K reduction inside CUDA graphs: two graphs captured (on torch's capture
    stream), the second replayed first, eager calls in between; every result equals the eager one."""
    x, w_int, q, s, z, b = _case(2, 4096, 4096, 128, True, torch.bfloat16)
    cfg = Int4TritonConfig(16, 64, 128, 8, 4, 4)
    f = lambda: int4_linear_triton(x, q, s, z, 128, b, config=cfg)  # noqa: E731
    want = f()
    _check(want, x, w_int, s, z, 128, b)
    graphs, outs = [], []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(f())
        graphs.append(g)
    for g, y in ((graphs[1], outs[1]), (graphs[0], outs[0]), (graphs[1], outs[1])):
        g.replay()
        assert torch.equal(f(), want)
        torch.cuda.synchronize()
        assert torch.equal(y, want)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 300, 1024])
@pytest.mark.parametrize("g", [None, 128])
def test_gpu_swap_ab_llama_shape(m, g):
    """The swap-AB path on the GPU (wgmma with register A operand on sm_90) at LLaMA shapes."""
    x, w_int, q, s, z, b = _case(m, 4096, 4096, g, g is not None, torch.bfloat16)
    bm, bn, warps = (16, 64, 4) if m <= 16 else (128, 128, 8)
    cfg = Int4TritonConfig(bm, bn, 64, 1, warps, 3, swap_ab=True)
    _check(int4_linear_triton(x, q, s, z, g, b, config=cfg), x, w_int, s, z, g, b)
