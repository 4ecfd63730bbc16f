"""prepare / convert / save / load on tiny HF models (LLaMA, Mistral, Qwen2) and plain nn.Modules."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import lrqat_kernels
from lrqat_kernels import (
    LRQATConfig,
    LRQATLinear,
    QuantizedLinear,
    convert,
    load_pretrained,
    prepare,
    print_trainable_parameters,
    save_pretrained,
)
from lrqat_kernels.formats import decode_phi
from lrqat_kernels.reference import lowrank_product, quantize_z
from lrqat_kernels.ops._launch import use_kernels

ARCHS = ["llama", "mistral", "qwen2"]


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Model-level tests run the eager CPU path, fast. tests/conftest.py turns the Triton
    interpreter on for the kernel tests; the environment is left alone (Triton reads it when
    kernels are defined), only the dispatcher's choice is switched off here."""
    with use_kernels(False):
        yield


def tiny_hf(arch: str = "llama", seed: int = 0, tie: bool = False, hidden: int = 64):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls[0](vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return cls[1](cfg).eval()


def plain_model(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16, bias=False), nn.ReLU(), nn.Linear(16, 8))


def ids(n=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, t), generator=g)


def train_a_bit(model, steps=3, lr=5e-2):
    """A few optimizer steps so C != 0 and rounding decisions flip."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for i in range(steps):
        if hasattr(model, "config"):
            loss = model(input_ids=ids(seed=i), labels=ids(seed=i)).loss
        else:
            loss = model(torch.randn(4, 32)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def w_int_recomputed(layer: LRQATLinear) -> torch.Tensor:
    z = decode_phi(layer.phi, layer.bits, layer.phi_format) + lowrank_product(layer.lora_A.detach(), layer.lora_B.detach(), layer.alpha)
    return quantize_z(z, layer.bits)[0].to(torch.int8)


# ---------------------------------------------------------------------------------------------- config


def test_config_json_round_trip(tmp_path):
    cfg = LRQATConfig(bits=3, group_size=64, symmetric=False, rank=8, alpha=2.0, phi_format="packed_int", range_method="lp:2.4",
                      init="svd", svd_steps=3, target_modules=["q_proj", "v_proj"], exclude=["lm_head", "layers.0.mlp"],
                      learn_scale=False, compute_dtype="bf16", seed=7)
    assert cfg.compute_dtype == "bfloat16" and cfg.torch_compute_dtype == torch.bfloat16
    assert LRQATConfig.from_json(cfg.to_json()) == cfg
    assert LRQATConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.json"
    cfg.to_json(str(path))
    assert LRQATConfig.from_json(str(path)) == cfg
    d = LRQATConfig()
    assert (d.bits, d.rank, d.alpha, d.phi_format, d.range_method, d.exclude, d.group_size) == (4, 32, 1.0, "fixed_point", "lp:4", ["lm_head"], None)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(phi_format="packed_int", bits=5), ValueError, "packed_int.*bits <= 4"),
        (dict(phi_format="fixed_point", bits=8), ValueError, "bits <= 7"),
        (dict(phi_format="int3"), ValueError, "phi_format"),
        (dict(bits=4.0), TypeError, "bits"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(rank=0), ValueError, "rank"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(range_method="lp:x"), ValueError, "range_method"),
        (dict(range_method="mse"), ValueError, "range_method"),
        (dict(init="gaussian"), ValueError, "init"),
        (dict(svd_steps=0), ValueError, "svd_steps"),
        (dict(compute_dtype="int8"), ValueError, "compute_dtype"),
        (dict(target_modules=[]), ValueError, "target_modules"),
        (dict(exclude=[3]), TypeError, "exclude"),
    ],
    ids=["packed-bits5", "fixed-bits8", "format", "bits-float", "group0", "rank0", "alpha-nan", "lp-bad", "method",
         "init", "svd-steps", "dtype", "empty-targets", "exclude-int"],
)
def test_config_contradictions(kwargs, err, match):
    with pytest.raises(err, match=match):
        LRQATConfig(**kwargs)


def test_config_bad_json():
    with pytest.raises(ValueError, match="malformed"):
        LRQATConfig.from_json("{not json")
    with pytest.raises(ValueError, match="unknown LRQATConfig field"):
        LRQATConfig.from_dict({"bits": 4, "bogus": 1})


# ---------------------------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("arch", ARCHS)
def test_prepare_hf_models(arch, capsys):
    model = tiny_hf(arch)
    x = ids()
    ref = model(x).logits
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    # The default L^4 range search on one arch; min-max elsewhere keeps the suite fast.
    out = prepare(model, LRQATConfig(bits=4, rank=8, range_method="lp:4" if arch == "llama" else "minmax"))
    assert out is model and model.lrqat_stage == "lrqat" and model.lrqat_config.rank == 8
    lr = [n for n, m in model.named_modules() if isinstance(m, LRQATLinear)]
    assert len(lr) == n_linear - 1 and isinstance(model.lm_head, nn.Linear)  # everything but the head
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "scale"}
    assert not model.model.embed_tokens.weight.requires_grad and not model.model.norm.weight.requires_grad
    y = model(x).logits
    assert y.shape == ref.shape and torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.98  # W4 close to FP
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    counts = model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert "trainable params" in printed and counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert print_trainable_parameters(model) == counts


def test_prepare_target_and_exclude_and_bf16():
    model = tiny_hf("llama")
    prepare(model, LRQATConfig(rank=4, target_modules=["q_proj", "down_proj"], exclude=["lm_head", r"model\.layers\.1\..*"],
                               compute_dtype="bfloat16"))
    swapped = sorted(n for n, m in model.named_modules() if isinstance(m, LRQATLinear))
    assert swapped == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.bfloat16 and layer.scale.dtype == torch.float32
    model.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32
    model(ids())


def test_prepare_plain_module_and_errors():
    model = plain_model()
    prepare(model, LRQATConfig(rank=4, group_size=16))
    assert all(isinstance(model[i], LRQATLinear) for i in (0, 2, 4))
    with pytest.raises(ValueError, match="already prepared"):
        prepare(model, LRQATConfig())
    # A group size that does not divide a layer's in: the error names the layer, nothing is swapped.
    fresh = plain_model()
    with pytest.raises(ValueError, match=r"group_size=32 does not divide in_features=48 of layer '2'"):
        prepare(fresh, LRQATConfig(group_size=32))
    assert isinstance(fresh[0], nn.Linear)
    with pytest.raises(ValueError, match="no target layers"):
        prepare(plain_model(), LRQATConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no target layers"):
        prepare(nn.Sequential(nn.ReLU()), LRQATConfig())
    with pytest.raises(ValueError, match="packed_int.*even"):
        prepare(nn.Sequential(nn.Linear(7, 4)), LRQATConfig(phi_format="packed_int"))
    with pytest.raises(TypeError, match="LRQATConfig"):
        prepare(plain_model(), {"bits": 4})
    with pytest.raises(ValueError, match="prepare"):
        convert(plain_model())


# ---------------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(bits=4, phi_format="fixed_point"),
        dict(bits=3, phi_format="packed_int", group_size=16, symmetric=False, range_method="minmax"),
        dict(bits=4, phi_format="fixed_point", compute_dtype="bfloat16"),
    ],
    ids=["w4-q4.4", "w3-int3-g16-asym", "w4-bf16"],
)
def test_convert_is_bit_exact(arch, cfg):
    model = train_a_bit(prepare(tiny_hf(arch), LRQATConfig(rank=8, **cfg)))
    x = ids(seed=5)
    with torch.no_grad():
        y_train = model(x).logits
    expected = {n: w_int_recomputed(m) for n, m in model.named_modules() if isinstance(m, LRQATLinear)}
    assert any(m.lora_B.abs().sum() > 0 for m in model.modules() if isinstance(m, LRQATLinear))
    out = convert(model)
    assert out is model and model.lrqat_stage == "quantized"
    got = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(got) == set(expected)
    for n, q in got.items():
        assert torch.equal(q.w_int, expected[n]), n  # bit for bit
        assert q.qweight.dtype == torch.uint8  # bits <= 4: packed nibbles
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        try:
            QuantizedLinear.use_int4_kernel = False
            assert torch.equal(model(x).logits, y_train)  # exact dequantise path == training forward
        finally:
            QuantizedLinear.use_int4_kernel = True
        y_kernel = model(x).logits  # deployment GEMM when available
    if "compute_dtype" not in cfg:
        torch.testing.assert_close(y_kernel, y_train, rtol=1e-4, atol=1e-4)
    else:  # bf16: the kernel sums W_int exactly in fp32, the training forward rounds W_hat to bf16
        assert (y_kernel.float() - y_train.float()).abs().mean() < 1e-2
    with pytest.raises(ValueError, match="already converted"):
        convert(model)


# ---------------------------------------------------------------------------------------------- save / load


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch, tie", [("llama", False), ("mistral", False), ("qwen2", True)], ids=["llama", "mistral", "qwen2-tied"])
def test_save_load_round_trip_both_stages(tmp_path, arch, tie):
    model = train_a_bit(prepare(tiny_hf(arch, tie=tie), LRQATConfig(rank=8, bits=4, compute_dtype="bfloat16", group_size=32,
                                                                     range_method="minmax")))
    x = ids(seed=3)
    path = save_pretrained(model, str(tmp_path / "lrqat"))
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "lrqat_config.json", "lrqat_model.safetensors"]
    loaded = load_pretrained(path)
    assert type(loaded) is type(model) and loaded.lrqat_stage == "lrqat" and loaded.lrqat_config == model.lrqat_config
    _assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [n for n, p in model.named_parameters() if p.requires_grad]
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # quantized stage
    convert(model)
    qpath = save_pretrained(model, str(tmp_path / "int4"))
    qloaded = load_pretrained(qpath)
    assert qloaded.lrqat_stage == "quantized"
    _assert_same_state(model, qloaded)
    with torch.no_grad():
        assert torch.equal(qloaded(x).logits, model(x).logits)


def test_plain_module_save_load_needs_skeleton(tmp_path):
    model = train_a_bit(prepare(plain_model(), LRQATConfig(rank=4)))
    path = save_pretrained(model, str(tmp_path / "p"))
    assert "config.json" not in os.listdir(path)
    with pytest.raises(ValueError, match="model= a freshly built"):
        load_pretrained(path)
    loaded = load_pretrained(path, model=plain_model(seed=123))
    _assert_same_state(model, loaded)
    x = torch.randn(3, 32)
    assert torch.equal(loaded(x), model(x))
    convert(model)
    qpath = save_pretrained(model, str(tmp_path / "q"))
    qloaded = load_pretrained(qpath, model=plain_model(seed=5))
    assert torch.equal(qloaded(x), model(x))


def test_save_is_atomic_and_replaces(tmp_path, monkeypatch):
    model = prepare(plain_model(), LRQATConfig(rank=4))
    target = tmp_path / "ck"
    save_pretrained(model, str(target))
    first = (target / "lrqat_model.safetensors").read_bytes()
    train_a_bit(model)
    save_pretrained(model, str(target))  # replaces an existing checkpoint
    assert (target / "lrqat_model.safetensors").read_bytes() != first
    second = (target / "lrqat_model.safetensors").read_bytes()

    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash while writing tensors")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, str(target))
    assert (target / "lrqat_model.safetensors").read_bytes() == second  # old checkpoint intact
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary leftovers
    with pytest.raises(ValueError, match="prepare"):
        save_pretrained(plain_model(), str(tmp_path / "fp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_save_over_a_checkpoint_swaps_it_in_one_step(tmp_path, monkeypatch):
    """Replacing a checkpoint directory exchanges old and new in one rename (no moment without a
    checkpoint at the path, which two renames have: a kill between them left none); the old copy is
    removed marker first, so a kill while removing it leaves nothing that loads as a checkpoint."""
    from lrqat_kernels import _io

    model = prepare(plain_model(), LRQATConfig(rank=4))
    target = tmp_path / "ck"
    save_pretrained(model, str(target))
    train_a_bit(model)
    real_replace = os.replace

    def replace(src, dst, **kw):
        if os.path.isdir(src):
            raise OSError("killed between the two renames of a directory")
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "replace", replace)
    removed = []
    real_rmtree = _io.shutil.rmtree

    def rmtree(path, *a, **k):
        removed.append(sorted(os.listdir(path)))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(_io.shutil, "rmtree", rmtree)
    save_pretrained(model, str(target))
    loaded = load_pretrained(str(target), model=plain_model(seed=9))
    _assert_same_state(model, loaded)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert removed and "lrqat_config.json" not in removed[0] and "lrqat_model.safetensors" in removed[0]


def _drop_sha256_record(d):
    """Make a checkpoint directory look written before lrqat_config.json recorded the files' sha256
    (and the weights header the JSON's digest)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    meta = json.loads((d / "lrqat_config.json").read_text())
    del meta["sha256"]
    (d / "lrqat_config.json").write_text(json.dumps(meta))
    w = d / "lrqat_model.safetensors"
    if w.exists():
        with safe_open(str(w), framework="pt") as f:
            header = {k: v for k, v in (f.metadata() or {}).items() if k != "lrqat_config_sha256"}
        save_file(load_file(str(w)), str(w), metadata=header)


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    model = prepare(tiny_hf("llama"), LRQATConfig(rank=4))
    good = save_pretrained(model, str(tmp_path / "good"))

    def variant(name, edit):
        import shutil

        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return str(d)

    def truncate(d):
        p = d / "lrqat_model.safetensors"
        p.write_bytes(p.read_bytes()[: 1000])

    with pytest.raises(ValueError, match="truncated or damaged"):
        load_pretrained(variant("trunc", truncate))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(variant("badjson", lambda d: (d / "lrqat_config.json").write_text("{oops")))
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(variant("nometa", lambda d: (d / "lrqat_config.json").unlink()))
    with pytest.raises(ValueError, match="weights file"):
        load_pretrained(variant("noweights", lambda d: (d / "lrqat_model.safetensors").unlink()))

    def drop_key(d):
        t = load_file(str(d / "lrqat_model.safetensors"))
        del t["model.layers.0.self_attn.q_proj.lora_A"]
        t["extra.tensor"] = torch.zeros(2)
        save_file(t, str(d / "lrqat_model.safetensors"))
        _drop_sha256_record(d)  # the strict loader's checks, past the checksum (a checkpoint without one)

    with pytest.raises(ValueError, match=r"missing keys \['model.layers.0.self_attn.q_proj.lora_A'\].*unexpected keys \['extra.tensor'\]"):
        load_pretrained(variant("keys", drop_key))

    def reshape(d):
        t = load_file(str(d / "lrqat_model.safetensors"))
        t["model.layers.0.self_attn.q_proj.scale"] = torch.ones(3, 1)
        save_file(t, str(d / "lrqat_model.safetensors"))
        _drop_sha256_record(d)

    with pytest.raises(ValueError, match="q_proj.scale has shape"):
        load_pretrained(variant("shape", reshape))

    def bad_stage(d):
        meta = json.loads((d / "lrqat_config.json").read_text())
        meta["stage"] = "trained"
        (d / "lrqat_config.json").write_text(json.dumps(meta))
        _drop_sha256_record(d)  # a hand-edited checkpoint without the record: the field check

    with pytest.raises(ValueError, match="stage"):
        load_pretrained(variant("stage", bad_stage))
    # loading into a mismatched skeleton
    with pytest.raises(ValueError, match=r"mismatch: layer .* is \[32, 64\] in the model"):
        load_pretrained(good, model=tiny_hf("llama", hidden=32))
    with pytest.raises(ValueError, match="no module"):
        load_pretrained(good, model=plain_model())
    with pytest.raises(ValueError, match="skeleton"):
        load_pretrained(good, model=model)
    with pytest.raises(ValueError, match="not a directory"):
        load_pretrained(str(tmp_path / "nope"))


def test_package_exports():
    for name in ("prepare", "convert", "LRQATConfig", "LRQATLinear", "QuantizedLinear", "save_pretrained",
                 "load_pretrained", "print_trainable_parameters"):
        assert hasattr(lrqat_kernels, name), name


def test_deepcopy_of_prepared_model():
    model = prepare(tiny_hf("llama"), LRQATConfig(rank=4))
    clone = copy.deepcopy(model)
    x = ids()
    assert torch.equal(clone(x).logits, model(x).logits)
    clone.print_trainable_parameters()


def test_old_checkpoint_with_fp16_factors_loads_fp32_master_factors(tmp_path):
    """Checkpoints saved before factors were kept fp32 under fp16 hold fp16 lora_A / lora_B: they load
    as fp32 (trainable again; the saved dtype is kept for every other tensor), values unchanged."""
    from lrqat_kernels.train import build_optimizer

    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).half()
    prepare(model, LRQATConfig(rank=4, compute_dtype="float16", exclude=[]))
    for m in (model[0], model[2]):  # as an older version saved them
        nn.init.normal_(m.lora_B, std=0.05)
        m.lora_A.data, m.lora_B.data = m.lora_A.data.half(), m.lora_B.data.half()
    save_pretrained(model, str(tmp_path / "old"))
    back = load_pretrained(str(tmp_path / "old"), model=nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).half())
    assert back[0].lora_A.dtype == torch.float32 and back[0].bias.dtype == torch.float16
    assert torch.equal(back[2].lora_B, model[2].lora_B.float())
    build_optimizer(back, 1e-3, 1e-4)


def test_checkpoints_keep_generation_config_and_default_permissions(tmp_path):
    """generation_config.json (EOS ids such as Llama-3's <|eot_id|>, sampling defaults) round-trips,
    and a checkpoint gets the permissions a plain write would (umask), not mkstemp's owner-only."""
    from transformers import GenerationConfig

    model = tiny_hf("llama")
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], do_sample=True, temperature=0.6)
    prepare(model, LRQATConfig(rank=4))
    old = os.umask(0o022)
    try:
        path = save_pretrained(model, str(tmp_path / "ck"))
    finally:
        os.umask(old)
    back = load_pretrained(path)
    g = back.generation_config
    assert (g.eos_token_id, g.do_sample, g.temperature) == ([2, 7], True, 0.6)
    assert os.stat(path).st_mode & 0o777 == 0o755
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o644, name


# --- HF integration: derived buffers, train/eval mode, foreign loaders, other classes, tied heads ---


def _bf16_from_pretrained(tmp_path, arch="llama"):
    """A bf16 model as HF's from_pretrained(dtype=bf16) makes it: RoPE's inv_freq stays fp32."""
    from transformers import AutoModelForCausalLM

    tiny_hf(arch).save_pretrained(str(tmp_path / "fp"))
    return AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp"), dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_rope_inv_freq_keeps_fp32_through_prepare_save_load(tmp_path, compute_dtype):
    """prepare's and load's casts leave derived fp32 buffers alone (bf16 inv_freq: RoPE phase off by
    radians at long positions), and a bf16 model round-trips bit-exactly."""
    model = _bf16_from_pretrained(tmp_path)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # HF's own convention, the baseline
    prepare(model, LRQATConfig(rank=4, compute_dtype=compute_dtype))
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    loaded = load_pretrained(save_pretrained(model, str(tmp_path / "ck")))
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    x = ids(1, 48, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_cast_floating_keeps_only_non_persistent_float_buffers():
    from lrqat_kernels.api import cast_floating

    m = nn.Linear(4, 4)
    m.register_buffer("derived", torch.rand(3), persistent=False)
    m.register_buffer("stored", torch.rand(3))
    m.register_buffer("index", torch.arange(3), persistent=False)
    derived = m.derived.clone()
    cast_floating(m, torch.bfloat16)
    assert m.weight.dtype == m.stored.dtype == torch.bfloat16
    assert m.derived.dtype == torch.float32 and torch.equal(m.derived, derived)
    assert m.index.dtype == torch.int64


def test_load_returns_eval_mode_like_from_pretrained(tmp_path):
    """Dropout must be off in a loaded model: a Qwen2 with attention dropout gave other logits on
    every call (and other greedy tokens) when load left it in training mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.5, attn_implementation="eager")
    torch.manual_seed(0)
    model = convert(prepare(Qwen2ForCausalLM(cfg).eval(), LRQATConfig(rank=4)))
    loaded = load_pretrained(save_pretrained(model, str(tmp_path / "q")))
    assert not loaded.training and not any(m.training for m in loaded.modules())
    x = ids(seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("stage", ["lrqat", "quantized"])
def test_hf_from_pretrained_refuses_an_lrqat_checkpoint(tmp_path, stage):
    """HF's loader would build the FP architecture and initialise every swapped linear at random,
    only logging it: the weights file is named so that it finds none and refuses."""
    from transformers import AutoModelForCausalLM

    model = prepare(tiny_hf(), LRQATConfig(rank=4))
    if stage == "quantized":
        convert(model)
    path = save_pretrained(model, str(tmp_path / stage))
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def test_checkpoint_with_the_old_weights_name_loads(tmp_path):
    model = convert(train_a_bit(prepare(tiny_hf(), LRQATConfig(rank=4))))
    path = save_pretrained(model, str(tmp_path / "old"))
    os.rename(os.path.join(path, "lrqat_model.safetensors"), os.path.join(path, "model.safetensors"))
    _drop_sha256_record(tmp_path / "old")  # written before the weights' sha256 was recorded too
    loaded = load_pretrained(path)
    x = ids(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("cls_name", ["LlamaForSequenceClassification", "LlamaModel"])
def test_save_load_other_hf_classes(tmp_path, cls_name):
    """load_pretrained builds the saved class (it used AutoModelForCausalLM for every checkpoint and
    failed on a missing 'score' / 'layers.0...' module)."""
    import transformers

    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    model = prepare(cls(tiny_hf().config).eval(), LRQATConfig(rank=4))
    loaded = load_pretrained(save_pretrained(model, str(tmp_path / "c")))
    assert type(loaded) is cls
    x = ids(1, 16, seed=1)  # one row: the classification head needs a pad token for more
    with torch.no_grad():
        out_a, out_b = model(x), loaded(x)
    a = out_a.logits if cls_name.endswith("Classification") else out_a.last_hidden_state
    b = out_b.logits if cls_name.endswith("Classification") else out_b.last_hidden_state
    assert torch.equal(a, b)


def test_swapped_tied_head_survives_tie_weights(tmp_path):
    """With the tied head targeted (exclude=[]), a later tie_weights() (resize_token_embeddings and
    others call it) gave the LR-QAT head a `weight` back, and the checkpoint no longer loaded."""
    model = prepare(tiny_hf(tie=True), LRQATConfig(rank=4, exclude=[]))
    assert isinstance(model.lm_head, LRQATLinear) and model.config.tie_word_embeddings is False
    model.tie_weights()
    assert not any(k.startswith("lm_head.weight") for k in model.state_dict())
    loaded = load_pretrained(save_pretrained(model, str(tmp_path / "t")))
    x = ids(seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# --- targeting: subclasses, shared modules, a bare linear, typos ---


class _WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


def test_linear_subclasses_are_skipped_with_a_warning():
    """nn.MultiheadAttention's out_proj (an nn.Linear subclass it reads .weight of) was swapped and
    the first forward failed with "'LRQATLinear' object has no attribute 'weight'"."""
    torch.manual_seed(0)
    model = _WithAttention()
    with pytest.warns(UserWarning, match=r"attn.out_proj \(NonDynamicallyQuantizableLinear\)"):
        prepare(model, LRQATConfig(rank=2))
    assert isinstance(model.proj, LRQATLinear) and type(model.attn.out_proj) is not LRQATLinear
    assert model(torch.randn(2, 3, 16)).shape == (2, 3, 16)


def test_one_linear_under_two_names_is_refused():
    """named_modules() lists a shared module once: only one of its names was swapped, the other
    stayed in floating point (and went into the checkpoint)."""
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match=r"registered under several names \['0', '2'\]"):
        prepare(model, LRQATConfig(rank=2))
    assert type(model[0]) is nn.Linear  # untouched


def test_bare_linear_and_unmatched_target_entries():
    with pytest.raises(ValueError, match="not an nn.Linear itself"):
        prepare(nn.Linear(8, 8), LRQATConfig(rank=2))
    with pytest.warns(UserWarning, match=r"\['qproj'\] match no nn.Linear"):
        prepare(tiny_hf(), LRQATConfig(rank=2, target_modules=["q_proj", "qproj"]))


@pytest.mark.parametrize("scale_dtype,tiny", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_convert_rounds_scales_to_a_grid_and_keeps_w_int(scale_dtype, tiny):
    """convert(scale_dtype=): every scale becomes its nearest fp16 / bf16 value (stored fp32),
    W_int is the plain convert's; a scale the type cannot hold is refused, nothing converted."""
    m = lrqat_kernels.prepare(tiny_hf("llama"), lrqat_kernels.LRQATConfig(bits=4, group_size=32, rank=4))
    train_a_bit(m)
    plain = lrqat_kernels.convert(copy.deepcopy(m))
    rounded = lrqat_kernels.convert(copy.deepcopy(m), scale_dtype=scale_dtype)
    qa, qb = dict(plain.named_modules()), dict(rounded.named_modules())
    changed = 0
    for name, q in qa.items():
        if isinstance(q, lrqat_kernels.QuantizedLinear):
            assert torch.equal(q.w_int, qb[name].w_int)
            assert qb[name].scale.dtype == torch.float32
            assert torch.equal(qb[name].scale, q.scale.to(tiny).float())
            changed += int((qb[name].scale != q.scale).sum())
    assert changed > 0
    if scale_dtype == "float16":  # bf16 has fp32's exponent range
        bad = copy.deepcopy(m)
        with torch.no_grad():
            next(layer for _, layer in lrqat_kernels.api.lrqat_layers(bad)).scale.fill_(1e-30)
        with pytest.raises(ValueError, match="overflows or flushes to 0 in float16"):
            lrqat_kernels.convert(bad, scale_dtype=scale_dtype)
        assert getattr(bad, "lrqat_stage", None) == "lrqat" and lrqat_kernels.api.lrqat_layers(bad)
    with pytest.raises(ValueError, match="scale_dtype must be None"):
        lrqat_kernels.convert(copy.deepcopy(m), scale_dtype="int8")


@pytest.mark.parametrize("scale_dtype,tiny", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_convert_scale_dtype_refuses_subnormal_scales(scale_dtype, tiny):
    """convert(scale_dtype=) promises W_hat moves by at most 2^-11 (fp16) / 2^-8 (bf16) relative: a
    scale below the type's normal range would move more and is refused, naming the layer, nothing
    converted; at the bottom of the normal range the bound holds."""
    m = lrqat_kernels.prepare(tiny_hf("llama", hidden=64), lrqat_kernels.LRQATConfig(bits=4, rank=4, phi_format="fp32",
                                                                                   range_method="minmax"))
    name = "model.layers.0.mlp.up_proj"
    lay = dict(lrqat_kernels.api.lrqat_layers(m))[name]
    fin = torch.finfo(tiny)
    bound = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[scale_dtype]
    bad = copy.deepcopy(m)
    with torch.no_grad():  # a dead channel's tiny scale: subnormal in the grid, not flushed to 0
        dict(lrqat_kernels.api.lrqat_layers(bad))[name].scale[0] = fin.tiny * 0.0213
    with pytest.raises(ValueError, match=rf"layer '{name}': {scale_dtype} moves a scale by .* below {scale_dtype}'s normal range"):
        lrqat_kernels.convert(bad, scale_dtype=scale_dtype)
    assert getattr(bad, "lrqat_stage", None) == "lrqat" and len(lrqat_kernels.api.lrqat_layers(bad)) == 14
    with torch.no_grad():  # just above the normal range's bottom, off the grid: allowed, within the bound
        lay.scale[0] = fin.tiny * (1 + 0.7 * fin.eps)
    s_before = lay.scale.detach().clone()
    lrqat_kernels.convert(m, scale_dtype=scale_dtype)
    s_after = m.get_submodule(name).scale
    rel = ((s_after - s_before).abs() / s_before).max().item()
    assert 0 < rel <= bound
