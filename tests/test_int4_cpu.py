"""CPU INT4 GEMM ``lrqat::int4_linear`` (csrc/int4_cpu) vs exact dequantisation + fp64 matmul.

Every instruction-set path is forced in turn (scalar, AVX2, AVX-512); a path is skipped only when
this CPU lacks it. Tolerance: the kernel sums in fp32 and rounds once to x's dtype, so
``|y - ref| <= eps(dtype) / 2 * |ref| + 1e-5 * (|x| @ |W_hat|^T + |bias|)`` (the second term is a
generous bound on fp32 summation error), against a reference computed in fp64 from the same
inputs: no bf16 rounding of W_hat is tolerated on any path.
"""

from __future__ import annotations

import pytest
import torch

from lrqat_kernels.formats import pack_nibbles
from lrqat_kernels.ops.int4_linear import (
    cpu_isas,
    dequantize_int4,
    int4_linear,
    int4_linear_prepacked,
    int4_prepack_cpu,
)

ISAS = ("scalar", "avx2", "avx512")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# group size -> (N, K): odd N everywhere, K a multiple of the group; per channel with K % 8 != 0.
GROUPS = {"g32": (32, 33, 96), "g64": (64, 257, 192), "g128": (128, 65, 384), "perchannel": (-1, 33, 50)}


def _isa_param(isa):
    reason = f"this CPU lacks the {isa} path (cpu_isas() = {cpu_isas()})"
    return pytest.param(isa, id=isa, marks=pytest.mark.skipif(isa not in cpu_isas(), reason=reason))


ISA_PARAMS = [_isa_param(i) for i in ISAS]


def _make(N, K, group, zp, seed=0, scale_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w_int = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
    G = 1 if group == -1 else K // group
    scale = (torch.rand(N, G, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    z = torch.randint(-8, 8, (N, G), dtype=torch.int8, generator=gen) if zp else None
    return w_int, scale, z


def _reference(x, w_int, scale, z, group, bias):
    """fp64 of x @ (scale * (w_int - z))^T + bias, and the magnitude |x| @ |W_hat|^T + |bias|."""
    K = w_int.shape[1]
    g = K if group == -1 else group
    w = w_int.double()
    if z is not None:
        w = w - z.double().repeat_interleave(g, 1)
    w_hat = (w * scale.float().double().repeat_interleave(g, 1)).float().double()  # fp32 W_hat, as the kernel
    xd = x.double().reshape(-1, K)
    ref = xd @ w_hat.T
    mag = xd.abs() @ w_hat.abs().T
    if bias is not None:
        ref = ref + bias.double()
        mag = mag + bias.double().abs()
    return ref, mag


def _assert_close(y, ref, mag, dtype):
    assert y.dtype == dtype and tuple(y.shape) == tuple(ref.shape)
    err = (y.double() - ref).abs()
    bound = torch.finfo(dtype).eps / 2 * ref.abs() + 1e-5 * mag + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"max error / bound = {worst:.3g} (max abs error {err.max().item():.3g})"


@pytest.mark.parametrize("M", [1, 2, 4, 7, 64, 300])
@pytest.mark.parametrize("zp", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("group", list(GROUPS), ids=list(GROUPS))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_matches_reference(lrqat_ext, isa, dtype, group, zp, M):
    g, N, K = GROUPS[group]
    dt = DTYPES[dtype]
    w_int, scale, z = _make(N, K, g, zp, seed=M)
    gen = torch.Generator().manual_seed(1000 + M)
    x = torch.randn(M, K, generator=gen).to(dt)
    bias = torch.randn(N, generator=gen).to(dt) if M % 2 else None  # odd M with bias, even M without
    packed = int4_prepack_cpu(pack_nibbles(w_int), scale, z, g)
    y = int4_linear_prepacked(x, packed, bias, isa=isa)
    ref, mag = _reference(x, w_int, scale, z, g, bias)
    _assert_close(y, ref, mag, dt)


@pytest.mark.parametrize("shape", [(64, 130, 1152, 128), (13, 64, 1154, -1), (9, 200, 2048, 32)],
                         ids=["chunks-g128", "chunks-perchannel-K1154", "chunks-g32"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_multi_chunk(lrqat_ext, isa, dtype, shape):
    """K longer than the kernels' k chunks (and not a multiple of them), several row blocks."""
    M, N, K, g = shape
    dt = DTYPES[dtype]
    w_int, scale, z = _make(N, K, g, zp=True, seed=K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7)).to(dt)
    y = int4_linear(x, pack_nibbles(w_int), scale, z, g, isa=isa)
    ref, mag = _reference(x, w_int, scale, z, g, None)
    _assert_close(y, ref, mag, dt)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16], ids=["bf16-scale", "fp16-scale"])
def test_low_precision_scales_are_converted(lrqat_ext, scale_dtype):
    w_int, scale, _ = _make(40, 128, 64, False, scale_dtype=scale_dtype)
    x = torch.randn(3, 128)
    y = int4_linear(x, pack_nibbles(w_int), scale, None, 64)
    ref, mag = _reference(x, w_int, scale, None, 64, None)
    _assert_close(y, ref, mag, torch.float32)


def test_standard_and_prepacked_agree_and_leading_dims(lrqat_ext):
    w_int, scale, z = _make(70, 256, 64, True)
    qw = pack_nibbles(w_int)
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    bias = torch.randn(70, dtype=torch.bfloat16)
    y = int4_linear(x, qw, scale, z, None, bias)  # group_size inferred from scale's shape
    assert y.shape == (2, 3, 70) and y.dtype == torch.bfloat16
    y_op = torch.ops.lrqat.int4_linear(x.reshape(6, 256), qw, scale, z, 64, bias)
    y_pp = int4_linear_prepacked(x, int4_prepack_cpu(qw, scale, z, 64), bias)
    assert torch.equal(y.reshape(6, 70), y_op) and torch.equal(y, y_pp)


def test_prepack_cache_follows_in_place_updates(lrqat_ext):
    w_int, scale, _ = _make(40, 64, 32, False)
    w_new, _, _ = _make(40, 64, 32, False, seed=5)
    qw = pack_nibbles(w_int)
    x = torch.randn(3, 64)
    y1 = int4_linear(x, qw, scale, None, 32)
    assert torch.equal(int4_linear(x, qw, scale, None, 32), y1)  # cached copy
    qw.copy_(pack_nibbles(w_new))
    ref, mag = _reference(x, w_new, scale, None, 32, None)
    _assert_close(int4_linear(x, qw, scale, None, 32), ref, mag, torch.float32)
    scale.mul_(2)
    ref, mag = _reference(x, w_new, scale, None, 32, None)
    _assert_close(int4_linear(x, qw, scale, None, 32), ref, mag, torch.float32)


def test_prepack_cache_never_reuses_a_freed_scales_copy(lrqat_ext):
    """A new scale (or zero-point) tensor is a miss even where the allocator puts it at a freed
    one's address with version 0 again (keyed by pointer and version, 11 of 50 calls used an
    earlier call's scale); the same tensors hit, a converted float zero point included."""
    from lrqat_kernels.ops import int4_linear as il

    w_int, _, z = _make(64, 128, 32, True)
    qw = pack_nibbles(w_int)
    x = torch.randn(3, 128)
    for i in range(50):
        s = torch.full((64, 4), float(i + 1))
        ref, mag = _reference(x, w_int, s, z, 32, None)
        _assert_close(int4_linear(x, qw, s, z, 32), ref, mag, torch.float32)
        del s
    for i in range(20):
        zf = torch.full((64, 4), float(i % 5 - 2))
        ref, mag = _reference(x, w_int, torch.ones(64, 4), zf.to(torch.int8), 32, None)
        _assert_close(int4_linear(x, qw, torch.ones(64, 4), zf, 32), ref, mag, torch.float32)
        del zf
    s, zf = torch.rand(64, 4) + 0.5, z.float()
    p1 = il._cached_prepack(qw, s, il._zero_point_int(zf), 32, zf)
    assert il._cached_prepack(qw, s, il._zero_point_int(zf), 32, zf) is p1


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_results_do_not_depend_on_the_thread_count(lrqat_ext, isa, dtype):
    """The row split follows at::get_num_threads(); the kernel (and so the fp32 summation order) of
    a row must not: with 2 threads and 64 columns, a 1-2 row tail task of M = 7 / 8 / 13 / 14 ran
    the decode kernel on AVX-512 and differed from a 1-thread run by up to 1e-3."""
    threads = torch.get_num_threads()
    qw = pack_nibbles(torch.randint(-8, 8, (64, 512), dtype=torch.int8, generator=torch.Generator().manual_seed(1)))
    packed = int4_prepack_cpu(qw, torch.rand(64, 1) + 0.5)
    try:
        for M in (3, 7, 8, 13, 14):
            x = torch.randn(M, 512, generator=torch.Generator().manual_seed(M)).to(dtype)
            ys = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                ys.append(int4_linear_prepacked(x, packed, isa=isa))
            assert all(torch.equal(ys[0], y) for y in ys[1:]), (M, [(ys[0] - y).abs().max() for y in ys[1:]])
    finally:
        torch.set_num_threads(threads)


def test_per_channel_group_spellings(lrqat_ext):
    w_int, scale, _ = _make(33, 96, -1, False)
    qw = pack_nibbles(w_int)
    x = torch.randn(5, 96)
    ys = [int4_linear(x, qw, scale, None, gs) for gs in (None, -1, 96)]
    assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])


def test_float_zero_point_holding_integers(lrqat_ext):
    w_int, scale, z = _make(20, 64, 32, True)
    x = torch.randn(2, 64)
    y_int = int4_linear(x, pack_nibbles(w_int), scale, z, 32)
    y_flt = int4_linear(x, pack_nibbles(w_int), scale, z.float(), 32)
    assert torch.equal(y_int, y_flt)
    with pytest.raises(ValueError, match="zero_point must hold integers"):
        int4_linear(x, pack_nibbles(w_int), scale, z.float() + 0.5, 32)


def test_dequantize_int4_matches_formats(lrqat_ext):
    w_int, scale, z = _make(9, 64, 32, True)
    w_hat = dequantize_int4(pack_nibbles(w_int), scale, z, 32)
    expect = (w_int.float() - z.float().repeat_interleave(32, 1)) * scale.repeat_interleave(32, 1)
    assert torch.equal(w_hat, expect)


def test_env_var_selects_isa(lrqat_ext, monkeypatch):
    w_int, scale, _ = _make(65, 128, 32, False)
    packed = int4_prepack_cpu(pack_nibbles(w_int), scale, None, 32)
    x = torch.randn(7, 128)
    forced = int4_linear_prepacked(x, packed, isa="scalar")
    monkeypatch.setenv("LRQAT_CPU_ISA", "scalar")
    assert torch.equal(int4_linear_prepacked(x, packed), forced)  # auto -> env
    assert torch.equal(torch.ops.lrqat.int4_linear(x, pack_nibbles(w_int), scale, None, 32), forced)
    monkeypatch.setenv("LRQAT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"unknown instruction set 'sse9' \(LRQAT_CPU_ISA\)"):
        int4_linear_prepacked(x, packed)
    with pytest.raises(ValueError, match="isa must be one of"):
        int4_linear_prepacked(x, packed, isa="sse9")


@pytest.mark.skipif(set(ISAS) <= set(cpu_isas()), reason="every instruction-set path is available on this CPU")
def test_missing_isa_is_an_error(lrqat_ext):
    missing = next(i for i in ISAS if i not in cpu_isas())
    w_int, scale, _ = _make(8, 32, 32, False)
    with pytest.raises(RuntimeError, match=f"instruction set '{missing}' requested"):
        int4_linear(torch.randn(1, 32), pack_nibbles(w_int), scale, None, 32, isa=missing)


def test_empty_inputs(lrqat_ext):
    w_int, scale, _ = _make(10, 32, 32, False)
    qw = pack_nibbles(w_int)
    assert torch.ops.lrqat.int4_linear(torch.randn(0, 32), qw, scale, None, 32, None).shape == (0, 10)
    y = torch.ops.lrqat.int4_linear(torch.randn(3, 32), qw[:0], scale[:0], None, 32, None)
    assert y.shape == (3, 0)


# ---- bad input -------------------------------------------------------------------------------


def _good():
    w_int, scale, z = _make(33, 128, 32, True)
    return torch.randn(4, 128), pack_nibbles(w_int), scale, z


@pytest.mark.parametrize(
    "case, match",
    [
        ("x_int", r"x must be torch.float32, torch.bfloat16 or torch.float16, got torch.int32"),
        ("x_3d", r"x must be 2-D \[M, K\]"),
        ("x_odd_k", r"in_features K = x.size\(1\) must be even"),
        ("x_k_mismatch", r"x's in_features K = 64 must equal 2 \* qweight.size\(1\)"),
        ("qweight_int8", r"qweight must be torch.uint8, got torch.int8"),
        ("qweight_1d", r"qweight must be 2-D \[N, K / 2\]"),
        ("scale_int", r"scale must be torch.float32, torch.bfloat16 or torch.float16"),
        ("scale_shape", r"scale must have shape \[N, K / group_size\] = \[33, 4\]"),
        ("group_not_dividing", r"group_size \(48\) must divide in_features K \(128\)"),
        ("group_not_multiple_of_8", r"group_size must be a multiple of 8"),
        ("group_zero", r"group_size must be positive"),
        ("zp_float", r"zero_point must have an integer dtype, got torch.float32"),
        ("zp_shape", r"zero_point must have the shape of scale, \[N, K / group_size\] = \[33, 4\]"),
        ("zp_range", r"zero_point values must be in \[-8, 7\]"),
        ("bias_shape", r"bias must have shape \[N\] = \[33\]"),
        ("bias_int", r"bias must be torch.float32, torch.bfloat16 or torch.float16"),
    ],
)
def test_bad_input_int4_linear(lrqat_ext, case, match):
    x, qw, s, z = _good()
    g, b = 32, None
    if case == "x_int":
        x = x.int()
    elif case == "x_3d":
        x = x.reshape(2, 2, 128)
    elif case == "x_odd_k":
        x = torch.randn(4, 127)
    elif case == "x_k_mismatch":
        x = torch.randn(4, 64)
    elif case == "qweight_int8":
        qw = qw.view(torch.int8)
    elif case == "qweight_1d":
        qw = qw.reshape(-1)
    elif case == "scale_int":
        s = s.int()
    elif case == "scale_shape":
        s = s[:, :2]
    elif case == "group_not_dividing":
        g = 48
    elif case == "group_not_multiple_of_8":
        g = 4
    elif case == "group_zero":
        g = 0
    elif case == "zp_float":
        z = z.float()
    elif case == "zp_shape":
        z = z[:, :1]
    elif case == "zp_range":
        z = z.clone()
        z[3, 1] = 8
    elif case == "bias_shape":
        b = torch.randn(32)
    elif case == "bias_int":
        b = torch.zeros(33, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"lrqat::int4_linear: " + match):
        torch.ops.lrqat.int4_linear(x, qw, s, z, g, b)


def test_bad_input_prepacked(lrqat_ext):
    x, qw, s, z = _good()
    pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qw, s, z, 32)
    op = torch.ops.lrqat.int4_linear_prepacked_cpu
    with pytest.raises(RuntimeError, match=r"packed_weight must have shape \[ceil\(N / 64\), ceil\(K / 8\), 256\]"):
        op(x, qw, ps, pz, 33, 32, None, "auto")  # a standard-layout weight is rejected
    with pytest.raises(RuntimeError, match=r"out_features \(65\) does not match packed_weight"):
        op(x, pw, ps, pz, 65, 32, None, "auto")
    with pytest.raises(RuntimeError, match=r"packed_scale must have shape"):
        op(x, pw, ps[:, :2], pz, 33, 32, None, "auto")
    with pytest.raises(RuntimeError, match=r"packed_scale must be torch.float32"):
        op(x, pw, ps.bfloat16(), pz, 33, 32, None, "auto")
    with pytest.raises(RuntimeError, match=r"packed_zero must be torch.int32"):
        op(x, pw, ps, pz.long(), 33, 32, None, "auto")
    with pytest.raises(RuntimeError, match=r"unknown instruction set 'neon'"):
        op(x, pw, ps, pz, 33, 32, None, "neon")


# ---- torch.library / torch.compile -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_cuda_dispatch_matches_reference(dtype):
    """CUDA tensors: the native CUDA kernel, the GPU hook, or dequantise + F.linear."""
    dt = DTYPES[dtype]
    w_int, scale, z = _make(257, 256, 64, True)
    x = torch.randn(7, 256).to(dt)
    y = int4_linear(x.cuda(), pack_nibbles(w_int).cuda(), scale.cuda(), z.cuda(), 64).cpu()
    ref, mag = _reference(x, w_int, scale, z, 64, None)
    err = (y.double() - ref).abs().max().item()
    assert err <= 4 * torch.finfo(dt).eps * ref.abs().max().item() + 1e-4 * mag.max().item()


def test_opcheck(lrqat_ext):
    w_int, scale, z = _make(70, 256, 64, True)
    qw = pack_nibbles(w_int)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    bias = torch.randn(70)
    torch.library.opcheck(torch.ops.lrqat.int4_linear, (x, qw, scale, z, 64, bias))
    torch.library.opcheck(torch.ops.lrqat.int4_linear, (x.float(), qw, scale[:, :1].contiguous(), None, -1, None))
    torch.library.opcheck(torch.ops.lrqat.int4_prepack_cpu, (qw, scale, z, 64))
    torch.library.opcheck(torch.ops.lrqat.int4_prepack_cpu, (qw, scale, None, 64))
    pw, ps, pz = torch.ops.lrqat.int4_prepack_cpu(qw, scale, z, 64)
    torch.library.opcheck(torch.ops.lrqat.int4_linear_prepacked_cpu, (x, pw, ps, pz, 70, 64, bias, "auto"))


def test_torch_compile_traces(lrqat_ext):
    w_int, scale, z = _make(70, 256, 64, True)
    qw = pack_nibbles(w_int)
    fn = torch.compile(lambda x: int4_linear(x, qw, scale, z, 64), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    assert torch.equal(fn(x), int4_linear(x, qw, scale, z, 64))


def test_int4_linear_passes_gradients_through(lrqat_ext):
    """The INT4 GEMMs have no autograd: an x that requires grad took the kernel and its gradient was
    dropped (None, only a torch warning); it now takes the exact dequantise path."""
    torch.manual_seed(2)
    w = torch.randint(-8, 8, (24, 64), dtype=torch.int8)
    s = torch.rand(24, 2) * 0.05 + 0.01
    x = torch.randn(5, 64, requires_grad=True)
    y = int4_linear(x, pack_nibbles(w), s, group_size=32)
    y.square().sum().backward()
    w_hat = s.repeat_interleave(32, 1) * w.float()
    torch.testing.assert_close(x.grad, 2 * (x.detach() @ w_hat.T) @ w_hat, rtol=1e-4, atol=1e-4)


def test_int4_linear_passes_scale_gradients_through(lrqat_ext):
    torch.manual_seed(4)
    w = torch.randint(-8, 8, (8, 32), dtype=torch.int8)
    s = (torch.rand(8, 1) * 0.05 + 0.01).requires_grad_(True)
    x = torch.randn(3, 32)
    int4_linear(x, pack_nibbles(w), s).sum().backward()
    torch.testing.assert_close(s.grad, (x.sum(0) @ w.float().T)[:, None], rtol=1e-4, atol=1e-4)
