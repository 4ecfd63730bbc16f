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

Norm site (``--sections norm``): the output of a decoder layer's ``input_layernorm`` feeds q, k
and v. Providers for "RMSNorm, then the q/k/v inputs quantised":

    per_linear_eager    torch RMSNorm (transformers' ops) + 3 x reference quantiser (eager)
    norm_once_eager     torch RMSNorm + 1 x reference quantiser: the norm-fused placement on CPU
    per_linear_triton   torch RMSNorm + 3 x the Triton quantiser (GPU)
    norm_fused_triton   ``lrqat_kernels.rms_norm_fake_quant``: one kernel (GPU)
    norm_only_eager     torch RMSNorm alone (what a weight-only model pays at this site)

GB/s there is over the fused kernel's minimum traffic (read x, write x_hat), so it reads as the
effective bandwidth of the whole site. Written to ``bench/results/norm_act_quant_<device>.csv``.

Training step (``--sections step``): forward + backward of a LLaMA (random weights; 2 layers of
LLaMA-2-7B width on a GPU, a 4-layer 512-wide one on a CPU) prepared with ``W4A8KV8``, with the
norm-fused placement and with per-linear quantisers (``fuse_norm_quant``). Written to
``bench/results/wa_step_<device>.csv``.

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
    ap.add_argument("--sections", default="quant,norm,step",
                    help="quant (the quantiser alone), norm (the norm site), step (a LLaMA training step)")
    args = ap.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    for sec in sections:
        if sec not in ("quant", "norm", "step"):
            ap.error(f"--sections: unknown section {sec!r}; known: quant, norm, step")

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
    if "norm" in sections:
        norm_site(device, tokens, [int(b) for b in args.bits.split(",")], env, args.csv)
    if "step" in sections:
        train_step(device, env, args.csv)
    if "quant" not in sections:
        return 0
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


NORM_PROVIDERS = ["norm_only_eager", "per_linear_eager", "norm_once_eager", "per_linear_triton", "norm_fused_triton"]
NORM_COLUMNS = ["date", "device", "torch", "triton", "provider", "tokens", "hidden", "bits", "dtype", "consumers",
                "median_ms", "p20_ms", "p80_ms", "gb_per_s", "pct_roofline", "speedup_vs_per_linear", "note"]


def norm_site(device, tokens, bits_list, env, csv_arg, hidden=4096, consumers=3) -> list[dict]:
    """Time the input_layernorm site (norm, then the inputs of ``consumers`` linears quantised)."""
    on_gpu = device.type == "cuda"
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    w = (torch.rand(hidden, device=device) + 0.5).to(torch.bfloat16)
    eps = 1e-5
    nbytes = 2 * x.numel() * x.element_size()

    def per_linear(quant):
        def f(bits):
            h = reference.rms_norm(x, w, eps)
            return [quant(h, bits, False) for _ in range(consumers)]
        return f

    fns = {
        "norm_only_eager": lambda bits: reference.rms_norm(x, w, eps),
        "per_linear_eager": per_linear(reference.fake_quant_activation),
        "norm_once_eager": lambda bits: reference.fake_quant_activation(reference.rms_norm(x, w, eps), bits, False),
        "per_linear_triton": per_linear(lk.fake_quant_activation),
        "norm_fused_triton": lambda bits: lk.rms_norm_fake_quant(x, w, eps, bits, False),
    }
    rows = []
    for bits in bits_list:
        base = None
        for p in NORM_PROVIDERS:
            if p.endswith("triton") and not on_gpu:
                continue
            with torch.no_grad():
                t = time_fn(lambda: fns[p](bits), device)
                note = "" if on_gpu else "CPU time"
                if p == "norm_fused_triton":
                    got = fns[p](bits)
                    want = reference.rms_norm_fake_quant(x, w, eps, bits, False)
                    if not torch.equal(got, want):
                        frac = (got != want).float().mean().item()
                        note += f"differs from reference in {100 * frac:.3f}% of elements (norm's last bit)"
            base = t["median_ms"] if p == "per_linear_eager" and not on_gpu else base
            base = t["median_ms"] if p == "per_linear_triton" else base
            gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rows.append(dict(env, provider=p, tokens=tokens, hidden=hidden, bits=bits, dtype="bf16", consumers=consumers,
                             **t, gb_per_s=gbps, pct_roofline=100 * gbps * 1e9 / H100_BYTES_PER_S if on_gpu else None,
                             speedup_vs_per_linear=(base / t["median_ms"]) if base else None, note=note))
    print(f"norm site (RMSNorm -> {consumers} quantised linear inputs) | device: {env['device']} | torch {env['torch']} "
          f"| triton {env['triton']} | {env['date']}")
    print(format_table(rows, [("provider", "provider", ""), ("tokens", "tokens", ""), ("hidden", "hidden", ""),
                              ("bits", "bits", ""), ("median_ms", "median ms", ".3f"), ("p20_ms", "p20", ".3f"),
                              ("p80_ms", "p80", ".3f"), ("gb_per_s", "GB/s", ".1f"),
                              ("pct_roofline", "% H100 HBM", ".1f"), ("speedup_vs_per_linear", "x per-linear", ".2f"),
                              ("note", "note", "")]))
    if csv_arg != "":
        path = os.path.join(os.path.dirname(__file__), "results", f"norm_act_quant_{device.type}.csv")
        write_csv(path, rows, NORM_COLUMNS)
        print(f"wrote {path}")
    return rows


STEP_COLUMNS = ["date", "device", "torch", "triton", "placement", "preset", "layers", "hidden", "batch", "seq", "dtype",
                "median_ms", "p20_ms", "p80_ms", "speedup_vs_per_linear", "note"]


def train_step(device, env, csv_arg, preset="W4A8KV8") -> list[dict]:
    """Forward + backward of a random LLaMA under ``preset``, norm-fused vs per-linear quantisers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    on_gpu = device.type == "cuda"
    if on_gpu:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32)
        batch, seq, dtype = 1, 2048, torch.bfloat16
    else:
        shape = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8)
        batch, seq, dtype = 2, 256, torch.float32
    cfg = LlamaConfig(vocab_size=1024, max_position_embeddings=seq, **shape)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    rows, base = [], None
    for placement in ("per_linear", "norm_fused"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        lk.prepare(model, lk.LRQATConfig.preset(preset, rank=16, fuse_norm_quant=placement == "norm_fused"))

        def step():
            model(input_ids=ids, labels=ids).loss.backward()

        t = time_fn(step, device, reps=10, max_seconds=20.0)
        base = t["median_ms"] if placement == "per_linear" else base
        rows.append(dict(env, placement=placement, preset=preset, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                         batch=batch, seq=seq, dtype=str(dtype).replace("torch.", ""), **t,
                         speedup_vs_per_linear=base / t["median_ms"], note="" if on_gpu else "CPU time"))
        del model
    print(f"training step (fwd + bwd, {preset}) | device: {env['device']} | torch {env['torch']} | {env['date']}")
    print(format_table(rows, [("placement", "placement", ""), ("layers", "layers", ""), ("hidden", "hidden", ""),
                              ("batch", "batch", ""), ("seq", "seq", ""), ("dtype", "dtype", ""),
                              ("median_ms", "median ms", ".1f"), ("p20_ms", "p20", ".1f"), ("p80_ms", "p80", ".1f"),
                              ("speedup_vs_per_linear", "x per-linear", ".3f"), ("note", "note", "")]))
    if csv_arg != "":
        path = os.path.join(os.path.dirname(__file__), "results", f"wa_step_{device.type}.csv")
        write_csv(path, rows, STEP_COLUMNS)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
