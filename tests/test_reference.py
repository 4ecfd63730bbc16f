"""The eager reference reproduces NUMERICS.md: ties, the inclusive clip mask, STE gradients,
the scale gradient, group layout, range estimation, merge, SVD init and bad input."""

import math

import pytest
import torch

from lrqat_kernels import init as I
from lrqat_kernels import reference as R
from lrqat_kernels.config import LRQATConfig
from lrqat_kernels.formats import decode_phi, encode_phi, qrange

FQ = dict(alpha=1.0)


def _one_col(z_values, bits=4, scale=None):
    """A layer with in=1, r=1, lora_A = 1, lora_B = 0, so Z = Phi0 exactly and dL/dlora_B = dL/dZ."""
    phi = torch.tensor(z_values, dtype=torch.float32).reshape(-1, 1)
    lora_A = torch.ones(1, 1, requires_grad=True)
    lora_B = torch.zeros(len(z_values), 1, requires_grad=True)
    s = (torch.ones(len(z_values), 1) if scale is None else scale).clone().requires_grad_(True)
    return phi, lora_A, lora_B, s


def test_round_half_to_even_ties():
    z = [0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -3.5, 0.49999997]
    phi, a, b, s = _one_col(z)
    w = R.fake_quant_weight(phi, a, b, s, bits=4, phi_format="fp32", **FQ)
    assert w.flatten().tolist() == [0.0, 2.0, 2.0, -2.0, -0.0, 4.0, -4.0, 0.0]


def test_inclusive_clip_mask_and_ste():
    # 4 bits: grid [-8, 7]. round(7.5) = 8 (clipped, masked), round(-8.5) = -8 (inside: half to even).
    z = [7.0, 7.4, 7.5, 8.0, -8.0, -8.5, -8.6, -9.0, 0.3]
    phi, a, b, s = _one_col(z)
    w = R.fake_quant_weight(phi, a, b, s, bits=4, phi_format="fp32", **FQ)
    assert w.flatten().tolist() == [7.0, 7.0, 7.0, 7.0, -8.0, -8.0, -8.0, -8.0, 0.0]
    w.sum().backward()
    # dL/dZ = s * G * M with G = 1, s = 1; dL/dlora_B = dL/dZ @ lora_A^T = M.
    assert b.grad.flatten().tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # dL/ds = G * W_int (z = 0), no LSQ term.
    assert s.grad.flatten().tolist() == [7.0, 7.0, 7.0, 7.0, -8.0, -8.0, -8.0, -8.0, 0.0]


def test_mask_at_other_bit_widths():
    for bits in (2, 3, 8):
        qmin, qmax = qrange(bits)
        z = [qmax + 0.49, qmax + 0.5, qmin - 0.5, qmin - 0.51]
        phi, a, b, s = _one_col(z, bits)
        R.fake_quant_weight(phi, a, b, s, bits=bits, phi_format="fp32", **FQ).sum().backward()
        # qmax + 0.5 rounds to even: up (masked) when qmax is odd; qmin - 0.5 rounds to qmin (even).
        assert b.grad.flatten().tolist() == [1.0, 0.0, 1.0, 0.0], bits


def test_scale_gradient_with_zero_point_by_hand():
    phi = torch.tensor([[1.0, 2.0, -3.0, 0.0], [4.0, 9.0, -1.0, 2.0]])
    a = torch.zeros(1, 4)
    b = torch.zeros(2, 1)
    s = torch.tensor([[0.5, 2.0], [1.0, 3.0]], requires_grad=True)
    zp = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 1.0, 2.0, 0.5]])
    w = R.fake_quant_weight(phi, a, b, s, bits=4, phi_format="fp32", zero_point=zp, group_size=2, **FQ)
    # W_int = clip(round(Z)): row 1 has 9 -> 7.
    expected_w = torch.tensor([[0.5 * 0, 0.5 * 1, 2.0 * -2, 2.0 * 1], [1.0 * 4, 1.0 * 7, 3.0 * -3, 3.0 * 0]])
    assert torch.equal(w, expected_w)
    w.backward(g)
    # dL/ds = sum over the group of G * (W_int - z)
    expected = torch.tensor([[1 * 0 + 2 * 1, 3 * -2 + 4 * 1], [-1 * 4 + 1 * 7, 2 * -3 + 0.5 * 0]])
    assert torch.equal(s.grad, expected)


def test_group_layout():
    out, in_, gs = 3, 12, 4
    phi = torch.ones(out, in_)
    s = torch.arange(1, out * in_ // gs + 1, dtype=torch.float32).reshape(out, in_ // gs)
    w = R.fake_quant_weight(phi, torch.zeros(1, in_), torch.zeros(out, 1), s, bits=4, phi_format="fp32",
                            group_size=gs, **FQ)
    for i in range(out):
        for j in range(in_):
            assert w[i, j] == s[i, j // gs]


def _explicit_grads(phi, a, b, s, zp, g, bits, alpha, group_size):
    """NUMERICS.md backward written out by hand, fp64."""
    r = a.shape[0]
    qmin, qmax = qrange(bits)
    gs = group_size or phi.shape[1]
    z = phi + (alpha / r) * b @ a
    q = torch.round(z)
    m = ((q >= qmin) & (q <= qmax)).to(z.dtype)
    w_int = q.clamp(qmin, qmax)
    s_full = s.repeat_interleave(gs, 1)
    zp_full = torch.zeros_like(z) if zp is None else zp.repeat_interleave(gs, 1)
    dz = s_full * g * m
    db = (alpha / r) * dz @ a.T
    da = (alpha / r) * b.T @ dz
    ds = (g * (w_int - zp_full)).reshape(z.shape[0], -1, gs).sum(-1)
    return da, db, ds


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("asym", [False, True])
def test_ste_gradients_match_numerics_formulas(group_size, asym):
    torch.manual_seed(0)
    out, in_, r, bits, alpha = 5, 8, 3, 3, 2.0
    phi = torch.randn(out, in_, dtype=torch.float64) * 3
    a = torch.randn(r, in_, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, r, dtype=torch.float64, requires_grad=True)
    ng = in_ // (group_size or in_)
    s = (torch.rand(out, ng, dtype=torch.float64) + 0.5).requires_grad_(True)
    zp = torch.randint(-2, 2, (out, ng)).double() if asym else None
    g = torch.randn(out, in_, dtype=torch.float64)
    phi32 = phi.float()  # stored fp32 Phi0; the math runs in fp64 because lora/scale are fp64
    w = R.fake_quant_weight(phi32, a, b, s, bits=bits, phi_format="fp32", alpha=alpha, zero_point=zp,
                            group_size=group_size)
    assert w.dtype == torch.float64
    da, db, ds = torch.autograd.grad(w, (a, b, s), g)
    ea, eb, es = _explicit_grads(phi32.double(), a.detach(), b.detach(), s.detach(), zp, g, bits, alpha, group_size)
    torch.testing.assert_close(da, ea, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, eb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds, es, rtol=1e-12, atol=1e-12)
    # The mask must actually bite in this case, or the test proves little.
    q = torch.round(phi32.double() + alpha / r * b.detach() @ a.detach())
    assert ((q < qrange(bits)[0]) | (q > qrange(bits)[1])).any()


@pytest.mark.parametrize("group_size", [None, 4])
def test_gradcheck_scale_x_bias(group_size):
    """W_hat is exactly linear in s and y in x and bias: torch.autograd.gradcheck in fp64."""
    torch.manual_seed(1)
    out, in_, r = 4, 8, 2
    phi = encode_phi(torch.randn(out, in_) * 2, 4, "fixed_point")
    a = torch.randn(r, in_, dtype=torch.float64)
    b = torch.randn(out, r, dtype=torch.float64)
    ng = in_ // (group_size or in_)
    s = (torch.rand(out, ng, dtype=torch.float64) + 0.5).requires_grad_(True)
    x = torch.randn(3, in_, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, dtype=torch.float64, requires_grad=True)

    def f(x, s, bias):
        return R.lrqat_linear(x, phi, a, b, s, bias, bits=4, phi_format="fixed_point", alpha=1.0,
                              group_size=group_size)

    assert torch.autograd.gradcheck(f, (x, s, bias))


def test_gradcheck_lora_surrogate():
    """With rounding offsets and the mask frozen at the base point, W_hat is smooth in lora_A/lora_B;
    its true derivative (gradcheck) equals the STE gradient of the reference at that point."""
    torch.manual_seed(2)
    out, in_, r, bits, alpha = 4, 6, 2, 3, 1.0
    phi = torch.randn(out, in_) * 3
    a0 = torch.randn(r, in_, dtype=torch.float64)
    b0 = torch.randn(out, r, dtype=torch.float64)
    s = torch.rand(out, 1, dtype=torch.float64) + 0.5
    qmin, qmax = qrange(bits)
    z0 = phi.double() + alpha / r * b0 @ a0
    q0 = torch.round(z0)
    m0 = (q0 >= qmin) & (q0 <= qmax)
    offset = q0 - z0

    def surrogate(a, b):
        z = phi.double() + alpha / r * b @ a
        return s * torch.where(m0, z + offset, q0.clamp(qmin, qmax))

    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(surrogate, (a, b))
    g = torch.randn(out, in_, dtype=torch.float64)
    w = R.fake_quant_weight(phi, a, b, s, bits=bits, phi_format="fp32", alpha=alpha)
    torch.testing.assert_close(w, surrogate(a, b), rtol=0, atol=0)
    got = torch.autograd.grad(w, (a, b), g)
    want = torch.autograd.grad(surrogate(a, b), (a, b), g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("phi_format,bits", [("packed_int", 4), ("fixed_point", 3), ("bf16", 8), ("fp16", 2)])
def test_merge_reproduces_forward(phi_format, bits):
    torch.manual_seed(3)
    out, in_, r = 6, 16, 4
    w0 = torch.randn(out, in_)
    s0 = I.estimate_scale(w0, bits, "minmax", group_size=8)
    x = w0 / R.expand_groups(s0, 8)
    phi = encode_phi(x, bits, phi_format)
    a, b = torch.randn(r, in_), torch.randn(out, r) * 0.5
    w_hat = R.fake_quant_weight(phi, a, b, s0, bits=bits, phi_format=phi_format, alpha=1.0, group_size=8,
                                out_dtype=torch.float32)
    w_int, scale, zp = R.merge_weight(phi, a, b, s0, bits=bits, phi_format=phi_format, alpha=1.0, group_size=8)
    assert w_int.dtype == torch.int8 and zp is None
    qmin, qmax = qrange(bits)
    assert int(w_int.min()) >= qmin and int(w_int.max()) <= qmax
    assert torch.equal(R.expand_groups(scale, 8) * w_int.float(), w_hat)


def test_out_dtype_and_linear_dtype():
    phi = encode_phi(torch.randn(4, 8), 4, "bf16")
    a, b = I.lora_init(4, 8, 2, dtype=torch.bfloat16)
    s = torch.full((4, 1), 0.1)
    assert R.fake_quant_weight(phi, a, b, s, bits=4, phi_format="bf16", alpha=1.0).dtype == torch.bfloat16
    x = torch.randn(2, 8, dtype=torch.float16)
    assert R.lrqat_linear(x, phi, a, b, s, bits=4, phi_format="bf16", alpha=1.0).dtype == torch.float16


def test_lora_init_is_zero_product():
    a, b = I.lora_init(7, 9, 3)
    assert a.shape == (3, 9) and b.shape == (7, 3)
    assert torch.all(b == 0) and a.abs().max() <= 1 / math.sqrt(9)
    assert torch.all(R.lowrank_product(a, b, 1.0) == 0)


def test_nan_and_inf_propagation():
    phi = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]])
    w = R.fake_quant_weight(phi, torch.zeros(1, 4), torch.zeros(1, 1), torch.ones(1, 1), bits=4,
                            phi_format="fp32", alpha=1.0)
    assert math.isnan(w[0, 0]) and w[0, 1:].tolist() == [7.0, -8.0, 1.0]
    b = torch.tensor([[float("nan")]])
    w = R.fake_quant_weight(torch.zeros(1, 4), torch.ones(1, 4), b, torch.ones(1, 1), bits=4, phi_format="fp32",
                            alpha=1.0)
    assert torch.isnan(w).all()
    with pytest.raises(ValueError, match="NaN"):
        R.merge_weight(torch.zeros(1, 4), torch.ones(1, 4), b, torch.ones(1, 1), bits=4, phi_format="fp32", alpha=1.0)


# ---------------------------------------------------------------------------------------------
# Range estimation and RTN
# ---------------------------------------------------------------------------------------------


def test_minmax_symmetric_and_asymmetric():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.7], [2.0, -0.1, 0.3, 3.5]])
    s = I.estimate_scale(w, 4, "minmax")
    torch.testing.assert_close(s, torch.tensor([[1.0 / 7], [3.5 / 7]]))
    s_g = I.estimate_scale(w, 4, "minmax", group_size=2)
    torch.testing.assert_close(s_g, torch.tensor([[1.0 / 7, 0.7 / 7], [2.0 / 7, 3.5 / 7]]))
    s_a, z = I.estimate_scale(w, 2, "minmax", symmetric=False)
    torch.testing.assert_close(s_a, torch.tensor([[1.7 / 3], [3.6 / 3]]))
    # z = round(qmin - min / s): row 0: -2 + 1/(1.7/3) = -0.235 -> 0; row 1: -2 + 0.1/1.2 -> -2
    assert z.flatten().tolist() == [0.0, -2.0]


@pytest.mark.parametrize("method", ["minmax", "lp:4"])
def test_asymmetric_range_of_a_one_signed_group_still_covers_it(method):
    """The grid s * (q - z) always holds 0 (z in [qmin, qmax]), so the range is widened to 0: a
    group in [1.0, 1.4] used to get z clamped to qmin and a grid near [0, 0.4] (error 1.0); every
    weight is now within half a step, and all-equal groups (either sign) are exact."""
    w = torch.tensor([[1.00, 1.05, 1.10, 1.15, 1.20, 1.25, 1.30, 1.40],
                      [-2.0, -1.9, -1.7, -1.6, -1.5, -1.3, -1.2, -1.1],
                      [0.7] * 8, [-0.3] * 8])
    s, z = I.estimate_scale(w, 4, method, symmetric=False)
    assert torch.all((-8 <= z) & (z <= 7))
    err = (I.rtn_quantize(w, s, bits=4, zero_point=z) - w).abs()
    assert torch.all(err <= s / 2 + 1e-6)
    assert torch.all(err[2:] <= 1e-6)


def test_lp_search_by_hand():
    # One outlier at 1.0 and 99 values at 0.3, 2 bits (qmax = 1), p = 2. Candidates s = k / 100.
    # For s in (0.3, 0.6): err = 99 (0.3 - s)^2 + (1 - s)^2; minimum over k is k = 31 (hand-computed:
    # k=30: 0.49, k=31: 0.4860, k=32: 0.5020).
    w = torch.tensor([[1.0] + [0.3] * 99])
    s = I.estimate_scale(w, 2, "lp:2")
    torch.testing.assert_close(s, torch.tensor([[0.31]]))
    # A larger p weighs the outlier more and picks a wider range.
    picked = [I.estimate_scale(w, 2, f"lp:{p}").item() for p in (2, 3, 4, 5, 12)]
    assert picked == sorted(picked) and picked[-1] > 0.6


def test_lp_beats_minmax_and_asymmetric_search():
    torch.manual_seed(4)
    w = torch.randn(16, 64) * torch.rand(16, 1)
    w[:, 0] *= 8  # outliers
    for p in (2.0, 2.4, 3.0, 3.5, 4.0, 5.0):
        s_lp = I.estimate_scale(w, 3, f"lp:{p}")
        s_mm = I.estimate_scale(w, 3, "minmax")
        e_lp = (I.rtn_quantize(w, s_lp, bits=3) - w).abs().pow(p).sum(1)
        e_mm = (I.rtn_quantize(w, s_mm, bits=3) - w).abs().pow(p).sum(1)
        assert torch.all(e_lp <= e_mm + 1e-6)
    s_a, z = I.estimate_scale(w + 0.5, 2, "lp:2.4", symmetric=False, group_size=16)
    assert s_a.shape == z.shape == (16, 4)
    s_m, z_m = I.estimate_scale(w + 0.5, 2, "minmax", symmetric=False, group_size=16)
    e_a = (I.rtn_quantize(w + 0.5, s_a, bits=2, zero_point=z, group_size=16) - w - 0.5).abs().pow(2.4).sum()
    e_m = (I.rtn_quantize(w + 0.5, s_m, bits=2, zero_point=z_m, group_size=16) - w - 0.5).abs().pow(2.4).sum()
    assert e_a < e_m


@pytest.mark.parametrize("method", ["lp:inf", "lp:64", "lp:0", "lp:-2", "lp:nan", "lp:", "l2", 4])
def test_range_method_must_be_a_usable_lp(method):
    """lp:inf / lp:64 made every candidate's fp32 sum |err|^p underflow to 0, and the search kept
    its first candidate: 1 % of the range, nearly every weight clipped, no warning."""
    with pytest.raises(ValueError, match="range_method must be 'minmax' or 'lp:<p>'"):
        LRQATConfig(range_method=method).validate()
    with pytest.raises(ValueError, match="method must be"):
        I.estimate_scale(torch.randn(4, 8), 4, method)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("magnitude", [1e-7, 0.02, 1e9])
def test_lp_search_is_exhaustive_and_scale_free(symmetric, magnitude):
    """The lp search keeps the best of its candidates (brute force in fp64 here) at any magnitude:
    fp32 sums overflowed at 1e9 (44x the best error), and a 1e-8 floor on candidate scales made
    rows under ~1e-6 worse than minmax; p = 32 still separates the candidates."""
    torch.manual_seed(11)
    w0 = torch.randn(6, 32, dtype=torch.float64)
    w0[:, 3] *= 6  # outliers
    bits, qmin, qmax = 4, -8, 7
    for p in (2.0, 5.0, 32.0):
        got = I.estimate_scale((w0 * magnitude).float(), bits, f"lp:{p}", symmetric=symmetric)
        w = (w0 * magnitude).float().double()
        best = []
        for row in w:
            lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
            errs = []
            for k in range(1, 101):
                if symmetric:
                    s = row.abs().max().item() * k / 100 / qmax
                    zs = [0.0]
                else:
                    half = (hi - lo) * k / 100 / 2
                    s = 2 * half / (qmax - qmin)
                    z0 = min(max(round(qmin - ((hi + lo) / 2 - half) / s), qmin), qmax)
                    zs = [min(max(z0 + d, qmin), qmax) for d in (-2, -1, 0, 1, 2)]
                for z in zs:
                    q = torch.clamp(torch.round(row / s + z), qmin, qmax)
                    errs.append((((row - (q - z) * s).abs() / magnitude) ** p).sum().item())
            best.append(min(errs))
        s_got, z_got = (got, torch.zeros_like(got)) if symmetric else got
        q = torch.clamp(torch.round(w / s_got.double() + z_got.double()), qmin, qmax)
        err = (((w - (q - z_got.double()) * s_got.double()).abs() / magnitude) ** p).sum(-1)
        torch.testing.assert_close(err, torch.tensor(best, dtype=torch.float64), rtol=1e-4, atol=0)
        if p == 32.0 and symmetric:
            assert torch.all(s_got * qmax > 0.3 * w.abs().amax(-1, keepdim=True).float())


def test_estimate_scale_refuses_nan_and_inf():
    for bad in (float("nan"), float("inf")):
        w = torch.randn(3, 8)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            I.estimate_scale(w, 4, "lp:4")


def test_rtn_quantize():
    w = torch.tensor([[0.26, -0.74, 1.1, 0.05, -0.9, -1.6]])
    s = torch.tensor([[0.5]])
    # 2 bits: grid [-2, 1]; w / s = [0.52, -1.48, 2.2, 0.1, -1.8, -3.2]
    assert I.rtn_quantize(w, s, bits=2).tolist() == [[0.5, -0.5, 0.5, 0.0, -1.0, -1.0]]
    # z = 1: w / s + z = [1.52, -0.48, 3.2, 1.1, -0.8, -2.2] -> [1, 0, 1, 1, -1, -2]; minus z, times s
    assert I.rtn_quantize(w, s, bits=2, zero_point=torch.tensor([[1.0]])).tolist() == [[0.0, -0.5, 0.0, 0.0, -1.0, -1.5]]


@pytest.mark.parametrize("phi_format,bits", [("packed_int", 3), ("fixed_point", 4), ("bf16", 2)])
def test_svd_init_reduces_error(phi_format, bits):
    torch.manual_seed(5)
    w0 = torch.randn(32, 48)
    s0 = I.estimate_scale(w0, bits, "minmax")
    x = w0 / s0
    plain = encode_phi(x, bits, phi_format)
    err_plain = (x - decode_phi(plain, bits, phi_format)).norm()
    errs = []
    for steps in (1, 3):
        phi, a, b = I.svd_init(x, 8, bits=bits, phi_format=phi_format, alpha=1.0, steps=steps)
        assert a.shape == (8, 48) and b.shape == (32, 8)
        errs.append((x - decode_phi(phi, bits, phi_format) - R.lowrank_product(a, b, 1.0)).norm())
    assert errs[0] < err_plain
    assert errs[1] <= errs[0] * 1.001


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _good(out=4, in_=8, r=2, fmt="fp32"):
    phi = encode_phi(torch.randn(out, in_), 4, fmt)
    return dict(phi=phi, lora_A=torch.zeros(r, in_), lora_B=torch.zeros(out, r), scale=torch.ones(out, 1))


def _call(**over):
    args = _good()
    kw = dict(bits=4, phi_format="fp32", alpha=1.0)
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return R.fake_quant_weight(args.pop("phi"), args.pop("lora_A"), args.pop("lora_B"), args.pop("scale"), **kw)


@pytest.mark.parametrize(
    "over,exc,msg",
    [
        (dict(bits=9), ValueError, "bits must be in 2..8"),
        (dict(lora_A=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "lora_A must have dtype"),
        (dict(lora_B=torch.zeros(4, 2, dtype=torch.float16)), TypeError, "same dtype"),
        (dict(scale=torch.ones(4, 1, dtype=torch.bfloat16)), TypeError, "scale must have dtype"),
        (dict(phi=torch.zeros(4, 8, dtype=torch.float16)), TypeError, "phi must be torch.float32"),
        (dict(lora_A=torch.zeros(0, 8), lora_B=torch.zeros(4, 0)), ValueError, "rank"),
        (dict(lora_A=torch.zeros(2, 9)), ValueError, "lora_A must be"),
        (dict(lora_B=torch.zeros(5, 2)), ValueError, "lora_B must be"),
        (dict(scale=torch.ones(4, 2)), ValueError, "scale must be per-channel"),
        (dict(group_size=3, scale=torch.ones(4, 2)), ValueError, "group_size=3 must divide in=8"),
        (dict(group_size=4, scale=torch.ones(4, 1)), ValueError, "scale must be"),
        (dict(group_size=0), ValueError, "group_size must be"),
        (dict(zero_point=torch.zeros(4, 2)), ValueError, "zero_point must have scale's shape"),
        (dict(zero_point=torch.full((4, 1), 0.5)), ValueError, r"zero_point must hold integers in \[qmin, qmax\] = \[-8, 7\]"),
        (dict(zero_point=torch.full((4, 1), 8)), ValueError, r"zero_point must hold integers .* got 8"),
        (dict(zero_point=torch.full((4, 1), float("nan"))), ValueError, "zero_point must hold integers"),
        (dict(alpha=float("nan")), ValueError, "alpha must be a finite"),
        (dict(scale=torch.ones(4, 1, device="meta")), ValueError, "same device"),
        (dict(phi=torch.zeros(8), lora_A=torch.zeros(2, 8)), ValueError, "phi must be 2-D"),
    ],
)
def test_bad_input(over, exc, msg):
    with pytest.raises(exc, match=msg):
        _call(**over)


@pytest.mark.parametrize("zp", [torch.full((4, 1), 0.5), torch.full((4, 1), 300.0)])
def test_merge_refuses_zero_points_it_would_store_differently(zp):
    """int8 storage would round 0.5 to 0 and wrap 300 to 44: a different deployed W_hat. The merge
    checks the values on every device (training ops on CPU only, a GPU check would sync)."""
    import lrqat_kernels

    args = dict(phi=torch.zeros(4, 8), lora_A=torch.zeros(2, 8), lora_B=torch.zeros(4, 2), scale=torch.ones(4, 1))
    kw = dict(bits=4, phi_format="fp32", alpha=1.0, zero_point=zp)
    for merge in (R.merge_weight, lrqat_kernels.merge_weight):
        with pytest.raises(ValueError, match="zero_point must hold integers"):
            merge(*args.values(), **kw)
    from lrqat_kernels._checks import check_fake_quant_args

    meta = {k: v.to("meta") for k, v in args.items()}  # off CPU: no value check (no sync) unless asked
    check_fake_quant_args(*meta.values(), **dict(kw, zero_point=zp.to("meta")))


def test_bad_input_packed_and_fixed_point():
    phi = encode_phi(torch.randn(4, 8), 4, "packed_int")
    with pytest.raises(ValueError, match="bits must be in 2..4"):
        R.fake_quant_weight(phi, torch.zeros(2, 8), torch.zeros(4, 2), torch.ones(4, 1), bits=8,
                            phi_format="packed_int", alpha=1.0)
    with pytest.raises(ValueError, match="lora_A must be"):  # phi [4, 4] packed holds in = 8, not 4
        R.fake_quant_weight(phi, torch.zeros(2, 4), torch.zeros(4, 2), torch.ones(4, 1), bits=4,
                            phi_format="packed_int", alpha=1.0)
    with pytest.raises(ValueError, match="bits must be in 2..7"):
        encode_phi(torch.randn(4, 8), 8, "fixed_point")
    with pytest.raises(ValueError, match="must be even"):
        encode_phi(torch.randn(4, 7), 4, "packed_int")


def test_bad_input_linear_and_estimators():
    g = _good()
    with pytest.raises(ValueError, match=r"x must be \[..., in\]"):
        R.lrqat_linear(torch.zeros(2, 7), g["phi"], g["lora_A"], g["lora_B"], g["scale"], bits=4,
                       phi_format="fp32", alpha=1.0)
    with pytest.raises(ValueError, match=r"bias must be \[out\]"):
        R.lrqat_linear(torch.zeros(2, 8), g["phi"], g["lora_A"], g["lora_B"], g["scale"], torch.zeros(3),
                       bits=4, phi_format="fp32", alpha=1.0)
    with pytest.raises(ValueError, match="method must be"):
        I.estimate_scale(torch.randn(2, 4), 4, "mse")
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        I.estimate_scale(torch.randn(2, 4), 4, group_size=3)
    with pytest.raises(ValueError, match="rank must be"):
        I.svd_init(torch.randn(4, 4), 5, bits=4, phi_format="fp32")
    with pytest.raises(ValueError, match="rank must be"):
        I.lora_init(4, 4, 0)


def test_reference_sends_no_gradient_to_phi_or_zero_point():
    """NUMERICS: Phi0 and z are frozen. The oracle gave them gradients when the caller's tensors
    required grad (functions.py returns None for them)."""
    torch.manual_seed(3)
    phi = (torch.rand(6, 16) * 10 - 5).requires_grad_(True)
    zp = torch.randint(-3, 3, (6, 2)).float().requires_grad_(True)
    A, B = torch.randn(2, 16, requires_grad=True), torch.randn(6, 2, requires_grad=True)
    s = (torch.rand(6, 2) * 0.1 + 0.01).requires_grad_(True)
    w = R.fake_quant_weight(phi, A, B, s, bits=4, phi_format="fp32", alpha=1.0, zero_point=zp, group_size=8)
    w.square().sum().backward()
    assert phi.grad is None and zp.grad is None
    assert A.grad is not None and B.grad is not None and s.grad is not None
