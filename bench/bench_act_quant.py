"""Benchmark of dynamic per-token activation fake quantisation (weight-activation LR-QAT).

Providers
    eager     ``reference.fake_quant_activation``: min, max, divide, round, clamp, multiply as
              separate eager ops (each a pass over the activations).
    compile   ``torch.compile`` (inductor) of the same reference.
    triton    ``lrqat_kernels.fake_quant_activation``: one Triton kernel, one read + one write
              (CUDA only; on CPU it would run in the Triton interpreter, which is not a timing).

Shapes: LLaMA-2-7B activations, 4096 tokens x 4096 (inputs of q/k/v/o/gate/up) and x 11008 (input
of down), bf16, 8- and 4-bit asymmetric. Reported: median / p20 / p80 time, GB/s over the minimum
traffic (read x once, write x_hat once) and its share of the H100 HBM roofline (3.35 TB/s).

On a CPU it runs the eager and compile providers at ``--tokens 512`` by default and says loudly
that these are CPU times.

Usage::

    PYTHONPATH=. python bench/bench_act_quant.py               # GPU: all providers
    PYTHONPATH=. python bench/bench_act_quant.py --tokens 512  # CPU: eager + compile only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import H100_BYTES_PER_S, environment, format_table, time_fn, write_csv  # noqa: E402

import lrqat_kernels as lk  # noqa: E402
from lrqat_kernels import reference  # noqa: E402

HIDDEN = [4096, 11008]
PROVIDERS = ["eager", "compile", "triton"]
COLUMNS = ["date", "device", "torch", "triton", "provider", "tokens", "hidden", "bits", "dtype",
           "median_ms", "p20_ms", "p80_ms", "gb_per_s", "pct_roofline", "speedup_vs_eager", "note"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="tokens (default 4096 on GPU, 512 on CPU)")
    ap.add_argument("--hidden", default=",".join(map(str, HIDDEN)))
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--csv", default=None, help="output CSV (default bench/results/act_quant_<device>.csv)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    tokens = args.tokens or (4096 if on_gpu else 512)
    env = environment(device)
    if not on_gpu:
        print("!! No CUDA device: these are CPU times of the eager/compile providers, NOT GPU timings.\n"
              "!! The Triton provider needs a GPU (the interpreter is not a timing) and is skipped.")
    providers = [p for p in args.providers.split(",") if p]
    fns = {
        "eager": reference.fake_quant_activation,
        "compile": torch.compile(reference.fake_quant_activation, dynamic=False),
        "triton": lk.fake_quant_activation,
    }
    rows = []
    for hidden in map(int, args.hidden.split(",")):
        for bits in map(int, args.bits.split(",")):
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
            nbytes = 2 * x.numel() * x.element_size()
            base = None
            for p in providers:
                if p == "triton" and not on_gpu:
                    continue
                fn = fns[p]
                with torch.no_grad():
                    out = fn(x, bits, False)
                    ref = reference.fake_quant_activation(x, bits, False)
                    exact = torch.equal(out, ref)
                    t = time_fn(lambda: fn(x, bits, False), device)
                gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
                base = t["median_ms"] if p == "eager" else base
                rows.append(dict(env, provider=p, tokens=tokens, hidden=hidden, bits=bits, dtype="bf16", **t,
                                 gb_per_s=gbps,
                                 pct_roofline=100 * gbps * 1e9 / H100_BYTES_PER_S if on_gpu else None,
                                 speedup_vs_eager=(base / t["median_ms"]) if base else None,
                                 note=("" if exact else "OUTPUT DIFFERS FROM REFERENCE") + ("" if on_gpu else "CPU time")))
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    print(format_table(rows, [("provider", "provider", ""), ("tokens", "tokens", ""), ("hidden", "hidden", ""),
                              ("bits", "bits", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"),
                              ("p80_ms", "p80", ".3f"), ("gb_per_s", "GB/s", ".1f"),
                              ("pct_roofline", "% H100 HBM", ".1f"), ("speedup_vs_eager", "x eager", ".2f"),
                              ("note", "note", "")]))
    path = args.csv or os.path.join(os.path.dirname(__file__), "results", f"act_quant_{device.type}.csv")
    write_csv(path, rows, COLUMNS)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
