"""Benchmark of the CPU INT4 GEMM ``lrqat::int4_linear`` (csrc/int4_cpu) against PyTorch.

    .venv/bin/python bench/bench_int4_cpu.py                 # full run, writes bench/results/int4_cpu.csv
    .venv/bin/python bench/bench_int4_cpu.py --quick         # one shape, fewer repetitions, no CSV

Methods, all ``y = x @ W^T`` with x ``[M, K]``, W ``[N, K]``:

* ``lrqat_int4``: ``torch.ops.lrqat.int4_linear_prepacked_cpu`` on a weight prepacked once
  (``int4_prepack_cpu``), group-wise fp32 scales, bf16 x (fp32 x for ``--x-dtype fp32``).
* ``torch_int4pack``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (PyTorch's own CPU W4A16,
  "tinygemm" layout): weight from ``_convert_weight_to_int4pack_for_cpu(W_u4 int32 [N, K], 1)``
  with unsigned nibbles ``W_u4 = W_int + 8``, and ``qScaleAndZeros`` ``[K / g, N, 2]`` in x's
  dtype with ``w = (W_u4 - 8) * scale + zero`` (zero = 0 for a symmetric grid). Checked against
  our output before timing, so both compute the same product.
* ``linear_bf16`` / ``linear_fp32``: ``F.linear`` with a dense bf16 / fp32 weight (oneDNN).

Timing: median (and p20 / p80) over repetitions, all methods in the same process and run:
interleaved call by call for rotated weights, in consecutive runs (3 rounds) for hot ones. ``--weights rotated``: each method cycles through enough copies of its weight to exceed the
last-level cache, as in a model whose layers do not stay in cache between calls;
``--weights hot``: one copy, reused (cache-resident for the INT4 weights); ``both`` (default).
GB/s is weight bytes (incl. scales) / time; the machine's copy bandwidth (``dst.copy_(src)`` of
256 MiB, read + write bytes / time) is measured in the same run for reference.
The CPU is shared with other work here: repeat and compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrqat_kernels import _ext  # noqa: E402
from lrqat_kernels.formats import pack_nibbles  # noqa: E402
from lrqat_kernels.ops.int4_linear import cpu_isas, int4_prepack_cpu  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "int4_cpu.csv")
SHAPES = [(4096, 4096), (11008, 4096)]  # (N, K)
MS = [1, 4, 16, 64, 256]
CACHE_BYTES = 96 << 20  # more than the 32 MiB L3 of the machine this was written on, with margin
METHODS = ("lrqat_int4", "torch_int4pack", "linear_bf16", "linear_fp32")


def cpu_name() -> str:
    """CPU model as /proc/cpuinfo gives it, with family / model (a VM may hide the marketing name)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = (t.strip() for t in line.split(":", 1))
                    info.setdefault(k, v)
                if not line.strip() and info:
                    break
    except OSError:
        return platform.processor() or platform.machine()
    name = info.get("model name", platform.machine())
    fam, mod = info.get("cpu family"), info.get("model")
    return f"{name} (family {fam} model {mod}, {os.cpu_count()} CPUs)" if fam else name


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    s = sorted(ts)

    def q(p):
        return s[min(len(s) - 1, max(0, int(round(p * (len(s) - 1)))))]

    return q(0.2), statistics.median(s), q(0.8)


def copy_bandwidth(reps: int = 10) -> float:
    """GB/s of ``dst.copy_(src)`` over 256 MiB (read + write bytes per second)."""
    n = (256 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(ts) / 1e9


def make_weights(N: int, K: int, group: int, x_dtype: torch.dtype, copies: dict[str, int], seed: int = 0):
    """Per method: a list of weight copies and the bytes one copy streams."""
    gen = torch.Generator().manual_seed(seed)
    w_int = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
    scale = torch.rand(N, K // group, generator=gen) * 0.01 + 0.001
    qweight = pack_nibbles(w_int)
    packed = int4_prepack_cpu(qweight, scale, None, group)
    w_u4 = (w_int.to(torch.int32) + 8).contiguous()
    tp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_u4, 1)
    sz = torch.stack([scale.T, torch.zeros_like(scale.T)], dim=-1).to(x_dtype).contiguous()  # [K/g, N, 2]
    w_hat = w_int.float() * scale.repeat_interleave(group, 1)
    w_bf16 = w_hat.bfloat16()

    def clones(t, n):
        return [t] + [t.clone() for _ in range(n - 1)]

    pw, ps = packed.packed_weight, packed.packed_scale
    # Each copy from its own prepack (as each layer of a model), not a clone: the prepack asks
    # for huge pages on the packed weight, a clone would not.
    more = [int4_prepack_cpu(qweight, scale, None, group) for _ in range(copies["lrqat_int4"] - 1)]
    out = {
        "lrqat_int4": (
            [(pw, ps)] + [(p.packed_weight, p.packed_scale) for p in more],
            pw.numel() + ps.numel() * 4,
        ),
        "torch_int4pack": (
            list(zip(clones(tp, copies["torch_int4pack"]), clones(sz, copies["torch_int4pack"]))),
            tp.numel() * tp.element_size() + sz.numel() * sz.element_size(),
        ),
        "linear_bf16": (clones(w_bf16, copies["linear_bf16"]), w_bf16.numel() * 2),
        "linear_fp32": (clones(w_hat, copies["linear_fp32"]), w_hat.numel() * 4),
    }
    return out, w_hat


def runner(method: str, x: torch.Tensor, N: int, group: int, weights, isa: str):
    x32 = x.float()
    xb = x.bfloat16()
    i = [0]

    def nxt():
        w = weights[i[0] % len(weights)]
        i[0] += 1
        return w

    if method == "lrqat_int4":
        op = torch.ops.lrqat.int4_linear_prepacked_cpu

        def f():
            pw, ps = nxt()
            return op(x, pw, ps, None, N, group, None, isa)
    elif method == "torch_int4pack":
        op = torch.ops.aten._weight_int4pack_mm_for_cpu

        def f():
            tp, sz = nxt()
            return op(x, tp, group, sz)
    elif method == "linear_bf16":

        def f():
            return F.linear(xb, nxt())
    else:

        def f():
            return F.linear(x32, nxt())

    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first shape only, fewer repetitions, no CSV")
    ap.add_argument("--weights", choices=("rotated", "hot", "both"), default="both")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--x-dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per case (default: adaptive, >= 15)")
    ap.add_argument("--ms", type=str, default=",".join(map(str, MS)))
    ap.add_argument("--isa", default="auto", help="CPU path of lrqat_int4 (auto, scalar, avx2, avx512)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="wall: perf_counter; thread: CPU time of the calling thread (use with --threads 1: "
                         "robust to time slicing by other processes on a shared machine)")
    ap.add_argument("--csv", default=RESULTS, help="output CSV ('' for none)")
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
    args = ap.parse_args()
    if not _ext.load_extension():
        sys.exit(f"lrqat_kernels._C is not available: {_ext.extension_error()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        sys.exit("--clock thread measures the calling thread only: use it with --threads 1")
    global _clock
    _clock = time.thread_time if args.clock == "thread" else time.perf_counter
    x_dtype = torch.bfloat16 if args.x_dtype == "bf16" else torch.float32
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = [int(m) for m in args.ms.split(",")]
    device = cpu_name()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    bw = copy_bandwidth()
    print(f"# {device} | {threads} threads | clock {args.clock} | torch {torch.__version__} | {date}"
          f" | load average at start {load:.2f}")
    print(f"# lrqat_int4 isa={args.isa} (cpu supports {', '.join(cpu_isas())}) | x {args.x_dtype} | group {args.group}"
          f" | copy bandwidth {bw:.1f} GB/s (read+write)")
    rows = []
    modes = ("rotated", "hot") if args.weights == "both" else (args.weights,)
    for mode, (N, K) in [(m, s) for m in modes for s in shapes]:
        print(f"# weights {mode}")
        per_copy = {"lrqat_int4": N * K // 2, "torch_int4pack": N * K // 2, "linear_bf16": 2 * N * K, "linear_fp32": 4 * N * K}
        copies = {m: (max(1, math.ceil(CACHE_BYTES / b)) if mode == "rotated" else 1) for m, b in per_copy.items()}
        weights, w_hat = make_weights(N, K, args.group, x_dtype, copies)
        for M in ms:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(x_dtype)
            fns = {m: runner(m, x, N, args.group, weights[m][0], args.isa) for m in METHODS}
            # Same product? (int4pack and ours against the dequantised weight, bf16-level tolerance.)
            ref = x.float() @ w_hat.T
            for m in ("lrqat_int4", "torch_int4pack"):
                y = fns[m]().float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    raise SystemExit(f"{m} disagrees with the reference at N={N} K={K} M={M}: rel err {err:.3g}")
            for f in fns.values():  # warm-up
                f()
                f()
            est = min(statistics.median(_time(f, 3)) for f in fns.values())
            reps = args.reps or (5 if args.quick else max(15, min(60, int(1.5 / max(est, 1e-6)))))
            ts = {m: [] for m in METHODS}
            if mode == "rotated":
                for _ in range(reps):  # interleaved, so load from other processes hits every method alike
                    for m, f in fns.items():
                        ts[m].extend(_time(f, 1))
            else:  # hot: consecutive calls keep the weight cached; 3 rounds spread the noise
                for r in range(3):
                    for m, f in fns.items():
                        f()
                        f()
                        ts[m].extend(_time(f, max(5, reps // 3)))
            stats = {m: quantiles(ts[m]) for m in METHODS}
            flops = 2 * M * N * K
            for m in METHODS:
                p20, med, p80 = stats[m]
                rows.append({
                    "device": device, "date": date, "torch": torch.__version__, "threads": threads,
                    "clock": args.clock,
                    "isa": args.isa if m == "lrqat_int4" else "", "weights": mode,
                    "x_dtype": args.x_dtype, "group": args.group, "N": N, "K": K, "M": M, "method": m,
                    "median_ms": round(med * 1e3, 4), "p20_ms": round(p20 * 1e3, 4), "p80_ms": round(p80 * 1e3, 4),
                    "gflops": round(flops / med / 1e9, 1), "weight_gbs": round(weights[m][1] / med / 1e9, 1),
                    "copy_gbs": round(bw, 1), "reps": reps, "load_avg_start": round(load, 2),
                    "speedup_vs_int4pack": round(stats["torch_int4pack"][1] / med, 2),
                    "speedup_vs_linear_bf16": round(stats["linear_bf16"][1] / med, 2),
                    "speedup_vs_linear_fp32": round(stats["linear_fp32"][1] / med, 2),
                })
            _print_case(N, K, M, rows[-len(METHODS):])
        del weights, w_hat
    if args.csv and not args.quick:
        os.makedirs(os.path.dirname(args.csv), exist_ok=True)
        append = args.append and os.path.exists(args.csv)
        if append:
            with open(args.csv, newline="") as f:
                header = next(csv.reader(f), None)
            if header != list(rows[0]):
                sys.exit(f"{args.csv} has another header; not appending")
        with open(args.csv, "a" if append else "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if not append:
                w.writeheader()
            w.writerows(rows)
        print(f"# {'appended to' if append else 'wrote'} {args.csv}")


_clock = time.perf_counter


def _time(f, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = _clock()
        f()
        out.append(_clock() - t0)
    return out


_header_printed = False


def _print_case(N, K, M, rows) -> None:
    global _header_printed
    if not _header_printed:
        print(f"{'N x K':>11} {'M':>4} {'method':>15} {'median ms':>10} {'p20-p80 ms':>17} {'GFLOP/s':>8} {'wGB/s':>7}"
              f" {'vs int4pack':>11} {'vs bf16':>8} {'vs fp32':>8}")
        _header_printed = True
    for r in rows:
        print(f"{N:>5}x{K:<5} {M:>4} {r['method']:>15} {r['median_ms']:>10.3f} {r['p20_ms']:>8.3f}-{r['p80_ms']:<8.3f}"
              f" {r['gflops']:>8.1f} {r['weight_gbs']:>7.1f} {r['speedup_vs_int4pack']:>10.2f}x"
              f" {r['speedup_vs_linear_bf16']:>7.2f}x {r['speedup_vs_linear_fp32']:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
