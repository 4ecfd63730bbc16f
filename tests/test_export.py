"""The export layer shared by every format (lrqat_kernels/export/__init__.py, _common.py)."""

import os

import pytest
import torch

import lrqat_kernels as L
from lrqat_kernels.export import ExportError, export
from lrqat_kernels.export._common import QuantLayer, collect_layers, pack_bitstream, scale_rounding, unpack_bitstream


def _bitwise_reference(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit by bit: element i of a row at bit i*bits of the row's LSB-first stream of 32-bit words."""
    rows, cols = u.shape
    n_words = -(-cols * bits // 32)
    out = [[0] * n_words for _ in range(rows)]
    for r in range(rows):
        for i in range(cols):
            v = int(u[r, i])
            for b in range(bits):
                if (v >> b) & 1:
                    pos = i * bits + b
                    out[r][pos // 32] |= 1 << (pos % 32)
    words = torch.tensor(out, dtype=torch.int64)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 32, 45, 96])
def test_bitstream_matches_bit_by_bit_reference(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    u = torch.randint(0, 1 << bits, (3, cols), generator=g)
    u[0, :] = (1 << bits) - 1  # every bit set: a spill into a neighbour would show
    words = pack_bitstream(u, bits)
    assert words.dtype == torch.int32 and words.shape == (3, -(-cols * bits // 32))
    assert torch.equal(words, _bitwise_reference(u, bits))
    assert torch.equal(unpack_bitstream(words, bits, cols), u)


def test_bitstream_refuses_codes_off_range():
    with pytest.raises(ExportError, match=r"codes must be in \[0, 15\]"):
        pack_bitstream(torch.tensor([[16]]), 4)
    with pytest.raises(ExportError, match="codes must be in"):
        pack_bitstream(torch.tensor([[-1]]), 4)


def test_scale_rounding_counts_and_error():
    s = torch.tensor([[1.0, 1.0 + 2.0 ** -20, 1e-9, 1e6]])
    r = scale_rounding(s, torch.float16)
    assert r["total"] == 4 and r["inexact"] == 3  # 1 + 2^-20 rounds; 1e-9 flushes to 0; 1e6 overflows
    assert r["overflow"] == 2
    r = scale_rounding(torch.tensor([[0.5, 0.25]]), torch.float16)
    assert r["inexact"] == 0 and r["max_rel_error"] == 0.0


def test_quant_layer_check_names_the_layer():
    layer = QuantLayer("model.layers.0.mlp.up_proj", torch.full((2, 4), 8, dtype=torch.int8), torch.ones(2, 1), None, 4, None)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.mlp\.up_proj: W_int holds values in \[8, 8\]"):
        layer.check()
    layer = QuantLayer("x", torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1), None, 9, None)
    with pytest.raises(ExportError, match="bits must be in 2..8"):
        layer.check()


def test_export_refuses_fp_model_and_existing_dir(tmp_path):
    from export_models import converted, tiny_hf

    with pytest.raises(ExportError, match="needs a converted model"):
        export(tiny_hf(), tmp_path / "a", "compressed-tensors")
    q = converted()
    (tmp_path / "b").mkdir()
    with pytest.raises(ExportError, match="exists; pass overwrite=True"):
        export(q, tmp_path / "b", "compressed-tensors")
    with pytest.raises(ExportError, match="format must be one of compressed-tensors, gguf, gptq"):
        export(q, tmp_path / "c", "onnx")
    assert sorted(os.listdir(tmp_path)) == ["b"]  # nothing half written, no .tmp- sibling


def test_export_of_lrqat_model_converts_a_copy(tmp_path):
    from export_models import tiny_hf

    m = L.prepare(tiny_hf(), L.LRQATConfig(bits=4, rank=4, phi_format="fp32", range_method="minmax"))
    rep = export(m, tmp_path / "ct", "compressed-tensors")
    assert getattr(m, "lrqat_stage", None) == "lrqat"  # the caller's model is left as it was
    assert rep["n_quantized_layers"] == len(collect_layers(L.convert(m)))


def test_export_refuses_activation_quant_unless_dropped(tmp_path):
    from export_models import tiny_hf

    m = L.prepare(tiny_hf(), L.LRQATConfig.preset("W4A8KV8", rank=4, phi_format="fp32", range_method="minmax"))
    L.convert(m)
    with pytest.raises(ExportError, match="quantises activations"):
        export(m, tmp_path / "x", "compressed-tensors")
    with pytest.warns(UserWarning, match="exported weights only"):
        rep = export(m, tmp_path / "x", "compressed-tensors", drop_activation_quant=True)
    assert any("weights only" in w for w in rep["warnings"])
