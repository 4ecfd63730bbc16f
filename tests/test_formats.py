"""Storage formats: exact round trips, the nibble layout, fixed-point codes, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrqat_kernels import formats
from lrqat_kernels.formats import (
    BITS_ALLOWED,
    PHI_DTYPES,
    PHI_FORMATS,
    decode_phi,
    encode_phi,
    pack_nibbles,
    qrange,
    unpack_nibbles,
)

FORMAT_BITS = [(f, b) for f in PHI_FORMATS for b in BITS_ALLOWED[f]]


def test_qrange():
    assert qrange(2) == (-2, 1)
    assert qrange(3) == (-4, 3)
    assert qrange(4) == (-8, 7)
    assert qrange(8) == (-128, 127)


def test_nibble_layout_by_hand():
    w = torch.tensor([[1, -1, -8, 7, 0, 3]], dtype=torch.int8)
    packed = pack_nibbles(w)
    # byte j = col 2j in the low nibble, col 2j+1 in the high nibble, two's complement.
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0xF1, 0x78, 0x30]]
    assert unpack_nibbles(packed).tolist() == w.tolist()


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 9),
    half_in=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64]),
)
def test_pack_unpack_roundtrip(out, half_in, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-8, 8, (out, 2 * half_in), generator=g).to(dtype)
    packed = pack_nibbles(w)
    assert packed.shape == (out, half_in)
    back = unpack_nibbles(packed)
    assert back.dtype == torch.int8
    assert torch.equal(back.long(), w.long())
    # And every byte value unpacks and repacks to itself.
    assert torch.equal(pack_nibbles(unpack_nibbles(packed)), packed)


def test_every_byte_roundtrips():
    allbytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256)
    assert torch.equal(pack_nibbles(unpack_nibbles(allbytes)), allbytes)


def _random_stored(phi_format, bits, shape, g):
    """A random valid stored Phi0 of the format (codes on its grid)."""
    qmin, qmax = qrange(bits)
    out, in_ = shape
    if phi_format == "packed_int":
        return pack_nibbles(torch.randint(qmin, qmax + 1, shape, generator=g))
    if phi_format == "fixed_point":
        f = formats.fixed_point_frac_bits(bits)
        return torch.randint(qmin << f, (qmax << f) + 1, shape, generator=g).to(torch.int8)
    x = torch.randn(shape, generator=g) * (qmax + 1) / 2
    return x.to(PHI_DTYPES[phi_format])


@pytest.mark.parametrize("phi_format,bits", FORMAT_BITS, ids=[f"{f}-b{b}" for f, b in FORMAT_BITS])
@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 6), half_in=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_encode_decode_roundtrip(phi_format, bits, out, half_in, seed):
    g = torch.Generator().manual_seed(seed)
    phi = _random_stored(phi_format, bits, (out, 2 * half_in), g)
    x = decode_phi(phi, bits, phi_format)
    assert x.dtype == torch.float32 and x.shape == (out, 2 * half_in)
    again = encode_phi(x, bits, phi_format)
    assert again.dtype == phi.dtype
    assert torch.equal(again.view(torch.uint8) if again.dtype == torch.uint8 else again, phi)
    assert torch.equal(decode_phi(again, bits, phi_format), x)


def test_fixed_point_codes_by_hand():
    # Q4.4: code = round_half_even(16 * clip(x, -8, 7))
    x = torch.tensor([[0.03125, 3 / 32, 5 / 32, 7.9, -9.0, -8.0, 0.0625, 1.0]])
    codes = encode_phi(x, 4, "fixed_point")
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[0, 2, 2, 112, -128, -128, 1, 16]]
    # Q3.5: 32 codes a unit, grid [-4, 3] -> [-128, 96]
    x3 = torch.tensor([[1.0, 3.5, -4.5, 1 / 64]])
    assert encode_phi(x3, 3, "fixed_point").tolist() == [[32, 96, -128, 0]]
    assert decode_phi(torch.tensor([[-128, 112, 17]], dtype=torch.int8), 4, "fixed_point").tolist() == [[-8.0, 7.0, 1.0625]]


def test_packed_int_rounds_half_to_even_and_clips():
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, -0.5, 9.0, -9.0, 6.5]])
    w = unpack_nibbles(encode_phi(x, 4, "packed_int"))
    assert w.tolist() == [[0, 2, 2, -2, 0, 7, -8, 6]]
    w2 = unpack_nibbles(encode_phi(x, 2, "packed_int"))
    assert w2.tolist() == [[0, 1, 1, -2, 0, 1, -2, 1]]


def test_float_formats_are_plain_casts():
    x = torch.randn(3, 8) * 5
    for fmt, dt in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        phi = encode_phi(x, 4, fmt)
        assert phi.dtype == dt
        assert torch.equal(phi, x.to(dt))


@pytest.mark.parametrize(
    "phi_format,bits,msg",
    [
        ("packed_int", 5, "bits must be in 2..4"),
        ("packed_int", 1, "bits must be in 2..4"),
        ("fixed_point", 8, "bits must be in 2..7"),
        ("bf16", 9, "bits must be in 2..8"),
        ("fp32", 1, "bits must be in 2..8"),
    ],
)
def test_bad_bits(phi_format, bits, msg):
    with pytest.raises(ValueError, match=msg):
        encode_phi(torch.zeros(2, 4), bits, phi_format)


def test_bad_inputs():
    with pytest.raises(ValueError, match="phi_format must be one of"):
        encode_phi(torch.zeros(2, 4), 4, "int4")
    with pytest.raises(TypeError, match="bits must be an int"):
        encode_phi(torch.zeros(2, 4), 4.0, "fp32")
    with pytest.raises(ValueError, match="must be even"):
        encode_phi(torch.zeros(2, 5), 4, "packed_int")
    with pytest.raises(TypeError, match="x must be a floating-point"):
        encode_phi(torch.zeros(2, 4, dtype=torch.int32), 4, "fp32")
    with pytest.raises(TypeError, match="phi must be torch.int8"):
        decode_phi(torch.zeros(2, 4), 4, "fixed_point")
    with pytest.raises(TypeError, match="phi must be torch.uint8"):
        decode_phi(torch.zeros(2, 4, dtype=torch.int8), 4, "packed_int")
    with pytest.raises(ValueError, match=r"in\) must be even"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_nibbles(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(TypeError, match="integer dtype"):
        pack_nibbles(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="packed must be uint8"):
        unpack_nibbles(torch.zeros(2, 4, dtype=torch.int8))
