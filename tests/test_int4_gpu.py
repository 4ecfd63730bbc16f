"""CUDA W4A16 kernel (csrc/int4_gpu): layout model, exact dequantisation, prepack, build, GPU runs.

On a machine without a GPU this proves, bit for bit, the two things the kernel's correctness
rests on that do not need one:

* the magic-number dequantisation (``int4_gpu.h``, run on the host through the test hook
  ``lrqat::int4_gpu_dequant_words``) equals plain integer -> float conversion for every nibble,
  every byte, every zero point, fp16 and bf16;
* ``lrqat::int4_gpu_prepack`` + the kernel's in-register unpack order put every weight exactly
  where the ``mma.m16n8k16`` B fragment expects it: a NumPy model of the PTX ISA fragment table
  replays the kernel's per-lane view of the prepacked words and rebuilds W.

The ``@pytest.mark.gpu`` tests run the kernel itself (skipped without CUDA). Until they have
passed on a real GPU the kernel stays opt-in (``backend="cuda"``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from lrqat_kernels.formats import pack_nibbles, unpack_nibbles

STRIP_N, STEP_K, WORDS = 128, 16, 256

# ---- NumPy model of the mma operands and of the kernel's register view ------------------------


def mma_b_fragment(lane: int) -> list[tuple[int, int]]:
    """(k, n) of the elements b0..b3 a lane holds for mma.m16n8k16 .f16/.bf16 B (PTX ISA table
    "Matrix Fragments for mma.m16n8k16"): b0, b1 = reg 0 (low, high half), b2, b3 = reg 1."""
    return [((lane % 4) * 2 + (e & 1) + (8 if e >= 2 else 0), lane // 4) for e in range(4)]


def magic_dequant_np(words: np.ndarray, dtype: str, z: int = 0) -> np.ndarray:
    """The kernel's dequantisation of uint32 ``words`` -> float32 ``[n, 4 pairs, 2 halves]``,
    emulated bit by bit: lop3 ``(q & mask) | magic``, reinterpret as 16-bit floats, then the
    fma (here in float64, exact for these values)."""
    q = words.astype(np.uint32)
    regs = []
    if dtype == "fp16":
        for a, shift, mask in ((0, 0, 0x000F000F), (1, 0, 0x00F000F0), (2, 8, 0x000F000F), (3, 8, 0x00F000F0)):
            regs.append((((q >> shift) & mask) | 0x64006400, a))
    else:
        for a in range(4):
            regs.append((((q >> (4 * a)) & 0x000F000F) | 0x43004300, a))
    out = np.empty((q.shape[0], 4, 2), dtype=np.float64)
    for r, a in regs:
        halves = np.stack([r & 0xFFFF, r >> 16], axis=-1).astype(np.uint16)
        if dtype == "fp16":
            v = halves.view(np.float16).astype(np.float64)
            out[:, a] = v / 16.0 - (72 + z) if a % 2 else v - (1032 + z)
        else:
            v = (halves.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            out[:, a] = v - (136 + z)
    return out


def kernel_view_weights(prepacked: np.ndarray, dtype: str) -> np.ndarray:
    """Rebuild W ``[N_pad, K]`` from prepacked int32 ``[strips, steps, 256]`` the way the kernel
    sees it: warp u, lane l loads word ``[p, s, 32 u + l]``; pair a of it is B register
    ``a & 1`` of n8 tile ``a >> 1``; element e of a tile sits at ``mma_b_fragment(l)[e]``."""
    strips, steps, _ = prepacked.shape
    w = np.full((strips * STRIP_N, steps * STEP_K), np.nan)
    vals = magic_dequant_np(prepacked.reshape(-1).view(np.uint32), dtype).reshape(strips, steps, 8, 32, 4, 2)
    for lane in range(32):
        frag = mma_b_fragment(lane)
        for j in range(2):  # n8 tile
            for e in range(4):  # element of the B fragment
                reg, half = e // 2, e % 2
                k, n = frag[e]
                v = vals[:, :, :, lane, 2 * j + reg, half]  # [strips, steps, 8 warps]
                for u in range(8):
                    rows = np.arange(strips) * STRIP_N + 16 * u + 8 * j + n
                    cols = np.arange(steps) * STEP_K + k
                    w[np.ix_(rows, cols)] = v[:, :, u]
    return w


def prepack_model(qweight: np.ndarray) -> np.ndarray:
    """Independent NumPy prepack (from the layout spec in int4_gpu.h), to cross-check the op."""
    n, kb = qweight.shape
    strips, steps = -(-n // STRIP_N), 2 * kb // STEP_K
    padded = np.zeros((strips * STRIP_N, kb), dtype=np.uint8)
    padded[:n] = qweight
    out = np.zeros((strips, steps, 8, 32), dtype=np.uint32)
    for lane in range(32):
        t, g = lane % 4, lane // 4
        for a in range(4):
            j, i = a >> 1, a & 1
            k_lo = np.arange(steps) * STEP_K + 2 * t + 8 * i  # [steps]
            for u in range(8):
                rows = np.arange(strips) * STRIP_N + 16 * u + 8 * j + g  # [strips]
                byte = padded[np.ix_(rows, k_lo // 2)].astype(np.uint32)  # [strips, steps]
                out[:, :, u, lane] |= ((byte & 0xF) ^ 8) << (4 * a)
                out[:, :, u, lane] |= ((byte >> 4) ^ 8) << (4 * (a + 4))
    return out.reshape(strips, steps, WORDS).view(np.int32)


# ---- model self-checks (pure NumPy: no extension needed) ---------------------------------------


def test_b_fragment_table_covers_the_tile_once():
    seen = [(k, n) for lane in range(32) for (k, n) in mma_b_fragment(lane)]
    assert sorted(seen) == [(k, n) for k in range(16) for n in range(8)]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_model_round_trip_random(dtype):
    rng = np.random.default_rng(0)
    w_int = rng.integers(-8, 8, size=(200, 96), dtype=np.int8)
    packed = pack_nibbles(torch.from_numpy(w_int)).numpy()
    w = kernel_view_weights(prepack_model(packed), dtype)
    np.testing.assert_array_equal(w[:200], w_int.astype(np.float64))
    np.testing.assert_array_equal(w[200:], 0.0)  # padding rows decode to W_int = 0


# ---- the native CPU ops ---------------------------------------------------------------------------


def _dequant_words(words, dtype, z):
    return torch.ops.lrqat.int4_gpu_dequant_words(words, dtype, z)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("z", [0, -8, -3, 5, 7])
def test_magic_dequant_all_nibbles_all_bytes(lrqat_ext, dtype, z):
    # Every byte value in every byte position of the word (so every nibble value in every one
    # of the 8 nibble slots, next to every possible neighbour), plus random words.
    byte = np.arange(256, dtype=np.uint32)
    words = [byte << (8 * pos) for pos in range(4)]
    words.append(byte * 0x01010101)
    words.append(np.random.default_rng(1).integers(0, 2**32, size=4096, dtype=np.uint64).astype(np.uint32))
    words = np.concatenate(words)
    got = _dequant_words(torch.from_numpy(words.view(np.int32)), dtype, z)
    assert got.dtype == dtype and got.shape == (words.size, 8)
    # Plain conversion: nibble c (offset binary) -> c - 8 - z, as the 16-bit float it must be.
    nib = (words[:, None] >> (4 * np.arange(8, dtype=np.uint32))[None, :]) & 0xF  # [n, 8] slots
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # register order: pair a = (nibble a, nibble a + 4)
    want = torch.from_numpy(nib[:, order].astype(np.float32) - 8 - z).to(dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # bit for bit
    # And the host twin agrees with the NumPy emulation of the bit tricks.
    model = magic_dequant_np(words, "fp16" if dtype == torch.float16 else "bf16", z).reshape(-1, 8)
    np.testing.assert_array_equal(got.float().numpy(), model.astype(np.float32))


def test_dequant_words_rejects(lrqat_ext):
    w = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"lrqat::int4_gpu_dequant_words: dtype must be"):
        _dequant_words(w, torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"zero_point must be in \[-8, 7\]"):
        _dequant_words(w, torch.float16, 8)
    with pytest.raises(RuntimeError, match=r"words must be torch.int32"):
        _dequant_words(w.long(), torch.float16, 0)


@pytest.mark.parametrize(
    "n,k", [(128, 16), (72, 256), (200, 96), (257, 48), (1, 32), (384, 1152)], ids=lambda v: str(v)
)
def test_prepack_matches_model_and_kernel_view(lrqat_ext, n, k):
    torch.manual_seed(n * 1000 + k)
    w_int = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    packed = pack_nibbles(w_int)
    got = torch.ops.lrqat.int4_gpu_prepack(packed)
    assert got.dtype == torch.int32 and tuple(got.shape) == (-(-n // STRIP_N), k // STEP_K, WORDS)
    np.testing.assert_array_equal(got.numpy(), prepack_model(packed.numpy()))
    for dtype in ("fp16", "bf16"):
        w = kernel_view_weights(got.numpy(), dtype)
        np.testing.assert_array_equal(w[:n], w_int.numpy().astype(np.float64))
        np.testing.assert_array_equal(w[n:], 0.0)


def test_prepack_extreme_values(lrqat_ext):
    # All -8 and all 7: the sign bit and offset-binary boundaries.
    for v in (-8, 7, -1, 0):
        w_int = torch.full((130, 32), v, dtype=torch.int8)
        got = torch.ops.lrqat.int4_gpu_prepack(pack_nibbles(w_int))
        w = kernel_view_weights(got.numpy(), "fp16")
        assert (w[:130] == v).all() and (w[130:] == 0).all()


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("dtype", r"qweight must be torch.uint8"),
        ("dim", r"qweight must be 2-D"),
        ("k16", r"multiple of 16"),
        ("noncontig", r"qweight must be contiguous"),
        ("empty", r"qweight must be non-empty"),
    ],
)
def test_prepack_rejects(lrqat_ext, case, pattern):
    q = {
        "dtype": torch.zeros(4, 8, dtype=torch.int8),
        "dim": torch.zeros(4, 8, 2, dtype=torch.uint8),
        "k16": torch.zeros(4, 12, dtype=torch.uint8),
        "noncontig": torch.zeros(16, 8, dtype=torch.uint8).t(),
        "empty": torch.zeros(0, 8, dtype=torch.uint8),
    }[case]
    with pytest.raises(RuntimeError, match=r"lrqat::int4_gpu_prepack: .*" + pattern):
        torch.ops.lrqat.int4_gpu_prepack(q)


def test_fake_impls(lrqat_ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(200, 48, dtype=torch.uint8)
        out = torch.ops.lrqat.int4_gpu_prepack(q)
        assert tuple(out.shape) == (2, 6, 256) and out.dtype == torch.int32
        x = torch.empty(5, 96, dtype=torch.bfloat16)
        y = torch.ops.lrqat.int4_gpu_linear(x, out, torch.empty(1, 256), None, None, 200)
        assert tuple(y.shape) == (5, 200) and y.dtype == torch.bfloat16


def test_opcheck_prepack_cpu(lrqat_ext):
    q = pack_nibbles(torch.randint(-8, 8, (130, 64), dtype=torch.int8))
    torch.library.opcheck(torch.ops.lrqat.int4_gpu_prepack.default, (q,))


def test_prepack_int4_gpu_api_cpu(lrqat_ext):
    from lrqat_kernels.ops.int4_cuda import int4_cuda_prepack as prepack_int4_gpu

    n, k, g = 200, 256, 64
    w_int = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    s = torch.rand(n, k // g) + 0.1
    z = torch.randint(-8, 8, (n, k // g), dtype=torch.int8)
    w = prepack_int4_gpu(pack_nibbles(w_int), s, z, g)
    assert w.out_features == n and w.in_features == k and w.group_size == g
    assert tuple(w.scale.shape) == (k // g, 256) and w.scale.dtype == torch.float32
    assert torch.equal(w.scale[:, :n], s.t()) and (w.scale[:, n:] == 0).all()
    assert torch.equal(w.zero_point[:, :n], z.t()) and w.zero_point.dtype == torch.int8
    with pytest.raises(ValueError, match="power of two >= 32"):
        prepack_int4_gpu(pack_nibbles(w_int), torch.rand(n, k // 16), None, 16)
    with pytest.raises(ValueError, match=r"zero_point values must be in \[-8, 7\]"):
        prepack_int4_gpu(pack_nibbles(w_int), s, z.int() + 9, g)


# ---- the build: does _C carry the kernel for sm_80 and sm_90? --------------------------------------


def _cuobjdump() -> str | None:
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(bundled):
            return bundled
    except ImportError:
        pass
    for cand in (shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def test_built_extension_has_kernel_for_sm80_sm90(lrqat_ext):
    """The CI script (scripts/check_cuda_build.py) proves every arch has a cubin; this checks that
    THIS kernel is in them, with no register spills (ptxas resource usage, per arch)."""
    from lrqat_kernels.ops.int4_cuda import cuda_kernel_available

    if not cuda_kernel_available():
        pytest.skip("lrqat_kernels._C was built without CUDA")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (bundled with triton or in CUDA_HOME/bin)")
    import lrqat_kernels

    so = glob.glob(os.path.join(os.path.dirname(lrqat_kernels.__file__), "_C*.so"))
    assert so, "no built _C*.so next to the package"
    out = subprocess.run([tool, "--dump-resource-usage", so[0]], capture_output=True, text=True, check=True).stdout
    per_arch: dict[str, list[tuple[str, int, int]]] = {}
    arch = None
    for line in out.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S*int4_gpu_gemm_kernel\S*):", line)
        if m and arch:
            per_arch.setdefault(arch, []).append((m.group(1), 0, 0))
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and arch in per_arch and per_arch[arch] and per_arch[arch][-1][1] == 0 and "int4_gpu_gemm" in (per_arch[arch][-1][0]):
            name, _, _ = per_arch[arch][-1]
            per_arch[arch][-1] = (name, int(m.group(1)), int(m.group(2)))
    for want in ("sm_80", "sm_90"):
        kernels = per_arch.get(want, [])
        # 2 dtypes x 2 scale dtypes x 3 M-tile sizes.
        assert len(kernels) == 12, f"{want}: expected 12 int4_gpu_gemm_kernel instantiations, got {kernels}"
        for name, regs, stack in kernels:
            assert 0 < regs <= 128, f"{want} {name}: {regs} registers (launch bounds allow 128)"
            assert stack == 0, f"{want} {name}: {stack} bytes of stack (register spills)"


# ---- GPU: the kernel itself -----------------------------------------------------------------------


def _reference(x, w_int, scale, zero_point, group_size, bias):
    """fp32 ``x @ (s * (W_int - z))^T + b`` and the fp32 W_hat."""
    n, k = w_int.shape
    g = k if group_size is None else group_size
    wi = w_int.float()
    if zero_point is not None:
        wi = wi - zero_point.float().repeat_interleave(g, dim=1)
    w_hat = scale.float().repeat_interleave(g, dim=1) * wi
    y = x.float() @ w_hat.t()
    if bias is not None:
        y = y + bias.float()
    return y, w_hat


def _case(m, n, k, g, zp, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_int = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    groups = 1 if g is None else k // g
    s = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).float()
    z = torch.randint(-8, 8, (n, groups), dtype=torch.int8, generator=gen) if zp else None
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), w_int, to(pack_nibbles(w_int)), to(s), to(z), to(b)


def _assert_close_to_torch(y, x, w_int, s, z, g, b):
    """Error vs the fp32 result at most 2x torch's own (F.linear on W_hat in x's dtype) + tiny atol."""
    ref, w_hat = _reference(x.cpu(), w_int, s.cpu(), None if z is None else z.cpu(), g, None if b is None else b.cpu())
    ref = ref.to(x.device)
    torch_y = torch.nn.functional.linear(x, w_hat.to(x.device, x.dtype), b)
    err = (y.float() - ref).abs().max().item()
    err_torch = (torch_y.float() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-5 * ref.abs().max().item() + 1e-6, f"error {err} vs torch's {err_torch}"


# M in {1, 3, 16, 17, 64, 65, 1000, 2048} (M-tiles of 16 / 32 / 64, several M-blocks), N not a
# multiple of 128 (padded strip), K not a power of two; split-K is chosen for the small ones,
# (2048, 4096, 256) has enough tiles for no split.
GPU_SHAPES = [(1, 4096, 4096), (3, 200, 256), (16, 72, 1152), (17, 384, 512), (64, 1000, 1024), (65, 300, 2048),
              (1000, 256, 768), (2048, 4096, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("g,zp", [(None, False), (None, True), (32, False), (64, True), (128, False), (128, True)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("m,n,k", GPU_SHAPES, ids=lambda v: str(v))
def test_cuda_kernel_matches_reference(lrqat_ext, m, n, k, g, zp, dtype):
    from lrqat_kernels.ops.int4_cuda import int4_cuda_linear as int4_gpu_linear, int4_cuda_prepack as prepack_int4_gpu

    x, w_int, q, s, z, b = _case(m, n, k, g, zp, dtype, "cuda")
    w = prepack_int4_gpu(q, s, z, g)
    y = int4_gpu_linear(x, w, b)
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_close_to_torch(y, x, w_int, s, z, g, b)
    y_nobias = int4_gpu_linear(x, w)
    _assert_close_to_torch(y_nobias, x, w_int, s, z, g, None)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,g", [(5, 136, 1040, None), (5, 136, 160, 32), (33, 200, 192, 64), (2, 72, 16, None)],
                         ids=lambda v: str(v))
def test_cuda_kernel_partial_last_stage(lrqat_ext, m, n, k, g):
    """K % 128 != 0: the last pipeline stage has fewer than 8 k-steps (bounds-checked path)."""
    from lrqat_kernels.ops.int4_cuda import int4_cuda_linear as int4_gpu_linear, int4_cuda_prepack as prepack_int4_gpu

    for zp in (False, True):
        x, w_int, q, s, z, b = _case(m, n, k, g, zp, torch.bfloat16, "cuda", seed=k)
        _assert_close_to_torch(int4_gpu_linear(x, prepack_int4_gpu(q, s, z, g), b), x, w_int, s, z, g, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_kernel_16bit_scales(lrqat_ext, dtype):
    from lrqat_kernels.ops.int4_cuda import int4_cuda_linear as int4_gpu_linear, int4_cuda_prepack as prepack_int4_gpu

    x, w_int, q, s, z, b = _case(5, 512, 1024, 128, True, dtype, "cuda")
    w = prepack_int4_gpu(q, s, z, 128, scale_dtype=dtype)
    y = int4_gpu_linear(x, w, b)
    # The reference then uses the 16-bit-rounded scales the kernel was given.
    _assert_close_to_torch(y, x, w_int, s.to(dtype).float(), z, 128, b)


@pytest.mark.gpu
def test_cuda_kernel_deterministic_and_counters_reset(lrqat_ext):
    """Split-K reduces in a fixed order and resets its arrival counters: repeated calls (also of
    other shapes in between) are bitwise identical."""
    from lrqat_kernels.ops.int4_cuda import int4_cuda_linear as int4_gpu_linear, int4_cuda_prepack as prepack_int4_gpu

    x, _, q, s, z, b = _case(2, 4096, 4096, 128, False, torch.bfloat16, "cuda")
    w = prepack_int4_gpu(q, s, z, 128)
    first = int4_gpu_linear(x, w, b)
    x2, _, q2, s2, _, _ = _case(7, 256, 8192, None, False, torch.bfloat16, "cuda", seed=1)
    w2 = prepack_int4_gpu(q2, s2)
    for _ in range(5):
        int4_gpu_linear(x2, w2)
        assert torch.equal(int4_gpu_linear(x, w, b), first)


@pytest.mark.gpu
def test_cuda_prepack_matches_cpu(lrqat_ext):
    w_int = torch.randint(-8, 8, (300, 1152), dtype=torch.int8)
    q = pack_nibbles(w_int)
    assert torch.equal(torch.ops.lrqat.int4_gpu_prepack(q.cuda()).cpu(), torch.ops.lrqat.int4_gpu_prepack(q))


@pytest.mark.gpu
def test_cuda_kernel_edge_inputs(lrqat_ext):
    from lrqat_kernels.ops.int4_cuda import int4_cuda_linear as int4_gpu_linear, int4_cuda_prepack as prepack_int4_gpu

    x, w_int, q, s, z, b = _case(4, 130, 256, 64, True, torch.float16, "cuda")
    w = prepack_int4_gpu(q, s, z, 64)
    # Empty M, 3-D x, a non-contiguous x, and an x whose data pointer is not 16-byte aligned.
    assert int4_gpu_linear(x[:0], w).shape == (0, 130)
    y3 = int4_gpu_linear(x.reshape(2, 2, 256), w, b)
    _assert_close_to_torch(y3.reshape(4, 130), x, w_int, s, z, 64, b)
    xt = torch.randn(256, 4, device="cuda", dtype=torch.float16).t()
    _assert_close_to_torch(int4_gpu_linear(xt, w), xt, w_int, s, z, 64, None)
    buf = torch.randn(4 * 256 + 1, device="cuda", dtype=torch.float16)
    xm = buf[1:].view(4, 256)
    _assert_close_to_torch(int4_gpu_linear(xm, w, b), xm, w_int, s, z, 64, b)


@pytest.mark.gpu
def test_cuda_kernel_rejects(lrqat_ext):
    from lrqat_kernels.ops.int4_cuda import int4_cuda_prepack as prepack_int4_gpu

    x, _, q, s, _, _ = _case(4, 130, 256, 64, False, torch.float16, "cuda")
    w = prepack_int4_gpu(q, s, None, 64)
    op = torch.ops.lrqat.int4_gpu_linear
    with pytest.raises(RuntimeError, match=r"lrqat::int4_gpu_linear: x must be torch.float16 or torch.bfloat16"):
        op(x.float(), w.qweight, w.scale, None, None, 130)
    with pytest.raises(RuntimeError, match=r"x must be \[M, K\]"):
        op(x[:, :128], w.qweight, w.scale, None, None, 130)
    with pytest.raises(RuntimeError, match=r"out_features must be in"):
        op(x, w.qweight, w.scale, None, None, 300)
    with pytest.raises(RuntimeError, match=r"scale must be torch.float32 or x's dtype"):
        op(x, w.qweight, w.scale.bfloat16(), None, None, 130)
    with pytest.raises(RuntimeError, match=r"bias must be"):
        op(x, w.qweight, w.scale, None, torch.zeros(7, device="cuda", dtype=torch.float16), 130)


@pytest.mark.gpu
def test_cuda_kernel_split_k_under_cuda_graphs(lrqat_ext):
    """Split-K (M = 1 on a 4096 x 4096 layer) inside CUDA graphs: two graphs captured on torch's
    capture stream, replayed out of order with eager calls in between, each equal to eager."""
    from lrqat_kernels.ops.int4_cuda import int4_cuda_linear as int4_gpu_linear, int4_cuda_prepack as prepack_int4_gpu

    x, w_int, q, s, z, b = _case(1, 4096, 4096, 128, True, torch.bfloat16, "cuda")
    w = prepack_int4_gpu(q, s, z, 128)
    want = int4_gpu_linear(x, w, b)
    _assert_close_to_torch(want, x, w_int, s, z, 128, b)
    graphs, outs = [], []
    for _ in range(2):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(int4_gpu_linear(x, w, b))
        graphs.append(g)
    for g, y in ((graphs[1], outs[1]), (graphs[0], outs[0]), (graphs[1], outs[1])):
        g.replay()
        assert torch.equal(int4_gpu_linear(x, w, b), want)
        torch.cuda.synchronize()
        assert torch.equal(y, want)


@pytest.mark.gpu
def test_opcheck_cuda(lrqat_ext):
    from lrqat_kernels.ops.int4_cuda import int4_cuda_prepack as prepack_int4_gpu

    x, _, q, s, z, b = _case(3, 200, 256, 128, True, torch.bfloat16, "cuda")
    w = prepack_int4_gpu(q, s, z, 128)
    torch.library.opcheck(torch.ops.lrqat.int4_gpu_linear.default, (x, w.qweight, w.scale, w.zero_point, b, 200))
    torch.library.opcheck(torch.ops.lrqat.int4_gpu_prepack.default, (q,))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "dequant", "auto"])
def test_dispatch_backends_agree(lrqat_ext, backend):
    from lrqat_kernels.ops.int4_linear import int4_linear as int4_linear_gpu

    for m in (1, 300):
        x, w_int, q, s, z, b = _case(m, 512, 1024, 128, True, torch.bfloat16, "cuda")
        y = int4_linear_gpu(x, q, s, z, 128, b, backend=backend)
        _assert_close_to_torch(y, x, w_int, s, z, 128, b)


# ---- dispatcher semantics (CPU-only checks of the backend choice) ---------------------------------


def test_resolve_backend(monkeypatch):
    from lrqat_kernels.ops.int4_linear import BACKEND_ENV, resolve_backend

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend() == "auto"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    assert resolve_backend() == "cuda"
    assert resolve_backend("triton") == "triton"  # the argument wins
    with pytest.raises(ValueError, match="int4 backend must be one of"):
        resolve_backend("cutlass")


def test_dequant_weight_cpu_matches_reference():
    from lrqat_kernels.ops.int4_linear import dequantize_int4 as dequant_weight

    _, w_int, q, s, z, _ = _case(1, 72, 256, 64, True, torch.float32, "cpu")
    _, w_hat = _reference(torch.zeros(1, 256), w_int, s, z, 64, None)
    assert torch.equal(dequant_weight(q, s, z, 64, torch.float32), w_hat)
    assert torch.equal(unpack_nibbles(q), w_int)


def test_prepack_cache_follows_in_place_updates(lrqat_ext):
    """backend='cuda' on standard-layout weights prepacks once per weight (cache keyed by identity,
    invalidated by in-place updates of any input)."""
    from lrqat_kernels.ops.int4_cuda import cached_prepack as _cached_prepack

    _, _, q, s, z, _ = _case(1, 130, 256, 64, True, torch.float32, "cpu")
    w1 = _cached_prepack(q, s, z, 64, torch.float32)
    assert _cached_prepack(q, s, z, 64, torch.float32) is w1
    s.mul_(2)
    w2 = _cached_prepack(q, s, z, 64, torch.float32)
    assert w2 is not w1 and torch.equal(w2.scale[:, :130], s.t())
    q[0, 0] ^= 0x11
    w3 = _cached_prepack(q, s, z, 64, torch.float32)
    assert w3 is not w2 and not torch.equal(w3.qweight, w2.qweight)
    s2 = s.clone()  # equal values, another tensor (may sit at a freed tensor's address): a miss
    w4 = _cached_prepack(q, s2, z, 64, torch.float32)
    assert w4 is not w3 and _cached_prepack(q, s2, z, 64, torch.float32) is w4


# ---- the generic dispatcher lrqat_kernels.ops.int4_linear.int4_linear routes CUDA tensors here ----


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "auto", "cuda", "triton", "dequant"])
def test_int4_linear_backend_argument(lrqat_ext, backend, monkeypatch):
    from lrqat_kernels.ops import int4_linear as int4_gpu
    from lrqat_kernels.ops.int4_linear import int4_linear

    monkeypatch.delenv(int4_gpu.BACKEND_ENV, raising=False)
    x, w_int, q, s, z, b = _case(5, 300, 512, 64, True, torch.float16, "cuda")
    _assert_close_to_torch(int4_linear(x, q, s, z, 64, b, backend=backend), x, w_int, s, z, 64, b)


@pytest.mark.gpu
def test_int4_linear_env_selects_cuda_kernel(lrqat_ext, monkeypatch):
    from lrqat_kernels.ops import int4_cuda
    from lrqat_kernels.ops import int4_linear as int4_gpu
    from lrqat_kernels.ops.int4_linear import int4_linear

    calls = []
    real = int4_cuda.int4_cuda_linear
    monkeypatch.setattr(int4_cuda, "int4_cuda_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(int4_gpu.BACKEND_ENV, "cuda")
    x, w_int, q, s, z, b = _case(2, 300, 512, 128, False, torch.bfloat16, "cuda")
    _assert_close_to_torch(int4_linear(x, q, s, z, 128, b), x, w_int, s, z, 128, b)
    assert calls == [1]
    monkeypatch.delenv(int4_gpu.BACKEND_ENV)
    int4_linear(x, q, s, z, 128, b)  # default "auto": never the CUDA kernel
    assert calls == [1]


# ---- issue 18: the old GPU names keep working for one release, with a DeprecationWarning ------------


def test_deprecated_int4_gpu_names(monkeypatch):
    import warnings

    from lrqat_kernels.ops import _int4_rules, int4_cuda, int4_gpu, int4_linear

    monkeypatch.setattr(int4_gpu, "_ANNOUNCED", set())
    renamed = {"prepack_int4_gpu": int4_cuda.int4_cuda_prepack, "int4_gpu_prepack": int4_cuda.int4_cuda_prepack_qweight,
               "int4_gpu_dequant_words": int4_cuda.int4_cuda_dequant_words, "Int4GPUWeight": int4_cuda.Int4CudaWeight,
               "cuda_kernel_available": int4_cuda.cuda_kernel_available, "resolve_backend": int4_linear.resolve_backend,
               "dequant_linear": int4_linear.dequant_linear, "zero_point_as_int": _int4_rules.zero_point_as_int,
               "check_int4_linear_args": _int4_rules.check_int4_linear_args, "BACKEND_ENV": "LRQAT_INT4_BACKEND"}
    for old, new in renamed.items():
        with pytest.warns(DeprecationWarning, match=rf"int4_gpu\.{old} is deprecated .* use lrqat_kernels\.ops\."):
            assert getattr(int4_gpu, old) == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per name: the next access is quiet
        int4_gpu.prepack_int4_gpu
    with pytest.raises(AttributeError, match="has no attribute 'int4_tuning_table'"):
        int4_gpu.int4_tuning_table
    # Wrappers: same results as the new functions.
    _, w_int, q, s, z, b = _case(3, 72, 256, 64, True, torch.float16, "cpu")
    with pytest.warns(DeprecationWarning, match="use lrqat_kernels.ops.int4_linear.dequantize_int4"):
        w = int4_gpu.dequant_weight(q, s, z, 64)
    assert w.dtype == torch.bfloat16 and torch.equal(w, int4_linear.dequantize_int4(q, s, z, 64, torch.bfloat16))
    x = torch.randn(3, 256, dtype=torch.float16)
    with pytest.warns(DeprecationWarning, match=r"int4_linear_gpu is deprecated"):
        y = int4_gpu.int4_linear_gpu(x, q, s, z, 64, b, backend="dequant")
    assert torch.equal(y, int4_linear.dequant_linear(x, q, s, z, 64, b))
    with pytest.warns(DeprecationWarning, match="bench/_int4_tuning.py"):
        assert int4_gpu.dequant_chunk_candidates(11008, 4096, torch.bfloat16) == [1024, 2048, 4096]


def test_deprecated_spellings_and_switches(monkeypatch):
    from lrqat_kernels.ops import int4_linear as il
    from lrqat_kernels.ops.int4_triton import int4_triton_config

    _, w_int, q, s, _, _ = _case(1, 40, 128, None, False, torch.float32, "cpu")
    with pytest.warns(DeprecationWarning, match="group_size=-1 for per-channel scales is deprecated"):
        w = il.dequantize_int4(q, s, None, -1)
    assert torch.equal(w, il.dequantize_int4(q, s, None, None)) and torch.equal(w, il.dequantize_int4(q, s, None, 128))
    with pytest.warns(DeprecationWarning, match="register_cuda_int4_linear is deprecated and has no effect"):
        il.register_cuda_int4_linear(lambda *a, **k: 1 / 0)
    with pytest.warns(DeprecationWarning, match=r"int4_triton_config\(device_name=, tuned=\) are deprecated"):
        assert int4_triton_config(1, 4096, 4096, 128, tuned=False) == int4_triton_config(1, 4096, 4096, 128)
    # The backend: argument > set_int4_backend > $LRQAT_INT4_BACKEND (deprecated) > "auto".
    monkeypatch.setattr(il, "_WARNED", set())
    monkeypatch.setenv(il.BACKEND_ENV, "dequant")
    with pytest.warns(DeprecationWarning, match=r"\$LRQAT_INT4_BACKEND is deprecated .*set_int4_backend\('dequant'\)"):
        assert il.resolve_backend() == "dequant"
    with il.int4_backend("triton"):
        assert il.resolve_backend() == "triton" and il.resolve_backend("cuda") == "cuda"
        assert il.get_int4_backend() == "triton"
    assert il.get_int4_backend() is None and il.resolve_backend() == "dequant"
    monkeypatch.delenv(il.BACKEND_ENV)
    assert il.resolve_backend() == "auto"
    with pytest.raises(ValueError, match=r"int4 backend must be one of .* \(set_int4_backend\), got 'tensorrt'"):
        il.set_int4_backend("tensorrt")
    # set_int4_backend covers a whole model like the variable did: a layer it cannot run uses "auto".
    x, w_int, q, s, z, b = _case(3, 40, 96, 48, True, torch.float16, "cpu")  # group 48: Triton cannot tile it
    try:
        il.set_int4_backend("triton")
        with pytest.warns(RuntimeWarning, match=r"set_int4_backend=triton: .*multiple of 32, got 48"):
            y = il._int4_linear_cuda(x, q, s, z, 48, b)
    finally:
        il.set_int4_backend(None)
    _assert_close_to_torch(y, x, w_int, s, z, 48, b)
