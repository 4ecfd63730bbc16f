"""Tensors past 2^31 elements (issue 22, item 4): the CPU INT4 GEMM, the nibble ops and the Triton
launchers compute correctly past int32 offsets, on CPU, in the normal test run.

Rule: every flat offset that can pass 2^31 - 1 is computed in 64 bits: in C++ (csrc/: int64_t
indices throughout the INT4 CPU kernels and the nibble ops), and in the Triton kernels either always
(int64 row offsets: activation quantisers, INT4 GEMM) or when ``needs_int64`` says so (the fake-quant
and fused-linear kernels, which take dense rows: their launchers make inputs contiguous first).

Sizes: the INT4 weights are real (1 and 2 GiB packed, M = 2 rows of x); results are checked on
sampled output columns against fp64 sums of the integers. The Triton kernels run interpreted on
CPU, far too slowly for 2^31 elements: they get views whose row strides put elements more than 2^31
elements apart in a large, untouched allocation (the pages never written cost no memory), and
their launchers' index-width decision is checked on meta tensors. Peak RSS stays under ~5 GB.
docs/RELIABILITY.md lists what each test tries.
"""

from __future__ import annotations

import gc

import pytest
import torch

import lrqat_kernels as lk
from lrqat_kernels import formats, reference

_2_31 = 2**31


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


# Each test keeps its tensors to itself (no module fixtures): the peak is one test's.
needs_memory = pytest.mark.skipif(_mem_available_gib() < 7, reason="needs ~6 GB of free memory (large-tensor tests)")


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    from lrqat_kernels.ops.int4_linear import _PREPACK_CACHE

    _PREPACK_CACHE.clear()
    gc.collect()


def _random_bytes(n_rows: int, n_cols: int, seed: int) -> torch.Tensor:
    """uint8 ``[n_rows, n_cols]`` of random bytes, drawn 8 at a time (uint8 randint of 1 GiB takes ~15 s)."""
    n = n_rows * n_cols
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=g)
    return words.view(torch.uint8)[:n].view(n_rows, n_cols)


def _nibbles_fp64(qweight_rows: torch.Tensor) -> torch.Tensor:
    """Signed nibbles of packed rows, from the bytes themselves (not the package's unpack)."""
    b = qweight_rows.to(torch.int64)
    lo, hi = b & 0xF, b >> 4
    lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)
    return torch.stack([lo, hi], dim=-1).reshape(b.shape[0], -1).double()


def _check_sampled_columns(x, qweight, scale, zero_point, group_size, y, rows):
    """``y[:, rows]`` against ``x @ (scale * (W_int - z))^T`` in fp64 for the given weight rows."""
    rows = torch.tensor(sorted(set(rows)))
    w = _nibbles_fp64(qweight[rows])
    K = w.shape[1]
    g = K if group_size is None else group_size
    s = scale[rows].double().repeat_interleave(g, dim=1)
    z = 0.0 if zero_point is None else zero_point[rows].double().repeat_interleave(g, dim=1)
    ref = x.double() @ (s * (w - z)).T
    got = y[:, rows].double()
    # fp32 accumulation over K terms: relative to the sum of |terms|
    bound = (x.double().abs() @ (s * (w - z)).abs().T) * (K * 2.0**-24) + 1e-6
    assert torch.all((got - ref).abs() <= bound), ((got - ref).abs() / bound).max()


@needs_memory
@pytest.mark.parametrize("isa", ["auto", "scalar"])
def test_int4_linear_cpu_weight_past_2_31_elements(lrqat_ext, isa):
    """N * K = 2^31 + 2^16 weight elements (1 GiB packed), per-channel, symmetric: the rows past
    element 2^31 (row 32768) come out as the fp64 sum says, for the best ISA and the scalar kernel."""
    N, K = 32769, 65536
    assert N * K > _2_31
    qweight = _random_bytes(N, K // 2, seed=0)
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(N, 1, generator=g) * 0.01 + 0.001
    x = torch.randn(2, K, generator=g)
    y = lk.int4_linear(x, qweight, scale, isa=isa)
    assert y.shape == (2, N) and torch.isfinite(y).all()
    _check_sampled_columns(x, qweight, scale, None, None, y,
                           [0, 1, 8191, 16384, 32766, 32767, 32768] + torch.randint(0, N, (9,), generator=g).tolist())


@needs_memory
def test_int4_linear_cpu_packed_bytes_past_2_31(lrqat_ext):
    """N * K / 2 = 2^31 + 2^15 packed bytes (2^32 + 2^16 elements), groups of 4096 with zero points
    and a bias: byte offsets themselves pass 2^31 (row 32768 on)."""
    N, K, gs = 65537, 65536, 4096
    assert N * K // 2 > _2_31
    qweight = _random_bytes(N, K // 2, seed=2)
    g = torch.Generator().manual_seed(3)
    scale = torch.rand(N, K // gs, generator=g) * 0.01 + 0.001
    zero_point = torch.randint(-8, 8, (N, K // gs), generator=g, dtype=torch.int8)
    bias = torch.randn(N, generator=g)
    x = torch.randn(2, K, generator=g)
    y = lk.int4_linear(x, qweight, scale, zero_point, gs, bias)
    assert y.shape == (2, N) and torch.isfinite(y).all()
    rows = [0, 32767, 32768, 32769, 49152, 65535, 65536] + torch.randint(0, N, (9,), generator=g).tolist()
    _check_sampled_columns(x, qweight, scale, zero_point, gs, y - bias, rows)


@needs_memory
def test_nibble_ops_past_2_31_elements(lrqat_ext):
    """unpack_nibbles of 2^31 + 2^16 nibbles (the native op: 2-D contiguous) gives the nibbles of the
    bytes at sampled positions past 2^31, and pack_nibbles gives the bytes back, every one."""
    N, half = 32769, 32768
    packed = _random_bytes(N, half, seed=4)
    w_int = formats.unpack_nibbles(packed)
    assert w_int.shape == (N, 2 * half) and w_int.dtype == torch.int8 and w_int.numel() > _2_31
    g = torch.Generator().manual_seed(5)
    rows = torch.tensor([0, 16383, 32767, 32768] + torch.randint(0, N, (8,), generator=g).tolist())
    assert torch.equal(w_int[rows].double(), _nibbles_fp64(packed[rows]))
    flat = w_int.view(-1)
    for i in (_2_31 - 1, _2_31, _2_31 + 1, flat.numel() - 1):  # single entries either side of 2^31
        byte = int(packed.view(-1)[i // 2])
        nib = (byte >> 4) if i % 2 else (byte & 0xF)
        assert int(flat[i]) == nib - 16 * (nib >= 8), i
    again = formats.pack_nibbles(w_int)
    del w_int, flat
    assert torch.equal(again, packed)
    # a value out of range past 2^31 is found and named
    bad = torch.zeros(N, 2 * half, dtype=torch.int8)
    bad.view(-1)[_2_31 + 3] = 9
    with pytest.raises((ValueError, RuntimeError), match=r"\[-8, 7\]"):
        formats.pack_nibbles(bad)


# ------------------------------------------------------------------------ Triton launchers (interpreted)


def _far_apart(t: torch.Tensor, row_stride: int) -> torch.Tensor:
    """A view equal to the 2-D ``t`` whose rows are ``row_stride`` elements apart in a large
    allocation (only the pages of the rows themselves are ever written)."""
    rows, cols = t.shape
    base = torch.empty((rows - 1) * row_stride + cols, dtype=t.dtype)
    v = base.as_strided((rows, cols), (row_stride, 1))
    v.copy_(t)
    return v


def _exact_problem(out, inn, rank, seed):
    """packed_int Phi0 and integer-valued low-rank factors (alpha / rank = 1): every W_hat is exact
    in fp32, so the kernels and the reference agree bit for bit whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    phi = formats.pack_nibbles(torch.randint(-8, 8, (out, inn), generator=g, dtype=torch.int8))
    lora_A = torch.randint(-2, 3, (rank, inn), generator=g).to(torch.bfloat16)
    lora_B = torch.randint(-2, 3, (out, rank), generator=g).to(torch.bfloat16)
    scale = torch.rand(out, 1, generator=g) * 0.02 + 0.01
    return phi, lora_A, lora_B, scale, dict(bits=4, phi_format="packed_int", alpha=float(rank))


@needs_memory
def test_fake_quant_weight_and_lrqat_linear_on_rows_more_than_2_31_apart():
    """lora_A rows 2^30 + 64 bf16 apart (3 rows: the last starts past element 2^31 of its
    allocation), x rows 2^30 + 96 apart: fake_quant_weight and lrqat_linear (interpreted kernels)
    equal the reference on contiguous copies. A Phi0 with rows 2^30 bytes apart is refused in one
    line naming phi (stored Phi0 is dense rows)."""
    phi, A, B, s, kw = _exact_problem(3, 64, 4, seed=6)
    A_far = _far_apart(A, 2**30 + 64)
    assert A_far.storage_offset() + 2 * A_far.stride(0) > _2_31
    want = reference.fake_quant_weight(phi, A, B, s, **kw)
    assert torch.equal(lk.fake_quant_weight(phi, A_far, B, s, **kw), want)
    x = torch.randint(-3, 4, (3, 64)).to(torch.bfloat16)
    x_far = _far_apart(x, 2**30 + 96)
    y = lk.lrqat_linear(x, phi, A, B, s, **kw)
    assert torch.equal(lk.lrqat_linear(x_far, phi, A_far, B, s, **kw), y)
    assert torch.equal(y.float(), reference.lrqat_linear(x, phi, A, B, s, **kw).float())
    phi_far = _far_apart(phi, 2**30 + 16)
    with pytest.raises(ValueError, match="^phi must be contiguous") as e:
        lk.fake_quant_weight(phi_far, A, B, s, **kw)
    assert "\n" not in str(e.value)


@needs_memory
def test_activation_quantisers_on_rows_more_than_2_31_apart():
    """fake_quant_activation, rms_norm_fake_quant and swiglu_fake_quant keep a view with a unit last
    stride as it is (the kernels take the row stride): rows 2^30 + 64 bf16 apart, 3 rows, so the
    last row starts past element 2^31. The results equal those on contiguous copies, and the
    reference within one quantisation step."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    up = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    w = torch.rand(64, generator=g).to(torch.bfloat16) + 0.5
    stride = 2**30 + 64
    x_far = _far_apart(x, stride)
    assert x_far.storage_offset() + 2 * x_far.stride(0) > _2_31
    cases = [
        ("fake_quant_activation", lambda a, b: lk.fake_quant_activation(a, 8), lambda a, b: reference.fake_quant_activation(a, 8)),
        ("rms_norm_fake_quant", lambda a, b: lk.rms_norm_fake_quant(a, w, 1e-6, 8), lambda a, b: reference.rms_norm_fake_quant(a, w, 1e-6, 8)),
        ("swiglu_fake_quant", lambda a, b: lk.swiglu_fake_quant(a, b, 8), lambda a, b: reference.swiglu_fake_quant(a, b, 8)),
    ]
    for name, fn, ref in cases:
        up_far = _far_apart(up, stride)
        got, want = fn(x_far, up_far), fn(x, up)
        assert torch.equal(got, want), name
        r = ref(x.float(), up.float()).to(got.dtype)
        step = (x.float().abs().amax(dim=1, keepdim=True) * 4 + 4) / 255  # >= one 8-bit step of any of the three
        assert torch.all((got.float() - r.float()).abs() <= step), name


class _Recorder:
    """Stands in for a Triton kernel: records the launch instead of running it."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
        return launch


@pytest.mark.parametrize("tokens, out, inn, want", [(4096, 4096, 4096, False), (1, 65536, 32768, True),
                                                    (65536, 4096, 32768, True), (16, 46340, 46340, False)])
def test_fused_linear_launchers_switch_to_int64_offsets_past_2_31(monkeypatch, tokens, out, inn, want):
    """lrqat_linear's fused kernels (forward and dx) get I64 when a weight, x, y or dx offset can pass
    2^31 - 1 (meta tensors: the launchers run their shape logic with no memory behind it)."""
    from lrqat_kernels.ops import fused_linear as fl

    phi = torch.empty(out, inn // 2, dtype=torch.uint8, device="meta")
    A = torch.empty(32, inn, dtype=torch.bfloat16, device="meta")
    B = torch.empty(out, 32, dtype=torch.bfloat16, device="meta")
    s = torch.empty(out, inn // 128, device="meta")
    x = torch.empty(tokens, inn, dtype=torch.bfloat16, device="meta")
    dy = torch.empty(tokens, out, dtype=torch.bfloat16, device="meta")
    fwd, dx = _Recorder(), _Recorder()
    monkeypatch.setattr(fl, "_fused_linear_fwd_kernel", fwd)
    monkeypatch.setattr(fl, "_fused_linear_dx_kernel", dx)
    kw = dict(bits=4, phi_format="packed_int", alpha=1.0)
    fl.fused_linear_forward(x, phi, A, B, s, None, None, **kw)
    fl.fused_linear_dx(dy, phi, A, B, s, None, **kw)
    assert fwd.calls[0]["I64"] is want and dx.calls[0]["I64"] is want
