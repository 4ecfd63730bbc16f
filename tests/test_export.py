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
    # an fp32-subnormal scale: the relative error is measured against |s| itself (bf16 step 2^-133 here)
    s = torch.tensor([[2.5e-40]])
    r = scale_rounding(s, torch.bfloat16)
    want = abs(s.to(torch.bfloat16).double().item() - s.double().item()) / s.double().item()
    assert want > 0.05 and r["max_rel_error"] == pytest.approx(want, rel=1e-6)


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


# ---- shared rules of export(): refusals before any work, nothing left behind, file modes --------

def test_check_options_one_message_format():
    from lrqat_kernels.export._common import check_options

    check_options("gptq", {"allow_inexact": True}, ("allow_inexact", "checkpoint_format"))
    with pytest.raises(ExportError, match=r"^gptq: unknown option 'bogus'; allowed: allow_inexact, checkpoint_format$"):
        check_options("gptq", {"bogus": 1}, ("allow_inexact", "checkpoint_format"))
    with pytest.raises(ExportError, match=r"^gguf: unknown options 'a', 'b'; allowed: gguf_type$"):
        check_options("gguf", {"b": 1, "a": 2}, ("gguf_type",))


@pytest.mark.parametrize("fmt,bad", [("compressed-tensors", {"bogus": 1}), ("gptq", {"checkpoint_format": "v3"}),
                                     ("gguf", {"gguf_type": "Q4_K"})])
def test_options_refused_before_the_model_is_loaded(tmp_path, fmt, bad):
    """A bad option name or value is refused before the model is read: the checkpoint path does not
    even exist here, and the error is about the option."""
    with pytest.raises(ExportError, match="bogus|checkpoint_format|gguf_type"):
        export(str(tmp_path / "no-such-checkpoint"), tmp_path / "out", fmt, **bad)
    assert os.listdir(tmp_path) == []


def test_refused_export_leaves_no_parent_dirs(tmp_path):
    """A refused export removes the parent directories it created (a refusal by the option check,
    and one inside the writer, after the temporary directory was made)."""
    from export_models import converted

    m = converted("llama", bits=4, symmetric=False, hidden=64)
    with pytest.raises(ExportError, match="unknown option 'bogus'"):
        export(m, tmp_path / "new" / "parents" / "out", "gptq", bogus=1)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ExportError, match="is asymmetric"):  # refused by gptq.write
        export(m, tmp_path / "new" / "parents" / "out", "gptq", checkpoint_format="gptq")
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()  # a parent that existed before stays
    with pytest.raises(ExportError, match="is asymmetric"):
        export(m, tmp_path / "kept" / "a" / "out", "gptq", checkpoint_format="gptq")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_refuses_out_dir_holding_the_source(tmp_path):
    """out_dir equal to, or an ancestor of, the checkpoint or tokenizer directory is refused, even
    with overwrite=True (replacing it would delete the source)."""
    from export_models import converted

    run = tmp_path / "run"
    L.save_pretrained(converted("llama", bits=4, hidden=64), str(run / "quantized"))
    (run / "results.json").write_text("{}")
    before = sorted(os.listdir(run))
    for out in (run, run / "quantized", tmp_path):
        with pytest.raises(ExportError, match=r"(contains|is) the source checkpoint .*choose another --out"):
            export(str(run / "quantized"), out, "compressed-tensors", overwrite=True)
    with pytest.raises(ExportError, match=r"contains the source checkpoint"):  # through a symlink to the run
        os.symlink(run, tmp_path / "link")
        export(str(run / "quantized"), tmp_path / "link", "compressed-tensors", overwrite=True)
    (tmp_path / "tok").mkdir()
    mem = converted("llama", bits=4, hidden=64)
    with pytest.raises(ExportError, match=r"is the tokenizer directory"):
        export(mem, tmp_path / "tok", "compressed-tensors", overwrite=True, tokenizer=str(tmp_path / "tok"))
    with pytest.raises(ExportError, match=r"contains the tokenizer directory"):
        export(mem, tmp_path, "compressed-tensors", overwrite=True, tokenizer=str(tmp_path / "tok"))
    assert sorted(os.listdir(run)) == before and os.path.isfile(run / "quantized" / "config.json")
    rep = export(str(run / "quantized"), run / "ct", "compressed-tensors")  # a sibling inside the run: fine
    assert rep["path"] == str(run / "ct")


def test_overwrite_through_a_symlink(tmp_path):
    """overwrite=True on a symlinked out_dir replaces the link's target; the link stays, and no
    temporary or backup sibling is left anywhere."""
    from export_models import converted

    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("old")
    os.symlink(real, tmp_path / "link")
    export(converted("llama", bits=4, hidden=64), tmp_path / "link", "compressed-tensors", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert os.path.islink(tmp_path / "link") and os.path.realpath(tmp_path / "link") == str(real)
    assert "keep.txt" not in os.listdir(real) and "model.safetensors" in os.listdir(real)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_exported_files_get_umask_permissions(tmp_path, fmt):
    """Every exported file (safetensors included, which safetensors creates 0600) is 0666 & ~umask."""
    import stat

    from export_models import converted

    old = os.umask(0o022)
    try:
        export(converted("llama", bits=4, hidden=64), tmp_path / "o", fmt)
    finally:
        os.umask(old)
    modes = {f: oct(stat.S_IMODE(os.stat(tmp_path / "o" / f).st_mode)) for f in os.listdir(tmp_path / "o")}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes
    assert oct(stat.S_IMODE(os.stat(tmp_path / "o").st_mode)) == "0o755"
