"""Training loop, CLI (train / eval / convert / demo), exact resume, data helpers."""

from __future__ import annotations

import json
import math
import copy
import os
import subprocess
import sys

import pytest
import torch

import lrqat_kernels
from lrqat_kernels import LRQATConfig, load_pretrained, prepare
from lrqat_kernels.checkpoint import save_trainer_state
from lrqat_kernels.cli import main
from lrqat_kernels.data import ByteTokenizer, WindowSampler, evaluate_perplexity, load_tokenizer, read_text, tokenize
from lrqat_kernels.modules import factor_dtype
from lrqat_kernels.train import build_optimizer, enable_layer_checkpointing, fit, linear_warmup_decay
from lrqat_kernels.ops._launch import use_kernels
from export_models import tiny_llama as _tiny_llama

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(autouse=True)
def _eager_cpu_path(monkeypatch):
    """Run the eager CPU path (tests/conftest.py enables the Triton interpreter for kernel tests)."""
    with use_kernels(False):
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A local HF model dir (no tokenizer: byte-level fallback) and train / held-out text files."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("train")
    _tiny_llama().save_pretrained(str(d / "model"))
    keys = sorted(topics)
    (d / "train.txt").write_text("\n\n".join(topics[k] for k in keys[:6])[:12000])
    texts = d / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(topics[keys[10]][:3000])
    (texts / "b.txt").write_text(topics[keys[11]][:3000])
    (texts / "skip.md").write_text("SKIPPED-FILE-MARKER")
    (d / "heldout.txt").write_text(topics[keys[20]][:4000])
    return d


TRAIN = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--lr-scale", "1e-3",
         "--range-method", "minmax", "--no-progress"]


def _train(workdir, out, *extra):
    return main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "train.txt"), "--out", str(out), *TRAIN, *extra])


# ---------------------------------------------------------------------------------------------- pieces


def test_schedule_warmup_then_linear_decay():
    f = linear_warmup_decay(100, 10)
    assert [f(i) for i in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and f(55) == pytest.approx(0.5) and f(100) == 0.0
    g = linear_warmup_decay(10, 0)
    assert g(0) == 1.0 and g(5) == 0.5


def test_optimizer_groups_follow_appendix_b():
    model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax"))
    opt = build_optimizer(model, 1e-3, 1e-5)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["lora", "scale"] and [g["lr"] for g in opt.param_groups] == [1e-3, 1e-5]
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.0 for g in opt.param_groups)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == n_lora
    opt0 = build_optimizer(model, 1e-3, 0.0)  # the paper's 0*: s = s0 frozen
    assert [g["name"] for g in opt0.param_groups] == ["lora"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("scale"))


def test_data_helpers(workdir):
    assert isinstance(load_tokenizer(str(workdir / "model")), ByteTokenizer)
    text = read_text(str(workdir / "texts"))
    assert "SKIPPED-FILE-MARKER" not in text and len(text) > 1000
    ids = tokenize("héllo", ByteTokenizer())
    assert ids.tolist() == list("héllo".encode()) and ByteTokenizer().decode(ids.tolist()) == "héllo"
    with pytest.raises(ValueError, match="vocab_size"):
        tokenize("hello", ByteTokenizer(), vocab_size=100)
    with pytest.raises(ValueError, match="neither"):
        read_text(str(workdir / "missing.txt"))
    s1, s2 = WindowSampler(tokenize(text, ByteTokenizer()), 16, seed=3), WindowSampler(tokenize(text, ByteTokenizer()), 16, seed=3)
    big = s1.batch(0, s1.n_windows + 5)  # crosses an epoch
    assert torch.equal(big[7:12], s2.batch(7, 5))
    assert sorted(big[: s1.n_windows, 0].tolist()) == sorted(s1.windows[:, 0].tolist())  # a permutation per epoch


def test_perplexity_metric_is_named_and_windowed():
    model = _tiny_llama()
    ids = torch.randint(0, 256, (100,))
    r = evaluate_perplexity(model, ids, 32)
    assert r["windows"] == 3 and r["tokens"] == 3 * 31 and r["window"] == 32
    assert "non-overlapping windows of 32 tokens" in r["metric"]
    assert 100 < r["perplexity"] < 1000  # ~ vocab size for a random model


def test_bf16_training_keeps_scales_fp32_and_checkpointing_matches(workdir):
    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())
    results = []
    for ckpt in (False, True):
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", compute_dtype="bfloat16"))
        if ckpt:
            enable_layer_checkpointing(model)
        s0 = model.model.layers[0].self_attn.q_proj.scale.detach().clone()
        r = fit(model, WindowSampler(ids, 32, seed=0), steps=3, batch_size=2, lr=1e-2, lr_scale=1e-4, progress=False)
        layer = model.model.layers[0].self_attn.q_proj
        # fp32 scales; LoRA factors in modules.factor_dtype's dtype; the model computes in bf16
        assert layer.scale.dtype == torch.float32 and layer.lora_A.dtype == factor_dtype(torch.bfloat16)
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert not torch.equal(layer.scale.detach(), s0)  # 1e-4 steps survive in fp32
        results.append([h["loss"] for h in r["history"]])
    assert results[0] == pytest.approx(results[1], rel=1e-2)


def test_fp16_training_tracks_fp32_training(workdir):
    """compute_dtype float16: fp32 factors (modules.factor_dtype) and dynamic loss scaling give
    the fp32 run's losses and gradient norms (lora_A became NaN at step 1 with fp16 factors).
    fp16 trainable tensors are refused by the optimizer with a message."""
    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())
    runs = {}
    for dt in ("float32", "float16"):
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", compute_dtype=dt))
        r = fit(model, WindowSampler(ids, 32, seed=0), steps=6, batch_size=2, lr=1e-2, lr_scale=1e-4, progress=False,
                ckpt_dir=str(workdir / f"fp16-{dt}"), save_every=3)
        runs[dt] = [v for h in r["history"] for v in (h["loss"], h["grad_norm"])]
        scaler = torch.load(str(workdir / f"fp16-{dt}" / "trainer_state.pt"), weights_only=True)["grad_scaler"]
        assert bool(scaler) == (dt == "float16")  # loss scaling on for fp16 only (a disabled scaler saves {})
        if scaler:
            assert scaler["scale"] > 1
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.lora_A.dtype == torch.float32 and layer.lora_B.abs().max() > 0
        assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert all(math.isfinite(v) for v in runs["float16"])
    assert runs["float16"] == pytest.approx(runs["float32"], rel=2e-2)
    layer.lora_A.data = layer.lora_A.data.half()
    with pytest.raises(ValueError, match="float16"):
        build_optimizer(model, 1e-3, 1e-4)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_train_eval_convert(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = _train(workdir, out, "--eval-data", str(workdir / "heldout.txt"), "--convert", "--grad-accum", "2", "--grad-checkpointing")
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] and len(res["history"]) == 6 and res["lrqat_config"]["rank"] == 4
    assert res["history"][0]["lr"] == pytest.approx(1e-2 * 1 / 1) or res["history"][0]["lr"] > 0
    assert {"loss", "lr", "lr_scale", "grad_norm", "tokens_per_s"} <= set(res["history"][0])
    e_l, e_q = res["eval_lrqat"], res["eval_quantized"]
    assert e_q["perplexity"] == pytest.approx(e_l["perplexity"], rel=1e-5)
    assert os.path.isfile(out / "lrqat" / "lrqat_tokenizer.json")
    for d in ("lrqat", "quantized"):  # training turns the KV cache off only while it runs
        assert json.loads((out / d / "config.json").read_text())["use_cache"] is True
    capsys.readouterr()

    assert main(["eval", "--model", str(out / "lrqat"), "--data", str(workdir / "heldout.txt"), "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity (non-overlapping windows of 32 tokens)" in printed and "stage lrqat" in printed
    line = json.loads(printed.strip().splitlines()[-1])
    assert line["perplexity"] == pytest.approx(e_l["perplexity"], rel=1e-6)

    assert main(["convert", "--model", str(out / "lrqat"), "--out", str(tmp_path / "int4")]) == 0
    q = load_pretrained(str(tmp_path / "int4"))
    ref = load_pretrained(str(out / "quantized"))
    for k, v in ref.state_dict().items():
        assert torch.equal(q.state_dict()[k], v), k
    # eval of the FP model directory works too
    assert main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "heldout.txt"), "--seq-len", "32"]) == 0
    assert "stage fp" in capsys.readouterr().out


def test_resume_reproduces_the_uninterrupted_run_exactly(workdir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _train(workdir, full, "--save-every", "2") == 0
    assert _train(workdir, cut, "--save-every", "2", "--stop-after", "3") == 0
    partial = json.loads((cut / "results.json").read_text())
    assert not partial["finished"] and partial["steps_done"] == 3 and not (cut / "lrqat").exists()
    assert os.path.isfile(cut / "checkpoint" / "trainer_state.pt")
    assert _train(workdir, cut, "--save-every", "2", "--resume") == 0
    a = json.loads((full / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    assert b["resumed_from"] == 3 and b["finished"]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert (ha["step"], ha["loss"], ha["lr"], ha["lr_scale"], ha["grad_norm"]) == (hb["step"], hb["loss"], hb["lr"], hb["lr_scale"], hb["grad_norm"])
    ma, mb = load_pretrained(str(full / "lrqat")), load_pretrained(str(cut / "lrqat"))
    for k, v in ma.state_dict().items():
        assert torch.equal(mb.state_dict()[k], v), k
    # tokens / train_seconds / tokens_per_s cover the whole run, not the last invocation only
    assert b["tokens"] == a["tokens"] == 6 * 2 * 32 and partial["tokens"] == 3 * 2 * 32
    assert b["train_seconds"] > partial["train_seconds"] > 0
    assert b["tokens_per_s"] == pytest.approx(b["tokens"] / b["train_seconds"])


def test_resume_of_a_checkpoint_without_running_totals(workdir, tmp_path):
    """Checkpoints written before tokens / train_seconds were stored resume, counting from the resumption."""
    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())
    ckpt = str(tmp_path / "ckpt")

    def run(**kw):
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax"))
        return fit(model, WindowSampler(ids, 16, seed=0), steps=4, batch_size=2, lr=1e-2, lr_scale=1e-3, progress=False,
                   ckpt_dir=ckpt, **kw)

    assert run(stop_after=2)["tokens"] == 2 * 2 * 16
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    assert state["tokens"] == 2 * 2 * 16 and state["train_seconds"] > 0
    del state["tokens"], state["train_seconds"]
    save_trainer_state(state, os.path.join(ckpt, "trainer_state.pt"))  # a consistent state without them
    r = run(resume=True)
    assert r["finished"] and r["resumed_from"] == 2 and r["tokens"] == 2 * 2 * 16


def _flip_a_tensor_byte(path):
    """Flip one bit in the middle of the largest tensor record (``archive/data/<n>``) of a torch.save
    zip (stored, not compressed): a flip that torch.load does not notice."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x10]))


def test_damaged_trainer_state_is_refused_naming_the_file(workdir, tmp_path, capsys):
    """trainer_state.pt records the sha256 of its content: truncated or bit-flipped, --resume (and
    fit(resume=True)) is a one-line error naming the file, never a resume from a wrong state; an
    intact copy resumes."""
    from lrqat_kernels.checkpoint import load_trainer_state

    out = tmp_path / "r"
    assert _train(workdir, out, "--stop-after", "2") == 0
    path = out / "checkpoint" / "trainer_state.pt"
    good = path.read_bytes()
    state = torch.load(str(path), weights_only=True)
    assert isinstance(state["sha256"], str) and len(state["sha256"]) == 64
    assert "sha256" not in load_trainer_state(str(path))
    _flip_a_tensor_byte(str(path))
    flipped = torch.load(str(path), weights_only=True)  # torch.load itself does not notice
    assert flipped["sha256"] == state["sha256"] and flipped["step"] == state["step"]
    for damage in ("flip", "truncate"):
        if damage == "truncate":
            path.write_bytes(good[: len(good) // 2])
        with pytest.raises(ValueError, match=f"corrupt checkpoint: .*{path}"):
            load_trainer_state(str(path))
        capsys.readouterr()
        assert _train(workdir, out, "--resume") == 2
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Loading weights")]
        assert len(err) == 1 and err[0].startswith("lrqat train: error: corrupt checkpoint") and str(path) in err[0], err
        assert not (out / "lrqat").exists()
    path.write_bytes(good)
    assert _train(workdir, out, "--resume") == 0 and (out / "lrqat").is_dir()


def test_trainer_state_digest_is_of_the_content():
    """The digest reads what the file holds: equal values give equal digests, any changed value,
    dtype, shape, container type or key order another one."""
    import io

    from lrqat_kernels._io import sha256_content

    state = {"step": 3, "t": torch.arange(6, dtype=torch.float32).reshape(2, 3), "h": [{"loss": 1.5, "g": None}],
             "betas": (0.9, 0.95), "rng": torch.get_rng_state(), "empty": torch.zeros(0)}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert sha256_content(back) == sha256_content(state)
    assert sha256_content({**state, "t": state["t"][:, :2]}) == sha256_content({**state, "t": state["t"][:, :2].clone()})
    variants = [{**state, "step": 4}, {**state, "t": state["t"].double()}, {**state, "t": state["t"].reshape(3, 2)},
                {**state, "betas": [0.9, 0.95]}, {**state, "h": [{"loss": 1.5000001, "g": None}]},
                {k: state[k] for k in reversed(state)}, {**state, "t": state["t"] + torch.eye(2, 3) * 1e-6}]
    digests = {sha256_content(v) for v in variants}
    assert len(digests) == len(variants) and sha256_content(state) not in digests


def test_fp16_overflow_skipped_steps_do_not_advance_the_schedule(workdir, tmp_path, monkeypatch):
    """fp16: a step the GradScaler skips (overflowed gradients; forced here by a huge initial loss
    scale) does not advance the LR schedule, as HF's Trainer; it is marked and counted, and a resume
    in the middle of the skips reproduces the uninterrupted run."""
    import warnings

    class BigScale(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            k.setdefault("init_scale", 2.0**30)
            super().__init__(*a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", BigScale)
    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())
    ckpt = str(tmp_path / "ckpt")

    def run(**kw):
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", compute_dtype="float16"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit(model, WindowSampler(ids, 16, seed=0), steps=12, batch_size=2, lr=1e-2, lr_scale=1e-3,
                       warmup_ratio=0.25, progress=False, **kw)

    r = run()
    skipped = [h for h in r["history"] if h["skipped"]]
    good = [h for h in r["history"] if not h["skipped"]]
    assert skipped and good and r["skipped_steps"] == len(skipped) and r["history"][0]["skipped"]
    assert all(h["grad_norm"] is None for h in skipped) and all(h["grad_norm"] > 0 for h in good)
    f = linear_warmup_decay(12, 3)  # the k-th applied step gets the k-th value: the warm-up is not lost
    assert [h["lr"] for h in good] == pytest.approx([1e-2 * f(k) for k in range(len(good))])
    assert good[0]["lr"] == pytest.approx(1e-2 / 3)
    cut = run(ckpt_dir=ckpt, stop_after=2)
    assert [h["skipped"] for h in cut["history"]] == [h["skipped"] for h in r["history"][:2]]
    res = run(ckpt_dir=ckpt, resume=True)
    assert res["skipped_steps"] == r["skipped_steps"]
    key = ("step", "loss", "lr", "lr_scale", "grad_norm", "skipped")
    assert [[h[k] for k in key] for h in res["history"]] == [[h[k] for k in key] for h in r["history"]]


def test_results_json_is_strict_json(workdir, tmp_path):
    """--max-grad-norm 0 (no clipping): grad_norm is null, not a bare NaN; the writer refuses NaN."""
    out = tmp_path / "run"
    assert _train(workdir, out, "--max-grad-norm", "0", "--steps", "2") == 0

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c}")

    res = json.loads((out / "results.json").read_text(), parse_constant=strict)
    assert [h["grad_norm"] for h in res["history"]] == [None, None]
    from lrqat_kernels._io import atomic_write_json, json_safe

    with pytest.raises(ValueError, match="bad.json"):
        atomic_write_json(tmp_path / "bad.json", {"x": [1.0, float("nan")]})
    assert not (tmp_path / "bad.json").exists()
    assert json_safe({"a": (float("inf"), 2.0), "b": float("nan"), "c": "x"}) == {"a": [None, 2.0], "b": None, "c": "x"}


def test_continue_training_an_lrqat_checkpoint(workdir, tmp_path, capsys):
    """`lrqat train --model <LR-QAT checkpoint>`: it trains with the checkpoint's config, recorded as
    such in results.json; a quantization flag given with another value is an error (a flag left
    at its default is not); --lr-scale > 0 trains the scales a --lr-scale 0 run had frozen."""
    first = tmp_path / "first"
    assert _train(workdir, first, "--bits", "3", "--lr-scale", "0", "--steps", "2") == 0
    ckpt = first / "lrqat"
    assert not any(p.requires_grad for n, p in load_pretrained(str(ckpt)).named_parameters() if n.endswith("scale"))
    capsys.readouterr()

    def cont(out, *extra):
        return main(["train", "--model", str(ckpt), "--data", str(workdir / "train.txt"), "--out", str(tmp_path / out),
                     "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", *extra])

    for extra, msg in ((("--bits", "4"), "--bits: got bits=4"), (("--act-bits", "8"), "--act-bits: got act_bits=8"),
                       (("--compute-dtype", "bfloat16"), "--compute-dtype: got compute_dtype='bfloat16'"),
                       (("--rank", "8"), "has rank=4"), (("--asymmetric",), "--asymmetric")):
        assert cont("bad", *extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "LR-QAT checkpoint" in err, (extra, err)
        assert not (tmp_path / "bad" / "results.json").exists()
    # the same values as the checkpoint's are fine (compute_dtype: the model's dtype when it kept it)
    assert cont("same", "--bits", "3", "--rank", "4", "--compute-dtype", "float32", "--lr-scale", "0") == 0
    assert cont("second", "--lr-scale", "1e-2") == 0
    res = json.loads((tmp_path / "second" / "results.json").read_text())
    assert res["lrqat_config"]["bits"] == 3 and res["args"]["bits"] == 3 and res["args"]["rank"] == 4
    assert res["args"]["range_method"] == res["lrqat_config"]["range_method"] == "minmax"
    assert all(h["lr_scale"] > 0 for h in res["history"])
    s0 = load_pretrained(str(ckpt)).model.layers[0].self_attn.q_proj.scale
    s1 = load_pretrained(str(tmp_path / "second" / "lrqat")).model.layers[0].self_attn.q_proj.scale
    assert s1.requires_grad and not torch.equal(s0, s1)


def test_build_optimizer_sets_the_scales_trainability_from_each_call():
    """lr_scale=0 froze the scales for good: a later call (a second fit, or a checkpoint saved with
    them frozen) with lr_scale > 0 silently left them at s0."""
    model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax"))
    scales = [p for n, p in model.named_parameters() if n.endswith("scale")]
    assert [g["name"] for g in build_optimizer(model, 1e-3, 0.0).param_groups] == ["lora"]
    assert not any(p.requires_grad for p in scales)
    opt = build_optimizer(model, 1e-3, 1e-5)
    assert [g["name"] for g in opt.param_groups] == ["lora", "scale"] and all(p.requires_grad for p in scales)
    frozen = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", learn_scale=False))
    assert [g["name"] for g in build_optimizer(frozen, 1e-3, 1e-5).param_groups] == ["lora"]
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number >= 0"):
        fit(model, None, steps=1, batch_size=1, lr=1e-3, lr_scale=0.0, max_grad_norm=-1.0)


def test_resume_refuses_changed_arguments(workdir, tmp_path, capsys):
    out = tmp_path / "r"
    assert _train(workdir, out, "--stop-after", "2") == 0
    capsys.readouterr()
    rc = main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "train.txt"), "--out", str(out),
               *TRAIN[:-3], "--lr", "5e-3", "--no-progress", "--resume"])
    assert rc == 2 and "cannot resume" in capsys.readouterr().err


def test_cli_bad_input(workdir, tmp_path, capsys):
    rc = main(["train", "--model", str(tmp_path / "nope"), "--data", str(workdir / "train.txt"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "not a directory" in capsys.readouterr().err
    rc = _train(workdir, tmp_path / "o2", "--phi-format", "packed_int", "--bits", "5")
    assert rc == 2 and "packed_int" in capsys.readouterr().err
    rc = _train(workdir, tmp_path / "o3", "--group-size", "48")
    assert rc == 2 and "does not divide" in capsys.readouterr().err
    rc = main(["convert", "--model", str(workdir / "model"), "--out", str(tmp_path / "c")])
    assert rc == 2 and "lrqat_config.json" in capsys.readouterr().err
    # checked before any training (a bad eval file used to fail after the last step, losing the run)
    for extra, msg in ((("--eval-data", str(tmp_path / "typo.txt")), "does not exist"),
                       (("--seq-len", "1"), "must be >= 2"), (("--seq-len", "65"), "max_position_embeddings=64"),
                       (("--resume",), "resume: no checkpoint"), (("--device", "cuda"), "is_available() is False")):
        if extra[0] == "--device" and torch.cuda.is_available():
            continue
        rc = _train(workdir, tmp_path / "o4", *extra)
        assert rc == 2 and msg in capsys.readouterr().err, extra
        assert not (tmp_path / "o4" / "lrqat").exists()
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    rc = _train(workdir, tmp_path / "o5", "--eval-data", str(short))
    assert rc == 2 and "fewer than one window" in capsys.readouterr().err
    # non-finite learning rates and clipping norms (inf trained, then failed; negative / nan disabled clipping)
    for extra, msg in ((("--lr", "inf"), "lr must be a finite number >= 0, got inf"),
                       (("--lr", "nan"), "lr must be a finite number >= 0, got nan"),
                       (("--lr-scale", "inf"), "lr_scale must be a finite number >= 0, got inf"),
                       (("--max-grad-norm", "-1"), "max_grad_norm must be a finite number >= 0"),
                       (("--max-grad-norm", "nan"), "max_grad_norm must be a finite number >= 0")):
        rc = _train(workdir, tmp_path / "o6", *extra)
        assert rc == 2 and msg in capsys.readouterr().err, extra
        assert not (tmp_path / "o6" / "results.json").exists()
    for extra, msg in ((("--seq-len", "1"), "seq_len must be an int >= 2"), (("--seq-len", "32", "--batch-size", "0"), "batch_size must be"),
                       (("--out", str(tmp_path / "nodir" / "x.json")), "does not exist")):
        rc = main(["eval", "--model", str(workdir / "model"), "--data", str(workdir / "heldout.txt"), *extra])
        assert rc == 2 and msg in capsys.readouterr().err, extra


def test_cli_out_must_be_a_directory_and_runtime_errors_are_reported(workdir, tmp_path, capsys, monkeypatch):
    """--out naming an existing file failed only at the save after training (FileExistsError
    traceback); OSError and FloatingPointError (divergence) reach the user as messages."""
    import lrqat_kernels.train as train_mod

    f = tmp_path / "a_file"
    f.write_text("x")
    for out, msg in ((f, "exists and is not a directory"), (f / "sub", "is not a directory")):
        rc = _train(workdir, out, "--steps", "200")
        assert rc == 2 and msg in capsys.readouterr().err, out
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "lrqat").write_text("x")
    assert _train(workdir, tmp_path / "o") == 2 and "lrqat exists and is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()

    for exc, code, msg in ((OSError(28, "No space left on device"), 1, "No space left on device"),
                           (FloatingPointError("loss is nan at step 3; lower the learning rates"), 1, "training diverged: loss is nan")):
        def boom(args, exc=exc):
            raise exc

        monkeypatch.setattr(train_mod, "run_train", boom)
        assert _train(workdir, tmp_path / "x") == code
        err = capsys.readouterr().err
        assert err.startswith("lrqat train: error: ") and msg in err


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in res["rows"]]
    assert methods[0] == "FP32" and any(m.startswith("RTN W3") for m in methods) and any("converted INT4" in m for m in methods)
    assert res["converted_equals_lrqat"] == {"W4": True, "W3": True, "W4A8KV4": True}
    assert set(res["fraction_recovered"]) == {"W4", "W3"}
    assert any(m.startswith("LR-QAT W4A8KV4") for m in methods) and set(res["weight_activation_vs_w4"]) == {"W4A8KV4"}
    assert {p["phi_format"] for p in res["phi_formats"]} == set(lrqat_kernels.BYTES_PER_WEIGHT)
    assert os.path.getsize(out / "demo.png") > 1000
    assert load_pretrained(str(out / "int4_model")).lrqat_stage == "quantized"


def test_python_dash_m_entry_point():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "lrqat_kernels", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "demo" in r.stdout


def test_model_dir_tokenizer_is_used(workdir, tmp_path):
    """A model directory with a HF tokenizer: it tokenises the data (the byte fallback is only a fallback)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "a", "of", "is", "to", "and", "in", "for", "be"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path / "model"
    shutil.copytree(workdir / "model", d)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(d))
    hf = load_tokenizer(str(d))
    assert not isinstance(hf, ByteTokenizer)
    ids = tokenize("the cat is in a hat", hf, vocab_size=256)
    assert ids.tolist() == [1, 0, 4, 7, 2, 0]
    out = tmp_path / "run"
    assert main(["train", "--model", str(d), "--data", str(workdir / "train.txt"), "--out", str(out), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--range-method", "minmax", "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["tokenizer"] != "byte"
    assert not isinstance(load_tokenizer(str(out / "lrqat")), ByteTokenizer)  # saved alongside the checkpoint


def test_train_weight_activation_flags(workdir, tmp_path):
    """`lrqat train --act-bits 8 --kv-bits 4`: the quantisers are in the trained and the converted model."""
    out = tmp_path / "wa"
    assert _train(workdir, out, "--act-bits", "8", "--kv-bits", "4", "--steps", "2", "--convert") == 0
    for stage in ("lrqat", "quantized"):
        m = load_pretrained(str(out / stage))
        assert m.lrqat_config.act_bits == 8 and m.lrqat_config.kv_bits == 4
        attn = m.model.layers[0].self_attn
        assert attn.o_proj.input_bits == 8 and attn.k_proj.output_bits == 4 and attn.q_proj.output_bits is None
        # q/k/v inputs are quantised once, by the norm feeding them (fuse_act_quant, the default)
        assert attn.q_proj.input_bits is None and m.model.layers[0].input_layernorm.output_bits == 8


def test_bf16_factors_train_through_fp32_master_weights(workdir, tmp_path):
    """bf16 LoRA factors stepped in bf16 lose every update under half an ulp (lora_A ~ 0.1 here: half
    an ulp is 2.4e-4 to 4.9e-4, an AdamW step at lr 1e-4 is <= ~1e-4); through fp32 masters every
    step counts and the bf16 factors take the masters' rounded values. A resumed run equals the
    uninterrupted one (the masters are in the checkpoint)."""
    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())

    def new_model():
        return prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", compute_dtype="bfloat16"))

    def run(model, master_weights=True, **kw):
        return fit(model, WindowSampler(ids, 16, seed=0), steps=10, batch_size=2, lr=1e-4, lr_scale=1e-5,
                   warmup_ratio=0.0, progress=False, master_weights=master_weights, **kw)

    def lora_a(model):
        return torch.cat([p.detach().float().flatten() for n, p in model.named_parameters() if n.endswith("lora_A")])

    a0 = lora_a(new_model())
    with_masters, without = new_model(), new_model()
    r = run(with_masters)
    run(without, master_weights=False)
    assert with_masters.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16
    moved = lambda m: (lora_a(m) != a0).float().mean().item()  # noqa: E731
    assert moved(without) < moved(with_masters), (moved(without), moved(with_masters))

    part = new_model()
    run(part, ckpt_dir=str(tmp_path), stop_after=6)
    state = torch.load(os.path.join(tmp_path, "trainer_state.pt"), weights_only=True)
    # masters: the bf16 trainable tensors in optimizer order (lora_A, lora_B of each layer; scales are fp32)
    names = [n for n, p in part.named_parameters() if p.requires_grad and p.dtype == torch.bfloat16]
    masters = state["optimizer"]["lrqat_masters"]
    assert len(masters) == len(names) and all(m.dtype == torch.float32 for m in masters)
    params = dict(part.named_parameters())
    a_masters = torch.cat([m.flatten() for n, m in zip(names, masters) if n.endswith("lora_A")])
    assert (a_masters != a0).float().mean().item() > 0.9  # every step counted in the masters
    for n, m in zip(names, masters):
        assert torch.equal(params[n].detach(), m.to(torch.bfloat16)), n  # the model holds their rounded values

    resumed = new_model()
    r2 = run(resumed, ckpt_dir=str(tmp_path), resume=True)
    assert [h["loss"] for h in r2["history"]] == [h["loss"] for h in r["history"]]
    for (n, p), (_, q) in zip(with_masters.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_build_optimizer_works_in_a_plain_loop_with_master_weights():
    """build_optimizer's fp32 copies of bf16 factors are stepped by a plain backward / step /
    zero_grad loop too (they were only fed by fit: lora_A never moved in a user's own loop)."""
    model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", compute_dtype="bfloat16"))
    opt = build_optimizer(model, 1e-2, 1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
    assert not torch.equal(layer.lora_A, a0) and not torch.equal(layer.lora_B, b0)
    masters = opt.lrqat_masters
    assert torch.equal(layer.lora_A.detach(), masters.master(layer.lora_A).to(torch.bfloat16))
    assert masters.master(layer.scale) is layer.scale  # fp32 tensors are their own masters


def test_master_adamw_closure_state_dict_and_hooks():
    """step(closure) pulled the gradients before running the closure (the factors never moved);
    opt.state_dict() lacked the fp32 copies (a resume from it rebuilt them from rounded bf16
    values); step hooks ran twice."""
    def new():
        torch.manual_seed(0)
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax", compute_dtype="bfloat16"))
        return model, build_optimizer(model, 1e-3, 1e-4)

    x = torch.randint(0, 256, (2, 16))
    model, opt = new()
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append(1))
    a0 = model.model.layers[0].self_attn.q_proj.lora_B.detach().clone()

    def closure_of(model, opt):
        def closure():
            opt.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss
        return closure

    closure = closure_of(model, opt)
    for _ in range(3):
        assert torch.isfinite(opt.step(closure))
    assert len(calls) == 3
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_B, a0)

    # resume from model + optimizer state dicts: the same next steps as continuing
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() holds references to the live AdamW state
    assert len(saved_opt["lrqat_masters"]) == len(opt.lrqat_masters.pairs)
    for _ in range(2):
        opt.step(closure)
    model2, opt2 = new()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)

    for _ in range(2):
        opt2.step(closure_of(model2, opt2))
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n


# ---- DistillationLoss ---------------------------------------------------------------------------

class _FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are a given [batch, seq, vocab] tensor (times a weight, so
    gradients flow to the student)."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = torch.nn.Parameter(z.clone())

    def forward(self, input_ids, use_cache=False):
        import types

        return types.SimpleNamespace(logits=self.z.expand(*input_ids.shape[:2], self.z.shape[-1]) if self.z.dim() == 1
                                     else self.z)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_equals_kl_div(temperature):
    """KD loss == T^2 * mean over tokens of KL(p_t || p_s), computed independently with F.kl_div."""
    from lrqat_kernels.train import DistillationLoss

    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    x = torch.zeros(2, 5, dtype=torch.long)
    got = DistillationLoss(_FixedLogits(zt), temperature=temperature)(_FixedLogits(zs), x)
    t = temperature
    ref = torch.nn.functional.kl_div(torch.log_softmax(zs.double() / t, -1), torch.log_softmax(zt.double() / t, -1),
                                     log_target=True, reduction="sum") / (2 * 5) * t * t
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_distillation_loss_teacher_neg_inf_logit():
    """A teacher logit of -inf (a masked / padded vocab entry) has p_t = 0 and adds 0 to the KL
    (0 * log 0 = 0): the loss is the finite KL over the other tokens, and so is its gradient."""
    from lrqat_kernels.train import DistillationLoss

    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(8, generator=g), torch.randn(8, generator=g)
    zt[-2:] = float("-inf")
    student = _FixedLogits(zs)
    loss = DistillationLoss(_FixedLogits(zt))(student, torch.zeros(1, 3, dtype=torch.long))
    pt = torch.softmax(zt.double(), -1)[:-2]
    ref = (pt * (torch.log(pt) - torch.log_softmax(zs.double(), -1)[:-2])).sum()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.z.grad).all()
