"""Benchmark of the LR-QAT linear layer ``y = x @ W_hat^T + b`` (forward, backward, both).

Providers
    linear       the baseline: the bf16 ``F.linear`` that LR-QAT replaces, weight trainable (the same
                 three GEMMs as LR-QAT: y, dx and the weight-shaped dW; no quantiser). The
                 ``vs_linear`` column is each provider's time over this one's for the same shape,
                 tokens and mode (the "fwd+bwd within 1.15x of a bf16 linear" target).
    eager        ``reference.lrqat_linear``: plain autograd over eager ops (keeps weight-sized
                 intermediates: mask, W_int, expanded scale, W_hat).
    eager_ckpt   the same under ``torch.utils.checkpoint`` (the LR-QAT authors' way: nothing
                 weight-sized is saved, the backward re-runs the eager forward).
    compile      ``torch.compile(reference.lrqat_linear)`` (inductor).
    lrqat        ``lrqat_kernels.lrqat_linear``: Triton kernels on CUDA (one-pass fake-quant
                 forward + cuBLAS, recomputing one-pass backward); on CPU its eager-math
                 fallback with the same lean autograd (saves only the inputs).
    lrqat_fused  ``functions.lrqat_linear_fused``: fused dequant-GEMM path (CUDA only).

Shapes are LLaMA-2-7B linears ``out x in``: 4096x4096 (q/k/v/o), 11008x4096 (gate/up),
4096x11008 (down), at 1, 16 and 4096 tokens; bf16 compute, INT4 ``packed_int`` Phi0, rank 32,
per-channel scales. Reported: median / p20 / p80 time, achieved GB/s over the op's minimum HBM
traffic (its inputs read once and outputs written once) and its share of the H100 roofline
(3.35 TB/s), TFLOP/s, peak memory of the timed region and the bytes saved for backward.

On a CPU it still runs (use ``--small``: the same shapes divided by 8, 1/16/512 tokens) and says
loudly that its times are CPU times: only the memory columns carry over to a GPU.

Kept beside the pytest-benchmark suite (``pytest bench --benchmark-only``, whose JSON is the
schema for timings of each op against the reference): this script writes the committed
``bench/results/lrqat_linear_cpu.csv`` that bench/RESULTS.md cites and what the suite does not
measure: the memory columns (peak, bytes saved for backward), GB/s and TFLOP/s against the H100
roofline, the backward alone, and the ``eager_ckpt`` / ``compile`` providers.
``scripts/gpu_session.sh`` runs it on a lent GPU.

Usage::

    PYTHONPATH=. python bench/bench_lrqat_linear.py                 # GPU, full shapes
    PYTHONPATH=. python bench/bench_lrqat_linear.py --small         # CPU, a few minutes
    PYTHONPATH=. python bench/bench_lrqat_linear.py --shapes 4096x4096 --tokens 16 --providers lrqat,eager
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    H100_BYTES_PER_S,
    environment,
    format_table,
    peak_memory,
    saved_for_backward,
    time_fn,
    write_csv,
)

import lrqat_kernels as lk  # noqa: E402
from lrqat_kernels import functions, reference  # noqa: E402
from lrqat_kernels.formats import encode_phi, qrange  # noqa: E402
from lrqat_kernels.modules import factor_dtype  # noqa: E402

LLAMA2_7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
TOKENS = [1, 16, 4096]
SMALL_SHAPES = [(512, 512), (1376, 512), (512, 1376)]
SMALL_TOKENS = [1, 16, 512]
PROVIDERS = ["linear", "eager", "eager_ckpt", "compile", "lrqat", "lrqat_fused"]
MODES = ["fwd", "bwd", "fwd+bwd"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

COLUMNS = ["date", "device", "torch", "triton", "provider", "mode", "out_features", "in_features", "tokens",
           "dtype", "factor_dtype", "phi_format", "bits", "rank", "group_size", "median_ms", "p20_ms", "p80_ms", "reps",
           "gbps", "pct_roofline", "tflops", "vs_linear", "peak_mem_mb", "saved_mb", "note"]


def make_layer(out, inn, tokens, args, device, provider="lrqat"):
    """The tensors one provider reads: LR-QAT's (phi, lora_A, lora_B, scale) or the baseline's weight."""
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    qmin, qmax = qrange(args.bits)
    g = inn if args.group_size is None else args.group_size
    # LoRA factors as LRQATLinear keeps them (modules.factor_dtype: fp32 under fp16), unless asked
    fdt = factor_dtype(dtype) if getattr(args, "factor_dtype", "auto") == "auto" else DTYPES[args.factor_dtype]
    if provider == "linear":
        lay = dict(weight=(torch.randn(out, inn, generator=gen) / inn**0.5).to(dtype).to(device).requires_grad_(True))
    else:
        phi = encode_phi(torch.rand(out, inn, generator=gen) * (qmax - qmin) + qmin, args.bits, args.phi_format)
        lay = dict(
            phi=phi.to(device),
            lora_A=(torch.randn(args.rank, inn, generator=gen) / inn**0.5).to(fdt).to(device).requires_grad_(True),
            lora_B=(torch.randn(out, args.rank, generator=gen) * 0.01).to(fdt).to(device).requires_grad_(True),
            scale=(torch.rand(out, inn // g, generator=gen) * 0.01 + 0.01).to(device).requires_grad_(True),
        )
    lay.update(
        bias=torch.zeros(out, dtype=dtype, device=device).requires_grad_(True),
        x=torch.randn(tokens, inn, generator=gen).to(dtype).to(device).requires_grad_(True),
        dy=torch.randn(tokens, out, generator=gen).to(dtype).to(device),
    )
    kw = dict(bits=args.bits, phi_format=args.phi_format, alpha=1.0, group_size=args.group_size)
    return lay, kw


def provider_fn(name, kw):
    if name == "linear":
        return lambda L: F.linear(L["x"], L["weight"], L["bias"])
    if name == "eager":
        return lambda L: reference.lrqat_linear(L["x"], L["phi"], L["lora_A"], L["lora_B"], L["scale"], L["bias"], **kw)
    if name == "eager_ckpt":
        def ckpt(L):
            f = lambda x, A, B, s, b: reference.lrqat_linear(x, L["phi"], A, B, s, b, **kw)  # noqa: E731
            return torch.utils.checkpoint.checkpoint(f, L["x"], L["lora_A"], L["lora_B"], L["scale"], L["bias"],
                                                     use_reentrant=False)
        return ckpt
    if name == "compile":
        compiled = torch.compile(reference.lrqat_linear)
        return lambda L: compiled(L["x"], L["phi"], L["lora_A"], L["lora_B"], L["scale"], L["bias"], **kw)
    if name == "lrqat":
        return lambda L: lk.lrqat_linear(L["x"], L["phi"], L["lora_A"], L["lora_B"], L["scale"], L["bias"], **kw)
    if name == "lrqat_fused":
        return lambda L: functions.lrqat_linear_fused(L["x"], L["phi"], L["lora_A"], L["lora_B"], L["scale"],
                                                      L["bias"], **kw)
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


def min_bytes(lay, mode):
    """Minimum HBM traffic of the op: every input read once, every output (and gradient) written once."""
    nb = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = [lay[k] for k in ("phi", "lora_A", "lora_B", "scale", "weight", "bias") if k in lay]
    read = sum(nb(t) for t in params) + nb(lay["x"]) + nb(lay["dy"])  # y has dy's size
    grads = nb(lay["x"]) + sum(nb(t) for t in params if t.requires_grad)
    return {"fwd": read, "bwd": read + grads, "fwd+bwd": 2 * read + grads}[mode]


def flops(out, inn, tokens, mode):
    f = 2 * tokens * out * inn
    return {"fwd": f, "bwd": 2 * f, "fwd+bwd": 3 * f}[mode]


def zero_grads(lay):
    for t in lay.values():
        if t.requires_grad:
            t.grad = None


def bench_one(provider, mode, out, inn, tokens, args, device):
    lay, kw = make_layer(out, inn, tokens, args, device, provider)
    fn = provider_fn(provider, kw)
    dy = lay["dy"]

    if mode == "fwd":
        run, setup = (lambda: fn(lay)), None
    elif mode == "bwd":
        def setup():
            zero_grads(lay)
            return fn(lay)

        def run(y):
            y.backward(dy)
    else:
        def run():
            zero_grads(lay)
            fn(lay).backward(dy)
        setup = None

    row = dict(provider=provider, mode=mode, out_features=out, in_features=inn, tokens=tokens, dtype=args.dtype,
               factor_dtype="" if provider == "linear" else str(lay["lora_A"].dtype).replace("torch.", ""),
               phi_format=args.phi_format, bits=args.bits, rank=args.rank,
               group_size="channel" if args.group_size is None else args.group_size)
    t = time_fn(run, device, setup=setup, warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds)
    row.update(t)
    sec = t["median_ms"] / 1e3
    row["gbps"] = min_bytes(lay, mode) / sec / 1e9
    row["pct_roofline"] = 100.0 * (min_bytes(lay, mode) / H100_BYTES_PER_S) / sec
    row["tflops"] = flops(out, inn, tokens, mode) / sec / 1e12
    peak = peak_memory(run, device, setup=setup)
    row["peak_mem_mb"] = None if peak is None else peak / 2**20
    zero_grads(lay)
    _, saved = saved_for_backward(lambda: fn(lay))
    row["saved_mb"] = saved / 2**20 if saved else None
    notes = []
    if device.type != "cuda":
        notes.append("CPU timing, not a GPU timing")
        if provider == "lrqat":
            notes.append("eager math (Triton runs on CUDA)")
    if provider == "compile" and not saved:
        notes.append("saved bytes not observable under torch.compile")
    row["note"] = "; ".join(notes)
    return row


def add_vs_linear(rows):
    """Set ``vs_linear`` = median / the ``linear`` row's median (same shape, tokens, mode), in place."""
    key = lambda r: (r["out_features"], r["in_features"], r["tokens"], r["mode"])  # noqa: E731
    base = {key(r): r["median_ms"] for r in rows if r["provider"] == "linear" and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and key(r) in base:
            r["vs_linear"] = r["median_ms"] / base[key(r)]


def parse_shapes(s):
    return [tuple(int(v) for v in item.lower().split("x")) for item in s.split(",") if item]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="shapes / 8 and tokens 1,16,512: a CPU run in minutes")
    p.add_argument("--shapes", type=parse_shapes, default=None, help="comma list of OUTxIN, e.g. 4096x4096,11008x4096")
    p.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--providers", type=lambda s: s.split(","), default=None)
    p.add_argument("--modes", type=lambda s: s.split(","), default=MODES)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--factor-dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="lora_A / lora_B dtype (auto: what LRQATLinear keeps, fp32 under fp16)")
    p.add_argument("--phi-format", default="packed_int")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--group-size", type=lambda s: None if s in ("none", "channel") else int(s), default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=3.0, help="stop timing one case after this long")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None, help="default: bench/results/lrqat_linear_<cuda|cpu>.csv")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    shapes = args.shapes or (SMALL_SHAPES if args.small else LLAMA2_7B_SHAPES)
    tokens = args.tokens or (SMALL_TOKENS if args.small else TOKENS)
    providers = args.providers or [pr for pr in PROVIDERS if on_gpu or pr != "lrqat_fused"]
    env = environment(device)
    if not on_gpu:
        bar = "!" * 78
        print(f"{bar}\n!! CPU RUN: these times are CPU times, NOT GPU timings. The memory columns (peak,\n"
              f"!! saved-for-backward) carry over; the lrqat provider runs its eager-math CPU fallback.\n{bar}")
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")

    path = args.csv or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"lrqat_linear_{'cuda' if on_gpu else 'cpu'}.csv")
    rows = []
    for out, inn in shapes:
        for t in tokens:
            for provider in providers:
                for mode in args.modes:
                    try:
                        r = bench_one(provider, mode, out, inn, t, args, device)
                    except Exception as exc:  # report and keep going (e.g. a compile failure)
                        r = dict(provider=provider, mode=mode, out_features=out, in_features=inn, tokens=t,
                                 note=f"failed: {type(exc).__name__}: {str(exc)[:120]}")
                    r.update(env)
                    rows.append(r)
                    print(f"  {provider:11} {mode:7} {out}x{inn} T={t:<5} "
                          + (f"{r['median_ms']:9.3f} ms" if "median_ms" in r else r["note"]), flush=True)
            torch._dynamo.reset()
            add_vs_linear(rows)
            write_csv(path, rows, COLUMNS)  # after every shape x tokens: a run cut short keeps what it measured

    print()
    print(format_table(rows, [
        ("provider", "provider", ""), ("mode", "mode", ""), ("out_features", "out", ""), ("in_features", "in", ""),
        ("tokens", "T", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"),
        ("gbps", "GB/s", ".2f"), ("pct_roofline", "%HBM", ".2f"), ("tflops", "TFLOP/s", ".3f"),
        ("vs_linear", "x linear", ".2f"), ("peak_mem_mb", "peak MiB", ".1f"), ("saved_mb", "saved MiB", ".2f"),
    ]))
    print(f"\nwrote {path}" + ("" if on_gpu else "   (CPU times: not GPU timings)"))


if __name__ == "__main__":
    main()
