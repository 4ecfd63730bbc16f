"""LR-QAT training on several ranks (lrqat_kernels.distributed): CPU, gloo, 2 processes.

One launch of 2 ranks (this file run as a script: ``python tests/test_distributed.py SCENARIOS``,
each rank with torchrun's variables) runs every 2-rank scenario through ``lrqat_kernels.cli.main``
in turn: the processes start (torch, transformers: most of the time) once. The 1-rank references
and resumptions run in the pytest process. A rank that dies ends the launch (the last scenario).

Tolerance of "2 ranks equal 1 rank": the ranks' mean losses and their reduced gradients are the
1-rank ones summed in another order (two half-batch means and a gradient reduction instead of one
full-batch mean), so the curves differ by rounding: fp32 to rtol 1e-5 (seen: 2e-8 on the loss, 1e-7
on the gradient norm after 4 AdamW steps). bf16 factors: each rank's gradient is rounded to bf16
(2^-8 relative) before the fp32 reduction and the reduced one again after it, where one rank rounds
once: rtol 5e-3 (seen: 1e-5 on the loss, 8e-4 on the gradient norm).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

STEPS = 4
COMMON = ["--steps", str(STEPS), "--batch-size", "4", "--grad-accum", "2", "--seq-len", "16", "--rank", "4", "--lr", "1e-2",
          "--lr-scale", "1e-3", "--no-progress"]
TIMEOUT_S = 30  # the process group's timeout in the launch: a dead peer ends a collective after at most this


def _tiny_llama_dir(d):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(d / "model"))


def _train_argv(work, out, *extra):
    return ["train", "--model", str(work / "model"), "--data", str(work / "train.txt"), "--out", str(work / out), *COMMON,
            *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenarios(work):
    """The 2-rank runs, in order; ``die_at``: rank 1 exits (os._exit) after that many steps."""
    return [
        {"argv": _train_argv(work, "fsdp", "--distributed", "fsdp", "--convert")},
        {"argv": _train_argv(work, "ddp", "--distributed", "ddp")},
        {"argv": _train_argv(work, "fsdp_bf16", "--distributed", "fsdp", "--compute-dtype", "bfloat16", "--phi-format",
                             "packed_int")},
        {"argv": _train_argv(work, "resume22", "--distributed", "fsdp", "--stop-after", "2")},
        {"argv": _train_argv(work, "resume22", "--distributed", "fsdp", "--resume")},
        {"argv": _train_argv(work, "resume21_fsdp", "--distributed", "fsdp", "--stop-after", "2")},
        {"argv": _train_argv(work, "resume21_ddp", "--distributed", "ddp", "--stop-after", "2")},
        {"argv": _train_argv(work, "dies", "--distributed", "fsdp"), "die_at": 2},
    ]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """The 2-rank launch: ``(work dir, {rank: (exit status, stdout + stderr)}, seconds)``."""
    from pydoc_data.topics import topics

    work = tmp_path_factory.mktemp("dist")
    _tiny_llama_dir(work)
    keys = sorted(topics)
    (work / "train.txt").write_text("\n\n".join(topics[k] for k in keys[:6])[:12000])
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the eager CPU path
    env.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    procs = {}
    t0 = time.monotonic()
    for r in (0, 1):
        procs[r] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), json.dumps(_scenarios(work))],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    out = {}
    for r, p in procs.items():
        try:
            text, _ = p.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"the 2-rank launch hung (rank {r}): {p.communicate()[0][-3000:]}")
        out[r] = (p.returncode, text)
    return work, out, time.monotonic() - t0


def _history(path):
    with open(os.path.join(path, "results.json")) as f:
        return json.load(f)["history"]


def _one_rank(work, out, *extra):
    """``lrqat train`` in this process (no torchrun variables: one process)."""
    from lrqat_kernels.cli import main

    assert main(_train_argv(work, out, *extra)) == 0
    return _history(work / out)


@pytest.fixture
def one_process(monkeypatch, set_kernel_options):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    set_kernel_options(kernels=False)


def _assert_same_curve(two, one, rtol):
    assert [h["step"] for h in two] == [h["step"] for h in one] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr", "lr_scale"):
        a, b = torch.tensor([h[key] for h in two], dtype=torch.float64), torch.tensor([h[key] for h in one], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=rtol, atol=0, msg=lambda m: f"{key}: {m}")


def test_launch_ran_every_scenario(launch):
    work, out, seconds = launch
    code, text = out[0]
    statuses = [line.split()[2] for line in text.splitlines() if line.startswith("SCENARIO ")]
    assert statuses == ["0"] * 7 + ["1"], text[-4000:]  # the last: rank 1 died, rank 0 reports it
    assert code == 1, text[-4000:]


def test_two_ranks_follow_the_one_rank_loss_curve(launch, one_process):
    work, out, _ = launch
    one = _one_rank(work, "one")
    _assert_same_curve(_history(work / "fsdp"), one, rtol=1e-5)
    _assert_same_curve(_history(work / "ddp"), one, rtol=1e-5)
    assert _history(work / "fsdp")[-1]["loss"] < one[0]["loss"]  # it trained
    # Phi0: sharded by FSDP2 (half per rank; each layer's rows split in 2), whole on every DDP rank
    info = {m: json.load(open(work / m / "results.json"))["distributed"] for m in ("fsdp", "ddp")}
    assert info["fsdp"]["mode"] == "fsdp" and info["ddp"]["world_size"] == 2
    assert info["fsdp"]["phi_bytes_per_rank"] * 2 == info["ddp"]["phi_bytes_per_rank"] > 0


def test_fsdp_bf16_factors_fp32_masters_on_shards(launch, one_process):
    """bf16 factors (DTensor shards, fp32 masters per shard), fp32 scales (replicated), packed
    INT4 Phi0 (uint8, sharded as a frozen parameter)."""
    from lrqat_kernels.api import lrqat_layers
    from lrqat_kernels.checkpoint import load_pretrained

    work, out, _ = launch
    one = _one_rank(work, "one_bf16", "--compute-dtype", "bfloat16", "--phi-format", "packed_int")
    _assert_same_curve(_history(work / "fsdp_bf16"), one, rtol=5e-3)
    layers = lrqat_layers(load_pretrained(str(work / "fsdp_bf16" / "lrqat")))
    assert layers and all(m.lora_A.dtype == torch.bfloat16 and m.scale.dtype == torch.float32 for _, m in layers)


def test_convert_after_distributed_training_equals_converting_the_gathered_model(launch, one_process):
    from lrqat_kernels.api import convert
    from lrqat_kernels.checkpoint import load_pretrained
    from lrqat_kernels.modules import QuantizedLinear

    work, _, _ = launch
    mine = {n: m for n, m in load_pretrained(str(work / "fsdp" / "quantized")).named_modules() if isinstance(m, QuantizedLinear)}
    gathered = convert(load_pretrained(str(work / "fsdp" / "lrqat")))
    ref = {n: m for n, m in gathered.named_modules() if isinstance(m, QuantizedLinear)}
    assert sorted(mine) == sorted(ref) and len(mine) == 14
    for n in ref:
        assert torch.equal(mine[n].w_int, ref[n].w_int), n
        assert torch.equal(mine[n].scale, ref[n].scale), n


def test_resume_on_two_ranks_equals_uninterrupted(launch):
    work, _, _ = launch
    def curve(out):  # every number but the timing
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in _history(work / out)]

    assert curve("resume22") == curve("fsdp")  # same ranks, same summation order: exactly equal
    with open(work / "resume22" / "results.json") as f:
        assert json.load(f)["resumed_from"] == 2


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_resume_two_ranks_on_one_process(launch, one_process, mode):
    work, _, _ = launch
    d = work / f"resume21_{mode}"
    state = torch.load(d / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["format"] == "dcp" and state["world_size"] == 2 and state["step"] == 2
    resumed = _one_rank(work, f"resume21_{mode}", "--resume")
    _assert_same_curve(resumed, _history(work / mode), rtol=1e-5)
    assert [os.path.basename(p) for p in (d / "checkpoint").iterdir() if p.is_dir()] == ["dcp-step2"]


def test_a_dead_rank_ends_the_others_with_a_clear_error(launch):
    work, out, seconds = launch
    text = out[0][1]
    assert "lrqat train: error: rank 0 of 2: a collective failed" in text, text[-3000:]
    assert "another rank died" in text
    assert out[1][0] == 3  # rank 1's own exit
    assert not (work / "dies" / "results.json").exists()


def _env(monkeypatch, rank, world=2):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "3"], "batch_size=3 is not divisible by WORLD_SIZE=2"),
    (["--dist-backend", "nccl", "--device", "cpu"], "--dist-backend nccl is not available here"),
])
def test_bad_launch_is_a_one_line_error_on_every_rank_before_any_collective(tmp_path, monkeypatch, capsys, rank, flags,
                                                                             message):
    import torch.distributed as dist

    from lrqat_kernels.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "train.txt").write_text("x" * 100)
    _env(monkeypatch, rank)
    argv = ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.txt"), "--out", str(tmp_path / "o"),
            "--batch-size", "4", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lrqat train: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not dist.is_initialized()


def test_single_process_checkpoint_is_refused_on_ranks(launch, one_process, monkeypatch, capsys):
    """A checkpoint of one process holds whole tensors, not DCP shards: refused on every rank (here a
    1-rank FSDP2 group in this process), one line, the group closed."""
    import torch.distributed as dist

    from lrqat_kernels.cli import main

    work, _, _ = launch
    _one_rank(work, "single", "--stop-after", "2")
    capsys.readouterr()
    _env(monkeypatch, 0, world=1)
    assert main(_train_argv(work, "single", "--resume", "--distributed", "fsdp")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]  # HF bar
    assert len(err) == 1 and "a single-process checkpoint resumes in one process" in err[0], err
    assert not dist.is_initialized()


def test_launch_env_and_modes(monkeypatch):
    from lrqat_kernels.distributed import launch_env, setup

    assert launch_env({}) is None
    assert launch_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)
    for env, message in (({"WORLD_SIZE": "2", "RANK": "2"}, "RANK must be in"), ({"WORLD_SIZE": "x"}, "WORLD_SIZE must be")):
        with pytest.raises(ValueError, match=message):
            launch_env(env)
    assert setup("auto", "auto", "cpu", 4, 60, environ={}) is None  # no torchrun: one process
    assert setup("auto", "auto", "cpu", 4, 60, environ={"WORLD_SIZE": "1", "RANK": "0"}) is None
    with pytest.raises(ValueError, match="--distributed fsdp needs torchrun"):
        setup("fsdp", "auto", "cpu", 4, 60, environ={})
    with pytest.raises(ValueError, match="distributed must be one of"):
        setup("zero3", "auto", "cpu", 4, 60, environ={})
    with pytest.raises(ValueError, match="dist_timeout must be"):
        setup("auto", "auto", "cpu", 4, 0, environ={})


def test_rank_slices_make_the_one_rank_batch():
    from lrqat_kernels.data import WindowSampler

    s = WindowSampler(torch.arange(400), 8, seed=3)
    for start in (0, 4, 44):  # 44 crosses an epoch (50 windows)
        whole = s.batch(start, 8)
        assert torch.equal(torch.cat([s.batch(start, 8, r, 4) for r in range(4)]), whole)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by world_size=4"):
        s.batch(0, 6, 1, 4)
    with pytest.raises(ValueError, match="rank must be an int in"):
        s.batch(0, 8, 4, 4)


def test_fsdp_memory_accounting_quick(tmp_path, capsys, set_kernel_options):
    """bench/bench_memory.py --fsdp: what FSDP2 shards divides by N (Phi0 too), what it replicates does not."""
    import importlib.util

    set_kernel_options(kernels=False)  # the saved tensors of the eager path (the interpreter is slow)

    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(os.path.dirname(__file__), "..", "bench",
                                                                               "bench_memory.py"))
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    rows = bm.fsdp_main(["--quick", "--seq", "64", "--csv", str(tmp_path / "fsdp.csv")])
    key = {(r["model"], r["phi_format"], r["gpus"]): r for r in rows}
    for (model, fmt, n), r in key.items():
        one = key[(model, fmt, 1)]
        assert r["saved_linear_in_seq"]
        assert r["scales_bytes"] == one["scales_bytes"]  # replicated
        for part in ("phi", "factors", "norms"):  # sharded
            assert r[f"{part}_bytes"] == one[f"{part}_bytes"] // n
        assert (r["fsdp_buffers_bytes"] == 0) == (n == 1)
        assert 2 * key[(model, "packed_int", n)]["phi_bytes"] == key[(model, "fixed_point", n)]["phi_bytes"]
    assert key[("quick-b", "packed_int", 8)]["total_bytes"] < key[("quick-b", "packed_int", 1)]["total_bytes"]
    assert "TOTAL" in capsys.readouterr().out
    # 1 GPU: the same bytes as the single-GPU accounting (a prepared layer, measured at full length)
    single = bm.main(["--quick", "--seq", "64", "--csv", str(tmp_path / "single.csv")])
    quick_7b = {k: v for k, v in vars(bm.llama2_7b_config(64, True)).items() if k in ("hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
    mine = {r["phi_format"]: r for r in bm.fsdp_accounting("quick-7B-layout", quick_7b, 64, world_sizes=(1,))}
    for r in single:
        if r["lrqat_linear"] == "current" and r["layer_checkpointing"]:
            assert mine[r["phi_format"]]["total_bytes"] == r["total_bytes"], r["phi_format"]


def _worker(scenarios) -> int:
    """One rank of the launch: every scenario through ``cli.main`` in one process group."""
    import datetime

    import torch.distributed as dist

    import lrqat_kernels.train as train
    from lrqat_kernels.cli import main
    from lrqat_kernels.ops import _launch

    _launch.set_kernel_options(kernels=False)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    fit = train.fit
    code = 0
    for sc in scenarios:
        def dying_fit(*a, _die=sc.get("die_at"), **k):
            done = [0]

            def hook(seconds):
                done[0] += 1
                if rank == 1 and done[0] == _die:
                    os._exit(3)

            return fit(*a, **k, step_hook=hook if _die else None)

        train.fit = dying_fit
        code = main(sc["argv"])
        print(f"SCENARIO {sc['argv'][sc['argv'].index('--out') + 1]} {code}", flush=True)
        if code:
            break
    sys.stdout.flush()
    os._exit(code)  # no destroy_process_group: after a dead peer it could wait for it


if __name__ == "__main__":
    sys.exit(_worker(json.loads(sys.argv[1])))
