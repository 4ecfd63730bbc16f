"""GGUF export (lrqat_kernels/export/gguf.py), checked by llama.cpp's own readers.

1. gguf-py (``GGUFReader`` + ``gguf.quants.dequantize``) reads back, for every tensor, exactly the
   converted model's ``W_hat`` (``QuantizedLinear.dequantize``; q/k rows in llama.cpp's order),
   norms, embeddings, biases, and the metadata of the HF config.
2. Refusals (ExportError naming the layer / arch / option) and ``allow_inexact`` reports.
3. llama.cpp itself (llama-cpp-python): logits of an F32 control export vs our model, Q4_0 vs the
   control, tokenization, generation, perplexity. These fail when llama_cpp is missing, and skip
   only when ``LRQAT_SKIP_LLAMA_CPP=1`` opts out.

Models export with fp16-valued scales (``_fp16_scales``) wherever exactness is checked: Q4_0 / Q8_0
store ``d`` in fp16, and the refusal tests show what happens otherwise.
"""

from __future__ import annotations

import json
import os

import gguf  # the [test] extra: a missing package fails the file, never skips it
import numpy as np
import pytest
import torch

import lrqat_kernels
from export_models import converted, tiny_hf
from lrqat_kernels.export import ExportError, export
from lrqat_kernels.export.gguf import llama_cpp_logits, llama_cpp_perplexity
from lrqat_kernels.modules import QuantizedLinear
from lrqat_kernels.ops._launch import use_kernels

VOCAB = 400  # the test tokenizer's size; every model here uses it
N_THREADS = 1  # llama.cpp threads: tiny models, shared CPU


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Model-level tests run the eager CPU path (as tests/test_api.py)."""
    with use_kernels(False):
        yield


# --------------------------------------------------------------------------------------------------
# Fixtures and independent references


def _corpus() -> str:
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (GPT-2 pre-tokenizer) of 400 tokens trained on the first 300k characters
    of pydoc's topics, with <|endoftext|> as BOS / EOS and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_corpus()[:300_000]], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    hf.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert len(hf) == VOCAB
    return hf


def _fp16_scales(model):
    """Round every QuantizedLinear scale to its fp16 value in place (the model's W_hat changes with it)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.scale.copy_(m.scale.half().float())
    return model


def _model(arch="llama", bits=4, group_size=32, symmetric=True, tie=False, **kw):
    model = converted(arch, bits=bits, group_size=group_size, symmetric=symmetric, tie=tie, vocab=VOCAB, **kw)
    model.config.bos_token_id = model.config.eos_token_id = 0  # the tokenizer's <|endoftext|>
    return _fp16_scales(model)


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's q/k permutation, applied to the data (rows = dim 0)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor the GGUF must hold, by GGUF name, from the model's own modules (dequantize()
    for quantised layers), q/k permuted for the llama arch."""
    cfg = model.config
    llama = type(model).__name__ in ("LlamaForCausalLM", "MistralForCausalLM")
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    for i, block in enumerate(model.model.layers):
        out[f"blk.{i}.attn_norm.weight"] = block.input_layernorm.weight
        out[f"blk.{i}.ffn_norm.weight"] = block.post_attention_layernorm.weight
        for parent in (block.self_attn, block.mlp):
            for hf, g in names.items():
                mod = getattr(parent, hf, None)
                if mod is None:
                    continue
                w = mod.dequantize() if isinstance(mod, QuantizedLinear) else mod.weight
                b = mod.bias
                if llama and hf in heads:
                    w = _llama_permute(w, heads[hf])
                    b = None if b is None else _llama_permute(b, heads[hf])
                out[f"blk.{i}.{g}.weight"] = w
                if b is not None:
                    out[f"blk.{i}.{g}.bias"] = b
    if not cfg.tie_word_embeddings:
        head = model.lm_head
        out["output.weight"] = head.dequantize() if isinstance(head, QuantizedLinear) else head.weight
    return {k: v.detach().float() for k, v in out.items()}


def _read(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    fields = {k: f.contents() for k, f in r.fields.items()}
    return tensors, fields


def _dequant(t) -> np.ndarray:
    """gguf-py's float32 values of a tensor, shaped [rows, cols] (PyTorch order)."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))


# --------------------------------------------------------------------------------------------------
# 1. gguf-py reads back exactly the model


CASES = [  # arch, bits, group_size, symmetric, tie, expected type of quantised layers
    ("llama", 4, None, True, False, "Q4_0"),
    ("llama", 4, 32, True, True, "Q4_0"),
    ("mistral", 3, 64, True, False, "Q4_0"),
    ("qwen2", 2, 32, True, False, "Q4_0"),
    ("llama", 4, 32, False, False, "Q8_0"),
    ("qwen2", 8, 64, True, True, "Q8_0"),
    ("mistral", 6, None, False, False, "Q8_0"),
]


@pytest.mark.parametrize("arch,bits,group_size,symmetric,tie,qtype", CASES,
                         ids=[f"{a}-b{b}-g{g}-{'sym' if s else 'asym'}-{'tied' if t else 'untied'}" for a, b, g, s, t, _ in CASES])
def test_reader_gives_exact_weights_and_metadata(tmp_path, tokenizer, arch, bits, group_size, symmetric, tie, qtype):
    model = _model(arch, bits, group_size, symmetric, tie)
    report = export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    assert report["weights_exact"] and report["tokenizer_exact"] and report["warnings"] == []
    tensors, fields = _read(tmp_path / "out" / "model.gguf")
    expected = _expected_tensors(model)
    assert set(tensors) == set(expected)  # tied: no output.weight; qwen2: q/k/v biases
    for name, want in expected.items():
        t = tensors[name]
        got = _dequant(t)
        is_quant = name.startswith("blk.") and name.endswith(".weight") and "norm" not in name
        assert t.tensor_type.name == (qtype if is_quant else "F32"), name
        assert np.array_equal(got, want.numpy()), f"{name}: max diff {np.abs(got - want.numpy()).max()}"
        if is_quant:
            assert report["layers"][name]["type"] == qtype and report["layers"][name]["max_abs_error"] == 0.0
    cfg, a = model.config, {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[arch]
    assert fields["general.architecture"] == a
    for key, value in [("context_length", cfg.max_position_embeddings), ("embedding_length", cfg.hidden_size),
                       ("block_count", cfg.num_hidden_layers), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("vocab_size", cfg.vocab_size),
                       ("rope.dimension_count", cfg.hidden_size // cfg.num_attention_heads)]:
        assert fields[f"{a}.{key}"] == value, key
    assert fields[f"{a}.attention.layer_norm_rms_epsilon"] == np.float32(cfg.rms_norm_eps)
    assert fields[f"{a}.rope.freq_base"] == cfg.rope_parameters["rope_theta"]
    assert fields["general.file_type"] == {"Q4_0": 2, "Q8_0": 7}[qtype]
    assert fields["general.quantization_version"] == 2 and fields["general.name"]
    # the tokenizer, as llama.cpp's converter writes it
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert fields["tokenizer.ggml.token_type"][0] == gguf.TokenType.CONTROL  # <|endoftext|>
    assert set(fields["tokenizer.ggml.token_type"][1:]) == {gguf.TokenType.NORMAL}
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges] and len(merges) == VOCAB - 257
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    # nothing else in out_dir was removed
    assert {"config.json", "tokenizer.json", "model.gguf", "lrqat_export.json"} <= set(os.listdir(tmp_path / "out"))


def test_reader_with_excluded_layer_and_quantised_head(tmp_path, tokenizer):
    """An excluded k_proj stays dense (F32, rows still permuted); a quantised lm_head becomes a Q4_0
    output.weight."""
    model = _model("llama", 4, 32, exclude=("k_proj",))
    assert isinstance(model.lm_head, QuantizedLinear) and not isinstance(model.model.layers[0].self_attn.k_proj, QuantizedLinear)
    export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    tensors, _ = _read(tmp_path / "out" / "model.gguf")
    expected = _expected_tensors(model)
    assert set(tensors) == set(expected)
    assert tensors["blk.1.attn_k.weight"].tensor_type.name == "F32" and tensors["output.weight"].tensor_type.name == "Q4_0"
    for name, want in expected.items():
        assert np.array_equal(_dequant(tensors[name]), want.numpy()), name


def test_q4_0_bytes_match_an_independent_packer(tmp_path, tokenizer):
    """The raw Q4_0 bytes of one layer: d = fp16(s) little-endian, then byte j = (W_int[j] + 8) |
    (W_int[j + 16] + 8) << 4, built here with plain Python loops over one row."""
    model = _model("qwen2", 4, 64, True)  # qwen2: no row permutation
    export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    tensors, _ = _read(tmp_path / "out" / "model.gguf")
    mod = model.model.layers[1].mlp.down_proj
    raw = np.asarray(tensors["blk.1.ffn_down.weight"].data)
    w_int, s = mod.w_int, mod.scale
    for row in (0, mod.out_features - 1):
        want = bytearray()
        for b in range(mod.in_features // 32):
            want += np.float16(s[row, b * 32 // 64].item()).tobytes()
            q = [int(v) + 8 for v in w_int[row, b * 32:(b + 1) * 32]]
            want += bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        assert raw[row].tobytes() == bytes(want)


def test_dense_types_follow_the_model_dtype(tmp_path, tokenizer):
    """fp16 / bf16 models keep their embedding and head in F16 / BF16 (exact); norms stay F32."""
    for dtype, name in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        model = _model("llama", 4, 32).to(dtype)
        export(model, tmp_path / name, format="gguf", tokenizer=tokenizer)
        tensors, _ = _read(tmp_path / name / "model.gguf")
        assert tensors["token_embd.weight"].tensor_type.name == name
        assert tensors["output.weight"].tensor_type.name == name
        assert tensors["output_norm.weight"].tensor_type.name == "F32"
        assert np.array_equal(_dequant(tensors["token_embd.weight"]), model.model.embed_tokens.weight.float().numpy())
        assert np.array_equal(_dequant(tensors["output_norm.weight"]), model.model.norm.weight.float().numpy())


def test_explicit_types(tmp_path, tokenizer):
    """Q8_0 holds a 4-bit layer exactly too; F32 is the dense W_hat; F16 only where it is exact."""
    model = _model("llama", 4, 32)
    expected = _expected_tensors(model)
    for t in ("Q8_0", "F32"):
        rep = export(model, tmp_path / t, format="gguf", tokenizer=tokenizer, gguf_type=t)
        tensors, _ = _read(tmp_path / t / "model.gguf")
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == t and rep["weights_exact"]
        for name in rep["layers"]:
            assert np.array_equal(_dequant(tensors[name]), expected[name].numpy()), name
    with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj: gguf_type='F16' changes weights"):
        export(model, tmp_path / "f16", format="gguf", tokenizer=tokenizer, gguf_type="F16")
    with pytest.warns(UserWarning, match=r"14 of 14 layers written as F16 \(not exact\)"):
        rep = export(model, tmp_path / "f16", format="gguf", tokenizer=tokenizer, gguf_type="F16", allow_inexact=True)
    tensors, _ = _read(tmp_path / "f16" / "model.gguf")
    got = _dequant(tensors["blk.0.attn_q.weight"])
    want = expected["blk.0.attn_q.weight"].numpy()
    assert np.array_equal(got, want.astype(np.float16).astype(np.float32))
    assert rep["layers"]["blk.0.attn_q.weight"]["max_abs_error"] == pytest.approx(float(np.abs(got - want).max()), rel=0, abs=0)
    assert not rep["weights_exact"] and rep["tokenizer_exact"] and len(rep["warnings"]) == 1


def test_llama3_rope_factors(tmp_path, tokenizer):
    """Llama-3.1 RoPE scaling: rope_freqs.weight = base frequency / HF's scaled frequency."""
    model = _llama3_model()
    export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    tensors, _ = _read(tmp_path / "out" / "model.gguf")
    rot = model.model.rotary_emb
    hd = model.config.head_dim
    base = 1.0 / (model.config.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    want = (base / rot.inv_freq.double()).float().numpy()
    got = _dequant(tensors["rope_freqs.weight"]).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.min() == 1.0 and got.max() == pytest.approx(8.0)  # high frequencies kept, low ones / factor


def _convert(model, bits=4, group_size=32, symmetric=True, seed=0):
    """LR-QAT prepare (fp32 phi, minmax ranges) + convert of an fp32 HF model, in place; scales fp16."""
    cfg = lrqat_kernels.LRQATConfig(bits=bits, group_size=group_size, symmetric=symmetric, rank=4, phi_format="fp32",
                                    range_method="minmax", exclude=["lm_head"])
    lrqat_kernels.prepare(model, cfg)
    lrqat_kernels.convert(model)
    model.config.bos_token_id = model.config.eos_token_id = 0
    return _fp16_scales(model.eval())


def _llama3_model():
    """A random LLaMA with Llama-3.1 RoPE scaling (original context 64: every band is used)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    torch.manual_seed(3)
    return _convert(LlamaForCausalLM(cfg).eval())


# --------------------------------------------------------------------------------------------------
# 2. Refusals and allow_inexact


def test_group_16_is_refused_then_written_nearest(tmp_path, tokenizer):
    model = _model("llama", 4, 16)
    with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj: no exact GGUF encoding.*group_size=16"):
        export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()  # nothing half written
    with pytest.warns(UserWarning, match=r"14 of 14 layers written as Q8_0 \(not exact\)"):
        rep = export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer, allow_inexact=True)
    tensors, _ = _read(tmp_path / "out" / "model.gguf")
    expected = _expected_tensors(model)
    assert not rep["weights_exact"]
    for name, info in rep["layers"].items():
        assert info["type"] == "Q8_0" and not info["exact"] and "group_size=16" in info["reason"]
        got, want = _dequant(tensors[name]), expected[name].numpy()
        err = float(np.abs(got.astype(np.float64) - want).max())
        assert info["max_abs_error"] == err  # the report states the error the reader sees
        assert 0 < info["max_rel_error"] == err / float(np.abs(want).max()) <= 0.5 / 127 * 1.01  # half a Q8_0 step


def test_fp16_inexact_scale_is_refused_then_reported(tmp_path, tokenizer):
    model = _model("mistral", 4, 32)
    mod = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        mod.scale[3, 0] = 1 + 2.0 ** -20  # between two fp16 values
    with pytest.raises(ExportError, match=r"layer model\.layers\.1\.mlp\.down_proj: .*scale not an fp16 value.*1 of \d+ scales"):
        export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    with pytest.warns(UserWarning, match=r"1 of 14 layers written as Q4_0 \(not exact\).* in model\.layers\.1\.mlp\.down_proj"):
        rep = export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer, allow_inexact=True)
    info = rep["layers"]["blk.1.ffn_down.weight"]
    q = mod.w_int[3, :32].abs().max().item()
    assert info["type"] == "Q4_0" and not info["exact"]
    assert info["max_abs_error"] == q * 2.0 ** -20  # d = fp16(s) = 1.0, same integers
    assert all(i["exact"] for n, i in rep["layers"].items() if n != "blk.1.ffn_down.weight")
    assert rep["scale_rounding"]["inexact"] == 1
    tensors, _ = _read(tmp_path / "out" / "model.gguf")
    got = _dequant(tensors["blk.1.ffn_down.weight"])
    assert np.array_equal(got[3, :32], mod.w_int[3, :32].float().numpy())


def test_unconverted_scales_need_allow_inexact(tmp_path, tokenizer):
    """A trained model's fp32 scales: refused by default; allow_inexact rounds them to fp16, weight
    error at most 2^-11 relative (half an fp16 ulp) times |W_int - z|."""
    model = converted("llama", bits=4, group_size=32, vocab=VOCAB)
    with pytest.raises(ExportError, match="scales are not fp16 values"):
        export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    with pytest.warns(UserWarning):
        rep = export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer, allow_inexact=True)
    for info in rep["layers"].values():
        assert info["type"] == "Q4_0" and 0 < info["max_rel_error"] <= 2.0 ** -11


def test_asymmetric_8bit_outside_int8_is_refused(tmp_path, tokenizer):
    model = _model("llama", 8, 32, symmetric=False)
    with pytest.raises(ExportError, match=r"W_int - z spans \[-?\d+, \d+\], outside int8"):
        export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    with pytest.raises(ExportError, match=r"Q4_0: .*asymmetric"):
        export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer, gguf_type="Q4_0")


def test_forced_q4_0_requantises_an_asymmetric_model(tmp_path, tokenizer):
    """gguf_type='Q4_0' + allow_inexact on asymmetric 4-bit layers: W_hat re-quantised per block
    of 32 (d = -m / 8, m the value of largest magnitude); the report's error is what the reader
    sees, at most one step (amax / 8: the +amax side clips at 7)."""
    model = _model("llama", 4, 64, symmetric=False)
    with pytest.warns(UserWarning, match=r"14 of 14 layers written as Q4_0 \(not exact\)"):
        rep = export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer, gguf_type="Q4_0", allow_inexact=True)
    tensors, _ = _read(tmp_path / "out" / "model.gguf")
    expected = _expected_tensors(model)
    for name, info in rep["layers"].items():
        got, want = _dequant(tensors[name]).astype(np.float64), expected[name].numpy().astype(np.float64)
        assert tensors[name].tensor_type.name == "Q4_0" and "asymmetric" in info["reason"]
        assert info["max_abs_error"] == float(np.abs(got - want).max())
        blocks_amax = np.maximum(np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True), 1e-30)
        ratio = float((np.abs(got - want).reshape(want.shape[0], -1, 32) / blocks_amax).max())
        assert ratio <= 1 / 8 * (1 + 8 * 2.0 ** -11), ratio  # one step, d rounded to fp16


def test_requantize_overflow_names_the_layer(tmp_path, tokenizer):
    """Re-quantising (group of 16, allow_inexact) a layer whose weights overflow Q8_0's fp16 block
    scale (amax / 127 > 65504) is refused, naming the layer."""
    model = _model("llama", 4, 16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.scale[0, 0] = 3e6
    with pytest.raises(ExportError, match=r"^layer model\.layers\.1\.mlp\.down_proj: weights up to .* overflow the "
                                          r"fp16 block scale of Q8_0"):
        export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer, allow_inexact=True)
    assert not (tmp_path / "out").exists()


def test_unknown_arch_option_type_and_missing_tokenizer(tmp_path, tokenizer):
    model = _model("llama", 4, 32)
    with pytest.raises(ExportError, match=r"gguf: unknown option 'foo'; allowed: gguf_type, allow_inexact"):
        export(model, tmp_path / "a", format="gguf", tokenizer=tokenizer, foo=1)
    with pytest.raises(ExportError, match=r"gguf: gguf_type must be one of auto, Q4_0, Q8_0, F32, F16, got 'Q4_K'"):
        export(model, tmp_path / "a", format="gguf", tokenizer=tokenizer, gguf_type="Q4_K")
    with pytest.raises(ExportError, match="needs the model's tokenizer"):
        export(model, tmp_path / "a", format="gguf")
    model.__class__ = type("PhiForCausalLM", (type(model),), {})
    with pytest.raises(ExportError, match=r"architecture PhiForCausalLM is not supported .*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        export(model, tmp_path / "a", format="gguf", tokenizer=tokenizer)
    assert not (tmp_path / "a").exists()


def test_unknown_pre_tokenizer_is_refused(tmp_path, tokenizer):
    """A pre-tokenizer llama.cpp does not implement (here: Whitespace split) would tokenize
    differently: refused, or written as 'default' with a warning under allow_inexact."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    odd = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    model = _model("qwen2", 4, 32)
    with pytest.raises(ExportError, match="pre-tokenizer is not one llama.cpp knows"):
        export(model, tmp_path / "out", format="gguf", tokenizer=odd)
    with pytest.warns(UserWarning, match="written as 'default'"):
        rep = export(model, tmp_path / "out", format="gguf", tokenizer=odd, allow_inexact=True)
    assert rep["vocab"]["pre"] == "default" and rep["tokenizer_exact"] is False and rep["weights_exact"]


def test_byte_fallback_bpe_needs_allow_inexact(tmp_path):
    """A LLaMA-2-style tokenizer.json (BPE with byte fallback, no tokenizer.model) can only go into
    GGUF as a SentencePiece vocab without merge ranks (what llama.cpp's converter writes; llama.cpp
    0.3.36 then split 2 of 3 probe sentences differently from HF): refused, or written with a warning."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([_corpus()[:50_000]], trainer=trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                                            show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = _model("llama", 4, 32)
    with pytest.raises(ExportError, match="byte-fallback BPE tokenizer.json without a usable tokenizer.model"):
        export(model, tmp_path / "out", format="gguf", tokenizer=hf)
    with pytest.warns(UserWarning, match="llama.cpp may split text into other tokens than HF"):
        rep = export(model, tmp_path / "out", format="gguf", tokenizer=hf, allow_inexact=True)
    _, fields = _read(tmp_path / "out" / "model.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and rep["vocab"]["source"] == "LlamaHfVocab"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and rep["weights_exact"]  # the weights are still exact
    assert rep["tokenizer_exact"] is False and rep["vocab"]["exact"] is False


def test_cli_export_from_a_checkpoint(tmp_path, tokenizer, capsys):
    """`lrqat export --format gguf` on a saved converted checkpoint with its tokenizer: the same
    file as the API on the loaded model; --allow-inexact / --gguf-type reach the writer."""
    from lrqat_kernels.cli import main

    model = converted("qwen2", bits=4, group_size=32, vocab=VOCAB)  # fp32 scales: needs --allow-inexact
    lrqat_kernels.save_pretrained(model, str(tmp_path / "ckpt"), tokenizer=tokenizer)
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "a")]) != 0
    assert "scales are not fp16 values" in capsys.readouterr().err and not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="14 of 14 layers written as Q8_0"):
        assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "a"),
                     "--allow-inexact", "--gguf-type", "Q8_0"]) == 0
    rep = json.loads((tmp_path / "a" / "lrqat_export.json").read_text())
    assert rep["gguf_type"] == "Q8_0" and set(rep["tensor_types"]) == {"Q8_0"} and not rep["weights_exact"]
    tensors, _ = _read(tmp_path / "a" / "model.gguf")
    want = model.model.layers[0].self_attn.v_proj
    d16 = want.scale.half().float().repeat_interleave(32, dim=1)
    assert np.array_equal(_dequant(tensors["blk.0.attn_v.weight"]), (want.w_int.float() * d16).numpy())


# --------------------------------------------------------------------------------------------------
# 3. llama.cpp itself


@pytest.fixture(scope="module")
def llama_cpp():
    if os.environ.get("LRQAT_SKIP_LLAMA_CPP", "").strip().lower() in ("1", "true", "yes", "on"):
        pytest.skip("LRQAT_SKIP_LLAMA_CPP=1: the llama.cpp checks are opted out")
    try:
        import llama_cpp
    except ImportError as e:
        pytest.fail(f"llama-cpp-python is not installed ({e}): install the [test] extra, or set "
                    "LRQAT_SKIP_LLAMA_CPP=1 to opt out of the llama.cpp checks", pytrace=False)
    return llama_cpp


def _hf_logits(model, ids) -> np.ndarray:
    """Our model's fp32 logits [T, V] on the exact dequantise path (the CPU INT4 GEMM sums in
    another order)."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.use_int4_kernel = False
    with torch.no_grad():
        return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A 2-layer LLaMA (hidden 64, 4 heads / 2 KV heads) trained 150 AdamW steps on pydoc text, then
    converted to 4-bit g32 with fp16 scales; exported as F32 (control) and auto (Q4_0).

    Returns dict(model, held (held-out ids), f32, q4 (GGUF paths))."""
    text = _corpus()
    train_ids = torch.tensor(tokenizer.encode(text[:200_000]))
    held = torch.tensor(tokenizer.encode(text[300_000:330_000]))
    model = tiny_hf("llama", seed=0, vocab=VOCAB, max_pos=256).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~10x faster than two on a busy shared CPU
    try:
        for _ in range(150):
            starts = torch.randint(0, train_ids.numel() - 64, (16,), generator=g)
            x = torch.stack([train_ids[s:s + 64] for s in starts.tolist()])
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model = _convert(model.eval())
    out = tmp_path_factory.mktemp("gguf_trained")
    export(model, out / "f32", format="gguf", tokenizer=tokenizer, gguf_type="F32")
    rep = export(model, out / "q4", format="gguf", tokenizer=tokenizer)
    assert rep["weights_exact"] and rep["tokenizer_exact"] and rep["tensor_types"] == {"Q4_0": 14}
    return {"model": model, "held": held, "f32": str(out / "f32" / "model.gguf"), "q4": str(out / "q4" / "model.gguf")}


def _control_cases():
    return ["llama-trained", "qwen2-tied-bias", "mistral-gqa", "llama3-rope", "llama-attention-bias"]


def _llama_bias_model():
    """LLaMA with attention_bias=True: q/k biases permuted with their rows, v and attn_output biases
    as they are. The biases get N(0, 0.5) values (zero-initialised they would test nothing)."""
    model = _model("llama", 4, 32, seed=4, bias=True, max_pos=256)
    attn = model.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantizedLinear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("case", _control_cases())
def test_llama_cpp_f32_control_matches_our_logits(llama_cpp, tokenizer, trained, tmp_path, case):
    """The F32 export (dense W_hat) in llama.cpp gives our fp32 model's logits up to summation
    order: names, metadata, q/k permutation (llama) or none (qwen2), GQA, biases, tied head and
    Llama-3.1 RoPE all show up here. F32 weights keep F32 activations in ggml-cpu, KV cache F32.

    Tolerance: 1e-5 of the largest |logit|. Measured 3e-7 .. 5e-7 (fp32 sums in another order);
    a wrong k permutation gave 1.8e-2 .. 4e-1, a missing rope_freqs 1.4e-2."""
    ids = trained["held"][:96].tolist()
    if case == "llama-trained":
        model, path = trained["model"], trained["f32"]
    else:
        model = {"qwen2-tied-bias": lambda: _model("qwen2", 4, 32, tie=True, seed=1, max_pos=256),
                 "mistral-gqa": lambda: _model("mistral", 3, 64, seed=2, heads=8, kv_heads=2, max_pos=256),
                 "llama3-rope": _llama3_model,
                 "llama-attention-bias": _llama_bias_model}[case]()
        with torch.no_grad():  # random weights give near-flat logits: make them larger so a mismatch shows
            model.lm_head.weight.mul_(30) if not model.config.tie_word_embeddings else model.model.embed_tokens.weight.mul_(30)
        export(model, tmp_path / "f32", format="gguf", tokenizer=tokenizer, gguf_type="F32")
        path = str(tmp_path / "f32" / "model.gguf")
    ours = _hf_logits(model, ids)
    theirs = llama_cpp_logits(path, ids, n_threads=N_THREADS, kv_f32=True)
    err = float(np.abs(theirs - ours).max()) / float(np.abs(ours).max())
    print(f"{case}: max |llama.cpp - ours| / max |logit| = {err:.2e} (max |logit| {np.abs(ours).max():.3g})")
    assert err < 1e-5
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.98


def test_llama_cpp_q4_0_matches_the_control(llama_cpp, trained):
    """Q4_0 weights equal the F32 control's exactly (test 1), so the two differ only by ggml's
    Q8_0 quantisation of the activations (per 32 values, d = amax/127) in every Q4_0 matmul.

    Tolerances from measurement on this model (96 tokens): max |diff| <= 0.02 of max |logit|
    (measured 5.4e-3), top-1 agreement >= 95 % (measured 100 %)."""
    ids = trained["held"][:96].tolist()
    f32 = llama_cpp_logits(trained["f32"], ids, n_threads=N_THREADS)
    q4 = llama_cpp_logits(trained["q4"], ids, n_threads=N_THREADS)
    rel = float(np.abs(q4 - f32).max()) / float(np.abs(f32).max())
    agree = float((q4.argmax(-1) == f32.argmax(-1)).mean())
    print(f"Q4_0 vs F32 control: max |diff| / max |logit| = {rel:.3e}, top-1 agreement {agree:.3f}")
    assert 0 < rel <= 0.02  # 0 would mean the activations were not quantised: not the Q4_0 path
    assert agree >= 0.95


def test_llama_cpp_tokenizes_and_generates(llama_cpp, tokenizer, trained):
    """llama.cpp's tokenizer (GGUF vocab + merges + pre 'gpt-2') gives HF's ids; greedy generation
    from the F32 control equals our model's greedy tokens; the Q4_0 file generates text."""
    from llama_cpp import Llama

    sentence = "The quick brown fox's 123 jumps!\n  def f(x):\treturn x**2  # caf\u00e9 \u00fcber 3.14"
    llm = Llama(model_path=trained["q4"], n_ctx=128, n_threads=N_THREADS, verbose=False)
    assert llm.tokenize(sentence.encode(), add_bos=False) == tokenizer.encode(sentence, add_special_tokens=False)
    assert llm.tokenize(sentence.encode(), add_bos=True) == tokenizer.encode(sentence)  # no BOS: add_bos_token false
    assert llm.detokenize(tokenizer.encode(sentence)).decode() == sentence
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    out = llm.create_completion("def ", max_tokens=8, temperature=0.0, repeat_penalty=1.0)
    llm.close()
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"]

    prompt = tokenizer.encode("The import statement")
    ctrl = Llama(model_path=trained["f32"], n_ctx=128, n_threads=N_THREADS, verbose=False, type_k=0, type_v=0)
    theirs = []
    for tok in ctrl.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(tok)
        if len(theirs) == 8:
            break
    ctrl.close()
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(_hf_logits(trained["model"], ids)[-1].argmax()))
    assert theirs == ids[len(prompt):]


def test_llama_cpp_perplexity_within_2_percent(llama_cpp, trained):
    """Perplexity of the Q4_0 file in llama.cpp (default F16 KV cache, as served) vs our model's
    (lrqat_kernels.data.evaluate_perplexity) on the same held-out windows: within 2 % (measured
    31.236 vs 31.232, 0.013 %)."""
    from lrqat_kernels.data import evaluate_perplexity

    held, seq = trained["held"], 64
    for m in trained["model"].modules():
        if isinstance(m, QuantizedLinear):
            m.use_int4_kernel = False
    ours = evaluate_perplexity(trained["model"], held, seq, max_windows=48)
    theirs = llama_cpp_perplexity(trained["q4"], held, seq, n_threads=N_THREADS, max_windows=48)
    print(f"perplexity: ours {ours['perplexity']:.4f}, llama.cpp Q4_0 {theirs['perplexity']:.4f} "
          f"({theirs['seconds']:.2f} s), uniform {VOCAB}")
    assert theirs["tokens"] == ours["tokens"] == 48 * (seq - 1)
    assert ours["perplexity"] < VOCAB / 4  # the model learned something: the check has teeth
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < 0.02


def test_convert_with_fp16_scales_exports_exactly(tmp_path, tokenizer):
    """convert(scale_dtype="float16") puts the trained scales on the fp16 grid: the GGUF export is
    exact (Q4_0, no allow_inexact) and equals the converted model's W_hat."""
    from export_models import tiny_hf

    model = tiny_hf("llama", vocab=VOCAB)
    model.config.bos_token_id = model.config.eos_token_id = 0
    cfg = lrqat_kernels.LRQATConfig(bits=4, group_size=32, rank=4, phi_format="fp32", range_method="minmax")
    lrqat_kernels.prepare(model, cfg)
    with torch.no_grad():
        for _, layer in lrqat_kernels.api.lrqat_layers(model):
            layer.scale.mul_(1 + 2.0 ** -20)  # trained scales: not fp16 values
    lrqat_kernels.convert(model, scale_dtype="float16")
    rep = export(model, tmp_path / "out", format="gguf", tokenizer=tokenizer)
    assert all(info["type"] == "Q4_0" for info in rep["layers"].values())
    got = {name: _dequant(t) for name, t in _read(tmp_path / "out" / "model.gguf")[0].items()}
    for name, want in _expected_tensors(model).items():
        assert np.array_equal(got[name], want.numpy()), name
