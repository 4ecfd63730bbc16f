"""L4Q and PE-QAT through the model-level workflow: prepare, fit, save/load, convert (issue 19)."""

from __future__ import annotations

import pytest
import torch

from lrqat_kernels import LRQATConfig, convert, load_pretrained, prepare, save_pretrained
from lrqat_kernels.data import WindowSampler
from lrqat_kernels.l4q import L4QLinear
from lrqat_kernels.modules import QuantizedLinear
from lrqat_kernels.ops._launch import use_kernels
from export_models import tiny_hf
from lrqat_kernels.peqat import PEQATLinear
from lrqat_kernels.train import fit


@pytest.fixture(autouse=True)
def _eager_cpu_path():
    """Model-level tests run the eager CPU path (conftest turns the Triton interpreter on)."""
    with use_kernels(False):
        yield


def tiny_llama(seed=0):
    return tiny_hf("llama", seed=seed, max_pos=64)  # hidden 64, 4 heads, 2 KV heads (GQA)


def ids(n=2, t=16, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=3):
    sampler = WindowSampler(ids(8, 16, seed=5).flatten(), 16, seed=0)
    return fit(model, sampler, steps=steps, batch_size=2, lr=5e-2, lr_scale=1e-2, progress=False)


def _trainable(model):
    return sorted({n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad})


def test_l4q_prepare_train_save_load_convert(tmp_path):
    model = prepare(tiny_llama(), LRQATConfig(method="l4q", group_size=32, rank=4))
    layers = [m for m in model.modules() if isinstance(m, L4QLinear)]
    assert len(layers) == 14 and all(m.group_size == 32 for m in layers)
    assert _trainable(model) == ["lora_A", "lora_B", "offset", "scale"]
    before = {n: b.clone() for n, b in model.named_buffers() if n.endswith(".w0")}
    hist = _train(model)
    losses = [h["loss"] for h in hist["history"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in before.items()), "W0 must stay frozen"
    assert any(m.offset.abs().sum() > 0 for m in layers), "the offset trains"
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    save_pretrained(model, str(tmp_path / "l4q"))
    back = load_pretrained(str(tmp_path / "l4q"))
    assert back.lrqat_config.method == "l4q"
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref)
    convert(model)
    q = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(q) == 14 and all(m.offset is not None for m in q)
    for m in q:
        m.use_int4_kernel = False  # the exact dequantise path: s * W_int + b is the training W_q
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
        for m in q:
            m.use_int4_kernel = True
        kernel = model(x).logits
    torch.testing.assert_close(kernel, ref, rtol=1e-4, atol=1e-4)  # fp32 sums in another order
    save_pretrained(model, str(tmp_path / "int4"))
    back = load_pretrained(str(tmp_path / "int4"))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, kernel, rtol=0, atol=0)


def test_peqat_prepare_needs_calibration_and_trains(tmp_path):
    cfg = LRQATConfig(method="peqat", act_bits=4, rank=4)
    with pytest.raises(ValueError, match="calibration data is needed by method='peqat'"):
        prepare(tiny_llama(), cfg)
    model = prepare(tiny_llama(), cfg, calibration=ids(4, 16, seed=9))
    layers = [m for m in model.modules() if isinstance(m, PEQATLinear)]
    assert len(layers) == 14
    assert _trainable(model) == ["clip", "log_smooth", "lora_A", "lora_B"]
    assert all(m.clip.item() > 0 for m in layers) and any(m.log_smooth.abs().sum() > 0 for m in layers)
    hist = _train(model)
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in hist["history"]])))
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    save_pretrained(model, str(tmp_path / "peqat"))
    back = load_pretrained(str(tmp_path / "peqat"))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref)
    convert(model)
    q = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(q) == 14 and all(m.input_step is not None and m.input_qrange == (-7, 7) for m in q)
    for m in q:
        m.use_int4_kernel = False  # exact dequantise path: dw * W_int and the same static x_q as training
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
        for m in q:
            m.use_int4_kernel = True
        kernel = model(x).logits
    torch.testing.assert_close(kernel, ref, rtol=2e-3, atol=2e-3)  # fp32 sums in another order, then requantised
    save_pretrained(model, str(tmp_path / "int4"))
    back = load_pretrained(str(tmp_path / "int4"))
    with torch.no_grad():
        assert torch.equal(back(x).logits, kernel)


def test_bf16_keeps_quantiser_tensors_fp32():
    model = prepare(tiny_llama(), LRQATConfig(method="l4q", group_size=32, rank=4, compute_dtype="bfloat16"))
    m = next(m for m in model.modules() if isinstance(m, L4QLinear))
    assert m.w0.dtype == torch.bfloat16 and m.lora_A.dtype == torch.bfloat16
    assert m.scale.dtype == torch.float32 and m.offset.dtype == torch.float32
    model = prepare(tiny_llama(), LRQATConfig(method="peqat", act_bits=4, rank=4, compute_dtype="bfloat16"),
                    calibration=ids())
    m = next(m for m in model.modules() if isinstance(m, PEQATLinear))
    assert m.w0.dtype == torch.bfloat16 and m.log_smooth.dtype == torch.float32 and m.clip.dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="l4q", phi_format="packed_int"), "phi_format applies to method='lrqat' only"),
    (dict(method="peqat"), "set act_bits"),
    (dict(method="peqat", act_bits=4, group_size=32), "per output channel"),
    (dict(method="l4q", symmetric=False), "symmetric=False does not apply"),
    (dict(method="l4q", act_bits=8), "weight-only"),
    (dict(method="lrqat", grad_scale=0.1), "grad_scale applies to method='l4q' only"),
    (dict(method="l4q", grad_scale=0.0), "grad_scale must be None"),
    (dict(method="peqat", act_bits=4, migration=1.5), "migration must be in"),
    (dict(method="sasq"), "method must be one of"),
])
def test_method_contradictions_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRQATConfig(**kwargs)


def test_config_round_trip_keeps_the_method():
    cfg = LRQATConfig(method="l4q", group_size=64, grad_scale=0.5, scale_init="lsq")
    back = LRQATConfig.from_json(cfg.to_json())
    assert back == cfg and back.phi_format is None
    assert LRQATConfig().phi_format == "fixed_point" and LRQATConfig().method == "lrqat"


def test_l4q_export_is_refused_naming_the_layer(tmp_path):
    from lrqat_kernels.export import export
    from lrqat_kernels.export._common import ExportError

    model = convert(prepare(tiny_llama(), LRQATConfig(method="l4q", group_size=32, rank=4)))
    with pytest.raises(ExportError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' has a float offset"):
        export(model, str(tmp_path / "ct"), format="compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_compare_methods_quick_run(tmp_path, capsys):
    """`lrqat demo --compare-methods --quick`: every method trains on the same FP model and data; the
    converted perplexity equals the trained one (exact dequantise path); the 7B memory accounting
    ranks LR-QAT (Q4.4 Phi0, 1 B/weight) below L4Q / PE-QAT (bf16 W0, 2 B/weight)."""
    from lrqat_kernels.cli import main
    from lrqat_kernels.compare import METHOD_ROWS, memory_7b

    assert main(["demo", "--compare-methods", "--quick", "--no-progress", "--out", str(tmp_path / "cmp")]) == 0
    import json

    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert [n for n, _ in METHOD_ROWS] == [r["method"] for r in res["rows"][3:]]
    for name, _ in METHOD_ROWS:
        r = rows[name]
        assert r["ppl_converted"] == r["ppl"] and r["trainable_params"] > 0 and r["step_s_median"] > 0
    assert "PE-QAT W4A4 (static A4)" in capsys.readouterr().out
    lr, l4 = memory_7b("lrqat"), memory_7b("l4q")
    assert abs(l4["base_weights_gb"] - 2 * lr["base_weights_gb"]) < 1e-9 and lr["total_gb"] < l4["total_gb"]
    assert abs(memory_7b("lrqat", phi_format="packed_int")["base_weights_gb"] * 2 - lr["base_weights_gb"]) < 1e-9


@pytest.mark.parametrize("method,extra", [("l4q", ["--group-size", "32", "--grad-scale", "0.5"]),
                                          ("peqat", ["--act-bits", "4", "--migration", "0.4"])])
def test_lrqat_train_method_end_to_end(tmp_path, method, extra):
    """`lrqat train --method l4q|peqat ... --convert`: trains, saves the checkpoint and the converted
    model; the config records the method and its fields; --resume with another method is refused."""
    import json

    from pydoc_data.topics import topics

    from lrqat_kernels.cli import main

    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(str(model_dir))
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(topics[k] for k in sorted(topics)[:4])[:8000])
    out = tmp_path / "out"
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "3",
            "--batch-size", "2", "--seq-len", "16", "--rank", "4", "--lr", "1e-2", "--lr-scale", "1e-3",
            "--method", method, *extra, "--convert", "--no-progress", "--save-every", "1"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["history"]) == 3
    back = load_pretrained(str(out / "lrqat"))
    assert back.lrqat_config.method == method
    assert (back.lrqat_config.grad_scale == 0.5) if method == "l4q" else (back.lrqat_config.migration == 0.4)
    q = load_pretrained(str(out / "quantized"))
    assert q.lrqat_stage == "quantized"
    other = "l4q" if method == "peqat" else "peqat"
    assert main([*args, "--resume", "--method", other, "--act-bits", "4"]) == 2
