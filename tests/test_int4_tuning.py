"""The W4A16 tuner and its tables (bench/_int4_tuning.py, bench/tune_int4_gemm.py).

No GPU needed: the tuner runs end to end on the CPU under the Triton interpreter (timings
meaningless). The package reads no table (issue 18): these tests hold the tuner and the table
schema a future loader will read.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from lrqat_kernels.ops.int4_triton import int4_triton_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
try:
    import _int4_tuning as T
finally:
    sys.path.pop(0)
NAME = "Fake GPU 80GB HBM3"


def cfg(bm=16, bn=64, bk=128, split=4, warps=4, stages=4) -> dict:
    return dict(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps, num_stages=stages)


def entry(N, K, M, backend="triton", **c) -> dict:
    return dict(N=N, K=K, M=M, backend=backend, config=cfg(**c), us={"triton": 1.0})


def table(entries, device=NAME, group_size=128) -> dict:
    return dict(version=T.TABLE_VERSION, device=device, sm="90", created="2026-11-25", torch="", triton="", cuda="",
                dtype="bf16", group_size=group_size, entries=entries)


def test_table_filename():
    assert T.table_filename("NVIDIA H100 80GB HBM3") == "int4_NVIDIA_H100_80GB_HBM3.json"
    assert T.table_filename(" NVIDIA A100-SXM4-80GB ") == "int4_NVIDIA_A100-SXM4-80GB.json"
    assert T.table_filename("a/b\\c:d") == "int4_a_b_c_d.json"  # never a path


def test_lookup_rules():
    tbl = table([entry(11008, 4096, 1), entry(11008, 4096, 16, bm=32), entry(11008, 4096, 256, bm=64),
                 entry(4096, 4096, 1, bn=128), entry(4096, 4096, 64, bm=64, bn=128)])
    e, exact = T.lookup(tbl, 3, 11008, 4096)
    assert (e.N, e.K, e.M, exact) == (11008, 4096, 16, True)  # smallest tuned M >= M
    assert T.lookup(tbl, 1, 11008, 4096)[0].M == 1
    assert T.lookup(tbl, 16, 11008, 4096)[0].M == 16
    assert T.lookup(tbl, 5000, 11008, 4096)[0].M == 256  # beyond the table: the largest tuned M
    e, exact = T.lookup(tbl, 2, 14336, 4096)  # untuned shape: the nearest tuned one (log distance)
    assert (e.N, e.K, e.M, exact) == (11008, 4096, 16, False)
    e, exact = T.lookup(tbl, 64, 4096, 4000)
    assert (e.N, e.K, e.M, exact) == (4096, 4096, 64, False)
    # Only the table's group size, and only shapes within a factor of 4 of a tuned one.
    assert T.lookup(tbl, 1, 11008, 4096, 128) is not None and T.lookup(tbl, 1, 11008, 4096, 32) is None
    assert T.lookup(tbl, 1, 128256, 4096) is None and T.lookup(tbl, 1, 64, 64) is None
    assert T.lookup(tbl, 1, 16384, 4096) is not None  # 4096 x 4096 within 4x


def test_validation_refuses_ambiguous_tables():
    for bad, msg in ((dict(table([entry(64, 64, 1)]), version=True), "version"),
                     (table([entry(64, 64, 1), entry(64, 64, 1, bm=32)]), "two entries"),
                     (table([entry(64, 64, 1, warps=64)]), "num_warps"),
                     (dict(table([entry(64, 64, 1)]), group_size=None), "group_size")):
        with pytest.raises(ValueError, match=msg):
            T._validate(bad)


def test_build_table_keeps_points_where_triton_failed():
    """A point whose Triton configs all failed their check was left out, and a neighbouring
    "triton" entry then decided it."""
    ok = dict(block_m=16, block_n=64, block_k=128, split_k=1, num_warps=4, num_stages=4)
    meas = [dict(N=4096, K=4096, M=1, triton=[(ok, 5.0)], dequant=9.0),
            dict(N=4096, K=4096, M=16, triton=[], dequant=7.0),
            dict(N=4096, K=4096, M=256, triton=[(ok, 5.0)], dequant=None)]
    tbl = T.build_table(meas, dict(device=NAME, sm="90"), dtype="bf16", group_size=128)
    by_m = {e["M"]: e for e in tbl["entries"]}
    assert sorted(by_m) == [1, 16, 256] and by_m[16]["backend"] == "dequant" and "triton" not in by_m[16]["us"]


def test_write_table_validates_and_is_atomic(tmp_path):
    good = table([entry(64, 128, 1)])
    path = T.write_table(good, tmp_path)
    assert path.name == T.table_filename(NAME) and json.loads(path.read_text()) == good
    with pytest.raises(ValueError, match="backend must be one of"):
        T.write_table(table([entry(64, 128, 1, "bogus")]), tmp_path)
    assert json.loads(path.read_text()) == good  # the old table is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind


def test_dequant_chunk_candidates():
    # 8 / 16 / 32 MiB of bf16 rows of K = 4096 (8 KiB a row), each < N, multiples of 256
    assert T.dequant_chunk_candidates(11008, 4096, torch.bfloat16) == [1024, 2048, 4096]
    assert T.dequant_chunk_candidates(4096, 11008, torch.float16) == [256, 512, 1280]
    assert T.dequant_chunk_candidates(1024, 4096, torch.bfloat16) == []  # whole W_hat is 8 MiB already


def test_build_table_picks_the_fastest():
    a, b, c = cfg(bn=64), cfg(bn=128), cfg(bm=64, bn=128, bk=64, split=1, warps=8)
    info = dict(device=NAME, sm="90", date="d", torch="t", triton="tr", cuda="c")
    meas = [
        dict(N=64, K=128, M=1, triton=[(a, 10.0), (b, 8.0), (c, None)], dequant=30.0, cublas=25.0, cuda=5.0),
        dict(N=64, K=128, M=4096, triton=[(a, 90.0), (c, 70.0)], dequant=60.0, cublas=55.0, cuda=None),
        dict(N=64, K=128, M=16, triton=[], dequant=1.0),  # every config failed: a dequant entry all the same
    ]
    tbl = T.build_table(meas, info, dtype="bf16", group_size=128)
    e1, e2, e3 = tbl["entries"]
    assert (e3["M"], e3["backend"], e3["us"]) == (16, "dequant", {"dequant": 1.0})
    assert (e1["M"], e1["backend"], e1["config"]) == (1, "triton", b)  # the CUDA kernel may not win
    assert e1["us"] == {"triton": 8.0, "dequant": 30.0, "cuda": 5.0, "cublas": 25.0}
    assert (e2["M"], e2["backend"], e2["config"]) == (4096, "dequant", c)
    assert T.build_table(meas, info, dtype="bf16", group_size=128, allow_cuda=True)["entries"][0]["backend"] == "cuda"
    assert "dequant_chunk_n" not in e1 and "dequant_chunk_n" not in e2
    meas[1]["dequant_chunk_n"] = 32
    assert T.build_table(meas, info, dtype="bf16", group_size=128)["entries"][1]["dequant_chunk_n"] == 32
    assert tbl["device"] == NAME and tbl["version"] == T.TABLE_VERSION


@pytest.mark.parametrize("g", [None, 32, 64, 128])
@pytest.mark.parametrize("N, K", [(11008, 4096), (4096, 11008), (1024, 4096)])
def test_candidate_configs(g, N, K):
    from lrqat_kernels.ops.int4_triton import Int4TritonConfig

    for M in (1, 4, 16, 17, 32, 64, 128, 256, 1024, 4096):
        cands = T.candidate_configs(M, N, K, g)
        default = int4_triton_config(M, N, K, g, "cuda")
        assert Int4TritonConfig(**cands[0]) == default  # a table is never worse than the heuristic
        assert 1 <= len(cands) <= 48 and len({tuple(c.values()) for c in cands}) == len(cands)
        # Both operand orders are timed for every tile shape of the regime (256-wide ones only swapped).
        plain = {(c["block_m"], c["block_n"]) for c in cands if not c["swap_ab"]}
        swapped = {(c["block_m"], c["block_n"]) for c in cands if c["swap_ab"]}
        extra = {(256, 128), (128, 256)} if M > 256 else {(8, 64), (8, 128)} if M <= 8 else set()
        assert plain and plain <= swapped and swapped - plain == extra, (M, plain, swapped)
        for c in cands:
            T._validate(table([dict(N=N, K=K, M=M, backend="triton", config=c, us={})]))
            if g is not None:
                assert g % c["block_k"] == 0, c
            k_tiles = -(-K // c["block_k"])
            assert c["split_k"] <= k_tiles and -(-k_tiles // -(-k_tiles // c["split_k"])) == c["split_k"], c


# The tuner as a script, after importing tests/conftest.py (as the test process did): its Triton
# interpreter shim must be in place in the child too (Triton < 3.7 with NumPy >= 2.4).
_RUN_TUNER = (
    "import runpy, sys; sys.path.insert(0, {tests!r}); import conftest; "
    "sys.argv = [{script!r}] + sys.argv[1:]; runpy.run_path({script!r}, run_name='__main__')"
)


def _tuner(*args, env_extra=None, tmp_path):
    env = dict(os.environ, **(env_extra or {}))
    code = _RUN_TUNER.format(tests=os.path.join(ROOT, "tests"), script=os.path.join(ROOT, "bench", "tune_int4_gemm.py"))
    return subprocess.run([sys.executable, "-c", code, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_tuner_end_to_end_on_cpu(tmp_path):
    """The whole script (check, time, choose, write table + CSV) in the interpreter on tiny layers."""
    out = tmp_path / "tables"
    proc = _tuner("--device", "cpu", "--custom-shapes", "64x128,48x256", "--ms", "1,40", "--group", "32",
                  "--max-candidates", "2", "--out-dir", str(out), "--csv", str(tmp_path / "t.csv"),
                  "--dequant-chunks", "16,40", env_extra={"TRITON_INTERPRET": "1"}, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    tbl = json.loads((out / T.table_filename("cpu-interpreter")).read_text())
    assert [(e["N"], e["K"], e["M"]) for e in tbl["entries"]] == [(64, 128, 1), (64, 128, 40), (48, 256, 1), (48, 256, 40)]
    assert all(e["backend"] in ("triton", "dequant") and set(e["us"]) >= {"triton", "dequant", "cublas"}
               for e in tbl["entries"])
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"cublas", "dequant", "triton"}
    assert sum(r["chosen"] == "best_triton" for r in rows) == 4 and not any(r["error"] for r in rows)
    assert {r["swap_ab"] for r in rows if r["provider"] == "triton"} == {"False", "True"}  # both operand orders ran
    # dequant + cuBLAS timed whole and in row chunks; an entry names the fastest chunk (or none)
    assert sorted(r["dequant_chunk_n"] for r in rows if r["provider"] == "dequant" and r["N"] == "64" and r["M"] == "1") \
        == ["", "16", "40"]
    for e in tbl["entries"]:
        timed = {r["dequant_chunk_n"]: float(r["us_p50"]) for r in rows if r["provider"] == "dequant"
                 and (int(r["N"]), int(r["M"])) == (e["N"], e["M"])}
        best = min(timed, key=timed.get)
        assert e.get("dequant_chunk_n") == (int(best) if best else None) and e["us"]["dequant"] == timed[best]
    e, exact = T.lookup(tbl, 30, 64, 128)
    assert exact and e.M == 40

    # A second run with --merge: one more shape, one re-measured point; the rest of the table and
    # of the CSV stay.
    proc = _tuner("--device", "cpu", "--custom-shapes", "32x64,64x128", "--ms", "1", "--group", "32",
                  "--max-candidates", "1", "--out-dir", str(out), "--csv", str(tmp_path / "t.csv"), "--merge",
                  env_extra={"TRITON_INTERPRET": "1"}, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    tbl2 = json.loads((out / T.table_filename("cpu-interpreter")).read_text())
    assert [(e["N"], e["K"], e["M"]) for e in tbl2["entries"]] == [
        (32, 64, 1), (48, 256, 1), (48, 256, 40), (64, 128, 1), (64, 128, 40)]
    kept = {(e["N"], e["K"], e["M"]): e for e in tbl["entries"]}
    assert all(e == kept[(e["N"], e["K"], e["M"])] for e in tbl2["entries"] if (e["N"], e["K"], e["M"]) in kept
               and (e["N"], e["M"]) != (64, 1))
    with open(tmp_path / "t.csv") as f:
        rows2 = list(csv.DictReader(f))
    assert len(rows2) > len(rows) and rows2[: len(rows)] == rows


def test_tuner_fast_decode_check_runs(monkeypatch):
    """The tuner's extra check of PTX-decode configs (zero points, both dtypes) runs end to end; on
    the CPU the config decodes portably, so it must pass, and a wrong kernel must fail it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import tune_int4_gemm as tuner
    finally:
        sys.path.pop(0)
    from lrqat_kernels.ops import int4_triton
    from lrqat_kernels.ops.int4_triton import Int4TritonConfig

    cfg = Int4TritonConfig(16, 64, 32, 2, 4, 3, swap_ab=True, fast_decode=True)
    tuner._ZP_CHECKED.clear()
    assert tuner._fast_decode_ok(cfg, 32, "cpu")
    real = int4_triton.int4_linear_triton
    monkeypatch.setattr(int4_triton, "int4_linear_triton", lambda *a, **k: real(*a, **k) * 1.1)
    tuner._ZP_CHECKED.clear()
    assert not tuner._fast_decode_ok(cfg, 32, "cpu")
    tuner._ZP_CHECKED.clear()


def test_merge_tables():
    old = table([entry(64, 128, 1), entry(64, 128, 16, bm=32)])
    new = table([entry(64, 128, 16, bm=16, split=2), entry(32, 64, 1)])
    merged = T.merge_tables(old, new)
    assert [(e["N"], e["K"], e["M"], e["config"]["block_m"]) for e in merged["entries"]] == [
        (32, 64, 1, 16), (64, 128, 1, 16), (64, 128, 16, 16)]  # re-measured: the new entry wins
    with pytest.raises(ValueError, match="different group_size"):
        T.merge_tables(old, dict(new, group_size=64))
    with pytest.raises(ValueError, match="different device"):
        T.merge_tables(old, table([entry(32, 64, 1)], device="Other GPU"))
    with pytest.raises(ValueError, match="different triton"):  # the table records one set of versions
        T.merge_tables(old, dict(new, triton="9.9.9"))


def test_tuner_rejects_bad_arguments(tmp_path):
    proc = _tuner("--device", "cpu", "--custom-shapes", "64x128", env_extra={"TRITON_INTERPRET": "0"}, tmp_path=tmp_path)
    assert proc.returncode == 2 and "set TRITON_INTERPRET=1" in proc.stderr
    proc = _tuner("--shapes", "nope", "--list", tmp_path=tmp_path)
    assert proc.returncode == 2 and "unknown --shapes ['nope']" in proc.stderr
    proc = _tuner("--group", "48", "--list", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--group must be a multiple of 32" in proc.stderr
    for bad in ("0", "x", ","):
        proc = _tuner("--dequant-chunks", bad, "--list", tmp_path=tmp_path)
        assert proc.returncode == 2 and "--dequant-chunks must be 'auto', 'none' or positive integers" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tuner_without_gpu_writes_nothing(tmp_path):
    proc = _tuner("--quick", "--out-dir", str(tmp_path / "o"), "--csv", str(tmp_path / "t.csv"), tmp_path=tmp_path)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "o").exists() and not (tmp_path / "t.csv").exists()
