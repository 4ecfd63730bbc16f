"""GPTQ export (lrqat_kernels/export/gptq.py): the checkpoint read back with GPTQ's documented
unpack rules (written here, independently of the writer's packer), bit-exact against the model's
own integers with fp16 scales; GPTQModel's reader when one is available; the refusals.

GPTQModel is not a dependency: set ``LRQAT_GPTQ_PYTHON`` to a Python that imports ``gptqmodel``
(default ``/tmp/venv-gptq/bin/python``; see docs/export-gptq.md) to run the reader tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

import lrqat_kernels
from export_models import converted

safetensors_torch = pytest.importorskip("safetensors.torch")

from lrqat_kernels.export import ExportError, export  # noqa: E402
from lrqat_kernels.export import gptq as G  # noqa: E402
from lrqat_kernels.export._common import QuantLayer, collect_layers, dense_state  # noqa: E402
from lrqat_kernels.ops._launch import use_kernels


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Model-level tests run the eager CPU path (as tests/test_api.py)."""
    with use_kernels(False):
        yield


# ---- GPTQ's unpack rules, written from the format's description (facts sheet 2.2 / 2.7a) -------

def _u32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def _unpack_3bit_blocks(w0, w1, w2) -> list[torch.Tensor]:
    """32 codes from 3 words: v0..v9 at 3j of word0, v10 split 2+1 bits, v11..v20 at 3j+1 of word1,
    v21 split 1+2 bits, v22..v31 at 3j+2 of word2."""
    v = [(w0 >> (3 * j)) & 7 for j in range(10)]
    v.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    v += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
    v.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    v += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return v


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[in*b/32, out]`` -> codes ``[in, out]``: word ``k // pf`` holds code ``k`` at bit ``b*(k % pf)``."""
    w = _u32(qweight)
    if bits == 3:
        blocks = w.reshape(-1, 3, w.shape[1])
        v = _unpack_3bit_blocks(blocks[:, 0], blocks[:, 1], blocks[:, 2])  # 32 x [blocks, out]
        return torch.stack(v, dim=1).reshape(-1, w.shape[1])
    pf = 32 // bits
    out = torch.empty(w.shape[0] * pf, w.shape[1], dtype=torch.int64)
    for i in range(pf):
        out[i::pf] = (w >> (bits * i)) & ((1 << bits) - 1)
    return out


def unpack_cols(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[G, out*b/32]`` -> codes ``[G, out]`` (the same rule along dim 1)."""
    return unpack_rows(qzeros.t(), bits).t()


def gptq_weight(sd: dict, prefix: str, qcfg: dict) -> torch.Tensor:
    """The dense fp32 ``[out, in]`` weight a GPTQ reader builds: ``((u - zc[g_idx]) * scales[g_idx]).T``."""
    bits = qcfg["bits"]
    u = unpack_rows(sd[prefix + ".qweight"], bits)
    zc = unpack_cols(sd[prefix + ".qzeros"], bits)
    if qcfg.get("checkpoint_format", "gptq") in ("gptq", "gemm"):
        zc = (zc + 1) & ((1 << bits) - 1)
    g = sd[prefix + ".g_idx"].long()
    return ((u - zc[g]).float() * sd[prefix + ".scales"].float()[g]).T


def expected_weight(m) -> torch.Tensor:
    """``(W_int - z) * fp16(s)`` in fp32 from a QuantizedLinear's own tensors."""
    w = m.w_int.to(torch.float32)
    g = w.shape[1] // m.scale.shape[1]
    if m.zero_point is not None:
        w = w - m.zero_point.to(torch.float32).repeat_interleave(g, dim=1)
    return w * m.scale.detach().to(torch.float16).to(torch.float32).repeat_interleave(g, dim=1)


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lrqat_kernels.QuantizedLinear)}


def _load(out):
    sd = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    return sd, cfg


# ---- 1. the checkpoint, read back by the format's rules ---------------------------------------

CASES = [(arch, bits, sym, gs) for arch in ("llama", "qwen2") for bits in (2, 3, 4, 8)
         for sym in (True, False) for gs in (None, 32, 64)]


@pytest.mark.parametrize("arch,bits,sym,gs", CASES, ids=[f"{a}-b{b}-{'sym' if s else 'asym'}-g{g}" for a, b, s, g in CASES])
def test_unpack_equals_fp16_scale_weight(tmp_path, arch, bits, sym, gs):
    model = converted(arch, bits=bits, group_size=gs, symmetric=sym, seed=bits, hidden=128, heads=4, kv_heads=2,
                      vocab=96, layers=1)
    with pytest.warns(UserWarning):  # fp16 rounds the trained scales: always reported
        rep = export(model, tmp_path / "gptq", "gptq")
    sd, cfg = _load(tmp_path / "gptq")
    qcfg = cfg["quantization_config"]
    assert qcfg == json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == \
        ("gptq", bits, -1 if gs is None else gs, sym, False)
    assert qcfg["checkpoint_format"] == qcfg["format"] == "gptq_v2" and qcfg["lm_head"] is False
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float16"
    quant = _quantized(model)
    assert len(quant) == 7
    for name, m in quant.items():
        n_out, n_in = m.w_int.shape
        n_groups = m.scale.shape[1]
        assert sd[name + ".qweight"].dtype == torch.int32 and sd[name + ".qweight"].shape == (n_in * bits // 32, n_out)
        assert sd[name + ".qzeros"].dtype == torch.int32 and sd[name + ".qzeros"].shape == (n_groups, n_out * bits // 32)
        assert sd[name + ".scales"].dtype == torch.float16 and sd[name + ".scales"].shape == (n_groups, n_out)
        assert torch.equal(sd[name + ".g_idx"], (torch.arange(n_in) // (n_in // n_groups)).to(torch.int32))
        w = gptq_weight(sd, name, qcfg)
        assert torch.equal(w, expected_weight(m)), name
        if m.bias is not None:
            assert sd[name + ".bias"].dtype == torch.float16 and torch.equal(sd[name + ".bias"], m.bias.half())
        assert name + ".weight" not in sd
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in sd)
    # dense tensors: the model's own values in fp16 under their HF names
    for key, t in model.state_dict().items():
        mod = key.rpartition(".")[0]
        if mod in quant:
            continue
        assert sd[key].dtype == torch.float16 and torch.equal(sd[key], t.half()), key
    s_all = torch.cat([m.scale.detach().flatten() for m in quant.values()])
    rel = ((s_all.half().float() - s_all).abs() / s_all).max().item()
    assert rep["scale_rounding"]["max_rel_error"] == pytest.approx(rel, rel=1e-6) and 0 < rel <= 2 ** -11
    assert rep["scale_rounding"]["inexact"] == int((s_all.half().float() != s_all).sum())
    assert rep["exact"]["quantized"] is False
    marlin = sym and bits in (4, 8)
    assert any("gptq_gemm" in w for w in rep["warnings"]) != marlin


def test_v1_symmetric_words_and_roundtrip(tmp_path):
    """v1 stores zero code 2^(b-1) - 1: every 4-bit qzeros word is 0x77777777, v2's 0x88888888."""
    model = converted("llama", bits=4, group_size=32, symmetric=True, seed=3, hidden=64)
    with pytest.warns(UserWarning):
        export(model, tmp_path / "v1", "gptq", checkpoint_format="gptq")
        export(model, tmp_path / "v2", "gptq")
    sd1, cfg1 = _load(tmp_path / "v1")
    sd2, _ = _load(tmp_path / "v2")
    assert cfg1["quantization_config"]["checkpoint_format"] == cfg1["quantization_config"]["format"] == "gptq"
    for name, m in _quantized(model).items():
        assert (sd1[name + ".qzeros"] == 0x77777777).all()
        assert (sd2[name + ".qzeros"] == 0x88888888 - (1 << 32)).all()
        assert torch.equal(sd1[name + ".qweight"], sd2[name + ".qweight"])
        assert torch.equal(gptq_weight(sd1, name, cfg1["quantization_config"]), expected_weight(m))


def test_qweight_words_by_hand():
    """One column of 8 known 4-bit codes -> one word, lowest input index in the lowest nibble;
    3-bit: code 10 straddles words 0/1 (two low bits at 30, the top bit at bit 0 of word 1)."""
    w_int = torch.tensor([[-8, -7, -1, 0, 1, 2, 6, 7]], dtype=torch.int8)  # [out=1, in=8]
    layer = QuantLayer("l", w_int, torch.ones(1, 1), None, 4, None)
    word = int(G.gptq_tensors(layer)["qweight"][0, 0]) & 0xFFFFFFFF
    assert word == sum(((v + 8) << (4 * k)) for k, v in enumerate(w_int[0].tolist()))
    codes = torch.full((32,), 4, dtype=torch.int64)
    codes[10] = 0b101
    layer3 = QuantLayer("l3", (codes - 4).to(torch.int8)[None, :], torch.ones(1, 1), None, 3, None)
    q = (G.gptq_tensors(layer3)["qweight"][:, 0].to(torch.int64) & 0xFFFFFFFF).tolist()
    base = [sum(4 << (3 * j) for j in range(10)), 0, 0]  # the other 31 codes are 4 = 0b100
    base[0] |= 0b01 << 30
    base[1] |= 1 | sum(4 << (3 * j + 1) for j in range(10)) | (0 << 31)  # code 21 = 0b100: bit 0 -> bit 31 of word 1
    base[2] |= 0b10 | sum(4 << (3 * j + 2) for j in range(10))  # code 21's bits 1..2 at bits 0..1 of word 2
    assert q == base


def test_tied_embeddings_and_bias(tmp_path):
    model = converted("llama", bits=4, group_size=None, tie=True, bias=True, hidden=64, seed=5)
    with pytest.warns(UserWarning):
        export(model, tmp_path / "o", "gptq")
    sd, cfg = _load(tmp_path / "o")
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in sd
    assert json.loads((tmp_path / "o" / "lrqat_export.json").read_text())["tied_head_omitted"] == "lm_head.weight"
    assert torch.equal(sd["model.embed_tokens.weight"], model.model.embed_tokens.weight.half())
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.bias"], model.model.layers[0].self_attn.q_proj.bias.half())


def test_head_follows_storage_and_config(tmp_path):
    """The head rule shared with compressed-tensors (_common.plan_head): a head sharing the embedding's
    storage is omitted only when config.json says tied; a head of its own under a config that says tied
    is written and config.json is set untied (a reader would otherwise overwrite it with the embedding)."""
    shared = converted("llama", bits=4, group_size=None, tie=True, hidden=64, seed=5)
    shared.config.tie_word_embeddings = False  # tensors shared, config untied
    with pytest.warns(UserWarning):
        rep = export(shared, tmp_path / "a", "gptq")
    sd, cfg = _load(tmp_path / "a")
    assert "lm_head.weight" in sd and cfg["tie_word_embeddings"] is False
    assert torch.equal(sd["lm_head.weight"], shared.model.embed_tokens.weight.half())
    assert torch.equal(sd["model.embed_tokens.weight"], sd["lm_head.weight"])
    assert rep["tied_head_omitted"] is None

    own = converted("llama", bits=4, group_size=None, tie=False, hidden=64, seed=6)
    own.config.tie_word_embeddings = True  # config tied, head its own tensor
    assert not torch.equal(own.lm_head.weight, own.model.embed_tokens.weight)
    with pytest.warns(UserWarning):
        rep = export(own, tmp_path / "b", "gptq")
    sd, cfg = _load(tmp_path / "b")
    assert torch.equal(sd["lm_head.weight"], own.lm_head.weight.half())
    assert cfg["tie_word_embeddings"] is False and rep["tied_head_omitted"] is None
    assert any("lm_head.weight is not the input embedding (dense)" in n for n in rep["notes"])

    quant_head = converted("llama", bits=4, group_size=None, tie=True, hidden=64, seed=7, exclude=())
    quant_head.config.tie_word_embeddings = True  # prepare sets it false; a config edited back must not win
    with pytest.warns(UserWarning):
        export(quant_head, tmp_path / "c", "gptq")
    sd, cfg = _load(tmp_path / "c")
    assert cfg["tie_word_embeddings"] is False and "lm_head.qweight" in sd and "lm_head.weight" not in sd


# ---- 2. GPTQModel's and transformers' readers (in another Python: LRQAT_GPTQ_PYTHON) ---------

_GPTQ_PY = os.environ.get("LRQAT_GPTQ_PYTHON", "/tmp/venv-gptq/bin/python")

# Runs in the reader's Python. Per job: GPTQModel's dequantize_model (safetensors level, fp32), GPTQModel.load
# (TorchLinear kernel, fp16: its dequantize_weight and the logits) and transformers' from_pretrained
# (GPTQConfig + optimum + gptqmodel: the logits). torch.compile is off (TORCHDYNAMO_DISABLE): it only
# compiles the same dequantisation and costs ~25 s per model on CPU.
_READER = textwrap.dedent("""
    import json, sys
    try:
        import torch
        from gptqmodel import BACKEND, GPTQModel
        from gptqmodel.utils.model_dequant import dequantize_model
    except ImportError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    for job in json.loads(sys.argv[1]):
        res, ids = {}, torch.tensor(job["ids"])
        dequantize_model(job["dir"], job["deq"], target_dtype=torch.float32)
        m = GPTQModel.load(job["dir"], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        with torch.no_grad():
            res["gptqmodel_logits"] = m.model(ids).logits.float()
            res["gptqmodel_weights"] = {n: mod.dequantize_weight().t().contiguous() for n, mod in m.model.named_modules()
                                        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight")}
            res["gptqmodel_kernels"] = sorted({type(mod).__name__ for mod in m.model.modules() if hasattr(mod, "qweight")})
        del m
        if job["lm_head"]:
            res["hf_skip"] = "transformers (5.25 + optimum 2.3) leaves a quantised lm_head randomly initialised"
            torch.save(res, job["out"])
            continue
        try:
            from transformers import AutoModelForCausalLM
            hf = AutoModelForCausalLM.from_pretrained(job["dir"], device_map="cpu", dtype=torch.float16)
            with torch.no_grad():
                res["hf_logits"] = hf(ids).logits.float()
            res["hf_kernels"] = sorted({type(mod).__name__ for mod in hf.modules() if hasattr(mod, "qweight")})
        except ImportError as e:
            res["hf_skip"] = f"transformers' GPTQ path does not import: {e}"
        torch.save(res, job["out"])
""")


def _gptq_python() -> str | None:
    """This Python when it has gptqmodel, else LRQAT_GPTQ_PYTHON when that file exists (its imports are
    checked by the reader run itself: exit code 3)."""
    import importlib.util

    if importlib.util.find_spec("gptqmodel") is not None:
        return sys.executable
    return _GPTQ_PY if _GPTQ_PY and os.path.exists(_GPTQ_PY) else None


# (bits, sym, group_size, checkpoint_format, exclude): 3-bit straddling words, v1 zero points, 2-bit asym,
# 8-bit with a quantised lm_head (quantization_config lm_head: true).
READER_CASES = [(3, False, 32, "gptq_v2", ("lm_head",)), (4, True, None, "gptq", ("lm_head",)),
                (2, False, 64, "gptq_v2", ("lm_head",)), (8, True, 32, "gptq_v2", ())]


@pytest.fixture(scope="module")
def reader_results(tmp_path_factory):
    """Exports every READER_CASES model and reads them all in one run of the reader's Python."""
    py = _gptq_python()
    if py is None:
        msg = f"gptqmodel is importable neither here nor by LRQAT_GPTQ_PYTHON={_GPTQ_PY} (docs/export-gptq.md)"
        if os.environ.get("LRQAT_REQUIRE_GPTQ_READER") == "1":  # .ci/run's reader step: a missing reader fails
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("gptq_readers")
    ids = (torch.arange(24) * 7 % 96).reshape(2, 12)
    jobs, cases = [], {}
    for i, (bits, sym, gs, fmt, exclude) in enumerate(READER_CASES):
        model = converted("qwen2", bits=bits, group_size=gs, symmetric=sym, seed=11 + i, hidden=128, layers=1,
                          vocab=96, exclude=exclude)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = export(model, root / f"c{i}", "gptq", checkpoint_format=fmt)
        assert rep["quantization_config"]["lm_head"] == ("lm_head" not in exclude)
        assert any("lm_head is quantised" in w for w in rep["warnings"]) == ("lm_head" not in exclude)
        for m in _quantized(model).values():
            m.use_int4_kernel = False  # the exact dequantise path
        with torch.no_grad():
            logits = model(ids).logits.float()
        jobs.append({"dir": str(root / f"c{i}"), "deq": str(root / f"d{i}"), "out": str(root / f"r{i}.pt"), "ids": ids.tolist(),
                     "lm_head": "lm_head" not in exclude})
        cases[READER_CASES[i]] = (model, logits, jobs[-1])
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([py, "-c", _READER, json.dumps(jobs)], capture_output=True, text=True, timeout=900, env=env, cwd=root)
    if r.returncode == 3:
        pytest.skip(f"gptqmodel does not import in {py}: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-4000:]
    return cases


@pytest.mark.parametrize("case", READER_CASES, ids=[f"b{c[0]}-{'sym' if c[1] else 'asym'}-g{c[2]}-{c[3]}" for c in READER_CASES])
def test_gptqmodel_and_transformers_read_it(reader_results, case):
    """GPTQModel's dequantize_model gives ``(W_int - z) * fp16(s)`` bit-exactly in fp32; GPTQModel.load's
    TorchLinear dequantises to the fp16 rounding of it, bit-exactly; the logits of GPTQModel and of
    transformers (fp16 activations) stay within 1% of the largest logit of the converted model (fp32)."""
    model, logits, job = reader_results[case]
    res = torch.load(job["out"])
    deq = safetensors_torch.load_file(os.path.join(job["deq"], "model.safetensors"))
    quant = _quantized(model)
    assert set(res["gptqmodel_weights"]) == set(quant)
    for name, m in quant.items():
        assert deq[name + ".weight"].dtype == torch.float32
        assert torch.equal(deq[name + ".weight"], expected_weight(m)), name
        assert torch.equal(res["gptqmodel_weights"][name], expected_weight(m).half()), name
    tol = 0.01 * logits.abs().max().item()
    assert (res["gptqmodel_logits"] - logits).abs().max().item() <= tol
    if "hf_skip" in res:
        pytest.skip(f"transformers check not run: {res['hf_skip']}")
    assert (res["hf_logits"] - logits).abs().max().item() <= tol


# ---- 3. refusals and options -------------------------------------------------------------------

def _layers(model):
    return collect_layers(model), dense_state(model, collect_layers(model))


def test_refuses_mixed_bits(tmp_path):
    model = converted("llama", bits=4, hidden=64)
    layers, dense = _layers(model)
    layers[3].bits = 8
    with pytest.raises(ExportError, match=rf"layer {layers[3].name} has bits=8 but layer {layers[0].name} has bits=4"):
        G.write(model, layers, dense, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_refuses_mixed_group_and_sym(tmp_path):
    model = converted("llama", bits=4, group_size=32, hidden=64)
    layers, dense = _layers(model)
    layers[1].group_size = 64
    with pytest.raises(ExportError, match=rf"layer {layers[1].name} has group_size=64"):
        G.write(model, layers, dense, str(tmp_path))
    layers[1].group_size = 32
    layers[2].zero_point = torch.zeros_like(layers[2].scale, dtype=torch.int8)
    with pytest.raises(ExportError, match=rf"layer {layers[2].name} has sym=False"):
        G.write(model, layers, dense, str(tmp_path))


@pytest.mark.parametrize("bits,shape,what", [(4, (8, 12), "in_features=12"), (4, (12, 16), "out_features=12"),
                                             (3, (32, 48), "in_features=48"), (3, (16, 32), "out_features=16"),
                                             (2, (16, 8), "in_features=8")])
def test_refuses_shapes(tmp_path, bits, shape, what):
    layer = QuantLayer("model.layers.0.mlp.up_proj", torch.zeros(shape, dtype=torch.int8), torch.ones(shape[0], 1),
                       None, bits, None)
    with pytest.raises(ExportError, match=rf"layer model\.layers\.0\.mlp\.up_proj has {what}"):
        G.write(nn.Module(), [layer], {}, str(tmp_path))


def test_refuses_bits_outside_gptq(tmp_path):
    layer = QuantLayer("a", torch.zeros(32, 32, dtype=torch.int8), torch.ones(32, 1), None, 5, None)
    with pytest.raises(ExportError, match=r"layer a has bits=5; GPTQ packs bits in \{2, 3, 4, 8\}"):
        G.write(nn.Module(), [layer], {}, str(tmp_path))


def test_refuses_asymmetric_v1(tmp_path):
    model = converted("llama", bits=4, symmetric=False, hidden=64)
    with pytest.raises(ExportError, match=r"layer model\.layers\.0\.self_attn\.q_proj is asymmetric.*gptq_v2"):
        export(model, tmp_path / "o", "gptq", checkpoint_format="gptq")
    assert not (tmp_path / "o").exists()


def test_refuses_options(tmp_path):
    model = converted("llama", bits=4, hidden=64)
    with pytest.raises(ExportError, match=r"unknown option 'scale_dtype'; allowed: allow_inexact, checkpoint_format"):
        export(model, tmp_path / "o", "gptq", scale_dtype="float16")
    with pytest.raises(ExportError, match=r"checkpoint_format must be one of gptq_v2, gptq, got 'gptq_v3'"):
        export(model, tmp_path / "o", "gptq", checkpoint_format="gptq_v3")
    assert not (tmp_path / "o").exists()


def test_refuses_dense_linear_in_blocks(tmp_path):
    model = converted("llama", bits=4, hidden=64, exclude=("lm_head", "down_proj"))
    with pytest.raises(ExportError, match=r"linear model\.layers\.0\.mlp\.down_proj is not quantised \(2 such\)"):
        export(model, tmp_path / "o", "gptq")


def test_scales_fp16_cannot_hold(tmp_path):
    w = torch.ones(32, 32, dtype=torch.int8)
    big = QuantLayer("big", w, torch.full((32, 1), 7e4), None, 4, None)
    with pytest.raises(ExportError, match=r"layer big has 32 scales fp16 cannot hold"):
        G.write(nn.Module(), [big], {}, str(tmp_path), allow_inexact=True)
    tiny = QuantLayer("tiny", w, torch.full((32, 1), 1e-8), None, 4, None)
    with pytest.raises(ExportError, match=r"layer tiny has 32 scales fp16 cannot hold"):
        G.write(nn.Module(), [tiny], {}, str(tmp_path), allow_inexact=True)
    sub = QuantLayer("sub", w, torch.full((32, 1), 1.01e-6), None, 4, None)  # fp16 subnormal, ~1% off
    with pytest.raises(ExportError, match=r"layer sub: fp16 rounds a scale by .* allow_inexact=True"):
        G.write(nn.Module(), [sub], {}, str(tmp_path))
    assert os.listdir(tmp_path) == []
    rep = G.write(nn.Module(), [sub], {}, str(tmp_path), allow_inexact=True)
    s16 = torch.tensor(1.01e-6).half().float().item()
    expect = abs(s16 - torch.tensor(1.01e-6).item()) / torch.tensor(1.01e-6).item()
    assert expect > 1e-3 and rep["scale_rounding"]["max_rel_error"] == pytest.approx(expect, rel=1e-5)


def test_exact_scales_no_scale_warning(tmp_path):
    w = torch.randint(-8, 8, (64, 32), dtype=torch.int8)
    layer = QuantLayer("x", w, torch.full((64, 1), 0.015625), None, 4, None)  # 2^-6: fp16-exact
    rep = G.write(nn.Module(), [layer], {}, str(tmp_path))
    assert rep["exact"]["quantized"] is True and rep["scale_rounding"]["inexact"] == 0
    assert not any("fp16-exact" in w for w in rep["warnings"])
    sd = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    qcfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert torch.equal(gptq_weight(sd, "x", qcfg), w.float() * 0.015625)


def test_cli_from_checkpoint_dir(tmp_path, capsys):
    """``lrqat export --format gptq`` from a saved converted checkpoint: same tensors as the in-memory export."""
    from lrqat_kernels.cli import main

    model = converted("mistral", bits=4, group_size=32, hidden=64, seed=7)
    lrqat_kernels.save_pretrained(model, str(tmp_path / "ckpt"))
    with warnings.catch_warnings():  # the CLI prints them too (checked below)
        warnings.simplefilter("ignore")
        assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "gptq", "--out", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert "not fp16-exact" in err
    with pytest.warns(UserWarning):
        export(model, tmp_path / "mem", "gptq")
    sd_cli, cfg = _load(tmp_path / "cli")
    sd_mem, _ = _load(tmp_path / "mem")
    assert sd_cli.keys() == sd_mem.keys() and all(torch.equal(sd_cli[k], sd_mem[k]) for k in sd_cli)
    rep = json.loads((tmp_path / "cli" / "lrqat_export.json").read_text())
    assert rep["format"] == "gptq" and rep["quantization_config"] == cfg["quantization_config"]
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "gptq", "--out", str(tmp_path / "x"),
                 "--scale-dtype", "float16"]) != 0


def test_refuses_dense_beyond_fp16(tmp_path):
    model = converted("llama", bits=4, hidden=64)
    with torch.no_grad():
        model.model.norm.weight[3] = 1e5
    with pytest.raises(ExportError, match=r"tensor model\.norm\.weight holds values beyond fp16's range"):
        export(model, tmp_path / "o", "gptq")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ExportError, match="no quantised layers"):
        G.write(model, [], {}, str(tmp_path))
