"""The compiled extension ``lrqat_kernels._C`` and its nibble ops (``torch.ops.lrqat.*``).

The pure-PyTorch ``lrqat_kernels.formats.pack_nibbles`` / ``unpack_nibbles`` define the layout
(NUMERICS.md, packed_int); the native ops must match them bit for bit. Tests that need the
extension take the ``lrqat_ext`` fixture (tests/conftest.py): without ``_C`` they fail, unless
``LRQAT_SKIP_EXT=1`` marks a Python-only run.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrqat_kernels import _ext
# The PyTorch definition of the layout (formats.pack_nibbles / unpack_nibbles themselves route 2-D
# int8 / uint8 tensors to the native ops under test here).
from lrqat_kernels.formats import _pack_nibbles_torch as pack_nibbles
from lrqat_kernels.formats import _unpack_nibbles_torch as unpack_nibbles
from lrqat_kernels.ops.nibble import pack_nibbles_native, unpack_nibbles_native

OUTS = (1, 3, 7)
INS = (2, 10, 130)


def random_w_int(out: int, in_: int, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (out, in_), generator=g, dtype=torch.int8).to(device)


def all_pairs() -> torch.Tensor:
    """int8 [16, 32]: every (low, high) pair of nibble values once, so all 256 bytes appear."""
    pairs = torch.tensor(list(itertools.product(range(-8, 8), repeat=2)), dtype=torch.int8)
    return pairs.reshape(16, 32)


# ---- layout -------------------------------------------------------------------------------


def test_layout_golden(lrqat_ext):
    # col 0 = 1 -> low nibble 0x1, col 1 = -1 -> high nibble 0xF; col 2 = -8 -> 0x8, col 3 = 7 -> 0x7.
    w = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    assert pack_nibbles_native(w).tolist() == [[0xF1, 0x78]]


def test_all_256_bytes(lrqat_ext):
    w = all_pairs()
    packed = pack_nibbles_native(w)
    assert torch.equal(packed, pack_nibbles(w))
    assert sorted(packed.flatten().tolist()) == list(range(256))
    assert torch.equal(unpack_nibbles_native(packed), w)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(8, 32)
    assert torch.equal(unpack_nibbles_native(every_byte), unpack_nibbles(every_byte))


@pytest.mark.parametrize("in_", INS, ids=lambda v: f"in{v}")
@pytest.mark.parametrize("out", OUTS, ids=lambda v: f"out{v}")
def test_matches_formats_and_round_trips(lrqat_ext, out, in_):
    w = random_w_int(out, in_, seed=out * 1000 + in_)
    packed = pack_nibbles_native(w)
    assert packed.dtype == torch.uint8 and packed.shape == (out, in_ // 2)
    assert torch.equal(packed, pack_nibbles(w))
    w_back = unpack_nibbles_native(packed)
    assert w_back.dtype == torch.int8 and w_back.shape == (out, in_)
    assert torch.equal(w_back, w)


def test_formats_route_to_native_nibble_ops(lrqat_ext, monkeypatch):
    """formats.pack_nibbles / unpack_nibbles run the native ops on 2-D contiguous int8 / uint8
    tensors (same bytes as the PyTorch definition) and the PyTorch code on every other layout."""
    from lrqat_kernels import formats

    used = []
    real = formats._native_nibble_op
    monkeypatch.setattr(formats, "_native_nibble_op", lambda name, dev: used.append(name) or real(name, dev))
    w = torch.randint(-8, 8, (9, 14), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = formats.pack_nibbles(w)
    assert used == ["pack_nibbles"] and torch.equal(packed, formats._pack_nibbles_torch(w))
    assert torch.equal(formats.unpack_nibbles(packed), w) and used == ["pack_nibbles", "unpack_nibbles"]
    used.clear()
    for other in (w.to(torch.int32), w.reshape(3, 3, 14), w.t().contiguous().t()[:, :14]):
        assert torch.equal(formats.pack_nibbles(other), formats._pack_nibbles_torch(other))
    assert torch.equal(formats.unpack_nibbles(packed[:, ::7]), formats._unpack_nibbles_torch(packed[:, ::7]))
    assert used == []
    with pytest.raises(ValueError, match=r"w_int values must be in \[-8, 7\]"):  # checked before the op
        formats.pack_nibbles(torch.full((2, 2), 8, dtype=torch.int8))


def test_large_matrix_parallel_path(lrqat_ext):
    # Several at::parallel_for chunks (grain 32768 bytes), one bad value in a late chunk.
    w = random_w_int(256, 1024, seed=7)
    assert torch.equal(pack_nibbles_native(w), pack_nibbles(w))
    w[200, 513] = -9
    with pytest.raises(RuntimeError, match=r"w_int\[200, 513\] = -9"):
        pack_nibbles_native(w)


@pytest.mark.parametrize("shape", [(0, 8), (4, 0), (0, 0)], ids=str)
def test_empty(lrqat_ext, shape):
    w = torch.empty(shape, dtype=torch.int8)
    packed = pack_nibbles_native(w)
    assert packed.shape == (shape[0], shape[1] // 2)
    assert unpack_nibbles_native(packed).shape == shape


@settings(max_examples=50, deadline=None)
@given(out=st.integers(1, 9), half=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_round_trip_property(lrqat_ext, out, half, seed):
    w = random_w_int(out, 2 * half, seed=seed)
    packed = pack_nibbles_native(w)
    assert torch.equal(packed, pack_nibbles(w))
    assert torch.equal(unpack_nibbles_native(packed), w)


# ---- input checks (C++ on cpu, the Python fakes on meta: same messages) -------------------

PACK_ERRORS = {
    "odd_in": (lambda d: torch.zeros(3, 5, dtype=torch.int8, device=d), r"in dimension must be even"),
    "float": (lambda d: torch.zeros(3, 4, device=d), r"w_int must be torch\.int8, got torch\.float32"),
    "uint8": (lambda d: torch.zeros(3, 4, dtype=torch.uint8, device=d), r"w_int must be torch\.int8"),
    "1d": (lambda d: torch.zeros(4, dtype=torch.int8, device=d), r"w_int must be 2-D, got shape \[4\]"),
    "3d": (lambda d: torch.zeros(2, 3, 4, dtype=torch.int8, device=d), r"w_int must be 2-D"),
    "non_contiguous": (lambda d: torch.zeros(4, 6, dtype=torch.int8, device=d).t(), r"w_int must be contiguous"),
}
UNPACK_ERRORS = {
    "int8": (lambda d: torch.zeros(3, 4, dtype=torch.int8, device=d), r"packed must be torch\.uint8, got torch\.int8"),
    "1d": (lambda d: torch.zeros(4, dtype=torch.uint8, device=d), r"packed must be 2-D"),
    "non_contiguous": (lambda d: torch.zeros(4, 6, dtype=torch.uint8, device=d).t(), r"packed must be contiguous"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", list(PACK_ERRORS))
def test_pack_rejects(lrqat_ext, case, device):
    make, pattern = PACK_ERRORS[case]
    with pytest.raises(RuntimeError, match=r"lrqat::pack_nibbles: .*" + pattern):
        torch.ops.lrqat.pack_nibbles(make(device))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", list(UNPACK_ERRORS))
def test_unpack_rejects(lrqat_ext, case, device):
    make, pattern = UNPACK_ERRORS[case]
    with pytest.raises(RuntimeError, match=r"lrqat::unpack_nibbles: .*" + pattern):
        torch.ops.lrqat.unpack_nibbles(make(device))


@pytest.mark.parametrize("value", [-9, 8, -128, 127])
def test_pack_rejects_out_of_range_on_cpu(lrqat_ext, value):
    w = random_w_int(3, 10)
    w[2, 7] = value
    with pytest.raises(RuntimeError, match=rf"values must be in \[-8, 7\].*w_int\[2, 7\] = {value}"):
        pack_nibbles_native(w)


# ---- fake impls, opcheck, torch.compile ----------------------------------------------------


def test_fake_impls_give_shapes(lrqat_ext):
    w = torch.empty(6, 130, dtype=torch.int8, device="meta")
    packed = torch.ops.lrqat.pack_nibbles(w)
    assert (packed.device.type, packed.dtype, packed.shape) == ("meta", torch.uint8, (6, 65))
    back = torch.ops.lrqat.unpack_nibbles(packed)
    assert (back.dtype, back.shape) == (torch.int8, (6, 130))


@pytest.mark.parametrize("shape", [(1, 2), (3, 10), (7, 130)], ids=str)
def test_opcheck_cpu(lrqat_ext, shape):
    w = random_w_int(*shape)
    torch.library.opcheck(torch.ops.lrqat.pack_nibbles.default, (w,))
    torch.library.opcheck(torch.ops.lrqat.unpack_nibbles.default, (pack_nibbles(w),))


def _dequant_row_scaled(w_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.lrqat.pack_nibbles(w_int)
    return torch.ops.lrqat.unpack_nibbles(packed).to(torch.float32) * scale


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_torch_compile_fullgraph_cpu(lrqat_ext, backend):
    torch._dynamo.reset()
    compiled = torch.compile(_dequant_row_scaled, backend=backend, fullgraph=True)
    w = random_w_int(7, 130)
    scale = torch.rand(7, 1)
    torch.testing.assert_close(compiled(w, scale), w.float() * scale, rtol=0, atol=0)


# ---- the loader ---------------------------------------------------------------------------


def test_require_extension_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", "ModuleNotFoundError: No module named 'lrqat_kernels._C'")
    assert not _ext.has_extension()
    with pytest.raises(RuntimeError) as info:
        _ext.require_extension("pack_nibbles")
    msg = str(info.value)
    for needle in (
        "torch.ops.lrqat.pack_nibbles",
        "No module named 'lrqat_kernels._C'",
        "pip install --no-build-isolation .",
        "CUDA_HOME",
        "LRQAT_SKIP_EXT=1",
        "reference",
    ):
        assert needle in msg
    with pytest.raises(RuntimeError, match=r"torch\.ops\.lrqat\.unpack_nibbles needs the compiled extension"):
        unpack_nibbles_native(torch.zeros(1, 1, dtype=torch.uint8))


def test_load_extension_never_raises(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "_EXT_MODULE", "lrqat_kernels._no_such_extension")
    assert _ext.load_extension() is False
    assert "ModuleNotFoundError" in _ext.extension_error()
    assert _ext.load_extension() is False  # cached, still no exception


def test_import_without_extension():
    """A Python-only install imports, reports why, raises only when a native op is called, and
    still runs converted INT4 layers on CPU (dequantise + F.linear, with a warning)."""
    code = "\n".join(
        [
            "import sys, torch",
            "import lrqat_kernels",
            "from lrqat_kernels import _ext",
            "from lrqat_kernels.ops import nibble",
            "assert not _ext.has_extension()",
            "assert 'disabled by LRQAT_DISABLE_EXT=1' in _ext.extension_error(), _ext.extension_error()",
            "assert 'lrqat_kernels._C' not in sys.modules",
            "w = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)",
            "assert lrqat_kernels.formats.pack_nibbles(w).tolist() == [[0xF1, 0x78]]",
            "try:",
            "    nibble.pack_nibbles_native(w)",
            "except RuntimeError as e:",
            "    assert 'pip install --no-build-isolation' in str(e)",
            "else:",
            "    raise AssertionError('pack_nibbles_native ran without the extension')",
            # a converted model still runs on CPU: int4_linear falls back to dequantise + F.linear
            "import warnings",
            "from lrqat_kernels import LRQATConfig, LRQATLinear, QuantizedLinear",
            "torch.manual_seed(0)",
            "layer = LRQATLinear.from_linear(torch.nn.Linear(64, 24), LRQATConfig(rank=4, group_size=32, symmetric=False))",
            "q = QuantizedLinear.from_lrqat(layer)",
            "x = torch.randn(5, 64)",
            "with warnings.catch_warnings(record=True) as caught:",
            "    warnings.simplefilter('always')",
            "    y = q(x)",
            "assert any('dequantises and calls F.linear' in str(c.message) for c in caught), caught",
            "ref = torch.nn.functional.linear(x, q.dequantize(torch.float32), q.bias)",
            "assert torch.equal(y, ref), (y - ref).abs().max()",
            "print('ok')",
        ]
    )
    env = dict(os.environ, LRQAT_DISABLE_EXT="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


# ---- CUDA ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("in_", INS, ids=lambda v: f"in{v}")
@pytest.mark.parametrize("out", OUTS, ids=lambda v: f"out{v}")
def test_cuda_matches_cpu(lrqat_ext, out, in_):
    w = random_w_int(out, in_, seed=out + in_)
    packed = pack_nibbles_native(w.cuda())
    assert packed.is_cuda
    assert torch.equal(packed.cpu(), pack_nibbles(w))
    assert torch.equal(unpack_nibbles_native(packed).cpu(), w)


@pytest.mark.gpu
def test_cuda_all_256_bytes_and_large(lrqat_ext):
    w = all_pairs().cuda()
    assert torch.equal(unpack_nibbles_native(pack_nibbles_native(w)), w)
    # More elements than one capped grid covers in one pass: exercises the grid-stride loop.
    big = random_w_int(4096, 8192, device="cuda", seed=3)
    assert torch.equal(pack_nibbles_native(big).cpu(), pack_nibbles(big.cpu()))
    assert torch.equal(unpack_nibbles_native(pack_nibbles_native(big)), big)


@pytest.mark.gpu
def test_cuda_rejects_and_empty(lrqat_ext):
    with pytest.raises(RuntimeError, match=r"in dimension must be even"):
        pack_nibbles_native(torch.zeros(3, 5, dtype=torch.int8, device="cuda"))
    with pytest.raises(RuntimeError, match=r"packed must be torch\.uint8"):
        unpack_nibbles_native(torch.zeros(3, 4, dtype=torch.int8, device="cuda"))
    assert pack_nibbles_native(torch.empty(0, 8, dtype=torch.int8, device="cuda")).shape == (0, 4)


@pytest.mark.gpu
def test_opcheck_cuda(lrqat_ext):
    w = random_w_int(7, 130, device="cuda")
    torch.library.opcheck(torch.ops.lrqat.pack_nibbles.default, (w,))
    torch.library.opcheck(torch.ops.lrqat.unpack_nibbles.default, (pack_nibbles_native(w),))


@pytest.mark.gpu
def test_torch_compile_fullgraph_cuda(lrqat_ext):
    torch._dynamo.reset()
    compiled = torch.compile(_dequant_row_scaled, fullgraph=True)
    w = random_w_int(7, 130, device="cuda")
    scale = torch.rand(7, 1, device="cuda")
    torch.testing.assert_close(compiled(w, scale), w.float() * scale, rtol=0, atol=0)
