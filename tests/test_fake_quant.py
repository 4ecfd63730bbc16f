"""Fused fake-quant kernels (``lrqat_kernels.ops.fake_quant`` via ``lrqat_kernels.fake_quant_weight``)
against the eager reference (``lrqat_kernels.reference``).

Without CUDA, ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` and the Triton kernels run in the
interpreter on CPU tensors (that is how CI runs them): shapes are small and odd on purpose (not
multiples of the tiles: 16 x 32 under the interpreter), the forward is the full cross product,
the backward a sample of it.

Rules checked (NUMERICS.md):
* ``W_int`` equals the reference's except at near-ties (``|frac(Z) - 1/2|`` within fp32 noise,
  where the summation order of ``C`` decides); those are counted and must be vanishingly rare.
  Where ``W_int`` agrees, ``W_hat`` is bit-identical.
* Gradients: the kernel's error against an fp64 reference is at most twice the eager
  reference's error in the same dtype (plus a tiny atol).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

import lrqat_kernels as lk
from lrqat_kernels import functions, reference
from lrqat_kernels.formats import decode_phi, encode_phi, qrange
from lrqat_kernels.ops import fake_quant as fq
from lrqat_kernels.ops import fused_linear  # noqa: F401  (registers the lrqat::fused_linear_* ops)
from lrqat_kernels.ops._launch import interpreting
from lrqat_kernels.ops._tiles import FMA_RANK_CHUNK, MAX_RANK, bwd_config, bwd_grid, fwd_config
from lrqat_kernels.ops._triton_quant import RNE_LIMIT, int_to_f32, nibble_codes, round_half_even

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = torch.cuda.is_available() or interpreting()
needs_kernels = pytest.mark.skipif(not KERNELS, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

FORMAT_BITS = (
    [("packed_int", b) for b in (2, 3, 4)]
    + [("fixed_point", b) for b in (2, 3, 4, 5, 6, 7)]
    + [(f, b) for f in ("bf16", "fp16", "fp32") for b in (2, 3, 4, 8)]
)
GRANULARITIES = (None, 32, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
RANKS = (1, 5, 17, 33)
ALPHA = 1.5


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def make_problem(out, inn, rank, bits, phi_format, group_size, dtype, *, zero_point=False, seed=0, zero_b=False):
    """Random LR-QAT layer: Phi0 spanning a bit beyond the grid (so the clip mask matters),
    O(1) low-rank corrections, realistic fp32 scales."""
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(bits)
    x = torch.rand(out, inn, generator=gen) * (qmax - qmin + 3) + (qmin - 1.5)
    phi = encode_phi(x, bits, phi_format)
    lora_A = torch.randn(rank, inn, generator=gen).to(dtype)
    lora_B = torch.zeros(out, rank) if zero_b else torch.randn(out, rank, generator=gen)
    lora_B = lora_B.to(dtype)
    n_groups = 1 if group_size is None else inn // group_size
    scale = torch.rand(out, n_groups, generator=gen) * 0.02 + 0.01
    zp = None
    if zero_point:
        zp = torch.randint(qmin // 2, qmax // 2 + 1, (out, n_groups), generator=gen).float()
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(phi), to(lora_A), to(lora_B), to(scale), to(zp)


def z_fp64(phi, lora_A, lora_B, bits, phi_format):
    return decode_phi(phi, bits, phi_format).double() + (lora_B.double() @ lora_A.double()) * (ALPHA / lora_A.shape[0])


def near_tie(z64: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Where fp32 summation order can decide the rounding: ``frac(Z)`` within ``tol`` of 1/2."""
    return ((z64 - torch.floor(z64)) - 0.5).abs() < tol


def qkw(bits, phi_format, group_size, zp=None):
    return dict(bits=bits, phi_format=phi_format, alpha=ALPHA, group_size=group_size, zero_point=zp)


def assert_int_match(w_k, w_r, z64, what):
    """``w_k == w_r`` except at near-ties (and those must be rare); NaN matches NaN."""
    w_k, w_r = w_k.double(), w_r.double()
    differ = ~((w_k == w_r) | (w_k.isnan() & w_r.isnan()))
    ties = near_tie(z64)
    assert not (differ & ~ties).any(), f"{what}: {int((differ & ~ties).sum())} W_int mismatches away from ties"
    assert int(differ.sum()) <= max(2, differ.numel() // 1000), f"{what}: {int(differ.sum())} near-tie flips"
    return differ


# ----------------------------------------------------------------------------------------------
# Forward: full cross product on tiny odd shapes
# ----------------------------------------------------------------------------------------------

FWD_CASES = list(itertools.product(FORMAT_BITS, GRANULARITIES, DTYPES))


@needs_kernels
@pytest.mark.parametrize(
    "fmt_bits,group_size,dtype", FWD_CASES,
    ids=[f"{f}-b{b}-{'ch' if g is None else f'g{g}'}-{_dt(d)}" for (f, b), g, d in FWD_CASES],
)
def test_forward_matches_reference(fmt_bits, group_size, dtype):
    phi_format, bits = fmt_bits
    i = FWD_CASES.index((fmt_bits, group_size, dtype))
    rank = RANKS[i % len(RANKS)]
    zp_on = i % 2 == 1
    phi, A, B, s, zp = make_problem(19, 256, rank, bits, phi_format, group_size, dtype, zero_point=zp_on, seed=i)
    kw = qkw(bits, phi_format, group_size, zp)

    w_hat = lk.fake_quant_weight(phi, A, B, s, **kw)
    w_ref = reference.fake_quant_weight(phi, A, B, s, **kw)
    assert w_hat.dtype == dtype and w_hat.shape == (19, 256)

    w_int, s_out, zp_out = lk.merge_weight(phi, A, B, s, **kw)
    w_int_ref, _, _ = reference.merge_weight(phi, A, B, s, **kw)
    assert w_int.dtype == torch.int8 and torch.equal(s_out, s.float())
    differ = assert_int_match(w_int, w_int_ref, z_fp64(phi, A, B, bits, phi_format), "merge")

    # W_hat is bit-identical wherever W_int agrees ...
    same = ~differ
    assert torch.equal(w_hat[same], w_ref[same])
    # ... and merge is bit-exact with the forward: s * (W_int - z) rebuilds W_hat exactly.
    g = 256 if group_size is None else group_size
    centered = w_int.float() - (0 if zp_out is None else reference.expand_groups(zp_out.float(), g))
    rebuilt = (reference.expand_groups(s_out, g) * centered).to(dtype)
    assert torch.equal(rebuilt, w_hat)


@needs_kernels
@pytest.mark.parametrize("phi_format,bits", [("fixed_point", 4), ("fixed_point", 3), ("fp16", 8), ("bf16", 2)])
def test_exact_ties_when_lora_b_is_zero(phi_format, bits):
    """At init ``C = 0``: Z is Phi0 exactly and every .5 tie must round half to even, bit for bit."""
    phi, A, B, s, _ = make_problem(21, 96, 3, bits, phi_format, 32, torch.bfloat16, zero_b=True, seed=7)
    kw = qkw(bits, phi_format, 32)
    z = decode_phi(phi, bits, phi_format)
    assert (z - torch.floor(z) == 0.5).any(), "the problem should contain exact ties"
    assert torch.equal(lk.fake_quant_weight(phi, A, B, s, **kw), reference.fake_quant_weight(phi, A, B, s, **kw))
    assert torch.equal(lk.merge_weight(phi, A, B, s, **kw)[0], reference.merge_weight(phi, A, B, s, **kw)[0])


SPECIAL = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, -0.49999997, 0.50000006, -0.0, 126.5, 127.49999,
           127.5, 128.5, -127.5, -128.5, -128.49998, -129.5, 4194303.5, -4194303.5, 4194304.0, 4194304.5,
           -4194304.5, 8388607.0, 8388609.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]


@needs_kernels
@pytest.mark.parametrize("bits", [8, 4])
def test_round_half_even_and_clip_special_values(bits):
    """Every x.5 from -200.5 to 200.5, huge values, +-inf, NaN: W_int and mask as torch.round + clamp."""
    vals = torch.tensor([k + 0.5 for k in range(-201, 201)] + SPECIAL * 2, dtype=torch.float32)
    vals = torch.cat([vals, torch.zeros((-vals.numel()) % 32)]).reshape(-1, 32)
    out, inn = vals.shape
    phi = vals.to(DEVICE)
    A = torch.randn(2, inn, device=DEVICE)
    B = torch.zeros(out, 2, device=DEVICE)
    s = torch.ones(out, 1, device=DEVICE)
    kw = qkw(bits, "fp32", None)
    qmin, qmax = qrange(bits)
    want = torch.round(vals).clamp(qmin, qmax)
    got = lk.fake_quant_weight(phi, A, B, s, **kw).cpu()
    assert torch.equal(got.nan_to_num(1234.0), want.nan_to_num(1234.0))
    assert torch.equal(got.isnan(), vals.isnan())
    # mask: dL/dZ reaches lora_B only where qmin <= round(Z) <= qmax (inclusive)
    A.requires_grad_(True)
    B.requires_grad_(True)
    s.requires_grad_(True)
    G = torch.ones(out, inn, device=DEVICE)
    lk.fake_quant_weight(phi, A, B, s, **kw).backward(G)
    r = torch.round(vals)
    mask = ((r >= qmin) & (r <= qmax)).float().to(DEVICE)
    torch.testing.assert_close(B.grad, (ALPHA / 2) * mask @ A.detach().T, rtol=1e-5, atol=1e-5)
    ds_want = torch.where(vals.isnan(), float("nan"), want).sum(1, keepdim=True)
    torch.testing.assert_close(s.grad.cpu(), ds_want, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Backward: a sample of the cross product
# ----------------------------------------------------------------------------------------------

BWD_CASES = [
    (fb, g, d)
    for j, (fb, g, d) in enumerate(itertools.product(
        [("packed_int", 4), ("packed_int", 2), ("fixed_point", 3), ("fixed_point", 7), ("bf16", 8), ("fp16", 4), ("fp32", 3)],
        GRANULARITIES, DTYPES))
    if j % 3 == 0 or (j % 3 == 1 and j % 2 == 0)
]


def assert_grad_close(name, kern, eager, truth, atol_rel=2.0**-20):
    """Kernel error vs fp64 <= 2 x eager-in-the-same-dtype error + atol (flash-attention's rule)."""
    t = truth.double().cpu()
    e_k = (kern.double().cpu() - t).abs().max().item()
    e_e = (eager.double().cpu() - t).abs().max().item()
    atol = atol_rel * t.abs().max().item()
    assert e_k <= 2 * e_e + atol, f"{name}: kernel error {e_k:.3g} > 2 x eager error {e_e:.3g} + {atol:.3g}"


def grads_of(fn, phi, A, B, s, G, kw, dtype):
    A = A.detach().clone().requires_grad_(True)
    B = B.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    fn(phi, A, B, s, out_dtype=dtype, **kw).backward(G.to(dtype))
    return A.grad, B.grad, s.grad


@needs_kernels
@pytest.mark.parametrize(
    "fmt_bits,group_size,dtype", BWD_CASES,
    ids=[f"{f}-b{b}-{'ch' if g is None else f'g{g}'}-{_dt(d)}" for (f, b), g, d in BWD_CASES],
)
def test_backward_matches_fp64_reference(fmt_bits, group_size, dtype):
    phi_format, bits = fmt_bits
    i = BWD_CASES.index((fmt_bits, group_size, dtype))
    rank = RANKS[(i + 1) % len(RANKS)]
    zp_on = i % 2 == 0
    phi, A, B, s, zp = make_problem(37, 128, rank, bits, phi_format, group_size, dtype, zero_point=zp_on, seed=100 + i)
    kw = qkw(bits, phi_format, group_size, zp)
    G = torch.randn(37, 128, generator=torch.Generator().manual_seed(i)).to(dtype).to(DEVICE)
    got = grads_of(lk.fake_quant_weight, phi, A, B, s, G, kw, dtype)
    eager = grads_of(reference.fake_quant_weight, phi, A, B, s, G, kw, dtype)
    truth = grads_of(reference.fake_quant_weight, phi, A.double(), B.double(), s.double(), G, kw, torch.float64)
    for name, k, e, t in zip(("lora_A", "lora_B", "scale"), got, eager, truth):
        assert k.dtype == e.dtype, name
        assert_grad_close(name, k, e, t)


@needs_kernels
@pytest.mark.parametrize("programs", ["1", "3", "64"])
@pytest.mark.parametrize("group_size", [None, 32, 24])
def test_backward_bandings_agree(set_kernel_options, programs, group_size):
    """One program for everything (dA read-modify-write over row tiles), a few bands (ds
    partials across column bands), one tile a program: all the same gradients."""
    set_kernel_options(bwd_programs=int(programs))
    phi, A, B, s, zp = make_problem(45, 96, 6, 4, "packed_int", group_size, torch.float32, zero_point=True, seed=3)
    G = torch.randn(45, 96, device=DEVICE)
    d = fq.fake_quant_backward(G, phi, A, B, s, zp, bits=4, phi_format="packed_int", alpha=ALPHA)
    want = fq._eager_bwd(G, phi, A, B, s, zp, 4, "packed_int", ALPHA)
    for got, ref_ in zip(d, want):
        torch.testing.assert_close(got, ref_, rtol=2e-5, atol=2e-5)


def test_bwd_grid_partials_and_in_place_ds():
    # ~target programs, bands cover every tile, ds in place iff no group spans two column bands
    for out, inn, tm_, tn_, chunks, gpt in [(4096, 4096, 64, 64, 64, 1), (11008, 4096, 172, 64, 1, 2), (45, 96, 3, 3, 3, 1)]:
        for target in (1, 3, 264):
            p_m, p_n, tm, tn = bwd_grid(out, inn, tm_, tn_, target_programs=target, chunks=chunks, gpt=gpt)
            assert p_m * tm >= tm_ and (p_m - 1) * tm < tm_
            assert p_n * tn >= tn_ and (p_n - 1) * tn < tn_
            if gpt == 1 and chunks > 1 and tn > chunks:
                assert tn % chunks == 0


# ----------------------------------------------------------------------------------------------
# Special inputs, layouts, the GPU tile table, int64 offsets
# ----------------------------------------------------------------------------------------------


@needs_kernels
def test_nan_inf_propagate_like_reference():
    phi, A, B, s, zp = make_problem(20, 64, 4, 8, "fp32", 32, torch.float32, zero_point=True, seed=11)
    phi[0, :5] = torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30])
    phi[3, 7] = float("nan")
    s[5, 1] = float("inf")   # inf * (W_int - z) is NaN where W_int == z
    s[6, 0] = float("nan")
    A[1, 9] = float("inf")   # column 9 of C: +-inf, or NaN where lora_B is 0 (inf * 0)
    B[2, 1] = 0.0
    kw = qkw(8, "fp32", 32, zp)
    got = lk.fake_quant_weight(phi, A, B, s, **kw)
    want = reference.fake_quant_weight(phi, A, B, s, **kw)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="NaN"):
        lk.merge_weight(phi, A, B, s, **kw)

    A[1, 9] = 0.5  # backward with non-finite Phi0 / scale: NaN lands where the reference puts it
    G = torch.randn(20, 64, device=DEVICE)
    got = grads_of(lk.fake_quant_weight, phi, A, B, s, G, kw, torch.float32)
    want = grads_of(reference.fake_quant_weight, phi, A, B, s, G, kw, torch.float32)
    for k, w in zip(got, want):
        assert torch.equal(k.isnan(), w.isnan()) and torch.equal(k.isinf(), w.isinf())
        torch.testing.assert_close(k, w, equal_nan=True, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("inn,group_size", [(36, 9), (30, 3), (96, 24), (160, 80)])
def test_group_sizes_not_dividing_the_tile(inn, group_size):
    """Odd and non-power-of-two groups (tiles end inside a group; packed nibbles start mid-byte)."""
    for phi_format in ("packed_int", "fixed_point"):
        phi, A, B, s, zp = make_problem(17, inn, 3, 4, phi_format, group_size, torch.float32, zero_point=True, seed=inn)
        kw = qkw(4, phi_format, group_size, zp)
        differ = assert_int_match(lk.merge_weight(phi, A, B, s, **kw)[0], reference.merge_weight(phi, A, B, s, **kw)[0],
                                  z_fp64(phi, A, B, 4, phi_format), "merge")
        assert torch.equal(lk.fake_quant_weight(phi, A, B, s, **kw)[~differ], reference.fake_quant_weight(phi, A, B, s, **kw)[~differ])
        G = torch.randn(17, inn, device=DEVICE)
        got = grads_of(lk.fake_quant_weight, phi, A, B, s, G, kw, torch.float32)
        truth = grads_of(reference.fake_quant_weight, phi, A.double(), B.double(), s.double(), G, kw, torch.float64)
        eager = grads_of(reference.fake_quant_weight, phi, A, B, s, G, kw, torch.float32)
        for name, k, e, t in zip(("lora_A", "lora_B", "scale"), got, eager, truth):
            assert_grad_close(name, k, e, t)


@needs_kernels
@pytest.mark.parametrize("rank,group_size,phi_format,dtype", [
    (32, None, "packed_int", torch.bfloat16), (32, 32, "fixed_point", torch.bfloat16), (64, 128, "bf16", torch.bfloat16),
    (128, 32, "fp32", torch.bfloat16), (100, None, "packed_int", torch.bfloat16),
    (128, None, "fp32", torch.float32), (64, 32, "packed_int", torch.float32)], ids=str)
def test_gpu_tile_table_under_interpreter(set_kernel_options, rank, group_size, phi_format, dtype):
    """The exact constexprs a GPU gets (64 x 128 forward tiles, gpt > 1, large ranks, the
    backward's 16-wide tiles at R_PAD = 128), on CPU."""
    set_kernel_options(gpu_tiles=True)
    phi, A, B, s, zp = make_problem(70, 256, rank, 4, phi_format, group_size, dtype, zero_point=True, seed=rank)
    kw = qkw(4, phi_format, group_size, zp)
    differ = assert_int_match(lk.merge_weight(phi, A, B, s, **kw)[0], reference.merge_weight(phi, A, B, s, **kw)[0],
                              z_fp64(phi, A, B, 4, phi_format), "merge")
    assert torch.equal(lk.fake_quant_weight(phi, A, B, s, **kw)[~differ], reference.fake_quant_weight(phi, A, B, s, **kw)[~differ])
    G = torch.randn(70, 256, device=DEVICE).to(dtype)
    got = grads_of(lk.fake_quant_weight, phi, A, B, s, G, kw, dtype)
    eager = grads_of(reference.fake_quant_weight, phi, A, B, s, G, kw, dtype)
    truth = grads_of(reference.fake_quant_weight, phi, A.double(), B.double(), s.double(), G, kw, torch.float64)
    for name, k, e, t in zip(("lora_A", "lora_B", "scale"), got, eager, truth):
        assert_grad_close(name, k, e, t)


@needs_kernels
@pytest.mark.parametrize("rank,group_size,phi_format,gpu_tiles", [(33, None, "packed_int", False), (100, 32, "fixed_point", True),
                                                                   (128, None, "fp32", True)])
def test_fp32_factors_wide_rank_forward_loops_over_rank_slices(set_kernel_options, rank, group_size, phi_format, gpu_tiles):
    """fp32 factors with R_PAD > 32 build B @ A in 32-wide rank slices (a loop whose last slice is
    partly masked): W_int and W_hat still match the reference."""
    set_kernel_options(gpu_tiles=gpu_tiles)
    cfg = fwd_config(70, 256, rank, group_size or 256, torch.float32)
    assert cfg.r_chunk == FMA_RANK_CHUNK < cfg.r_pad
    phi, A, B, s, zp = make_problem(70, 256, rank, 4, phi_format, group_size, torch.float32, zero_point=True, seed=rank)
    kw = qkw(4, phi_format, group_size, zp)
    differ = assert_int_match(lk.merge_weight(phi, A, B, s, **kw)[0], reference.merge_weight(phi, A, B, s, **kw)[0],
                              z_fp64(phi, A, B, 4, phi_format), "merge")
    assert torch.equal(lk.fake_quant_weight(phi, A, B, s, **kw)[~differ], reference.fake_quant_weight(phi, A, B, s, **kw)[~differ])


@needs_kernels
def test_int64_offsets_give_the_same_results(monkeypatch):
    phi, A, B, s, zp = make_problem(33, 64, 5, 3, "fixed_point", 32, torch.float16, zero_point=True, seed=5)
    kw = dict(bits=3, phi_format="fixed_point", alpha=ALPHA)
    G = torch.randn(33, 64, device=DEVICE).half()
    base = (fq.fake_quant_forward(phi, A, B, s, zp, out_dtype=torch.float16, **kw), *fq.fake_quant_backward(G, phi, A, B, s, zp, **kw))
    monkeypatch.setattr(fq, "needs_int64", lambda *n: True)
    wide = (fq.fake_quant_forward(phi, A, B, s, zp, out_dtype=torch.float16, **kw), *fq.fake_quant_backward(G, phi, A, B, s, zp, **kw))
    for a, b in zip(base, wide):
        assert torch.equal(a, b)


class _Recorder:
    """Stands in for a Triton kernel: records the launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return launch


def test_launchers_switch_to_int64_offsets_past_2_31(monkeypatch):
    """``out * in >= 2^31`` (e.g. a 128256 x 16768 embedding-sized weight): int64 offsets.

    Meta tensors: the launchers run their shape logic with no memory behind it."""
    assert not fq.needs_int64(2**31 - 1) and fq.needs_int64(2**31)
    for out, inn, want in [(4096, 11008, False), (65536, 32768, True), (32768, 65536, True), (46340, 46340, False)]:
        phi = torch.empty(out, inn // 2, dtype=torch.uint8, device="meta")
        A = torch.empty(32, inn, dtype=torch.bfloat16, device="meta")
        B = torch.empty(out, 32, dtype=torch.bfloat16, device="meta")
        s = torch.empty(out, inn // 128, device="meta")
        fwd, bwd = _Recorder(), _Recorder()
        monkeypatch.setattr(fq, "_fake_quant_fwd_kernel", fwd)
        monkeypatch.setattr(fq, "_fake_quant_bwd_kernel", bwd)
        fq.fake_quant_forward(phi, A, B, s, None, bits=4, phi_format="packed_int", alpha=1.0, out_dtype=torch.bfloat16)
        G = torch.empty(out, inn, dtype=torch.bfloat16, device="meta")
        fq.fake_quant_backward(G, phi, A, B, s, None, bits=4, phi_format="packed_int", alpha=1.0)
        assert fwd.calls[0][2]["I64"] is want and bwd.calls[0][2]["I64"] is want, (out, inn)


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument (same rules as the reference: _checks.py)
# ----------------------------------------------------------------------------------------------


def _good():
    phi, A, B, s, _ = make_problem(8, 64, 2, 4, "packed_int", 32, torch.float32, seed=1)
    return phi, A, B, s


BAD = [
    ("lora dtypes", lambda p, A, B, s: (p, A, B.half(), s, {}), TypeError, "lora_A and lora_B"),
    ("lora_A shape", lambda p, A, B, s: (p, A[:, :32], B, s, {}), ValueError, "lora_A must be"),
    ("lora_B shape", lambda p, A, B, s: (p, A, B[:4], s, {}), ValueError, "lora_B must be"),
    ("scale granularity", lambda p, A, B, s: (p, A, B, s[:, :1], {}), ValueError, "scale must be"),
    ("scale per-channel", lambda p, A, B, s: (p, A, B, s, {"group_size": None}), ValueError, "scale must be"),
    ("scale dtype", lambda p, A, B, s: (p, A, B, s.half(), {}), TypeError, "scale"),
    ("phi dtype", lambda p, A, B, s: (p.view(torch.int8), A, B, s, {}), TypeError, "phi"),
    ("phi unpacked", lambda p, A, B, s: (torch.zeros(8, 64, dtype=torch.uint8), A, B, s, {}), ValueError, "lora_A must be"),
    ("phi non-contiguous", lambda p, A, B, s: (torch.zeros(64, 8, dtype=torch.uint8).t()[:, :32], A, B, s, {}),
     ValueError, "phi must be contiguous"),
    ("zero_point shape", lambda p, A, B, s: (p, A, B, s, {"zero_point": torch.zeros(8, 1)}), ValueError, "zero_point"),
    ("device", lambda p, A, B, s: (p, A, B, s.to("meta"), {}), ValueError, "same device"),
    ("bits", lambda p, A, B, s: (p, A, B, s, {"bits": 5}), ValueError, "bits"),
    ("group_size", lambda p, A, B, s: (p, A, B, s, {"group_size": 48}), ValueError, "group_size"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("api", ["fake_quant_weight", "merge_weight", "lrqat_linear"])
def test_bad_input_names_the_argument(case, api):
    _, make, exc, match = case
    phi, A, B, s, extra = make(*_good())
    kw = dict(bits=4, phi_format="packed_int", alpha=1.0, group_size=32)
    kw.update(extra)
    fn = getattr(lk, api)
    with pytest.raises(exc, match=match):
        if api == "lrqat_linear":
            fn(torch.randn(3, 64, device=DEVICE), phi, A, B, s, **kw)
        else:
            fn(phi, A, B, s, **kw)


@triton.jit
def _helpers_kernel(z_ptr, q_ptr, byte_ptr, lo_ptr, hi_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(q_ptr + i, round_half_even(tl.load(z_ptr + i)))
    u_lo, u_hi = nibble_codes(tl.load(byte_ptr + i).to(tl.int32))
    tl.store(lo_ptr + i, int_to_f32(u_lo, 8))
    tl.store(hi_ptr + i, int_to_f32(u_hi, 8))


@needs_kernels
def test_shared_quantiser_helpers():
    """ops/_triton_quant.py, which every kernel uses: ``round_half_even`` is ``torch.round`` (ties to
    even; a zero's sign aside) below 2^22 and passes larger values, +-inf and NaN through; the
    nibble decoder reads every byte as ``formats.unpack_nibbles`` does (low nibble: even column)."""
    from lrqat_kernels.formats import unpack_nibbles

    ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 7.5, -8.5, 0.49999997, -0.50000006, 4194303.5, -4194302.5, 3.0, -0.0]
    big = [4194304.5, -5000000.5, 1e30, float("inf"), float("-inf"), float("nan")]
    z = torch.tensor(ties + big + [0.0] * (256 - len(ties) - len(big)), device=DEVICE)
    byte = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    q, lo, hi = (torch.empty(256, device=DEVICE) for _ in range(3))
    _helpers_kernel[(1,)](z, q, byte, lo, hi, N=256)
    small = z.abs() < RNE_LIMIT.value  # 2^22
    assert torch.equal(q[small], torch.round(z[small]))  # as numbers: (-0.5 + c) - c is +0.0, torch.round's -0.0
    assert torch.equal(q[~small & ~z.isnan()], z[~small & ~z.isnan()]) and q[z.isnan()].isnan().all()
    want = unpack_nibbles(byte.view(256, 1).cpu()).float()  # [256, 2]: columns 2j, 2j + 1 of byte j
    assert torch.equal(lo.cpu(), want[:, 0]) and torch.equal(hi.cpu(), want[:, 1])


def test_public_names_are_the_dispatchers():
    assert lk.fake_quant_weight is functions.fake_quant_weight
    assert lk.lrqat_linear is functions.lrqat_linear
    assert lk.merge_weight is functions.merge_weight


# ----------------------------------------------------------------------------------------------
# torch.library
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phi_format,group_size,zp_on", [("packed_int", 32, True), ("bf16", None, False)])
def test_opcheck(phi_format, group_size, zp_on):
    phi, A, B, s, zp = make_problem(12, 64, 3, 4, phi_format, group_size, torch.float32, zero_point=zp_on, seed=2)
    meta = (4, phi_format, ALPHA)
    torch.library.opcheck(torch.ops.lrqat.fake_quant_fwd.default,
                          (phi, A.requires_grad_(), B.requires_grad_(), s.requires_grad_(), zp, *meta, torch.bfloat16))
    A, B, s = A.detach(), B.detach(), s.detach()
    G = torch.randn(12, 64, device=DEVICE)
    torch.library.opcheck(torch.ops.lrqat.fake_quant_bwd.default, (G, phi, A, B, s, zp, *meta))
    torch.library.opcheck(torch.ops.lrqat.fake_quant_w_int.default, (phi, A, B, s, zp, *meta))
    x = torch.randn(5, 64, device=DEVICE)
    dy = torch.randn(5, 12, device=DEVICE)
    bias = torch.randn(12, device=DEVICE)
    torch.library.opcheck(torch.ops.lrqat.fused_linear_fwd.default, (x, phi, A, B, s, zp, bias, *meta))
    torch.library.opcheck(torch.ops.lrqat.fused_linear_dx.default, (dy, phi, A, B, s, zp, *meta))
    torch.library.opcheck(torch.ops.lrqat.fused_linear_param_grads.default, (dy, x, phi, A, B, s, zp, *meta))


def test_fake_quant_fwd_op_is_differentiable():
    phi, A, B, s, zp = make_problem(12, 64, 3, 4, "fixed_point", 32, torch.float32, zero_point=True, seed=4)
    A.requires_grad_(True)
    B.requires_grad_(True)
    s.requires_grad_(True)
    G = torch.randn(12, 64, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    torch.ops.lrqat.fake_quant_fwd(phi, A, B, s, zp, 4, "fixed_point", ALPHA, torch.float32).backward(G)
    want = fq._eager_bwd(G, phi, A.detach(), B.detach(), s.detach(), zp, 4, "fixed_point", ALPHA)
    truth = fq._eager_bwd(G.double(), phi, A.detach().double(), B.detach().double(), s.detach().double(), zp, 4,
                                 "fixed_point", ALPHA)
    # fp32 sums in another order than the eager path's: compared by error against fp64 (a fixed
    # rtol failed for some draws of G, 4.7e-5 relative on an entry with cancellation)
    for name, got, w, t in zip(("lora_A", "lora_B", "scale"), (A.grad, B.grad, s.grad), want, truth):
        assert_grad_close(name, got, w, t)


def test_eager_path_equals_reference_bitwise(set_kernel_options):
    """Without kernels (plain CPU) the dispatchers run reference.py's math: identical results."""
    set_kernel_options(kernels=False)
    if torch.cuda.is_available():
        pytest.skip("CUDA tensors always take the kernels")
    phi, A, B, s, zp = make_problem(19, 64, 5, 3, "fixed_point", 32, torch.bfloat16, zero_point=True, seed=9)
    kw = qkw(3, "fixed_point", 32, zp)
    assert not functions.uses_kernels(phi, A, s)
    assert torch.equal(lk.fake_quant_weight(phi, A, B, s, **kw), reference.fake_quant_weight(phi, A, B, s, **kw))
    G = torch.randn(19, 64).bfloat16()
    got = grads_of(lk.fake_quant_weight, phi, A, B, s, G, kw, torch.bfloat16)
    want = grads_of(reference.fake_quant_weight, phi, A, B, s, G, kw, torch.bfloat16)
    for k, w in zip(got, want):
        torch.testing.assert_close(k, w, rtol=0, atol=0)


def test_ranks_above_max_rank_take_the_eager_path():
    phi, A, B, s, _ = make_problem(9, 64, MAX_RANK + 1, 4, "packed_int", None, torch.bfloat16, seed=13)
    assert not functions.uses_kernels(phi, A, s)
    kw = qkw(4, "packed_int", None)
    assert torch.equal(lk.fake_quant_weight(phi, A, B, s, **kw), reference.fake_quant_weight(phi, A, B, s, **kw))
