"""Per-token activation fake quantisation: Triton kernel vs the reference, STE, torch.library, AOT."""

import os
import sys

import pytest
import torch

from lrqat_kernels import reference as R
from lrqat_kernels.ops import act_quant as AQ

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, n, generator=g) * 3
    x[1] = 2.5  # constant row
    x[2] = 0.0  # zero row
    x[3, 0] = 40.0  # outlier
    x[4] = x[4].abs() + 1  # all positive
    return x.to(dtype)


@pytest.mark.parametrize("n", [1, 7, 33, 130, 3000, 4096, 8193], ids=lambda n: f"hidden{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (4, True)])
def test_kernel_matches_reference_exactly(n, dtype, bits, symmetric):
    x = _rows(n, dtype)
    got = AQ.act_fake_quant_forward(x, bits, symmetric)
    want = R.fake_quant_activation(x, bits, symmetric)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_rows_share_programs_exactly(dtype):
    """Queries [B, H, T, head_dim] quantised per (token, head): 72 rows of 64, 16 rows a program,
    the last program half empty; each row keeps its own scale."""
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(2, 4, 9, 64, generator=g) * torch.rand(2, 4, 9, 1, generator=g) * 10).to(dtype)
    q[0, 1, 3] = 0.0
    for bits, sym in ((8, False), (4, True)):
        got = AQ.act_fake_quant_forward(q, bits, sym)
        assert torch.equal(got, R.fake_quant_activation(q, bits, sym))


def test_reference_semantics_by_hand():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.5]])
    # 4-bit asymmetric: lo = -1.5, hi = 3, s = 4.5 / 15 = 0.3, z = round(-8 + 5) = -3
    s, z = R.act_quant_params(x, 4, False)
    assert s.item() == pytest.approx(0.3) and z.item() == -3.0
    xh = R.fake_quant_activation(x, 4, False)
    q = torch.round(x / s + z).clamp(-8, 7)
    assert torch.equal(xh, s * (q - z))
    # constant row keeps its value (0 is in the range), zero row stays zero
    c = torch.full((2, 5), 2.5)
    c[1] = 0
    torch.testing.assert_close(R.fake_quant_activation(c, 8, False), c)
    torch.testing.assert_close(R.fake_quant_activation(c, 8, True), c)
    # symmetric 8 bit: s = max|x| / 127
    s, z = R.act_quant_params(x, 8, True)
    assert s.item() == pytest.approx(3.0 / 127) and z.item() == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_nan_inf_rows_like_reference(symmetric):
    x = torch.randn(4, 20)
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2, 5] = -float("inf")
    got = AQ.act_fake_quant_forward(x, 8, symmetric)
    want = R.fake_quant_activation(x, 8, symmetric)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(got[0]).all()
    assert torch.isfinite(got[3]).all()


def test_shapes_noncontiguous_and_empty():
    x = torch.randn(2, 3, 5, 40)[..., ::2]  # last dim strided
    torch.testing.assert_close(AQ.fake_quant_activation(x, 8), R.fake_quant_activation(x, 8), rtol=0, atol=0)
    e = torch.empty(0, 16)
    assert AQ.fake_quant_activation(e, 8).shape == (0, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_straight_through_gradient(dtype):
    x = _rows(37, dtype).requires_grad_(True)
    g = torch.randn(x.shape).to(dtype)
    y = AQ.fake_quant_activation(x, 4, False)
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(dx, g)
    xr = x.detach().clone().requires_grad_(True)
    (dxr,) = torch.autograd.grad(R.fake_quant_activation(xr, 4, False), xr, g)
    assert torch.equal(dxr, g)


def test_saves_nothing_for_backward():
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        AQ.fake_quant_activation(x, 8).sum()
    assert saved == []


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["kernel", "eager"])
def test_noncontiguous_input_gives_the_fakes_layout(interpret, set_kernel_options):
    """The op returns a contiguous tensor on every path, as its fake says: a transposed input
    (queries [B, T, H, D] -> [B, H, T, D]) once made a compiled graph's later .view() fail."""
    set_kernel_options(kernels=interpret == "1")
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)
    torch.library.opcheck(AQ._fake_quant_activation_op, (x, 8, False))
    y = AQ.fake_quant_activation(x, 8)
    assert y.is_contiguous() and torch.equal(y, R.fake_quant_activation(x.contiguous(), 8))


def test_opcheck_and_compile():
    x = torch.randn(4, 48, requires_grad=True)
    torch.library.opcheck(AQ._fake_quant_activation_op, (x, 8, False))
    torch.library.opcheck(AQ._fake_quant_activation_op, (x.detach(), 4, True))

    def f(t):
        return AQ.fake_quant_activation(t * 2, 8, False).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(cf(x), f(x))


def test_cpu_without_interpreter_uses_reference(set_kernel_options):
    set_kernel_options(kernels=False)
    x = _rows(50, torch.bfloat16)
    assert torch.equal(AQ.fake_quant_activation(x, 8), R.fake_quant_activation(x, 8))


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(bits=6), ValueError, r"bits must be one of \(4, 8\)"),
        (dict(bits=True), ValueError, "bits must be one of"),
        (dict(symmetric=1), TypeError, "symmetric must be a bool"),
    ],
)
def test_bad_input(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        AQ.fake_quant_activation(torch.randn(2, 4), **kwargs)


def test_bad_input_tensor():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        AQ.fake_quant_activation(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        AQ.fake_quant_activation([1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty last dimension"):
        AQ.fake_quant_activation(torch.ones(2, 0))


def test_launcher_config():
    C = AQ.ActQuantConfig
    assert AQ.act_quant_config(4096) == C(4096, 1, 4, True, 1)  # 32 values a thread
    assert AQ.act_quant_config(8192) == C(8192, 1, 8, True, 1)
    assert AQ.act_quant_config(11008) == C(4096, 1, 16, True, 3)  # 3 x 4096 lanes: 10 % masked, not 33 %
    assert AQ.act_quant_config(5120) == C(2048, 1, 8, True, 3)
    assert AQ.act_quant_config(14336) == C(16384, 1, 16, True, 1)  # 4 x 4096 is no fewer lanes
    assert AQ.act_quant_config(3584) == C(4096, 1, 4, True, 1)
    assert AQ.act_quant_config(28672) == C(8192, 1, 16, False, 1)
    assert AQ.act_quant_config(128) == C(128, 16, 4, True, 1)  # a head's queries: 16 rows a program
    assert AQ.act_quant_config(7) == C(128, 16, 4, True, 1)
    assert AQ.act_quant_config(2048) == C(2048, 1, 4, True, 1)
    assert AQ.act_quant_config(4096, AQ.KIND_RMS_NORM) == C(4096, 1, 4, True, 1)
    assert AQ.act_quant_config(4096, AQ.KIND_SWIGLU) == C(4096, 1, 8, True, 1)  # two operands and exp: 16 a thread
    assert AQ.act_quant_config(128, AQ.KIND_SWIGLU) == C(128, 16, 8, True, 1)
    assert AQ.act_quant_config(11008, AQ.KIND_SWIGLU) == C(4096, 1, 16, True, 3)
    assert AQ.act_quant_config(3000, AQ.KIND_SWIGLU) == C(1024, 1, 4, True, 3)  # 8 values a thread a tile: 16-byte vectors
    for n in range(1, 16385, 37):  # every width: covered, by the fewest lanes, at most 16384 in registers
        c = AQ.act_quant_config(n)
        assert c.one_chunk and c.nchunk * c.block >= n and c.nchunk * c.block <= 16384 and c.nchunk in (1, 3)
        assert c.nchunk == 1 or (c.rows == 1 and (c.nchunk - 1) * c.block < n)  # no empty tile


@pytest.mark.parametrize("n", [20000], ids=lambda n: f"hidden{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_rows_match_reference_exactly(n, dtype):
    """Rows wider than one chunk take the two-pass loop."""
    x = _rows(n, dtype)
    assert not AQ.act_quant_config(n)[3]
    assert torch.equal(AQ.act_fake_quant_forward(x, 8, False), R.fake_quant_activation(x, 8, False))


# What the JIT sees at LLaMA shapes (hidden 4096, 11008, head 128: every pointer 16-byte aligned,
# widths and row strides multiples of 16): Triton then vectorises the row loads and stores.
_DIVISIBLE = ("a_ptr", "b_ptr", "y_ptr", "n_cols", "stride_a", "stride_b", "stride_y")


@pytest.mark.parametrize("arch", [80, 90])
def test_aot_compiles_without_spills_or_approximate_math(arch):
    """Every (KIND, block) the launchers can pick, bf16, plus fp16 / fp32 / mixed variants; each
    both as specialised for LLaMA shapes (multiples of 16) and for odd widths (no hints)."""
    from lrqat_kernels.ops.aot import aot_compile_many

    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "n_rows": "i32", "n_cols": "i32", "stride_a": "i64",
           "stride_b": "i64", "stride_y": "i64", "eps": "fp32", "KIND": "constexpr", "QMIN": "constexpr",
           "QMAX": "constexpr", "QUANT": "constexpr", "SYMMETRIC": "constexpr", "BLOCK": "constexpr",
           "ROWS": "constexpr", "ONE_CHUNK": "constexpr", "INTERPRET": "constexpr"}
    ONE_MAX = AQ.ONE_CHUNK_BLOCKS[-1]
    cases = [(k, "bf16", "bf16", "bf16", b, True, 8, False) for k in (0, 1, 2) for b in AQ.ONE_CHUNK_BLOCKS]
    cases += [(k, "bf16", "bf16", "bf16", AQ.CHUNK_BLOCK, False, 8, False) for k in (0, 1, 2)]
    cases += [(k, dt, dt, dt, b, True, 4, True) for k in (0, 1, 2) for dt in ("fp16", "fp32") for b in (8192, 16384)]
    cases += [(k, dt, dt, dt, AQ.CHUNK_BLOCK, False, 4, True) for k in (0, 1, 2) for dt in ("fp16", "fp32")]
    cases += [(1, "bf16", "fp32", "fp32", 16384, True, 8, False)]  # bf16 x, fp32 norm weight
    # rows held as several tiles (the row width in place of the block: 3000 -> 3 x 1024,
    # 5120 -> 3 x 2048, 11008 -> 3 x 4096)
    cases += [(k, dt, dt, dt, n, True, 8, False) for k in (0, 1, 2) for n in (3000, 5120, 11008) for dt in ("bf16", "fp32")]
    cases = [c + (div,) for c in cases for div in (True, False)]
    specs = []
    for kind, ad, bd, yd, width, one, bits, sym, div in cases:
        qmin, qmax = (-128, 127) if bits == 8 else (-8, 7)
        block, rows, warps, _, nchunk = AQ.act_quant_config(width if one else 2 * ONE_MAX, kind)
        specs.append(dict(signature=dict(sig, a_ptr=f"*{ad}", b_ptr=f"*{bd}", y_ptr=f"*{yd}"),
                          constexprs=dict(KIND=kind, QMIN=qmin, QMAX=qmax, QUANT=True, SYMMETRIC=sym, BLOCK=block,
                                          ROWS=rows, ONE_CHUNK=one, INTERPRET=False, NCHUNK=nchunk),
                          arch=arch, num_warps=warps, num_stages=3, divisible=_DIVISIBLE if div else (),
                          enable_fp_fusion=False))  # as the launcher
    bad = []
    for (kind, _, _, _, block, one, _, _, div), res in zip(cases, aot_compile_many(AQ._act_quant_kernel, specs)):
        narrow = one and AQ.act_quant_config(block, kind).rows > 1  # block: the row width for one-chunk cases
        tiles = AQ.act_quant_config(block, kind).nchunk if one else 1
        print(f"KIND={kind} hints={div} tiles={tiles}", res, res.global_ops)
        # Rows of several tiles: ptxas sometimes holds them at 64 registers (its occupancy target)
        # and spills a few words to L1-cached local memory rather than take more; tolerated up to
        # 64 bytes there. Anything else must not spill.
        spilled = res.spill_stores + res.spill_loads
        if spilled and not (tiles > 1 and res.registers <= 64 and spilled <= 64):
            bad.append(f"KIND={kind} tiles={tiles} {res}")
        assert res.registers <= 128 or not div, f"KIND={kind}: > 128 registers leaves < 16 warps an SM: {res}"
        # SwiGLU's exp is libdevice's expf (what torch's CUDA silu calls): its ex2.approx.ftz follows
        # an exact range reduction. Anything else approximate (tl.exp's bare ex2.approx.f32, '/')
        # would not match torch.
        allowed = "ex2.approx.ftz.f32" if kind == 2 else ""
        assert res.approx_ops == allowed, f"approximate fp32 math would not match torch: KIND={kind} {res}"
        if div:
            # One read and one write at HBM speed need 16-byte accesses: every activation load and
            # every store must be a .v4.b32. (Narrow RMSNorm rows, [ROWS > 1, BLOCK] tiles, load the
            # norm weight once per program in a slice layout, b16..v2: <= 1 / ROWS of the bytes.)
            ops = res.global_ops.split(",")
            weight_ok = kind == 1 and narrow
            wide = [op for op in ops if op.endswith(".v4.b32")]
            assert "ld.global.v4.b32" in wide and "st.global.v4.b32" in wide and (weight_ok or wide == ops), (
                f"KIND={kind} BLOCK={block}: global accesses not 16-byte vectors at LLaMA shapes: {ops} ({res})")
    assert not bad, "register spills: " + "; ".join(bad)


# ----------------------------------------------------------------------------------------------
# The quantiser's division: v / s from the row's reciprocal (act_quant.div_by_row)
# ----------------------------------------------------------------------------------------------


def _rn32(fr):
    """An exact rational -> the nearest fp32 (ties to even)."""
    import numpy as np
    from fractions import Fraction

    c = np.float32(float(fr))
    near = (c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf)))
    return min(near, key=lambda v: (abs(Fraction(float(v)) - fr), int(np.float32(v).view(np.uint32)) & 1))


def _fma32(a, b, c):
    """IEEE fp32 ``fma(a, b, c)``: one rounding of the exact value; an exact zero is -0 only when
    the product and ``c`` are both -0 (round to nearest)."""
    import numpy as np
    from fractions import Fraction

    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:
        prod_neg = bool(np.signbit(a)) != bool(np.signbit(b))
        both_zero = (a == 0 or b == 0) and c == 0
        return np.float32(-0.0) if both_zero and prod_neg and np.signbit(c) else np.float32(0.0)
    return _rn32(exact)


def _div_by_row_model(v, s, corrections=2):
    """``div_by_row`` on the GPU, step by step: r = RN(1/s), q = RN(v r), then ``corrections``
    times t = fma(q, s, -v), q = fma(-t, r, q)."""
    import numpy as np

    r = np.float32(np.float32(1.0) / s)
    q = np.float32(v * r)
    for _ in range(corrections):
        t = _fma32(q, s, -v)
        q = _fma32(-t, r, q)
    return q


def _bits(*words):
    import numpy as np

    return np.array(words, dtype=np.uint32).view(np.float32)


#: Scales whose reciprocal is hardest to use: mantissas of all ones and just below 2 (a review
#: found v = 0x3fc00001 / s = 0x3fffffff: RN(v * RN(1/s)) is 1.25 ulp off and one FMA residual inexact).
_HARD_SCALES = _bits(0x3FFFFFFF, 0x3F7FFFFF, 0x3FFFFFFD, 0x3C7FFFFE, 0x3FC00001, 0x3FAAAAAB)


def test_row_reciprocal_division_is_ieee_division():
    """The GPU quantiser divides by a row's scale with one reciprocal a row and a multiply plus two
    FMA corrections a value (Markstein). Its model, with exact FMAs, must equal IEEE fp32 division bit for bit (sign of
    zero included) for the scales the quantiser makes: bf16 / fp16 / fp32 rows over 60 decades, the
    values themselves and the rounding ties (k + 1/2) s and their fp32 neighbours, where an
    off-by-an-ulp quotient would change W_int. (The interpreter, whose fma is not fused, divides.)"""
    import numpy as np

    rng = np.random.default_rng(0)
    f32 = np.float32
    checked = 0
    for trial in range(600):
        scale = 10.0 ** rng.uniform(-30, 30) if trial % 3 == 2 else 10.0 ** rng.uniform(-6, 4)
        row = torch.randn(32, generator=torch.Generator().manual_seed(trial)) * scale
        row = (row.bfloat16() if trial % 3 == 0 else row.half() if trial % 3 == 1 and scale < 1e4 else row).float().numpy()
        for qmin, qmax in ((-128, 127), (-8, 7)):
            lo, hi = min(row.min(), f32(0)), max(row.max(), f32(0))
            s = max(f32(f32(hi - lo) / f32(qmax - qmin)), f32(1e-8))
            ties = np.array([f32((k + 0.5) * s) for k in rng.integers(qmin, qmax, 4)], dtype=f32)
            values = np.concatenate([row[:6], ties, np.nextafter(ties, f32(np.inf)), np.nextafter(ties, f32(-np.inf)),
                                     np.array([0.0, -0.0, hi, lo], dtype=f32)])
            for v in values:
                want, got = f32(v / s), _div_by_row_model(v, s)
                assert want == got and np.signbit(want) == np.signbit(got), (v, s, want, got)
                checked += 1
    assert checked > 25000
    # the hard scales: tie neighbours over the whole grid, and the review's operand
    for s in _HARD_SCALES:
        ks = np.arange(-128, 128, dtype=np.float64)
        ties = ((ks + 0.5) * np.float64(s)).astype(f32)
        v_all = np.concatenate([ties, np.nextafter(ties, f32(np.inf)), np.nextafter(ties, f32(-np.inf)), _bits(0x3FC00001)])
        for v in v_all:
            want, got = f32(v / s), _div_by_row_model(v, s)
            assert want == got and np.signbit(want) == np.signbit(got), (v, s, want, got)


def test_quantiser_divides_once_a_row():
    """The compiled quantiser has no per-value ``div.rn.f32`` (each is ~10 instructions and a slow
    path): one reciprocal a row, four FMAs a value. Fails if the kernel divides value by value."""
    import re
    import subprocess as sp

    code = (
        "import os, re, json; os.environ['TRITON_INTERPRET'] = '0'\n"
        "from lrqat_kernels.ops import act_quant as AQ, aot\n"
        "sig = {'a_ptr': '*bf16', 'b_ptr': '*bf16', 'y_ptr': '*bf16', 'n_rows': 'i32', 'n_cols': 'i32',"
        " 'stride_a': 'i64', 'stride_b': 'i64', 'stride_y': 'i64', 'eps': 'fp32'}\n"
        "out = {}\n"
        "for kind in (0, 1, 2):\n"
        "    for n in (4096, 11008, 30000):\n"
        "        block, rows, warps, one, nchunk = AQ.act_quant_config(n, kind)\n"
        "        ce = dict(KIND=kind, QMIN=-128, QMAX=127, QUANT=True, SYMMETRIC=False, BLOCK=block, ROWS=rows,"
        " ONE_CHUNK=one, INTERPRET=False, NCHUNK=nchunk)\n"
        "        s = dict(sig, **{k: 'constexpr' for k in ce})\n"
        "        _, ptx = aot._compile(AQ._act_quant_kernel, s, ce, 90, warps, 3, enable_fp_fusion=False,"
        " return_ptx=True)\n"
        "        out[f'{kind}-{n}'] = [len(re.findall(r'div\\.rn\\.f32', ptx)), len(re.findall(r'fma\\.rn\\.f32', ptx)),"
        " nchunk * block * rows // (32 * warps), one]\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = sp.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    for name, (divs, fmas, per_thread, one_chunk) in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        # per row: 1 / s, the scale, the zero point, RMSNorm's mean and rsqrt. SwiGLU's division a
        # value (silu(g) = g / (1 + exp(-g)), as torch) is the producer's, not the quantiser's (made
        # twice by the two-pass loop of wide rows: range, then write).
        allowed = 6 + (per_thread * (1 if one_chunk else 2) if name.startswith("2-") else 0)
        assert divs <= allowed, f"{name}: {divs} div.rn.f32 for {per_thread} values a thread"
        assert fmas >= 4 * per_thread, f"{name}: {fmas} fma.rn.f32, expected four a value"


def _hard_rows(dtype):
    """fp32 rows whose symmetric 8-bit scale ``RN(max|x| / 127)`` is one of :data:`_HARD_SCALES`,
    filled with the rounding ties ``(k + 1/2) s`` of the grid, their fp32 neighbours and signed zeros."""
    import numpy as np

    rows = []
    for target in _HARD_SCALES:
        m = np.float32(np.float64(target) * 127)
        for _ in range(64):  # the largest |x| whose scale is exactly the target
            s = np.float32(m / np.float32(127))
            if s == target:
                break
            m = np.nextafter(m, np.float32(np.inf) if s < target else np.float32(-np.inf))
        assert np.float32(m / np.float32(127)) == target
        ties = ((np.arange(-127, 127, dtype=np.float64) + 0.5) * np.float64(target)).astype(np.float32)
        row = np.concatenate([ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf)),
                              np.array([m, -0.0, 0.0], dtype=np.float32)])
        rows.append(row)
    return torch.from_numpy(np.stack(rows)).to(dtype)


@pytest.mark.parametrize("device", ["cuda" if torch.cuda.is_available() else "cpu"])
def test_kernel_divides_exactly_at_hard_scales(device):
    """Kernel vs reference, value for value, on rows built so that the row's
    scale has the hardest mantissas for a reciprocal and every value sits at or next to a rounding
    tie: a quotient an ulp off would move a value to the next grid point. On a GPU this checks the
    compiled reciprocal division; under the interpreter (which divides) the plumbing. (Zeros are
    compared as values: the kernels' round-half-even, ``(x + 1.5 * 2^23) - 1.5 * 2^23``, gives
    +0 where ``torch.round(-0.5)`` gives -0.)"""
    x = _hard_rows(torch.float32).to(device)
    got = AQ.act_fake_quant_forward(x, 8, True)
    want = R.fake_quant_activation(x, 8, True)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [7, 130, 4096, 5120, 11008, 20000], ids=lambda n: f"hidden{n}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_kernel_matches_reference_exactly(n, dtype):
    """The compiled kernel (reciprocal division, 32 values a thread) on CUDA vs torch's own CUDA
    ops, value for value, every grid and symmetry."""
    x = _rows(n, dtype).cuda()
    x[5, : n // 2] = -0.0
    for bits, sym in ((8, False), (8, True), (4, False), (4, True)):
        got = AQ.act_fake_quant_forward(x, bits, sym)
        assert torch.equal(got, R.fake_quant_activation(x, bits, sym)), (bits, sym)


def test_reference_straight_through_saves_nothing():
    """The straight-through step passes the gradient to x alone: no graph behind x_hat (it used to
    keep two activation-sized masks and run dead backward nodes on the eager CPU path)."""
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = R.fake_quant_activation(x, 8, False)
    assert saved == []
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)
