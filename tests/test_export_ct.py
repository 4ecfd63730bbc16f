"""compressed-tensors export (lrqat_kernels/export/compressed_tensors.py), checked by
compressed-tensors' own decompressor / packer / config model and by transformers' loader (CPU).

Exactness held here: with fp32 scales compressed-tensors' decompressor returns ``s * (W_int - z)``
bit for bit, its packer produces our int32 words, and transformers' model loaded from the export
gives the converted model's exact-dequantise-path logits bit for bit (torch.equal, fp32).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import lrqat_kernels
from lrqat_kernels import QuantizedLinear
from lrqat_kernels.export import ExportError, export
from lrqat_kernels.export import compressed_tensors as ct_writer
from lrqat_kernels.export._common import collect_layers
from lrqat_kernels.ops._launch import use_kernels

from export_models import converted, tiny_hf

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.utils.match import is_match  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Model-level tests run the eager CPU path (as tests/test_api.py)."""
    with use_kernels(False):
        yield


# name: (converted() arguments, extra). Bits 2/3/4/8, per-channel and g=32, sym and asym,
# llama/qwen2 (q/k/v biases)/mistral, tied and untied heads, a quantised head, odd shapes.
CASES = {
    "llama-w4-ch-sym": dict(arch="llama", bits=4, group_size=None, symmetric=True),
    "llama-w3-g32-asym-tied": dict(arch="llama", bits=3, group_size=32, symmetric=False, tie=True),
    "qwen2-w2-g32-asym": dict(arch="qwen2", bits=2, group_size=32, symmetric=False),
    "qwen2-w8-ch-sym-tied": dict(arch="qwen2", bits=8, group_size=None, symmetric=True, tie=True),
    # in_features 40 / 80 per-channel: 3-bit rows of 120 / 240 bits, padded inside the last word
    "llama-w3-ch-sym-odd": dict(arch="llama", bits=3, group_size=None, symmetric=True, hidden=40, heads=4, kv_heads=2),
    "qwen2-w3-ch-asym-odd": dict(arch="qwen2", bits=3, group_size=None, symmetric=False, hidden=40, heads=4, kv_heads=2),
    # lm_head quantised too (tie undone by prepare): targets "Linear", nothing ignored
    "mistral-w4-g32-asym-head": dict(arch="mistral", bits=4, group_size=32, symmetric=False, tie=True, exclude=()),
    "llama-w8-g32-sym": dict(arch="llama", bits=8, group_size=32, symmetric=True, seed=3),
}
IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


def _mixed_model():
    """Two schemes: 4-bit per-channel everywhere, one layer 6-bit g=16 and one 2-bit g=32 (regex targets)."""
    model = converted("llama", bits=4, group_size=None, symmetric=True, seed=5)
    g = torch.Generator().manual_seed(9)
    for name, bits, gs in (("model.layers.1.mlp.down_proj", 6, 16), ("model.layers.0.self_attn.k_proj", 2, 32)):
        old = model.get_submodule(name)
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        w = torch.randint(qmin, qmax + 1, (old.out_features, old.in_features), generator=g, dtype=torch.int8)
        s = torch.rand(old.out_features, old.in_features // gs, generator=g) * 0.01 + 1e-3
        lrqat_kernels.api._set_submodule(model, name, QuantizedLinear.from_int(w, s, None, group_size=gs, bits=bits))
    return model.eval()


def _make(name):
    return _mixed_model() if name == "mixed" else converted(**{k: v for k, v in CASES[name].items()})


def _exact_path(model):
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.use_int4_kernel = False  # the exact dequantise path (F.linear on W_hat)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, export dir, report); each case converted and exported once."""
    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            model = _exact_path(_make(name))
            out = str(tmp_path_factory.mktemp("ct") / name)
            with pytest.warns(UserWarning):  # every tiny model breaks a vLLM kernel rule (Marlin shapes)
                report = export(model, out, "compressed-tensors", **options)
            cache[key] = (model, out, report)
        return cache[key]

    return get


def _tensors(out):
    return load_file(os.path.join(out, "model.safetensors"))


def _qc(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)["quantization_config"]


def _scheme_of(qc, layer_name):
    """The QuantizationScheme compressed-tensors' own matcher assigns to a module name (None: ignored/unmatched)."""
    parsed = QuantizationConfig.model_validate(qc)
    hits = [s for s in parsed.config_groups.values() if is_match(layer_name, torch.nn.Linear(1, 1), s.targets, parsed.ignore)]
    assert len(hits) <= 1, f"{layer_name} matched by {len(hits)} config groups"
    return hits[0] if hits else None


def _module_state(T, name):
    return {k.rpartition(".")[2]: v for k, v in T.items() if k.rpartition(".")[0] == name}


# -- 1, 2: per tensor, against compressed-tensors' own decompressor and packer -------------------

@pytest.mark.parametrize("name", list(CASES) + ["mixed"])
def test_decompressor_bit_exact(exported, name):
    """Decompressed weight == s * (W_int - z) (torch.equal, fp32); unpacked integers == W_int, z;
    our int32 words == compressed-tensors' pack_to_int32 of the same integers."""
    model, out, report = exported(name)
    T, qc = _tensors(out), _qc(out)
    layers = collect_layers(model)
    assert layers and report["exact"] and report["scale_rounding"]["inexact"] == 0
    for layer in layers:
        scheme = _scheme_of(qc, layer.name)
        assert scheme is not None and scheme.weights.num_bits == layer.bits
        assert scheme.weights.symmetric == layer.symmetric
        assert scheme.weights.group_size == layer.group_size if layer.group_size else scheme.weights.strategy == "channel"
        sd = _module_state(T, layer.name)
        assert set(sd) - {"bias"} == set(PackedQuantizationCompressor.compression_param_names(scheme))
        b, n_out, n_in = layer.bits, layer.out_features, layer.in_features
        assert sd["weight_packed"].dtype == torch.int32 and sd["weight_packed"].shape == (n_out, -(-n_in * b // 32))
        assert sd["weight_shape"].dtype == torch.int64 and sd["weight_shape"].tolist() == [n_out, n_in]
        assert sd["weight_scale"].dtype == torch.float32 and torch.equal(sd["weight_scale"], layer.scale)
        # 2: raw words equal the third party's packer of the same integers (it adds the offset itself)
        assert torch.equal(sd["weight_packed"], pack_to_int32(layer.w_int, b))
        assert torch.equal(unpack_from_int32(sd["weight_packed"], b, sd["weight_shape"]), layer.w_int)
        if not layer.symmetric:
            zp = sd["weight_zero_point"]
            assert zp.dtype == torch.int32 and zp.shape == (-(-n_out * b // 32), n_in // layer.group)
            assert torch.equal(zp, pack_to_int32(layer.zero_point, b, packed_dim=0))
            assert torch.equal(unpack_from_int32(zp, b, layer.zero_point.shape, packed_dim=0), layer.zero_point)
        # 1: the decompressor's weight, bit for bit
        w = PackedQuantizationCompressor.decompress(dict(sd), scheme)["weight"]
        assert w.dtype == torch.float32 and torch.equal(w, layer.w_hat())
        if layer.bias is not None:
            assert torch.equal(sd["bias"], layer.bias)
    # every tensor of the file is accounted for: compressed layers + the model's dense tensors
    qnames = {l.name for l in layers}
    dense_keys = {k for k in T if k.rpartition(".")[0] not in qnames or k.endswith(".bias")}
    for k in dense_keys:
        assert torch.equal(T[k], model.state_dict()[k]) and T[k].dtype == model.state_dict()[k].dtype, k


def test_config_targets_and_ignore(exported):
    """One scheme: targets ["Linear"], ignore = the high-precision Linears; mixed: anchored regexes per
    layer, each quantised layer in exactly one group; validated by compressed-tensors' own model."""
    _, out, rep = exported("llama-w4-ch-sym")
    qc = _qc(out)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["version"] == ct.__version__
    assert list(qc["config_groups"]) == ["group_0"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["ignore"] == ["lm_head"] == rep["ignore"]
    assert qc["config_groups"]["group_0"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                         "strategy": "channel", "group_size": None, "dynamic": False}
    _, out, _ = exported("mistral-w4-g32-asym-head")
    qc = _qc(out)
    assert qc["ignore"] == [] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "group"
    model, out, rep = exported("mixed")
    qc = _qc(out)
    # groups in order of first appearance: 4-bit (q_proj), 2-bit (layer 0 k_proj), 6-bit (layer 1 down_proj)
    assert [g["bits"] for g in rep["config_groups"].values()] == [4, 2, 6]
    assert qc["config_groups"]["group_2"]["targets"] == [r"re:^model\.layers\.1\.mlp\.down_proj$"]
    assert len(qc["config_groups"]["group_0"]["targets"]) == 12
    assert qc["ignore"] == ["lm_head"] and _scheme_of(qc, "lm_head") is None
    for layer in collect_layers(model):
        assert _scheme_of(qc, layer.name).weights.num_bits == layer.bits
    # a name that only starts like a layer's is not matched (anchored)
    assert _scheme_of(qc, "model.layers.1.mlp.down_proj_extra") is None


def test_report_and_warnings(exported):
    _, out, rep = exported("qwen2-w2-g32-asym")
    with open(os.path.join(out, "lrqat_export.json")) as f:
        on_disk = json.load(f)
    assert on_disk["format"] == "compressed-tensors" and on_disk["exact"] is True
    assert on_disk["readers"]["compressed-tensors"] == ">= 0.9.4"  # b=2: old layout identical; packed zp
    w = rep["warnings"]
    assert any(x.startswith("2-bit weights") and "14 layers" in x for x in w)
    assert any(x.startswith("vLLM casts weight_scale") for x in w)
    assert not any("asymmetric" in x for x in w)  # reported once, under the 2-bit reason
    assert "CompressedTensorsConfig(dequantize=True)" in rep["readers"]["transformers"]
    _, _, rep = exported("llama-w3-ch-sym-odd")
    assert rep["readers"]["compressed-tensors"] == ">= 0.18.0"
    assert any("dense bit layout of compressed-tensors >= 0.18.0" in x for x in rep["warnings"])
    _, _, rep = exported("llama-w8-g32-sym")
    assert rep["readers"]["compressed-tensors"] == ">= 0.9.0"
    assert not any(x.startswith(("8-bit", "group_size")) for x in rep["warnings"])
    _, _, rep = exported("mistral-w4-g32-asym-head")
    assert not any("asymmetric" in x for x in rep["warnings"])  # asym 4-bit: Marlin takes it
    assert any(x.startswith("quantised output head lm_head:") for x in rep["warnings"])
    assert not any(x.startswith("quantised output head") for x in exported("llama-w4-ch-sym")[2]["warnings"])
    _, _, rep = exported("mixed")
    assert rep["readers"]["transformers"] == "AutoModelForCausalLM.from_pretrained(dir)"  # symmetric
    assert any(x.startswith("group_size 16") and "1 layer (model.layers.1.mlp.down_proj)" in x for x in rep["warnings"])
    fused = [x for x in rep["warnings"] if x.startswith("vLLM fuses")]
    assert len(fused) == 1 and "model.layers.0.self_attn.{q_proj,k_proj,v_proj}" in fused[0]


def test_tied_head_written_as_hf_writes_it(exported, tmp_path):
    """The dense key set (packed tensors counted as their weight) equals what HF's own save_pretrained
    writes for the same architecture: a tied head once, an untied / quantised head under lm_head."""
    for name, tie in (("llama-w3-g32-asym-tied", True), ("llama-w4-ch-sym", False), ("mistral-w4-g32-asym-head", True)):
        model, out, rep = exported(name)
        ref_dir = tmp_path / name
        hf = tiny_hf(CASES[name]["arch"], tie=tie)
        hf.save_pretrained(ref_dir)
        want = set(load_file(os.path.join(ref_dir, "model.safetensors")))
        got = {k.replace(".weight_packed", ".weight") for k in _tensors(out)
               if not k.endswith((".weight_scale", ".weight_shape", ".weight_zero_point"))}
        if name == "mistral-w4-g32-asym-head":  # prepare untied the quantised head: config says so
            want.add("lm_head.weight")
            with open(os.path.join(out, "config.json")) as f:
                assert json.load(f)["tie_word_embeddings"] is False
        assert got == want, name
        assert rep["tied_head_omitted"] == ("lm_head.weight" if name == "llama-w3-g32-asym-tied" else None)
    # shared storage, but the config says untied: both names written (safetensors refuses shared tensors)
    model = converted("llama", tie=True)
    model.config.tie_word_embeddings = False
    with pytest.warns(UserWarning):
        export(model, str(tmp_path / "untied"), "compressed-tensors")
    T = _tensors(str(tmp_path / "untied"))
    assert torch.equal(T["lm_head.weight"], T["model.embed_tokens.weight"])
    # a head of its own, but the config says tied: written, and config.json set untied
    model = converted("llama", tie=False)
    model.config.tie_word_embeddings = True
    with pytest.warns(UserWarning):
        rep = export(model, str(tmp_path / "own"), "compressed-tensors")
    assert torch.equal(_tensors(str(tmp_path / "own"))["lm_head.weight"], model.lm_head.weight)
    with open(tmp_path / "own" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    assert rep["tied_head_omitted"] is None and any("not the input embedding (dense)" in n for n in rep["notes"])


# -- 3: transformers loads the export; logits equal the converted model's ------------------------

def _hf_load(out, dequantize, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kw).eval()


@pytest.mark.parametrize("name", ["llama-w4-ch-sym", "llama-w3-g32-asym-tied", "qwen2-w2-g32-asym",
                                  "qwen2-w8-ch-sym-tied", "qwen2-w3-ch-asym-odd", "mistral-w4-g32-asym-head", "mixed"])
def test_transformers_logits_bit_exact(exported, name):
    """Tolerance: none. fp32 logits of the loaded export == the converted model's (torch.equal).

    Symmetric checkpoints load through transformers' default (compressed) path; asymmetric ones
    through ``CompressedTensorsConfig(dequantize=True)``: compressed-tensors 0.20.1 builds the
    compressed module layout with an unpacked ``[out, G]`` zero point (its meta-device compress
    skips packing), so the default path refuses any packed asymmetric checkpoint (size mismatch),
    ours and llm-compressor's alike. The dequantize path takes the first config group's scheme
    for every layer, so mixed (several groups) exports use the default path.
    """
    model, out, _ = exported(name)
    with torch.no_grad():
        ref = model(IDS).logits
    symmetric = all(l.symmetric for l in collect_layers(model))
    hf = _hf_load(out, dequantize=not symmetric)
    with torch.no_grad():
        got = hf(IDS).logits
    assert got.dtype == torch.float32 and torch.equal(got, ref), (got - ref).abs().max().item()


def test_transformers_bf16_model(tmp_path):
    """A bf16 model: dense tensors written in bf16, scales fp32. Tolerance: none (torch.equal).

    ``dequantize=True`` decompresses with the fp32 scales and casts W_hat to bf16 once: the converted
    model's exact path. transformers' default (compressed) path keeps ``weight_scale`` in the model
    dtype, as vLLM does: its logits equal the converted model's with bf16-rounded scales (``q * bf16(s)``
    is exact in fp32, so both round the same product once).
    """
    model = _exact_path(converted("llama", bits=4, group_size=32, symmetric=True, tie=True, seed=7))
    lrqat_kernels.api.cast_floating(model, torch.bfloat16)
    out = str(tmp_path / "bf16")
    with pytest.warns(UserWarning, match="vLLM casts weight_scale to the served dtype"):
        export(model, out, "compressed-tensors")
    T = _tensors(out)
    assert T["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert T["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, QuantizedLinear):
                m.scale.copy_(m.scale.to(torch.bfloat16).float())
        assert not torch.equal(rounded(IDS).logits, model(IDS).logits)
        for dequantize, ref in ((True, model), (False, rounded)):
            got = _hf_load(out, dequantize=dequantize, dtype=torch.bfloat16)(IDS).logits
            assert got.dtype == torch.bfloat16 and torch.equal(got, ref(IDS).logits), dequantize


def test_sharded_export_loads(exported, tmp_path, monkeypatch):
    """Above MAX_SHARD_BYTES the weights go to model-0000k-of-0000n.safetensors + index; every tensor
    once, a layer's tensors in one shard; transformers loads it with the same logits."""
    model, _, _ = exported("llama-w4-ch-sym")
    monkeypatch.setattr(ct_writer, "MAX_SHARD_BYTES", 40_000)
    out = str(tmp_path / "sharded")
    with pytest.warns(UserWarning):
        rep = export(model, out, "compressed-tensors")
    with open(os.path.join(out, ct_writer.INDEX_NAME)) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert rep["sharded"] and len(shards) >= 3 and not os.path.exists(os.path.join(out, "model.safetensors"))
    assert rep["weights_files"] == shards + [ct_writer.INDEX_NAME]
    all_t = {}
    for s in shards:
        t = load_file(os.path.join(out, s))
        assert not set(t) & set(all_t) and all(index["weight_map"][k] == s for k in t)
        all_t.update(t)
    assert set(all_t) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in all_t.values())
    for layer in collect_layers(model):
        assert len({index["weight_map"][f"{layer.name}.{p}"] for p in ("weight_packed", "weight_scale", "weight_shape")}) == 1
    with torch.no_grad():
        assert torch.equal(_hf_load(out, dequantize=False)(IDS).logits, model(IDS).logits)


# -- 4: bf16 / fp16 scales ------------------------------------------------------------------------

@pytest.mark.parametrize("sdt", ["bfloat16", "float16"])
def test_scale_dtype_rounding(exported, sdt):
    dt = getattr(torch, sdt)
    model, out, rep = exported("qwen2-w3-ch-asym-odd", scale_dtype=sdt)
    T, qc = _tensors(out), _qc(out)
    layers = collect_layers(model)
    s = torch.cat([l.scale.reshape(-1) for l in layers])
    r = s.to(dt).to(torch.float32)
    assert rep["scale_dtype"] == sdt and rep["exact"] is False
    assert rep["scale_rounding"]["inexact"] == int((r != s).sum()) > 0
    assert rep["scale_rounding"]["total"] == s.numel()
    assert rep["scale_rounding"]["max_rel_error"] == pytest.approx(float(((r - s).abs() / s).max()), rel=1e-6)
    assert rep["warnings"][0].startswith(f"weight_scale stored in {sdt}: {rep['scale_rounding']['inexact']} of {s.numel()}")
    for layer in layers:
        sd = _module_state(T, layer.name)
        assert sd["weight_scale"].dtype == dt
        w = PackedQuantizationCompressor.decompress(dict(sd), _scheme_of(qc, layer.name))["weight"]
        assert w.dtype == dt and torch.equal(w, layer.w_hat(dt))
        assert not torch.equal(w.float(), layer.w_hat())  # the rounding shows (holds the test's power)


# -- 5: bad input, checkpoint directories, CLI ---------------------------------------------------

def _no_leftovers(parent, name):
    left = [f for f in os.listdir(parent) if f == name or f.startswith(f".{name}.tmp-")]
    assert not left, left


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_input(exported, tmp_path):
    model, out, _ = exported("llama-w4-ch-sym")
    out2 = str(tmp_path / "x")
    with pytest.raises(ExportError) as e:  # unconverted floating-point model
        export(tiny_hf("llama"), out2, "compressed-tensors")
    assert "needs a converted model" in _one_line(e) and "floating-point" in str(e.value)
    _no_leftovers(tmp_path, "x")
    with pytest.raises(ExportError) as e:
        export(model, out2, "compressed-tensors", group_by="layer")
    assert "group_by" in _one_line(e) and "allowed: scale_dtype" in str(e.value)
    _no_leftovers(tmp_path, "x")
    with pytest.raises(ExportError) as e:
        export(model, out2, "compressed-tensors", scale_dtype="float8")
    assert "scale_dtype must be one of float32, bfloat16, float16" in _one_line(e)
    _no_leftovers(tmp_path, "x")
    before = sorted(os.listdir(out))
    with pytest.raises(ExportError) as e:  # existing directory, no overwrite: untouched
        export(model, out, "compressed-tensors")
    assert "exists" in _one_line(e) and sorted(os.listdir(out)) == before
    # fp16 cannot hold a scale of 1e5: refused, naming the layer
    big = copy.deepcopy(model)
    big.get_submodule("model.layers.1.mlp.up_proj").scale[3, 0] = 1e5
    with pytest.raises(ExportError) as e:
        export(big, out2, "compressed-tensors", scale_dtype="float16")
    assert "model.layers.1.mlp.up_proj" in _one_line(e) and "use float32" in str(e.value)
    _no_leftovers(tmp_path, "x")


def test_export_checks_ranges(tmp_path):
    """Integers off the grid (the packer would spill them into a neighbour) are refused, naming the
    layer, by collect_layers (QuantLayer.check), once, before any writer runs."""
    model = converted("llama", bits=3, hidden=64)
    name = "model.layers.0.self_attn.v_proj"
    model.get_submodule(name).qweight[0, 5] = 4  # 3-bit grid: [-4, 3]
    with pytest.raises(ExportError) as e:
        export(model, str(tmp_path / "w"), "compressed-tensors")
    assert name in _one_line(e) and "[-4, 3]" in str(e.value)
    _no_leftovers(tmp_path, "w")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(250)} | {"<unk>": 250, "<s>": 251, "</s>": 252}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_lrqat_checkpoint_dir_and_cli(tmp_path, capsys):
    """An LR-QAT checkpoint directory is converted first: the exported integers equal `lrqat convert`'s;
    generation config and tokenizer files come along; the CLI returns 0, and 2 with one stderr line."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from lrqat_kernels.cli import main

    model = tiny_hf("qwen2", seed=11)
    lrqat_kernels.prepare(model, lrqat_kernels.LRQATConfig(bits=4, group_size=32, symmetric=False, rank=4,
                                                           phi_format="fp32", range_method="minmax"))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for _, layer in lrqat_kernels.api.lrqat_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    ckpt, conv = str(tmp_path / "ckpt"), str(tmp_path / "conv")
    tok = _tokenizer()
    lrqat_kernels.save_pretrained(model, ckpt, tokenizer=tok)
    assert main(["convert", "--model", ckpt, "--out", conv]) == 0
    out = str(tmp_path / "ct")
    assert main(["export", "--model", ckpt, "--format", "compressed-tensors", "--out", out, "--scale-dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "exported" in captured.out and "warning: shape not a multiple" in captured.err
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors", "lrqat_export.json"} <= set(os.listdir(out))
    T, qc = _tensors(out), _qc(out)
    ref_layers = collect_layers(lrqat_kernels.load_pretrained(conv))
    for layer in ref_layers:
        sd = _module_state(T, layer.name)
        scheme = _scheme_of(qc, layer.name)
        assert torch.equal(unpack_from_int32(sd["weight_packed"], 4, sd["weight_shape"]), layer.w_int)
        assert torch.equal(PackedQuantizationCompressor.decompress(dict(sd), scheme)["weight"], layer.w_hat())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out, f), "rb") as a, open(os.path.join(ckpt, f), "rb") as b:
            assert a.read() == b.read(), f
    assert PreTrainedTokenizerFast.from_pretrained(out)("w1 w7 w3")["input_ids"] == tok("w1 w7 w3")["input_ids"] == [1, 7, 3]
    assert GenerationConfig.from_pretrained(out).to_dict() == model.generation_config.to_dict()
    # a bad case: 2, one line on stderr, nothing written
    assert main(["export", "--model", ckpt, "--format", "compressed-tensors", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrqat export: error: output directory") and "\n" not in err
    assert main(["export", "--model", str(tmp_path / "nothing"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "y")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    _no_leftovers(tmp_path, "y")
