"""Benchmark of pQuant's CPU 1-bit GEMM (``lrqat::binary_linear_cpu``) against bf16 / fp32 ``F.linear``.

Providers (every one computes ``y = x @ W^T`` for the same ``[N, K]`` weight):
    binary_<isa>   ``pquant.binary_linear``: signs packed 8 a byte (``pack_signs``), fp32 sums
                   ``2 * sum_{S=+1} x - sum x`` (one AVX-512 masked add per 16 weights), per ISA
                   the CPU has (scalar only for the smallest shape: it is a reference, not a path).
    bf16_linear    ``F.linear`` on bf16 x and the dequantised bf16 weight (``+-lam``): what a model
                   without the kernel runs.
    fp32_linear    ``F.linear`` in fp32.

Each case checks the kernel against the fp32 product (relative max error printed). Weight bytes
streamed per call: ``N * ceil(K / 8)`` for the packed signs vs ``2 N K`` for bf16 (16x less).
Reported: median / p20 / p80 ms, and the speed-up over bf16 ``F.linear``. Written to
``bench/results/binary_cpu.csv``. Times on a shared, loaded machine are noisy: compare rows of one run.

Usage::

    PYTHONPATH=. python bench/bench_binary_cpu.py                 # quick: K = N = 2048, M in 1, 16, 128
    PYTHONPATH=. python bench/bench_binary_cpu.py --full          # LLaMA-2-7B: 4096 x 4096, 11008 x 4096
    PYTHONPATH=. python bench/bench_binary_cpu.py --threads 1     # one thread: steadier on a shared machine
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import environment, format_table, time_fn, write_csv  # noqa: E402

from lrqat_kernels import _ext  # noqa: E402
from lrqat_kernels.pquant import binarize, binary_linear, pack_signs, unpack_signs  # noqa: E402

COLUMNS = ["date", "device", "torch", "threads", "provider", "M", "N", "K", "median_ms", "p20_ms", "p80_ms",
           "reps", "vs_bf16_linear", "weight_bytes", "max_rel_err"]


def isas() -> list[str]:
    out = ["scalar"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" in flags and " fma" in flags:
        out.append("avx2")
    if " avx512f" in flags:
        out.append("avx512")
    return out


def run(shapes, ms, reps, out_csv):
    if not (_ext.load_extension() and hasattr(torch.ops.lrqat, "binary_linear_cpu")):
        sys.exit("lrqat_kernels._C has no binary_linear_cpu: build it (python setup.py build_ext --inplace)")
    dev = torch.device("cpu")
    env = environment(dev) | {"threads": torch.get_num_threads()}
    rows = []
    for N, K in shapes:
        gen = torch.Generator().manual_seed(0)
        sign, lam = binarize(torch.randn(N, K, generator=gen) * 0.02)
        packed, scale = pack_signs(sign), lam.reshape(1)
        w32 = unpack_signs(packed, K) * scale
        w16 = w32.bfloat16()
        for M in ms:
            x = torch.randn(M, K, generator=gen)
            x16 = x.bfloat16()
            want = F.linear(x.double(), w32.double())
            cases = {"bf16_linear": (lambda: F.linear(x16, w16), 2 * N * K, None),
                     "fp32_linear": (lambda: F.linear(x, w32), 4 * N * K, None)}
            for isa in isas():
                if isa == "scalar" and N * K * M > 2048 * 2048 * 16:
                    continue
                fn = (lambda isa=isa: binary_linear(x, packed, scale, in_features=K, isa=isa))
                err = float(((fn().double() - want).abs().max() / want.abs().max()))
                cases[f"binary_{isa}"] = (fn, packed.numel(), err)
            timed = {}
            for name, (fn, nbytes, err) in cases.items():
                t = time_fn(fn, dev, reps=reps, max_seconds=3.0)
                timed[name] = t["median_ms"]
                rows.append(env | t | {"provider": name, "M": M, "N": N, "K": K, "weight_bytes": nbytes, "max_rel_err": err})
            for r in rows[-len(cases):]:
                r["vs_bf16_linear"] = timed["bf16_linear"] / r["median_ms"]
    print(f"# {env['device']}, torch {env['torch']}, {env['threads']} threads (CPU times, shared machine)")
    print(format_table(rows, [("provider", "provider", ""), ("M", "M", ""), ("N", "N", ""), ("K", "K", ""),
                              ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"),
                              ("vs_bf16_linear", "x bf16", ".2f"), ("max_rel_err", "rel err", ".1e")]))
    if out_csv:
        write_csv(out_csv, rows, COLUMNS)
        print(f"wrote {out_csv}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="LLaMA-2-7B shapes (4096 x 4096, 11008 x 4096)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a loaded machine")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "binary_cpu.csv"),
                    help="CSV path ('' for none)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = [(4096, 4096), (11008, 4096)] if a.full else [(2048, 2048)]
    run(shapes, [1, 16, 128], a.reps, a.out)


if __name__ == "__main__":
    main()
