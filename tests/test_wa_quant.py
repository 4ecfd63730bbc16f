"""Weight-activation LR-QAT: presets, quantiser placement on LLaMA / Mistral / Qwen2, convert and
save/load keep the quantisers, bad input."""

import pytest
import torch
import torch.nn as nn

import lrqat_kernels
from lrqat_kernels import ActQuantMLP, ActQuantRMSNorm, LRQATConfig, LRQATLinear, QuantizedLinear, convert, load_pretrained, prepare, save_pretrained
from lrqat_kernels import reference as R
from lrqat_kernels.wa_quant import attn_impl_name


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Model-level tests run the eager CPU path (the kernels have their own tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def tiny(arch="llama", seed=0, attn="sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls[0](vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return cls[1](cfg).eval()


def ids(seed=0):
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))


class _Counter:
    """Wraps lrqat_kernels.fake_quant_activation and records (ndim, last dim, bits) per call."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = lrqat_kernels.fake_quant_activation

        def wrapped(x, bits=8, symmetric=False):
            self.calls.append((x.dim(), x.shape[-1], bits))
            return inner(x, bits, symmetric)

        monkeypatch.setattr("lrqat_kernels.ops.act_quant.fake_quant_activation", wrapped)  # where layers look it up


def test_presets_and_config_validation():
    for name, (a, kv) in {"W4A8KV8": (8, 8), "W4A8KV4": (8, 4), "W4A4KV4": (4, 4)}.items():
        c = LRQATConfig.preset(name)
        assert (c.bits, c.act_bits, c.kv_bits) == (4, a, kv)
        assert LRQATConfig.from_json(c.to_json()) == c
    assert LRQATConfig.preset("W4A8KV4", group_size=32).group_size == 32
    with pytest.raises(ValueError, match="unknown preset"):
        LRQATConfig.preset("W4A16")
    with pytest.raises(ValueError, match="kv_bits=4 needs act_bits"):
        LRQATConfig(kv_bits=4)
    with pytest.raises(ValueError, match=r"act_bits must be None or one of \(4, 8\)"):
        LRQATConfig(act_bits=6)
    with pytest.raises(ValueError, match="kv_bits must be None or one of"):
        LRQATConfig(act_bits=8, kv_bits=2)
    for kw in (dict(act_bits=8.0), dict(act_bits=8, kv_bits=4.0), dict(act_bits=True)):  # not ints: refused
        with pytest.raises(ValueError, match="bits must be None or one of"):
            LRQATConfig(**kw)


class _NormCounter:
    """Wraps lrqat_kernels.rms_norm_fake_quant and records (last dim, bits) per call."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = lrqat_kernels.rms_norm_fake_quant

        def wrapped(x, weight, eps=1e-6, bits=8, symmetric=False):
            self.calls.append((x.shape[-1], bits))
            return inner(x, weight, eps, bits, symmetric)

        monkeypatch.setattr("lrqat_kernels.ops.norm_act_quant.rms_norm_fake_quant", wrapped)  # where layers look it up


class _SwigluCounter:
    """Wraps lrqat_kernels.swiglu_fake_quant and records (last dim, bits) per call."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = lrqat_kernels.swiglu_fake_quant

        def wrapped(gate, up, bits=8, symmetric=False):
            self.calls.append((gate.shape[-1], bits))
            return inner(gate, up, bits, symmetric)

        monkeypatch.setattr("lrqat_kernels.ops.swiglu_act_quant.swiglu_fake_quant", wrapped)  # where layers look it up


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-linear"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_placement(arch, fuse, monkeypatch):
    model = prepare(tiny(arch), LRQATConfig.preset("W4A8KV4", rank=4, fuse_act_quant=fuse))
    assert model.config._attn_implementation == attn_impl_name("sdpa")
    produced = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    for name, m in model.named_modules():
        if isinstance(m, LRQATLinear):
            assert m.input_bits == (None if fuse and name.endswith(produced) else 8), name
            assert m.output_bits == (4 if name.endswith(("k_proj", "v_proj")) else None), name
    norms = [n for n, m in model.named_modules() if isinstance(m, ActQuantRMSNorm)]
    mlps = [n for n, m in model.named_modules() if isinstance(m, ActQuantMLP)]
    assert (len(norms), len(mlps)) == ((4, 2) if fuse else (0, 0))
    assert all(model.get_submodule(n).output_bits == 8 for n in norms + mlps)
    counter, norm_counter, swiglu_counter = _Counter(monkeypatch), _NormCounter(monkeypatch), _SwigluCounter(monkeypatch)
    with torch.no_grad():
        model(ids())
    layers, head_dim, hidden, inter = 2, 16, 64, 96
    # per layer: linear inputs (7, or o_proj's alone with the norms doing q/k/v and gate/up and
    # the SwiGLU doing down_proj's), k/v outputs (KV cache), queries and keys after RoPE
    n_inputs = 1 if fuse else 7
    assert len(counter.calls) == layers * (n_inputs + 2 + 2)
    assert norm_counter.calls == ([(hidden, 8)] * 2 * layers if fuse else [])
    assert swiglu_counter.calls == ([(inter, 8)] * layers if fuse else [])
    qk = [c for c in counter.calls if c[0] == 4]
    assert len(qk) == 2 * layers and all(c == (4, head_dim, 8) for c in qk)
    kv = [c for c in counter.calls if c[2] == 4]
    assert len(kv) == 2 * layers and all(c[1] == 32 for c in kv)  # 2 kv heads x 16
    assert sum(1 for c in counter.calls if c[2] == 8 and c[0] == 3 and c[1] in (hidden, inter)) == n_inputs * layers


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fusion_is_the_same_model(arch):
    """Quantising a norm's or the SwiGLU's output once, where it is made, equals quantising it in
    each linear: logits and every gradient bit for bit on the eager path (this also checks that
    transformers' decoder layers still feed q/k/v from input_layernorm, gate/up from
    post_attention_layernorm and down_proj from silu(gate) * up)."""
    x = ids(3)
    out = {}
    for fuse in (True, False):
        model = prepare(tiny(arch, seed=4), LRQATConfig.preset("W4A8KV8", rank=4, fuse_act_quant=fuse))
        for m in model.modules():  # non-zero lora_B: the low-rank path matters
            if isinstance(m, LRQATLinear):
                torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(5))
        res = model(input_ids=x, labels=x)
        res.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[fuse] = (res.logits.detach(), grads)
    assert torch.equal(out[True][0], out[False][0])
    assert out[True][1].keys() == out[False][1].keys() and len(out[True][1]) > 0
    for n in out[True][1]:
        assert torch.equal(out[True][1][n], out[False][1][n]), n


def test_fusion_under_the_kernels_matches(monkeypatch):
    """With the Triton kernels (on CUDA, else the interpreter) the fused model matches the
    per-linear one up to the last bits of the norm (the kernel's sum of squares is not torch's)
    and of silu."""
    from lrqat_kernels.functions import _interpreting

    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "0" if device == "cuda" else "1")
    from triton.runtime.interpreter import InterpretedFunction

    if device == "cpu" and not isinstance(lrqat_kernels.ops.act_quant._act_quant_kernel, InterpretedFunction):
        # kernels jitted without the interpreter (imported before TRITON_INTERPRET=1) cannot run on CPU
        pytest.skip("Triton kernels were compiled for a GPU backend and no GPU is present")
    assert device == "cuda" or _interpreting()
    x = ids(4).to(device)
    with torch.no_grad():
        y = {f: prepare(tiny(seed=6), LRQATConfig.preset("W4A8KV8", rank=4, fuse_act_quant=f)).to(device)(x).logits.cpu()
             for f in (True, False)}
    torch.testing.assert_close(y[True], y[False], rtol=0.05, atol=0.05)
    assert (y[True] - y[False]).abs().mean() < 2e-3


def test_numerics_differ_from_weight_only_and_match_manual():
    base = tiny(seed=1)
    x = ids(1)
    w_only = prepare(tiny(seed=1), LRQATConfig(rank=4, bits=4))
    wa = prepare(tiny(seed=1), LRQATConfig.preset("W4A8KV8", rank=4))
    with torch.no_grad():
        y_fp, y_w, y_wa = base(x).logits, w_only(x).logits, wa(x).logits
    assert not torch.equal(y_w, y_wa)
    # 8-bit activations stay close to weight-only, much closer than weight-only is to FP
    assert (y_wa - y_w).abs().mean() < (y_w - y_fp).abs().mean()
    # A layer's forward is the reference math around its linear (per-linear placement: the k
    # projection quantises its input and its output; norm-fused: its input arrives quantised)
    per_linear = prepare(tiny(seed=1), LRQATConfig.preset("W4A8KV8", rank=4, fuse_act_quant=False))
    h = torch.randn(3, 64)
    for model, in_bits in ((per_linear, 8), (wa, None)):
        layer = model.model.layers[0].self_attn.k_proj
        assert layer.input_bits == in_bits
        with torch.no_grad():
            xin = R.fake_quant_activation(h, 8) if in_bits else h
            want = R.fake_quant_activation(
                R.lrqat_linear(xin, layer.phi, layer.lora_A, layer.lora_B, layer.scale, layer.bias,
                               bits=4, phi_format=layer.phi_format, alpha=layer.alpha), 8)
            assert torch.equal(layer(h), want)
    norm = wa.model.layers[0].input_layernorm
    with torch.no_grad():
        assert torch.equal(norm(h), R.fake_quant_activation(R.rms_norm(h, norm.weight, norm.variance_epsilon), 8))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "per-linear"])
def test_torch_compile_whole_model_training_step(fuse):
    """torch.compile (aot_eager) of a prepared W4A8KV8 LLaMA: one graph, forward and backward equal
    to eager (the activation quantisers' fakes must describe their real outputs, strides too)."""
    x = ids(5)
    model = prepare(tiny(seed=7), LRQATConfig.preset("W4A8KV8", rank=4, fuse_act_quant=fuse))
    for m in model.modules():
        if isinstance(m, LRQATLinear):
            torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(8))
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    closs = compiled(input_ids=x, labels=x).loss
    closs.backward()
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_w4a4kv4_training_step_and_gradients_flow():
    model = prepare(tiny(), LRQATConfig.preset("W4A4KV4", rank=4))
    out = model(input_ids=ids(), labels=ids())
    out.loss.backward()
    grads = [m.lora_B.grad for m in model.modules() if isinstance(m, LRQATLinear)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_convert_and_save_load_keep_quantizers(tmp_path, monkeypatch):
    monkeypatch.setattr(QuantizedLinear, "use_int4_kernel", False)
    model = prepare(tiny(), LRQATConfig.preset("W4A8KV4", rank=4))
    x = ids(2)
    with torch.no_grad():
        y_prep = model(x).logits
    save_pretrained(model, str(tmp_path / "lrqat"))
    back = load_pretrained(str(tmp_path / "lrqat"))
    assert back.config._attn_implementation == attn_impl_name("sdpa")
    with torch.no_grad():
        assert torch.equal(back(x).logits, y_prep)
    convert(model)
    qs = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert qs and all(m.input_bits == (8 if n.endswith("o_proj") else None) for n, m in qs)
    assert all(m.output_bits == 4 for n, m in qs if n.endswith(("k_proj", "v_proj")))
    with torch.no_grad():
        y_conv = model(x).logits
    torch.testing.assert_close(y_conv, y_prep, rtol=1e-5, atol=1e-5)
    save_pretrained(model, str(tmp_path / "int4"))
    back = load_pretrained(str(tmp_path / "int4"))
    with torch.no_grad():
        assert torch.equal(back(x).logits, y_conv)
    assert "input_bits=8" in repr(back.model.layers[0].self_attn.o_proj)
    assert "output_bits=8" in repr(back.model.layers[0].input_layernorm)
    assert isinstance(back.model.layers[1].post_attention_layernorm, ActQuantRMSNorm)
    assert isinstance(back.model.layers[1].mlp, ActQuantMLP) and back.model.layers[1].mlp.output_bits == 8
    assert isinstance(back.model.layers[1].mlp.down_proj, QuantizedLinear)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_masks_are_those_of_the_wrapped_implementation(attn):
    """Queries and keys are quantised per token, so the wrapped attention must stay causal and
    honour padding: earlier logits do not see a later token, and a left-padded batch (with its
    mask and positions) gives the unpadded logits (the lrqat name once had no mask function, so
    transformers built no mask at all)."""
    model = prepare(tiny(attn=attn), LRQATConfig.preset("W4A8KV8", rank=4))
    assert model.config._attn_implementation == attn_impl_name(attn)
    x = ids(3)[:1]
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 1) % 128
    pad = 3
    xp = torch.cat([torch.zeros(1, pad, dtype=x.dtype), x], 1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(x)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        y, y2 = model(x).logits[0], model(x2).logits[0]
        yp = model(xp, attention_mask=mask, position_ids=pos).logits[0, pad:]
    assert not torch.equal(y[-1], y2[-1])  # the changed token does matter
    torch.testing.assert_close(y[:-1], y2[:-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(yp, y, rtol=1e-5, atol=1e-5)


def test_load_restores_the_wrapped_attention_implementation(tmp_path):
    """config.json does not keep the attention implementation; the checkpoint does."""
    model = prepare(tiny(attn="eager"), LRQATConfig.preset("W4A8KV4", rank=4))
    x = ids(4)
    with torch.no_grad():
        y = model(x).logits
    save_pretrained(model, str(tmp_path / "ck"))
    back = load_pretrained(str(tmp_path / "ck"))
    assert back.config._attn_implementation == attn_impl_name("eager")
    assert all(m.lrqat_inner_attn == "eager" for m in back.modules() if hasattr(m, "lrqat_inner_attn"))
    with torch.no_grad():
        assert torch.equal(back(x).logits, y)


def test_attention_that_cannot_be_wrapped_is_refused():
    """transformers' flash / flex paths key on their implementation's own name, so a wrapped
    flash attention would fail at the first forward: refused at prepare, naming what works."""
    model = tiny()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"can wrap \('sdpa', 'eager'\), not 'flash_attention_2'"):
        prepare(model, LRQATConfig.preset("W4A8KV8", rank=4))


def test_load_keeps_the_default_attention_when_the_saved_one_cannot_run(tmp_path):
    """A checkpoint trained with flash attention loads on a machine without flash-attn: sdpa, warned."""
    from lrqat_kernels.wa_quant import restore_attn_implementation

    pytest.importorskip("transformers")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    model = tiny()
    with pytest.warns(UserWarning, match="'flash_attention_2', which cannot run here"):
        restore_attn_implementation(model, "flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(ids())


def test_plain_linear_model_act_only():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    prepare(model, LRQATConfig(rank=2, act_bits=8, exclude=[]))
    assert all(m.input_bits == 8 for m in model.modules() if isinstance(m, LRQATLinear))
    assert model(torch.randn(4, 16)).shape == (4, 8)


def test_reinstall_unfuses_producers_whose_consumers_left():
    """A re-install (load, a new config) after a consumer stopped being an LR-QAT layer: its
    producer stops quantising, so the plain linear gets full-precision inputs (as per-linear)."""
    from lrqat_kernels.wa_quant import install_activation_quantizers

    cfg = LRQATConfig(rank=4, act_bits=8)
    model = prepare(tiny(), cfg)
    layer = model.model.layers[0]
    assert layer.input_layernorm.output_bits == 8 and layer.mlp.output_bits == 8
    layer.self_attn.q_proj = nn.Linear(64, 64, bias=False)
    layer.mlp.down_proj = nn.Linear(96, 64, bias=False)
    install_activation_quantizers(model, cfg)
    assert layer.input_layernorm.output_bits is None and layer.mlp.output_bits is None
    assert layer.self_attn.k_proj.input_bits == 8  # quantises its own input again
    assert layer.post_attention_layernorm.output_bits == 8 and layer.mlp.gate_proj.input_bits is None
    assert model.model.layers[1].mlp.output_bits == 8
    install_activation_quantizers(model, LRQATConfig(rank=4, act_bits=8, fuse_act_quant=False))
    assert all(getattr(m, "output_bits", None) is None for m in model.modules() if isinstance(m, (ActQuantRMSNorm, ActQuantMLP)))


def test_bad_placement():
    with pytest.raises(ValueError, match="kv_bits=8 needs attention modules"):
        prepare(nn.Sequential(nn.Linear(16, 8)), LRQATConfig(rank=2, act_bits=8, kv_bits=8, exclude=[]))
    with pytest.raises(ValueError, match=r"self_attn.k_proj is a Linear, not an LR-QAT layer"):
        prepare(tiny(), LRQATConfig.preset("W4A8KV4", rank=4, exclude=["lm_head", "k_proj"]))

    class FakeConfig:
        _attn_implementation = "sdpa"

    class OddAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = FakeConfig()
            self.attn = OddAttention()

    with pytest.raises(ValueError, match=r"module 'attn' \(OddAttention\) has no q_proj/k_proj/v_proj/o_proj"):
        prepare(Odd(), LRQATConfig(rank=2, act_bits=8, exclude=[]))
    with pytest.raises(ValueError, match="input_bits must be None or one of"):
        LRQATLinear(16, 8, rank=2, input_bits=3)
