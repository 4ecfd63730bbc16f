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
