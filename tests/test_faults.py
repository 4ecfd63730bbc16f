"""SIGKILL fault injection (issue 22, item 2): a process running ``lrqat train``, ``save_pretrained``
or ``lrqat export`` is killed with SIGKILL (no handler runs, nothing is flushed) during a step, at
every write primitive of one checkpoint / one save / one export, in the middle of a tensor file, and
at random times. docs/RELIABILITY.md lists what each test tries.

Rule (lrqat_kernels._io): every file is written to a temporary sibling, fsynced and renamed over
its target; every directory is built beside its target and renamed into place. So after a kill at
any point the target is either the previous complete version or the new complete one, never a
half-written file that looks complete, and ``lrqat train --resume`` continues the run exactly.

"Deterministic, not timing luck": the processes are forked from one server process that has
imported torch, transformers and the package once (a fresh interpreter pays 5-10 s of imports per
case). A child wraps the write primitives (``os.replace``, ``os.rename``, ``os.fsync``,
``torch.save``, ``safetensors.torch.save_file``, ``tempfile.mkstemp`` / ``mkdtemp``,
``shutil.rmtree``) and sends itself SIGKILL on the N-th call (mode "before"), or after writing half
of the N-th tensor file (mode "partial"); a first run of each operation logs the calls, so N goes
over every call of the operation. The children run the CLI (``lrqat_kernels.cli.main``) as
``lrqat train`` / ``lrqat export`` do.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from export_models import tiny_llama as _tiny_llama

from lrqat_kernels import load_pretrained

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_SERVER = r'''
import io, json, os, signal, sys, time, traceback
os.environ.pop("TRITON_INTERPRET", None)  # the eager CPU path, as a user's CPU run
import torch
torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children stay safe
import shutil, tempfile
import safetensors.torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM  # resolve the lazy modules once
import lrqat_kernels, lrqat_kernels.cli, lrqat_kernels.train, lrqat_kernels.data, lrqat_kernels.export
from lrqat_kernels.cli import main

PRIMITIVES = [("os", "replace"), ("os", "rename"), ("os", "fsync"), ("torch", "save"), ("safetensors.torch", "save_file"),
              ("tempfile", "mkstemp"), ("tempfile", "mkdtemp"), ("shutil", "rmtree")]


def _describe(args):
    out = []
    for a in args[:2]:
        if isinstance(a, (str, os.PathLike)):
            out.append(os.path.basename(os.fspath(a)) or "/")
        elif hasattr(a, "name"):
            out.append(os.path.basename(str(a.name)))
    return ",".join(out)


def _where():
    """The package functions on the stack, innermost first (for the log)."""
    f, names = sys._getframe(2), []
    while f is not None:
        if "lrqat_kernels" in f.f_code.co_filename:
            names.append(f.f_code.co_name)
        f = f.f_back
    return ">".join(names[:6]) or "-"


def arm(fault, log_path):
    count = [0]
    log = open(log_path, "w", buffering=1) if log_path else None
    for modname, attr in PRIMITIVES:
        mod = sys.modules[modname]
        orig = getattr(mod, attr)

        def wrapper(*a, _orig=orig, _name=modname + "." + attr, **kw):
            count[0] += 1
            n = count[0]
            if log is not None:
                log.write(f"{n}\t{_name}\t{_describe(a)}\t{_where()}\n")
            if fault is not None and n == fault["at"]:
                if fault["mode"] == "partial" and _name == "torch.save":
                    buf = io.BytesIO()
                    _orig(a[0], buf)
                    data = buf.getvalue()
                    a[1].write(data[: len(data) // 2])
                    a[1].flush()
                elif fault["mode"] == "partial" and _name == "safetensors.torch.save_file":
                    r = _orig(*a, **kw)
                    path = a[1] if len(a) > 1 else kw["filename"]
                    os.truncate(path, os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return _orig(*a, **kw)

        setattr(mod, attr, wrapper)


def child(req):
    fd = os.open(req["output"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    nul = os.open(os.devnull, os.O_RDONLY)
    os.dup2(nul, 0)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    arm(req.get("fault"), req.get("log"))
    try:
        if "argv" in req:
            rc = main(req["argv"])
        else:
            exec(req["code"], {"__name__": "__child__"})
            rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req)
    if req.get("kill_after") is not None:
        deadline = t0 + req["kill_after"]
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    else:
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    print(json.dumps({"status": code, "seconds": time.monotonic() - t0}), flush=True)
'''


class Server:
    """Forks one child per request from a process that imported everything once."""

    def __init__(self, tmp):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
        self.tmp = tmp
        self.n = 0
        self.p = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, cwd=ROOT)
        assert self.p.stdout.readline().strip() == "ready", "fault server did not start"

    def run(self, *, argv=None, code=None, fault=None, log=False, kill_after=None):
        """Run one child; returns (exit status (-9 for SIGKILL), its output, the primitive-call log)."""
        self.n += 1
        output = str(self.tmp / f"child{self.n}.out")
        log_path = str(self.tmp / f"child{self.n}.log") if log else None
        req = {"output": output, "log": log_path, "fault": fault, "kill_after": kill_after}
        req.update({"argv": [str(a) for a in argv]} if argv is not None else {"code": code})
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "fault server died"
        res = json.loads(line)
        self.last_seconds = res["seconds"]
        with open(output, encoding="utf-8", errors="replace") as f:
            out = f.read()
        calls = []
        if log_path:
            with open(log_path, encoding="utf-8") as f:
                calls = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
        return res["status"], out, calls

    def close(self):
        self.p.stdin.close()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("faults")
    _tiny_llama().save_pretrained(str(d / "model"))
    keys = sorted(topics)
    (d / "train.txt").write_text("\n\n".join(topics[k] for k in keys[:6])[:12000])
    return d


TRAIN = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--rank", "4", "--lr", "1e-2", "--lr-scale", "1e-3",
         "--range-method", "minmax", "--no-progress", "--save-every", "1"]
STEPS = 6


def _train_argv(workdir, out, *extra):
    return ["train", "--model", workdir / "model", "--data", workdir / "train.txt", "--out", out, *TRAIN, *extra]


def _tree(d):
    """{relative path: bytes} of every file under ``d``."""
    out = {}
    for dirpath, _, files in os.walk(d):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def _killed(status, out, what):
    assert status == -9, f"{what}: the fault did not fire (exit status {status}):\n{out[-3000:]}"


def _leftovers_are_hidden_temporaries(parent, final_names):
    """Besides the final names, a killed write leaves only temporaries no reader takes for a result:
    ``.<name>.tmp-*`` (a file or a directory being built) and ``<name>.old-<pid>`` (the directory being
    replaced, renamed aside)."""
    for entry in os.listdir(parent):
        if entry in final_names:
            continue
        assert any(entry.startswith(f".{n}.tmp-") or entry.startswith(f"{n}.old-") for n in final_names), \
            f"{parent}: {entry!r} is neither a final name nor a temporary"


def _same_run(ref_dir, out_dir, resumed_from):
    a = json.loads((ref_dir / "results.json").read_text())
    b = json.loads((out_dir / "results.json").read_text())
    assert b["finished"] and b["resumed_from"] == resumed_from and len(a["history"]) == len(b["history"]) == STEPS
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert (ha["step"], ha["loss"], ha["lr"], ha["lr_scale"], ha["grad_norm"]) == \
            (hb["step"], hb["loss"], hb["lr"], hb["lr_scale"], hb["grad_norm"])
    ma, mb = load_pretrained(str(ref_dir / "lrqat")), load_pretrained(str(out_dir / "lrqat"))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(sb[k], v), k


def _checkpoint_step(out_dir):
    """The step the training checkpoint holds (None: no checkpoint), after checking it is whole
    (its recorded sha256, by load_trainer_state)."""
    from lrqat_kernels.checkpoint import load_trainer_state

    ck = out_dir / "checkpoint"
    if not (ck / "trainer_state.pt").exists():
        return None
    state = load_trainer_state(str(ck / "trainer_state.pt"))
    assert len(state["history"]) == state["step"]
    final = {e for e in os.listdir(ck) if not e.startswith(".")}
    _leftovers_are_hidden_temporaries(ck, final)
    return int(state["step"])


def _resume_and_compare(server, workdir, ref, out, expect_step):
    step = _checkpoint_step(out)
    assert step in expect_step, (step, expect_step)
    status, text, _ = server.run(argv=_train_argv(workdir, out, "--resume"))
    assert status == 0, text[-3000:]
    _same_run(ref, out, step)


@pytest.fixture(scope="module")
def reference(server, workdir):
    """The uninterrupted run (checkpoint every step) and the log of its write-primitive calls."""
    ref = workdir / "ref"
    status, out, calls = server.run(argv=_train_argv(workdir, ref), log=True)
    assert status == 0, out[-3000:]
    return ref, calls


def _checkpoint_blocks(calls):
    """The calls of the training checkpoints (steps 1 .. STEPS-1), one equal block per checkpoint:
    everything before the final save_pretrained."""
    first_save = next(i for i, c in enumerate(calls) if "save_pretrained" in c[3])
    n = first_save
    assert n % (STEPS - 1) == 0, f"checkpoint writes are not one block per step: {calls[:first_save]}"
    c = n // (STEPS - 1)
    blocks = [calls[i * c:(i + 1) * c] for i in range(STEPS - 1)]
    assert all([x[1] for x in b] == [x[1] for x in blocks[0]] for b in blocks), blocks
    return blocks


# ------------------------------------------------------------------------------ training checkpoints


def test_sigkill_at_every_write_of_a_checkpoint_resumes_exactly(server, workdir, reference, tmp_path):
    """SIGKILL at each write-primitive call of the step-3 checkpoint (and halfway through its tensor
    file): the checkpoint on disk is step 2's or step 3's, whole; --resume gives the uninterrupted run."""
    ref, calls = reference
    block = _checkpoint_blocks(calls)[2]  # the checkpoint after step 3; step 2's is on disk before it
    faults = [{"at": int(c[0]), "mode": "before"} for c in block]
    faults += [{"at": int(c[0]), "mode": "partial"} for c in block if c[1] in ("torch.save", "safetensors.torch.save_file")]
    assert len(faults) >= 5
    for i, fault in enumerate(faults):
        out = tmp_path / f"run{i}"
        status, text, _ = server.run(argv=_train_argv(workdir, out), fault=fault)
        _killed(status, text, fault)
        assert not (out / "results.json").exists() and not (out / "lrqat").exists()
        _resume_and_compare(server, workdir, ref, out, {2, 3})


_KILL_IN_STEP = r'''
import os, signal, sys, torch
import transformers.models.llama.modeling_llama as llama
WHERE, STEP = {where!r}, {step}
calls = [0]
def kill_at(n):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if WHERE == "forward":
    orig = llama.LlamaForCausalLM.forward
    def forward(self, *a, **k):
        kill_at(STEP)
        return orig(self, *a, **k)
    llama.LlamaForCausalLM.forward = forward
elif WHERE == "backward":
    orig_bw = torch.Tensor.backward
    def backward(self, *a, **k):
        kill_at(STEP)
        return orig_bw(self, *a, **k)
    torch.Tensor.backward = backward
elif WHERE == "clip":
    orig_clip = torch.nn.utils.clip_grad_norm_
    def clip(*a, **k):
        kill_at(STEP)
        return orig_clip(*a, **k)
    torch.nn.utils.clip_grad_norm_ = clip
elif WHERE == "optimizer_step":  # before the parameters change
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(lambda opt, a, k: kill_at(STEP))
elif WHERE == "after_optimizer_step":  # parameters changed, scheduler / history / checkpoint not yet
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda opt, a, k: kill_at(STEP))
from lrqat_kernels.cli import main
sys.exit(main({argv!r}))
'''


@pytest.mark.parametrize("where", ["forward", "backward", "clip", "optimizer_step", "after_optimizer_step"])
def test_sigkill_during_a_step_resumes_exactly(server, workdir, reference, tmp_path, where):
    """SIGKILL inside step 4 (its forward, backward, clipping, before and after the optimizer changes
    the parameters): the step-3 checkpoint loads and --resume gives the uninterrupted run."""
    ref, _ = reference
    out = tmp_path / "run"
    code = _KILL_IN_STEP.format(where=where, step=4, argv=[str(a) for a in _train_argv(workdir, out)])
    status, text, _ = server.run(code=code)
    _killed(status, text, where)
    _resume_and_compare(server, workdir, ref, out, {3})


def test_sigkill_at_random_times_resumes_exactly(server, workdir, reference, tmp_path):
    """SIGKILL at 8 seeded random times spread over a run's wall time (one in each eighth: set-up,
    steps, checkpoints, the final save): a checkpoint on disk is whole and --resume gives the
    uninterrupted run; without one, --resume is refused in one line (exit 2) and nothing looks
    finished. Until one kill has found a checkpoint on disk (the set-up's share of the time varies
    with the machine's load), up to 8 more land in the run's second half."""
    ref, _ = reference
    rng = random.Random(22)
    seen = []

    def wall_time(name):
        """The wall time of a whole run now (the machine's load changes it)."""
        status, text, _ = server.run(argv=_train_argv(workdir, tmp_path / name))
        assert status == 0, text[-3000:]
        return server.last_seconds

    def kill_at(i, delay):
        out = tmp_path / f"run{i}"
        status, text, _ = server.run(argv=_train_argv(workdir, out), kill_after=delay)
        if status == 0:  # finished before the kill
            _same_run(ref, out, None)
            return "finished"
        assert status == -9, text[-3000:]
        step = _checkpoint_step(out)
        if step is None:
            assert not (out / "results.json").exists()
            status, text, _ = server.run(argv=_train_argv(workdir, out, "--resume"))
            assert status == 2 and "no checkpoint" in text, text[-3000:]
            return "before the first checkpoint"
        _resume_and_compare(server, workdir, ref, out, set(range(1, STEPS)))
        return "after a checkpoint"

    for i in range(8):
        seen.append(kill_at(i, (i + rng.random()) / 8 * wall_time(f"time{i}")))
    for j in range(8):
        if "after a checkpoint" in seen:
            break
        seen.append(kill_at(8 + j, (0.5 + 0.5 * rng.random()) * wall_time(f"late{j}")))
    assert "after a checkpoint" in seen, seen


def test_sigkill_of_a_real_lrqat_train_process(workdir, reference, tmp_path):
    """A plain `python -m lrqat_kernels train` process (not forked from the server) killed as soon as
    its first checkpoint appears, at whatever point it has reached: --resume gives the uninterrupted run."""
    import time

    ref, _ = reference
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    argv = [sys.executable, "-m", "lrqat_kernels", *[str(a) for a in _train_argv(workdir, out)]]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint" / "trainer_state.pt").exists():
            assert p.poll() is None, p.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.002)
        p.kill()
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if p.returncode == 0:  # finished in the meantime: still the same run
        _same_run(ref, out, None)
        return
    assert p.returncode == -9
    status = _checkpoint_step(out)
    assert status is not None
    env_resume = dict(env)
    r = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env_resume, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(ref, out, status)


# ------------------------------------------------------------------ save_pretrained over a checkpoint

_SAVE = r'''
from lrqat_kernels import load_pretrained, save_pretrained
model = load_pretrained({src!r})
save_pretrained(model, {dst!r})
'''


@pytest.fixture(scope="module")
def two_checkpoints(server, workdir, reference, tmp_path_factory):
    """Two different LR-QAT checkpoints: the reference run's and one of a 3-step run."""
    d = tmp_path_factory.mktemp("two")
    ref, _ = reference
    status, text, _ = server.run(argv=_train_argv(workdir, d / "short", "--steps", "3"))
    assert status == 0, text[-3000:]
    return ref / "lrqat", d / "short" / "lrqat"


def test_sigkill_at_every_write_of_save_pretrained_over_a_checkpoint(server, two_checkpoints, tmp_path):
    """save_pretrained of checkpoint B over checkpoint A killed at each of its write-primitive calls
    (and halfway through the tensor file): the directory holds A or B byte for byte and loads; what
    else is left is a hidden temporary that load_pretrained refuses or a complete copy of B."""
    old, new = two_checkpoints
    status, text, _ = server.run(code=_SAVE.format(src=str(new), dst=str(tmp_path / "new_ref")))
    assert status == 0, text[-3000:]
    new_tree, old_tree = _tree(tmp_path / "new_ref"), _tree(old)
    assert new_tree != old_tree
    target = tmp_path / "probe"
    shutil.copytree(old, target)
    status, text, calls = server.run(code=_SAVE.format(src=str(new), dst=str(target)), log=True)
    assert status == 0 and _tree(target) == new_tree, text[-3000:]
    faults = [{"at": int(c[0]), "mode": "before"} for c in calls]
    faults += [{"at": int(c[0]), "mode": "partial"} for c in calls if c[1] == "safetensors.torch.save_file"]
    outcomes = []
    for i, fault in enumerate(faults):
        parent = tmp_path / f"k{i}"
        target = parent / "ck"
        shutil.copytree(old, target)
        status, text, _ = server.run(code=_SAVE.format(src=str(new), dst=str(target)), fault=fault)
        _killed(status, text, fault)
        assert target.is_dir(), f"{fault}: the checkpoint directory is gone: {sorted(os.listdir(parent))}"
        tree = _tree(target)
        assert tree in (old_tree, new_tree), f"{fault}: neither the old nor the new checkpoint"
        outcomes.append("old" if tree == old_tree else "new")
        load_pretrained(str(target))
        _leftovers_are_hidden_temporaries(parent, {"ck"})
        for entry in os.listdir(parent):
            if entry != "ck" and (parent / entry).is_dir() and _tree(parent / entry) not in (old_tree, new_tree):
                with pytest.raises(ValueError):
                    load_pretrained(str(parent / entry))
    assert "old" in outcomes and "new" in outcomes, outcomes


# ----------------------------------------------------------------------------------------- export


def test_sigkill_at_every_write_of_an_export(server, two_checkpoints, tmp_path):
    """`lrqat export --format compressed-tensors` killed at each of its write-primitive calls (and
    halfway through the tensor file), into a new --out and with --overwrite over an older export:
    --out is absent (new) or the old export, or the complete new one byte for byte; leftovers are
    hidden temporaries; an export into the same --out then runs to the end."""
    old_ck, new_ck = two_checkpoints

    def export(src, out, *extra, **kw):
        return server.run(argv=["export", "--model", src, "--format", "compressed-tensors", "--out", out, *extra], **kw)

    status, text, calls = export(new_ck, tmp_path / "new_ref", log=True)
    assert status == 0, text[-3000:]
    status, text, _ = export(old_ck, tmp_path / "old_ref")
    assert status == 0, text[-3000:]
    new_tree, old_tree = _tree(tmp_path / "new_ref"), _tree(tmp_path / "old_ref")
    assert new_tree != old_tree
    faults = [{"at": int(c[0]), "mode": "before"} for c in calls]
    faults += [{"at": int(c[0]), "mode": "partial"} for c in calls if c[1] == "safetensors.torch.save_file"]
    for overwrite in (False, True):
        for i, fault in enumerate(faults):
            parent = tmp_path / f"{'over' if overwrite else 'new'}{i}"
            out = parent / "ct"
            parent.mkdir()
            if overwrite:
                shutil.copytree(tmp_path / "old_ref", out)
            status, text, _ = export(new_ck, out, *(["--overwrite"] if overwrite else []), fault=fault)
            _killed(status, text, fault)
            allowed = [old_tree, new_tree] if overwrite else [new_tree]
            if overwrite:
                assert out.is_dir(), f"{fault}: --overwrite killed: the old export is gone: {sorted(os.listdir(parent))}"
            if out.exists():
                assert _tree(out) in allowed, f"{fault}: a half-written export at --out"
            _leftovers_are_hidden_temporaries(parent, {"ct"})
            if not overwrite:  # the leftovers do not get in the way of the next export
                status, text, _ = export(new_ck, out, "--overwrite")
                assert status == 0 and _tree(out) == new_tree, text[-3000:]
