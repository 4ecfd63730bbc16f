"""Tune the W4A16 dispatch on this GPU: Triton tile configs and the Triton / dequant + cuBLAS crossover.

    python bench/tune_int4_gemm.py                  # all LLaMA shapes, default M list (~3-5 min on an H100)
    python bench/tune_int4_gemm.py --quick          # two shapes, M in {1, 16, 256, 4096}
    python bench/tune_int4_gemm.py --list           # print the candidate configs (no GPU needed)

For every layer shape ``[N, K]`` of ``bench_int4_gemm.SHAPES`` and every M it times each candidate
Triton config (:func:`_int4_tuning.candidate_configs`: the heuristic default plus tiles, split-K
and pipeline depths around it), "dequantise + cuBLAS" (for M > 64 also in L2-sized row chunks,
``_int4_tuning.dequant_chunk_candidates``) and cuBLAS on bf16 weights (and the opt-in CUDA kernel
when built), after checking each output against the fp32 product. It then writes the device's
table (``bench/results/int4_tables/int4_<device>.json`` or ``--out-dir``; schema in
``bench/_int4_tuning.py``) and a CSV of every timing (``bench/results/int4_tune_cuda.csv``). The
package reads no table yet: its heuristics (``int4_triton_config``, ``int4_linear``'s "auto") are
what a first measured table will be compared with, and replaced by where it wins.

``--allow-cuda`` lets the CUDA kernel win table entries. Pass it only
after ``pytest tests/test_int4_gpu.py`` passed on this GPU (the kernel is opt-in until then).
``--budget-s``: stop starting new (shape, M) points after this many seconds and write what was
measured (the table then covers fewer shapes; lookup falls back to the nearest tuned one).
``--merge``: keep the entries of the device's existing table (in ``--out-dir``) that this run did
not re-measure, and append to the CSV instead of replacing it: a table built over several runs,
e.g. ``--shapes`` in two groups when one run does not fit a time limit.

Without a CUDA device it says so and exits 0 (nothing is written).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import format_table, write_csv  # noqa: E402
from bench_int4_gemm import SHAPES, Layer, check, versions  # noqa: E402

import _int4_tuning as int4_tuning  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MS = [1, 4, 16, 32, 64, 128, 256, 1024, 4096]
CSV_COLUMNS = ["date", "device", "sm", "torch", "triton", "cuda", "shape", "N", "K", "M", "dtype", "group",
               "provider", "block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "swap_ab", "fast_decode",
               "dequant_chunk_n", "us_p50", "chosen", "error"]


def _time(fn, rep_ms: int, device: str) -> float:
    """Median microseconds of ``fn``: ``do_bench`` on a GPU (L2 flushed before every run); on the CPU
    (``--device cpu``, the interpreter: a smoke test of this script, not a measurement) wall time."""
    if device == "cpu":
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1] * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, quantiles=[0.5])[0] * 1e3


_ZP_CHECKED: dict = {}


def _fast_decode_ok(config, group: int, device: str) -> bool:
    """Whether an inline-PTX decode config (``fast_decode``) is exact where the timed layer does not
    look: with zero points, for fp16 and bf16 x (the timed layer is symmetric, one dtype). Checked
    once per kernel variant on a small layer against the fp32 product."""
    from lrqat_kernels.formats import pack_nibbles
    from lrqat_kernels.ops.int4_triton import Int4TritonConfig, int4_linear_triton

    key = (config.block_m, config.block_n, config.block_k, config.num_warps, config.num_stages, config.swap_ab,
           config.split_k > 1)
    if key not in _ZP_CHECKED:
        gen = torch.Generator().manual_seed(0)
        N, K = 200, 4 * group
        w_int = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
        z = torch.randint(-8, 8, (N, K // group), dtype=torch.int8, generator=gen)
        s = torch.rand(N, K // group, generator=gen) * 0.02 + 0.005
        w_hat = s.repeat_interleave(group, 1) * (w_int.float() - z.float().repeat_interleave(group, 1))
        cfg = Int4TritonConfig(**{**config.__dict__, "split_k": 2 if config.split_k > 1 else 1})
        ok = True
        for dt in (torch.bfloat16, torch.float16):
            x = torch.randn(5, K, generator=gen).to(dt)
            ref = x.float() @ w_hat.t()
            y = int4_linear_triton(x.to(device), pack_nibbles(w_int).to(device), s.to(device), z.to(device), group,
                                   config=cfg).float().cpu()
            ok &= bool(((y - ref).abs().max() / ref.abs().max()).item() < 2e-2)
        _ZP_CHECKED[key] = ok
    return _ZP_CHECKED[key]


def _cpu_info() -> dict:
    import datetime

    import triton

    return dict(device="cpu-interpreter", sm="", sms=132, torch=torch.__version__, cuda=str(torch.version.cuda),
                triton=triton.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16, 256, 4096}")
    ap.add_argument("--list", action="store_true", help="print the candidate configs and exit (no GPU needed)")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="all", help="comma-separated shape names (bench_int4_gemm.SHAPES) or 'all'")
    ap.add_argument("--out-dir", default=None,
                    help="where the table is written (default: bench/results/int4_tables for cuda; required for cpu)")
    ap.add_argument("--csv", default=None, help="'' for none (default: bench/results/int4_tune_cuda.csv for cuda, "
                                                "none for cpu)")
    ap.add_argument("--rep-ms", type=int, default=20, help="do_bench repetition time per candidate (ms)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--custom-shapes", default="", help="'NxK,...' instead of --shapes (tests: tiny layers)")
    ap.add_argument("--max-candidates", type=int, default=0, help="time at most this many configs a point (0: all)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: smoke-test the script under TRITON_INTERPRET=1 (timings meaningless)")
    ap.add_argument("--merge", action="store_true",
                    help="merge into the device's existing table (and CSV) instead of replacing them")
    ap.add_argument("--allow-cuda", action="store_true",
                    help="let the CUDA kernel win entries (only after tests/test_int4_gpu.py passed on this GPU)")
    ap.add_argument("--dequant-chunks", default="auto",
                    help="row chunks timed for dequant + cuBLAS: 'auto' (L2-sized, M > 64), 'none', or 'n1,n2,...' "
                         "(every M)")
    args = ap.parse_args(argv)

    ms = [int(m) for m in args.ms.split(",") if m]
    if any(m < 1 for m in ms):
        ap.error(f"--ms must be positive integers, got {args.ms!r}")
    names = [s[0] for s in SHAPES]
    if args.shapes != "all":
        unknown = [s for s in args.shapes.split(",") if s not in names]
        if unknown:
            ap.error(f"unknown --shapes {unknown}; known: {names}")
    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    if args.custom_shapes:
        try:
            shapes = [(f"{n}x{k}", int(n), int(k)) for n, k in (t.split("x") for t in args.custom_shapes.split(","))]
        except ValueError:
            ap.error(f"--custom-shapes must be 'NxK,...' with integers, got {args.custom_shapes!r}")
    if args.dequant_chunks not in ("auto", "none"):
        try:
            fixed_chunks = [int(c) for c in args.dequant_chunks.split(",") if c]
        except ValueError:
            fixed_chunks = [0]
        if not fixed_chunks or min(fixed_chunks) < 1:
            ap.error(f"--dequant-chunks must be 'auto', 'none' or positive integers 'n1,n2,...', got {args.dequant_chunks!r}")
    if args.quick:
        shapes, ms = shapes[:2], [1, 16, 256, 4096]
    if args.group < 32 or args.group % 32:
        ap.error(f"--group must be a multiple of 32 (the Triton kernel's K tile), got {args.group}")

    if args.list:
        for name, N, K in shapes:
            for M in ms:
                cands = int4_tuning.candidate_configs(M, N, K, args.group)
                print(f"{name} N={N} K={K} M={M}: {len(cands)} candidates")
                for c in cands:
                    print("   ", c)
        return 0
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the Triton kernel in the interpreter: set TRITON_INTERPRET=1")
    # A CPU smoke run must not overwrite the GPU table or CSV meant to be committed.
    if args.out_dir is None:
        if args.device == "cpu":
            ap.error("--device cpu needs --out-dir (its table must not land beside the GPU tables)")
        args.out_dir = os.path.join(RESULTS_DIR, "int4_tables")
    if args.csv is None:
        args.csv = os.path.join(RESULTS_DIR, "int4_tune_cuda.csv") if args.device == "cuda" else ""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune_int4_gemm: no CUDA device (torch.cuda.is_available() is False): nothing was tuned or "
              "written. Run this on the GPU the table is for.")
        return 0

    from lrqat_kernels.ops.int4_cuda import cuda_kernel_available, int4_cuda_linear
    from lrqat_kernels.ops.int4_linear import dequant_linear
    from lrqat_kernels.ops.int4_triton import Int4TritonConfig, int4_linear_triton, int4_triton_config

    dev = args.device
    info = versions() if dev == "cuda" else _cpu_info()
    sms = info["sms"]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    have_cuda_kernel = dev == "cuda" and cuda_kernel_available()
    print(f"# {info['device']} (sm_{info['sm']}, {sms} SMs), torch {info['torch']}, triton {info['triton']}; "
          f"x {args.dtype}, group {args.group}; CUDA kernel {'timed' if have_cuda_kernel else 'not built'}"
          f"{' (may win entries)' if args.allow_cuda else ''}")
    t_start = time.monotonic()
    measurements, csv_rows, summary = [], [], []
    stopped = None
    for name, N, K in shapes:
        if stopped:
            break
        layer = Layer(N, K, args.group, dtype, torch.float32, device=dev)  # fp32 scales: as "auto" prepacks a model
        for M in ms:
            if time.monotonic() - t_start > args.budget_s:
                stopped = f"budget of {args.budget_s:.0f} s reached before {name} M={M}"
                break
            x = torch.randn(M, K, device=dev).to(dtype)
            base = dict(date=info["date"], device=info["device"], sm=info["sm"], torch=info["torch"],
                        triton=info["triton"], cuda=info["cuda"], shape=name, N=N, K=K, M=M,
                        dtype=args.dtype, group=args.group)
            point = dict(N=N, K=K, M=M, triton=[])
            # "dequant" = dequantise + cuBLAS: one whole W_hat, and (prefill, M > 64, where it can
            # win) L2-sized row chunks of it, each followed by its GEMM; the fastest is recorded.
            if args.dequant_chunks == "auto":
                chunks = [None] + (int4_tuning.dequant_chunk_candidates(N, K, dtype) if M > 64 else [])
            else:
                chunks = [None] + ([c for c in fixed_chunks if c < N] if args.dequant_chunks != "none" else [])
            others = [("cublas", None, lambda: F.linear(x, layer.w_dense))]
            others += [("dequant", c, lambda c=c: dequant_linear(x, layer.qweight, layer.scale, None, args.group,
                                                                 chunk_n=c)) for c in chunks]
            if have_cuda_kernel:
                w = layer.gpu_weight()
                others.append(("cuda", None, lambda: int4_cuda_linear(x, w)))
            for prov, chunk, fn in others:
                row = dict(base, provider=prov, dequant_chunk_n=chunk if chunk is not None else "")
                try:
                    if prov != "cublas":
                        check("lrqat_cuda" if prov == "cuda" else prov, fn, layer, x)
                    row["us_p50"] = round(_time(fn, args.rep_ms, dev), 3)
                    if point.get(prov) is None or row["us_p50"] < point[prov]:
                        point[prov] = row["us_p50"]
                        if prov == "dequant":
                            point["dequant_chunk_n"] = chunk
                except Exception as exc:  # a failing provider is recorded, not fatal
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                csv_rows.append(row)
            default = int4_triton_config(M, N, K, args.group, "cuda", sms=sms)
            default_us = None
            candidates = int4_tuning.candidate_configs(M, N, K, args.group, sms=sms)
            for cfg in candidates[: args.max_candidates or None]:
                row = dict(base, provider="triton", **cfg)
                config = Int4TritonConfig(**cfg)
                fn = lambda: int4_linear_triton(x, layer.qweight, layer.scale, None, args.group,  # noqa: E731
                                                config=config)
                try:
                    if config.fast_decode and not _fast_decode_ok(config, args.group, dev):
                        raise AssertionError("fast_decode is wrong with zero points or the other dtype")
                    check("lrqat_triton", fn, layer, x)
                    us = _time(fn, args.rep_ms, dev)
                    row["us_p50"] = round(us, 3)
                    point["triton"].append((cfg, us))
                    if Int4TritonConfig(**cfg) == default:
                        default_us = us
                except Exception as exc:  # e.g. out of shared memory for a big tile on this GPU
                    row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                csv_rows.append(row)
            measurements.append(point)
            timed = [(us, cfg) for cfg, us in point["triton"]]
            if timed:
                best_us, best_cfg = min(timed, key=lambda t: t[0])
                for r in csv_rows:
                    if r.get("provider") == "triton" and r["shape"] == name and r["M"] == M and \
                            all(r.get(k) == v for k, v in best_cfg.items()):
                        r["chosen"] = "best_triton"
                summary.append(dict(shape=name, N=N, K=K, M=M, best=best_us, default=default_us, dequant=point.get("dequant"),
                                    cublas=point.get("cublas"), cuda=point.get("cuda"),
                                    cfg="{block_m}x{block_n}x{block_k} s{split_k} w{num_warps} p{num_stages}".format(**best_cfg)
                                    + (" swapAB" if best_cfg.get("swap_ab") else "")
                                    + (" ptx-decode" if best_cfg.get("fast_decode") else "")))
            print(f"  {name} M={M}: {len(point['triton'])} configs timed ({time.monotonic() - t_start:.0f} s)", flush=True)
        del layer
        if dev == "cuda":
            torch.cuda.empty_cache()

    if stopped:
        print(f"# stopped early: {stopped}")
    if args.csv:  # first: the measurements (and errors) are on record even if no table can be built
        if args.merge and os.path.exists(args.csv):
            with open(args.csv, newline="") as f:
                csv_rows = list(csv.DictReader(f)) + csv_rows
        write_csv(args.csv, csv_rows, CSV_COLUMNS)
        print(f"# wrote {args.csv} ({len(csv_rows)} rows)")
    if not any(p["triton"] for p in measurements):
        errors = sorted({r["error"] for r in csv_rows if r.get("error")})
        print("# no Triton config ran: no table written. Errors: " + "; ".join(errors)[:2000])
        return 1
    table = int4_tuning.build_table(measurements, info, dtype=args.dtype, group_size=args.group,
                                    allow_cuda=args.allow_cuda)
    backend_of = {(e["N"], e["K"], e["M"]): e["backend"] for e in table["entries"]}
    for s in summary:
        s["backend"] = backend_of.get((s["N"], s["K"], s["M"]), "-")
        s["tuned_vs_default"] = s["default"] / s["best"] if s["default"] else None
        s["vs_cublas"] = s["cublas"] / min(v for v in (s["best"], s["dequant"]) if v) if s["cublas"] else None
    print()
    print(format_table(summary, [("shape", "shape", ""), ("M", "M", ""), ("cfg", "best Triton config", ""),
                                 ("best", "best us", ".2f"), ("default", "default us", ".2f"),
                                 ("tuned_vs_default", "x default", ".2f"), ("dequant", "dequant us", ".2f"),
                                 ("cublas", "cuBLAS us", ".2f"), ("cuda", "CUDA us", ".2f"),
                                 ("backend", "auto picks", ""), ("vs_cublas", "auto x cuBLAS", ".2f")]))
    if args.merge:
        existing = os.path.join(args.out_dir, int4_tuning.table_filename(table["device"]))
        if os.path.exists(existing):
            try:
                with open(existing) as f:
                    old = json.load(f)
                table = int4_tuning.merge_tables(old, table)
                print(f"# merged with {existing} (same versions; the date is this run's)")
            except (OSError, ValueError) as exc:  # keep both: this run's table beside the old one (unreadable too)
                path = int4_tuning.write_table(table, os.path.join(RESULTS_DIR, "unmerged_tables"))
                print(f"# --merge: cannot merge with {existing} ({exc}); this run's table is in {path}")
                return 1
        else:
            print(f"# --merge: no table at {existing} yet (a fresh machine loses the last call's table: "
                  "restore it there first); writing this run's alone")
    path = int4_tuning.write_table(table, args.out_dir)
    print(f"\n# wrote {path} ({len(table['entries'])} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
