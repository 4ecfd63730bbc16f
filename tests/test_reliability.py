"""Faults users meet (issue 22): damaged checkpoints, missing optional packages, interrupted
training, CLI defaults and refusals. docs/RELIABILITY.md lists what each test tries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import lrqat_kernels
from lrqat_kernels import LRQATConfig, load_pretrained, prepare, save_pretrained
from lrqat_kernels.cli import main
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
    """A tiny HF model dir (no tokenizer), an LR-QAT checkpoint of it (lora_B moved off zero) and text."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("rel")
    _tiny_llama().save_pretrained(str(d / "model"))
    model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    save_pretrained(model, str(d / "lrqat"))
    keys = sorted(topics)
    (d / "train.txt").write_text("\n\n".join(topics[k] for k in keys[:6])[:12000])
    (d / "heldout.txt").write_text(topics[keys[20]][:4000])
    return d


TRAIN = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--lr-scale", "1e-3",
         "--range-method", "minmax", "--no-progress"]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line_error(capsys, prefix):
    err = capsys.readouterr().err
    # transformers' own progress bars (loading an FP --model, saving one) are not ours
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not x.startswith(("Loading weights", "Writing model shards"))]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


# ------------------------------------------------------------------------------------- checksums (item 6)
#
# Rule: save_pretrained records the sha256 of the weights, config.json, generation_config.json and of
# lrqat_config.json's own content; load_pretrained checks them, so a damaged checkpoint is a one-line
# ValueError naming the file, never a wrong model (lrqat eval / convert: one line, exit status 2).


def _flip(path, pos, bit=0x01):
    b = bytearray(path.read_bytes())
    b[pos] ^= bit
    path.write_bytes(bytes(b))


def test_checksum_truncated_or_bit_flipped_weights_are_refused(workdir, tmp_path):
    good = workdir / "lrqat"
    d = _copy(good, tmp_path / "ck")
    w = d / "lrqat_model.safetensors"
    original = w.read_bytes()
    n_header = int.from_bytes(original[:8], "little")
    data_start = 8 + n_header
    # a flip in the middle of the tensor data: safetensors itself loads it without a word
    from safetensors.torch import load_file

    _flip(w, data_start + (len(original) - data_start) // 2)
    assert len(load_file(str(w))) > 0
    cases = 0
    for pos in [data_start + (len(original) - data_start) // 2] + [round(i * (len(original) - 1) / 47) for i in range(48)]:
        w.write_bytes(original)
        _flip(w, pos)
        with pytest.raises(ValueError) as e:
            load_pretrained(str(d))
        assert str(w) in str(e.value) and "\n" not in str(e.value), (pos, e.value)
        cases += 1
    for size in (0, 7, 8, data_start - 1, data_start, (len(original) + data_start) // 2, len(original) - 1):
        w.write_bytes(original[:size])
        with pytest.raises(ValueError, match="truncated or damaged") as e:
            load_pretrained(str(d))
        assert str(w) in str(e.value) and "\n" not in str(e.value), size
        cases += 1
    w.write_bytes(original + b"\0")  # appended bytes too
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_pretrained(str(d))
    w.write_bytes(original)
    ref, back = load_pretrained(str(good)), load_pretrained(str(d))
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert cases == 56


def test_checksum_damaged_json_is_refused_at_every_byte(workdir, tmp_path):
    """Every single-bit flip (bit 0) of lrqat_config.json, and of config.json at sampled positions,
    is refused naming the file; a parseable edit (alpha 1.0 -> 2.0) loaded a wrong model before."""
    d = _copy(workdir / "lrqat", tmp_path / "ck")
    meta_path = d / "lrqat_config.json"
    original = meta_path.read_bytes()
    meta = json.loads(original)
    assert set(meta["sha256"]) == {"lrqat_model.safetensors", "config.json", "generation_config.json", "lrqat_config.json"}
    fd = os.open(meta_path, os.O_RDWR)  # flip in place (rewriting the file 9000 times is the slow part)
    try:
        for pos in range(len(original)):
            os.pwrite(fd, bytes([original[pos] ^ 0x01]), pos)
            with pytest.raises(ValueError) as e:
                load_pretrained(str(d))
            os.pwrite(fd, original[pos:pos + 1], pos)
            msg = str(e.value)
            assert str(meta_path) in msg and "\n" not in msg, (pos, original[max(0, pos - 20):pos + 20], msg)
    finally:
        os.close(fd)
    assert meta_path.read_bytes() == original
    edited = dict(meta, lrqat_config=dict(meta["lrqat_config"], alpha=2.0))
    meta_path.write_text(json.dumps(edited, indent=2, sort_keys=True))
    with pytest.raises(ValueError, match="damaged or edited after saving"):
        load_pretrained(str(d))
    lost = {k: v for k, v in meta.items() if k != "sha256"}  # the record itself lost: the weights header knows
    meta_path.write_text(json.dumps(lost))
    with pytest.raises(ValueError, match="record is missing"):
        load_pretrained(str(d))
    meta_path.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(str(d))
    meta_path.write_bytes(original)
    cfg = d / "config.json"
    cfg_original = cfg.read_bytes()
    for i in range(16):
        cfg.write_bytes(cfg_original)
        _flip(cfg, round(i * (len(cfg_original) - 1) / 15))
        with pytest.raises(ValueError) as e:
            load_pretrained(str(d))
        assert str(cfg) in str(e.value) and "\n" not in str(e.value)
    cfg.write_bytes(cfg_original)
    assert load_pretrained(str(d)).lrqat_stage == "lrqat"


def test_checksum_checkpoint_without_the_record_still_loads(workdir, tmp_path):
    """Checkpoints saved before the record (no "sha256", no digest in the weights header) load unchecked."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    d = _copy(workdir / "lrqat", tmp_path / "old")
    meta = json.loads((d / "lrqat_config.json").read_text())
    del meta["sha256"]
    (d / "lrqat_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    w = str(d / "lrqat_model.safetensors")
    with safe_open(w, framework="pt") as f:
        header = f.metadata()
    assert "lrqat_config_sha256" in header
    save_file(load_file(w), w, metadata={"format": "pt", "stage": header["stage"]})
    ref, back = load_pretrained(str(workdir / "lrqat")), load_pretrained(str(d))
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_checksum_cli_eval_and_convert_print_one_line_and_exit_2(workdir, tmp_path, capsys):
    d = _copy(workdir / "lrqat", tmp_path / "ck")
    w = d / "lrqat_model.safetensors"
    size = w.stat().st_size
    _flip(w, size - size // 3)
    data = str(workdir / "heldout.txt")
    assert main(["eval", "--model", str(d), "--data", data, "--seq-len", "32"]) == 2
    line = _one_line_error(capsys, "lrqat eval: error: corrupt checkpoint: ")
    assert str(w) in line
    assert main(["convert", "--model", str(d), "--out", str(tmp_path / "int4")]) == 2
    assert str(w) in _one_line_error(capsys, "lrqat convert: error: corrupt checkpoint: ")
    assert not (tmp_path / "int4").exists()
    d2 = _copy(workdir / "lrqat", tmp_path / "ck2")
    m = d2 / "lrqat_config.json"
    m.write_text(m.read_text().replace('"rank": 4', '"rank": 5'))
    assert main(["convert", "--model", str(d2), "--out", str(tmp_path / "int4")]) == 2
    assert str(m) in _one_line_error(capsys, "lrqat convert: error: corrupt checkpoint: ")
    assert main(["eval", "--model", str(d2), "--data", data, "--seq-len", "32"]) == 2
    assert str(m) in _one_line_error(capsys, "lrqat eval: error: corrupt checkpoint: ")


# ------------------------------------------------------------------------------ lrqat eval --seq-len (item 2)
#
# Rule: without --seq-len, lrqat eval uses min(256, the model's max_position_embeddings); an explicit
# value the model cannot take stays an error.


def test_eval_default_seq_len_fits_the_model(workdir, tmp_path, capsys):
    short = tmp_path / "short"
    _tiny_llama(max_pos=32).save_pretrained(str(short))
    data = str(workdir / "heldout.txt")
    assert main(["eval", "--model", str(short), "--data", data]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["window"] == 32
    long = tmp_path / "long"
    _tiny_llama(max_pos=512).save_pretrained(str(long))
    assert main(["eval", "--model", str(long), "--data", data, "--max-windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["window"] == 256
    assert main(["eval", "--model", str(short), "--data", data, "--seq-len", "33"]) == 2
    assert "seq_len=33 exceeds the model's max_position_embeddings=32" in _one_line_error(capsys, "lrqat eval: error: ")


# --------------------------------------------------------------------------- lrqat convert --out (item 3)
#
# Rule: lrqat convert refuses an existing --out unless --overwrite (as lrqat export); lrqat train --out
# is a run directory with its own rules (train._check_out_dir: it may exist, --resume reads it).


def test_convert_refuses_an_existing_out_unless_overwrite(workdir, tmp_path, capsys):
    out = tmp_path / "int4"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["convert", "--model", str(workdir / "lrqat"), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in _one_line_error(capsys, "lrqat convert: error: ")
    assert os.listdir(out) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "--model", str(workdir / "lrqat"), "--out", str(empty)]) == 2
    capsys.readouterr()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["convert", "--model", str(workdir / "lrqat"), "--out", str(a_file), "--overwrite"]) == 2
    assert "not a directory" in _one_line_error(capsys, "lrqat convert: error: ")
    assert main(["convert", "--model", str(workdir / "lrqat"), "--out", str(out), "--overwrite"]) == 0
    assert "notes.txt" not in os.listdir(out) and load_pretrained(str(out)).lrqat_stage == "quantized"
    fresh = tmp_path / "new" / "int4"
    assert main(["convert", "--model", str(workdir / "lrqat"), "--out", str(fresh)]) == 0
    assert load_pretrained(str(fresh)).lrqat_stage == "quantized"


def test_train_out_may_exist_as_before(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--model", str(workdir / "model"), "--data", str(workdir / "train.txt"), "--out", str(out),
                 *TRAIN[2:], "--steps", "2"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.json").is_file() and (out / "lrqat").is_dir()


# ----------------------------------------------------------------------- byte-level fallback (item 4)
#
# Rule: lrqat eval / train refuse the byte-level fallback (no tokenizer files in --model) for a model
# with vocab_size > 256 unless --byte-tokens; an explicit byte tokenizer (lrqat_tokenizer.json) is used.


def test_byte_fallback_on_a_large_vocab_is_refused_unless_byte_tokens(workdir, tmp_path, capsys):
    from lrqat_kernels.data import ByteTokenizer

    big = tmp_path / "big"
    _tiny_llama(vocab=300).save_pretrained(str(big))
    data = str(workdir / "heldout.txt")
    assert main(["eval", "--model", str(big), "--data", data, "--seq-len", "32"]) == 2
    line = _one_line_error(capsys, "lrqat eval: error: ")
    assert "vocab_size=300 > 256" in line and "--byte-tokens" in line
    assert main(["eval", "--model", str(big), "--data", data, "--seq-len", "32", "--byte-tokens"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokenizer"] == "byte"
    out = tmp_path / "run"
    assert main(["train", "--model", str(big), "--data", str(workdir / "train.txt"), "--out", str(out), *TRAIN]) == 2
    assert "vocab_size=300 > 256" in _one_line_error(capsys, "lrqat train: error: ")
    assert not (out / "checkpoint").exists() and not (out / "results.json").exists()
    # a checkpoint that carries the byte tokenizer explicitly (lrqat_tokenizer.json) is not a fallback
    ck = save_pretrained(prepare(_tiny_llama(vocab=300), LRQATConfig(rank=4, range_method="minmax")), str(tmp_path / "ck"),
                         tokenizer=ByteTokenizer())
    assert main(["eval", "--model", ck, "--data", data, "--seq-len", "32"]) == 0
    # vocab 256 (the byte vocabulary): the fallback is what it is for
    assert main(["eval", "--model", str(workdir / "model"), "--data", data, "--seq-len", "32"]) == 0


# ------------------------------------------------------------------ missing optional packages (item 1)
#
# Rule: a missing optional package never costs the work. The demo skips demo.png with a one-line note
# (demo._can_plot, checked before training), progress bars go without tqdm (train.progress_bar), and a
# CLI command that needs a missing package (transformers, ...) stops with one line saying what to
# install, exit status 1 (cli._OPTIONAL_PACKAGES). Test-only packages (hypothesis) are never imported
# by the package.


def _block(monkeypatch, name):
    """Make ``import name`` (and its submodules) raise ModuleNotFoundError for this test."""
    for m in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, name, None)


def test_demo_without_matplotlib_skips_the_plot(tmp_path, monkeypatch, capsys):
    from lrqat_kernels.demo import run_demo

    _block(monkeypatch, "matplotlib")
    out = tmp_path / "demo"
    res = run_demo(str(out), quick=True, progress=False, threads=1,
                   overrides={"fp_steps": 2, "qat_steps": {4: 1, 3: 1}, "wa_presets": (), "eval_windows": 2})
    assert res["rows"] and json.loads((out / "results.json").read_text())["rows"]
    assert (out / "int4_model").is_dir() and not (out / "demo.png").exists()
    notes = [x for x in capsys.readouterr().err.splitlines() if "matplotlib" in x]
    assert len(notes) == 1 and notes[0].startswith("[demo] note: no demo.png") and "pip install matplotlib" in notes[0]


def test_training_without_tqdm_runs_without_progress_bars(workdir, monkeypatch, capsys):
    import lrqat_kernels.train as train_mod
    from lrqat_kernels.data import ByteTokenizer, WindowSampler, read_text, tokenize
    from lrqat_kernels.train import fit

    monkeypatch.setattr(train_mod, "_NO_TQDM_NOTED", False, raising=False)
    _block(monkeypatch, "tqdm")
    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())
    for _ in range(2):
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax"))
        res = fit(model, WindowSampler(ids, 16, seed=0), steps=2, batch_size=2, lr=1e-2, lr_scale=1e-3, progress=True)
        assert res["finished"]
    notes = [x for x in capsys.readouterr().err.splitlines() if "tqdm" in x]
    assert notes == ["lrqat: note: tqdm is not installed, so no progress bars (pip install tqdm)"]  # once


def test_cli_missing_optional_package_is_one_line_saying_what_to_install(workdir, tmp_path, monkeypatch, capsys):
    _block(monkeypatch, "transformers")
    data = str(workdir / "heldout.txt")
    for argv in (["eval", "--model", str(workdir / "model"), "--data", data, "--seq-len", "32"],
                 ["train", "--model", str(workdir / "model"), "--data", str(workdir / "train.txt"), "--out", str(tmp_path / "r"), *TRAIN],
                 ["convert", "--model", str(workdir / "lrqat"), "--out", str(tmp_path / "int4")],
                 ["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress", "--no-plot"]):
        assert main(argv) == 1, argv
        line = _one_line_error(capsys, f"lrqat {argv[0]}: error: this needs the package transformers, which is not installed")
        assert line.endswith("pip install transformers (the [hf] extra)")
    assert not (tmp_path / "r" / "results.json").exists() and not (tmp_path / "int4").exists()
    # a module of the package itself (or of any package not on the list) missing is a bug: its traceback stays
    import lrqat_kernels.train as train_mod

    def broken(args):
        raise ModuleNotFoundError("No module named 'lrqat_kernels.nope'", name="lrqat_kernels.nope")

    monkeypatch.setattr(train_mod, "run_train", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["train", "--model", str(workdir / "model"), "--data", data, "--out", str(tmp_path / "r"), *TRAIN])


def test_package_imports_without_optional_packages():
    """`import lrqat_kernels` and the CLI's modules need none of the optional packages; the package never
    imports a test-only one (hypothesis, pytest)."""
    import ast

    blocked = ["transformers", "matplotlib", "tqdm", "numpy", "gguf", "compressed_tensors", "llama_cpp", "hypothesis", "pytest"]
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "import lrqat_kernels, lrqat_kernels.cli, lrqat_kernels.api, lrqat_kernels.train, lrqat_kernels.data\n"
            "import lrqat_kernels.demo, lrqat_kernels.export\n"
            "from lrqat_kernels.cli import build_parser\n"
            "build_parser()\n"
            "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the Triton interpreter (tests' conftest) imports numpy; a user's run does not
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    for dirpath, _, files in os.walk(os.path.join(ROOT, "lrqat_kernels")):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read())
                for node in ast.walk(tree):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
                    assert not any(n.split(".")[0] in ("hypothesis", "pytest") for n in names), (f, names)


# ------------------------------------------------------------- SIGTERM / SIGINT during training (item 5)
#
# Rule: with a checkpoint directory (lrqat train: always <out>/checkpoint), SIGINT and SIGTERM during
# train.fit save the last finished step and raise TrainingInterrupted; lrqat train prints one line and
# exits 128 + signal (130 / 143), and --resume then continues exactly: the loss history and the trained
# tensors equal the uninterrupted run's. A signal while gradients are computed leaves that step
# unapplied at once; one while a step is applied or saved waits for it.

_SLOW_TRAIN = """
import sys, time
import lrqat_kernels.train as t
_loss, calls = t._lm_loss, [0]
def loss(model, x):  # announces each forward, then leaves the parent time to signal mid-step
    calls[0] += 1
    print("FORWARD", calls[0], flush=True)
    time.sleep(0.3)
    return _loss(model, x)
t._lm_loss = loss
from lrqat_kernels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_argv(workdir, out, *extra):
    return ["train", "--model", str(workdir / "model"), "--data", str(workdir / "train.txt"), "--out", str(out), *TRAIN, *extra]


def _same_run(a_dir, b_dir):
    a = json.loads((a_dir / "results.json").read_text())
    b = json.loads((b_dir / "results.json").read_text())
    assert b["finished"] and len(a["history"]) == len(b["history"]) == 6
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert (ha["step"], ha["loss"], ha["lr"], ha["lr_scale"], ha["grad_norm"]) == \
            (hb["step"], hb["loss"], hb["lr"], hb["lr_scale"], hb["grad_norm"])
    ma, mb = load_pretrained(str(a_dir / "lrqat")), load_pretrained(str(b_dir / "lrqat"))
    for k, v in ma.state_dict().items():
        assert torch.equal(mb.state_dict()[k], v), k
    return b


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    with pytest.MonkeyPatch.context() as mp:  # the eager CPU path: module fixtures run before _eager_cpu_path
        if hasattr(getattr(lrqat_kernels, "functions", None), "_interpreting"):
            mp.setattr(lrqat_kernels.functions, "_interpreting", lambda: False)
        assert main(_train_argv(workdir, out)) == 0
    return out


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_during_train_save_the_last_step_and_resume_exactly(workdir, uninterrupted, tmp_path, sig, status):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the eager CPU path, as in this process (_eager_cpu_path)
    p = subprocess.Popen([sys.executable, "-c", _SLOW_TRAIN, *_train_argv(workdir, out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        for line in p.stdout:  # the second forward: step 1 is done (and logged)
            if line.split() == ["FORWARD", "2"]:
                break
            assert time.monotonic() < deadline, "no second forward"
        p.send_signal(sig)
        _, err = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not x.startswith(("Loading weights",))]
    assert p.returncode == status, err[-3000:]
    name = signal.Signals(sig).name
    assert lines and lines[-1].startswith(f"lrqat train: interrupted by {name} after step "), err[-3000:]
    assert "Traceback" not in err
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 1 and f"after step 1 of 6; {out / 'checkpoint'} holds it" in lines[-1]
    assert not (out / "results.json").exists() and not (out / "lrqat").exists()
    assert main(_train_argv(workdir, out, "--resume")) == 0
    assert _same_run(uninterrupted, out)["resumed_from"] == 1


def test_signal_while_a_step_is_applied_waits_for_it(workdir, tmp_path):
    """In process: SIGTERM sent from the step hook (a step being applied) is taken after that step, and
    SIGINT sent inside a forward leaves that step unapplied; each resume equals the uninterrupted fit."""
    from lrqat_kernels.data import ByteTokenizer, WindowSampler, read_text, tokenize
    from lrqat_kernels.train import TrainingInterrupted, _lm_loss, fit

    ids = tokenize(read_text(str(workdir / "train.txt")), ByteTokenizer())

    def run(ckpt=None, **kw):
        model = prepare(_tiny_llama(), LRQATConfig(rank=4, range_method="minmax"))
        res = fit(model, WindowSampler(ids, 16, seed=0), steps=5, batch_size=2, lr=1e-2, lr_scale=1e-3, progress=False,
                  ckpt_dir=ckpt, **kw)
        return model, res

    def same(a, b):
        (ma, ra), (mb, rb) = a, b
        assert [(h["step"], h["loss"], h["grad_norm"]) for h in ra["history"]] == \
            [(h["step"], h["loss"], h["grad_norm"]) for h in rb["history"]]
        for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
            assert torch.equal(p, q), n

    def kill_self(s):
        assert signal.getsignal(s) not in (signal.SIG_DFL, signal.default_int_handler), "fit installed no handler"
        os.kill(os.getpid(), s)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    seen = []
    full = run(step_hook=lambda dt: seen.append(signal.getsignal(signal.SIGTERM)))
    assert set(seen) == {before[0]}  # no checkpoint directory: signals act as usual
    ckpt = str(tmp_path / "a")
    count = [0]

    def hook(dt):
        count[0] += 1
        if count[0] == 2:
            kill_self(signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as e:
        run(ckpt, step_hook=hook)
    assert (e.value.signum, e.value.step, e.value.exit_status) == (signal.SIGTERM, 2, 143)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    same(full, run(ckpt, resume=True))

    ckpt = str(tmp_path / "b")
    calls = [0]

    def loss(model, x):
        calls[0] += 1
        if calls[0] == 4:  # inside step 4's forward
            kill_self(signal.SIGINT)
        return _lm_loss(model, x)

    with pytest.raises(TrainingInterrupted) as e:
        run(ckpt, loss_fn=loss)
    assert (e.value.signum, e.value.step, e.value.exit_status) == (signal.SIGINT, 3, 130)
    assert isinstance(e.value, KeyboardInterrupt)
    same(full, run(ckpt, resume=True))


def test_ctrl_c_outside_training_is_one_line_and_130(workdir, tmp_path, monkeypatch, capsys):
    """Ctrl-C in a command's set-up (no training state to save yet): one line, exit 130, no traceback."""
    import lrqat_kernels.train as train_mod

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "run_train", interrupted)
    assert main(_train_argv(workdir, tmp_path / "r")) == 130
    assert _one_line_error(capsys, "lrqat train: interrupted") == "lrqat train: interrupted"
