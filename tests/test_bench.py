"""The benchmark scripts' own arithmetic (bench/): baselines, ratios, byte counts, CSV merging.

Their timings are not tested (they need a GPU to mean anything); what they compute from the
timings is, since a GPU session has minutes to run them and no time to find a wrong column.
"""

import csv
import importlib.util
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


def _load(name):
    sys.path.insert(0, os.path.abspath(BENCH))  # the scripts import bench/_common.py
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(os.path.abspath(BENCH))


def test_lrqat_linear_bench_has_a_bf16_linear_baseline(tmp_path):
    bl = _load("bench_lrqat_linear")
    path = tmp_path / "l.csv"
    bl.main(["--shapes", "24x40,16x24", "--tokens", "3", "--providers", "linear,lrqat", "--modes", "fwd,fwd+bwd",
             "--reps", "2", "--warmup", "0", "--device", "cpu", "--csv", str(path)])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and all(r["median_ms"] for r in rows)
    base = {(r["out_features"], r["mode"]): float(r["median_ms"]) for r in rows if r["provider"] == "linear"}
    for r in rows:
        want = float(r["median_ms"]) / base[(r["out_features"], r["mode"])]
        assert float(r["vs_linear"]) == pytest.approx(want, rel=1e-9), r


@pytest.mark.parametrize("provider", ["linear", "lrqat"])
def test_lrqat_linear_bench_minimum_bytes(provider):
    """Inputs read once, outputs and gradients written once: counted by hand for both providers."""
    bl = _load("bench_lrqat_linear")

    class Args:
        dtype, bits, phi_format, rank, group_size, factor_dtype = "bf16", 4, "packed_int", 4, None, "auto"

    out, inn, t = 24, 40, 3
    lay, _ = bl.make_layer(out, inn, t, Args, torch.device("cpu"), provider)
    x, y, b = 2 * t * inn, 2 * t * out, 2 * out  # bf16
    if provider == "linear":
        params = trainable = 2 * out * inn + b
    else:
        lora = 2 * 4 * inn + 2 * out * 4
        params = out * inn // 2 + lora + 4 * out + b  # nibbles, bf16 factors, fp32 per-channel scale
        trainable = lora + 4 * out + b
    assert bl.min_bytes(lay, "fwd") == params + x + y
    assert bl.min_bytes(lay, "bwd") == params + x + y + x + trainable
    assert bl.min_bytes(lay, "fwd+bwd") == bl.min_bytes(lay, "fwd") + bl.min_bytes(lay, "bwd")


def test_int4_gemm_bench_csv_keeps_older_rows_and_columns(tmp_path):
    bi = _load("bench_int4_gemm")
    path = str(tmp_path / "g.csv")
    old = [{"device": "A", "M": "1", "us_p50": "3.0"}]
    bi.append_csv(path, [{"device": "B", "M": 2, "us_p50": 4.0, "auto_backend": "triton"}], old)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["device"] for r in rows] == ["A", "B"]
    assert rows[0]["auto_backend"] == "" and rows[1]["auto_backend"] == "triton"
    assert list(rows[0]) == ["device", "M", "us_p50", "auto_backend"]


# ---- the pytest-benchmark suite (bench/conftest.py, bench/test_*.py) ------------------------

SUITE_OPS = ("fake_quant_weight", "lrqat_linear", "merge_weight", "fake_quant_activation", "rms_norm_fake_quant",
             "swiglu_fake_quant", "int4_linear")


def _run_suite(*args, timeout=240):
    """``python -m pytest bench ...`` from the repository root, with TRITON_INTERPRET=1 in its
    environment: the suite must clear it (the interpreter is not a timing), or its CPU op cases skip."""
    import subprocess

    root = os.path.abspath(os.path.join(BENCH, ".."))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_suite_collects_every_op_on_both_devices():
    pytest.importorskip("pytest_benchmark")
    res = _run_suite("bench", "--collect-only")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    for op in SUITE_OPS:
        for device in ("cpu", "cuda"):
            assert any(f"test_{op}[{device}-" in i for i in ids), (op, device)
    for impl in ("reference", "linear", "fused_gemm", "lrqat-scalar", "lrqat-avx2", "lrqat-avx512", "lrqat-triton",
                 "torch_int4pack", "linear_bf16", "linear_fp32"):
        assert any(f"-{impl}]" in i or f"-{impl}-" in i for i in ids), impl


def test_bench_suite_runs_and_writes_its_schema(tmp_path):
    """One lrqat_linear fwd+bwd case untimed, then a timed group of two with --benchmark-json: the
    JSON carries the machine info and each case's ratio to the group's baseline."""
    pytest.importorskip("pytest_benchmark")
    res = _run_suite("bench/test_ops.py::test_lrqat_linear[cpu-qkvo-512x512-16-lrqat-fwd+bwd]",
                     "bench/test_int4.py::test_int4_linear[cpu-qkvo-4096x4096-1-torch_int4pack]", "--benchmark-disable")
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]

    path = tmp_path / "b.json"
    res = _run_suite("bench/test_ops.py", "-k", "test_merge_weight and cpu-qkvo", "--benchmark-only",
                     "--benchmark-min-rounds=2", "--benchmark-max-time=0", f"--benchmark-json={path}")
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    with open(path) as f:
        out = json.load(f)
    info = out["machine_info"]["lrqat"]
    assert {"cpu_model", "cpu_flags", "int4_cpu_isas", "torch", "triton", "torch_threads", "load_average_start",
            "load_average_end", "date"} <= set(info)
    assert info["torch_threads"] == 1 and info["shapes"] == "quick" and info["triton_interpret"] == ""
    cases = {b["extra_info"]["impl"]: b for b in out["benchmarks"]}
    assert set(cases) == {"lrqat", "reference"}
    assert len({b["group"] for b in cases.values()}) == 1
    ref, ours = cases["reference"], cases["lrqat"]
    assert ref["extra_info"]["vs_reference"] == 1.0
    assert ours["extra_info"]["vs_reference"] == pytest.approx(ours["stats"]["median"] / ref["stats"]["median"])
    assert ours["extra_info"]["device"] == "cpu" and ours["extra_info"]["runs"].startswith("eager CPU path")
    assert "data" not in ours["stats"] and ours["stats"]["rounds"] >= 2  # raw times only with --benchmark-save-data
