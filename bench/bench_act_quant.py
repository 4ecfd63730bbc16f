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

Producer sites (``--sections sites``): the output of ``input_layernorm`` feeds q, k and v (norm
site, 4096 wide); ``silu(gate) * up`` feeds down_proj (SwiGLU site, 11008 wide). Providers for
"make the tensor, then quantise the inputs of its consumers":

    producer_only_eager  the producer alone in torch (what a weight-only model pays there)
    per_linear_eager     torch producer + one reference quantiser per consumer (eager)
    once_eager           torch producer + 1 reference quantiser: the fused placement on CPU
    per_linear_triton    torch producer + one Triton quantiser per consumer (GPU)
    fused_triton         ``rms_norm_fake_quant`` / ``swiglu_fake_quant``: one kernel (GPU)

GB/s there is over the fused kernel's minimum traffic (norm: read x, write x_hat; SwiGLU: read
gate and up, write x_hat), so it reads as the effective bandwidth of the whole site. Written to
``bench/results/act_quant_sites_<device>.csv``.

Training step (``--sections step``): forward + backward of a LLaMA (random weights; 2 layers of
LLaMA-2-7B width on a GPU, a 4-layer 512-wide one on a CPU) prepared with ``W4A8KV8``, with the
fused placement (norms and SwiGLU quantise their outputs) and with per-linear quantisers (``fuse_act_quant``). Written to
``bench/results/wa_step_<device>.csv``.

On a CPU it runs the eager and compile providers at ``--tokens 512`` by default and says loudly
that these are CPU times.

Kept beside the pytest-benchmark suite (``pytest bench --benchmark-only``, whose JSON is the
schema for timings of each op against the reference): this script writes the committed CSVs that
bench/RESULTS.md cites (``act_quant_cpu.csv``, ``act_quant_sites_cpu.csv``, ``wa_step_cpu.csv``) and
what the suite does not measure: GB/s against the HBM roofline, the producer sites, the training
step and the ``torch.compile`` provider. ``scripts/gpu_session.sh`` runs it on a lent GPU.

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

HIDDEN = ["4096", "11008", "128x32"]  # "DxH": H heads of D per token (queries after RoPE, per head)
PROVIDERS = ["eager", "compile", "triton"]
COLUMNS = ["date", "device", "torch", "triton", "provider", "tokens", "hidden", "bits", "dtype",
           "median_ms", "p20_ms", "p80_ms", "gb_per_s", "pct_roofline", "speedup_vs_eager", "note"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=None, help="tokens (default 4096 on GPU, 512 on CPU)")
    ap.add_argument("--hidden", default=",".join(HIDDEN),
                    help="row widths; 'DxH' quantises H rows of D per token (per-head queries / keys)")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--csv", default=None,
                    help="output CSV of the quant section (default bench/results/act_quant_<device>.csv; the sites "
                         "and step sections write act_quant_sites_<device>.csv / wa_step_<device>.csv beside it); "
                         "'' writes no files")
    ap.add_argument("--sections", default="quant,sites,step",
                    help="quant (the quantiser alone), sites (norm / SwiGLU + quantisers), step (a LLaMA training step)")
    args = ap.parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    for sec in sections:
        if sec not in ("quant", "sites", "step"):
            ap.error(f"--sections: unknown section {sec!r}; known: quant, sites, step")

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
    if "sites" in sections:
        sites(device, tokens, [int(b) for b in args.bits.split(",")], env, args.csv)
    if "step" in sections:
        train_step(device, env, args.csv)
    if "quant" not in sections:
        return 0
    for spec in args.hidden.split(","):
        hidden, heads = (int(v) for v in spec.split("x")) if "x" in spec else (int(spec), 1)
        for bits in map(int, args.bits.split(",")):
            x = torch.randn(tokens * heads, hidden, device=device, dtype=torch.bfloat16)
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
                rows.append(dict(env, provider=p, tokens=tokens, hidden=spec, bits=bits, dtype="bf16", **t,
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
    if args.csv == "":
        return 0
    path = args.csv or os.path.join(os.path.dirname(__file__), "results", f"act_quant_{device.type}.csv")
    write_csv(path, rows, COLUMNS)
    print(f"wrote {path}")
    return 0


def _results_dir(csv_arg: str | None) -> str:
    """Where the sites / step CSVs go: beside ``--csv`` when given, else bench/results/."""
    return os.path.dirname(os.path.abspath(csv_arg)) if csv_arg else os.path.join(os.path.dirname(__file__), "results")


SITE_PROVIDERS = ["producer_only_eager", "per_linear_eager", "once_eager", "per_linear_triton", "fused_triton"]
SITE_COLUMNS = ["date", "device", "torch", "triton", "site", "provider", "tokens", "width", "bits", "dtype", "consumers",
                "median_ms", "p20_ms", "p80_ms", "gb_per_s", "pct_roofline", "speedup_vs_per_linear", "note"]


def _site_fns(site: str, device, tokens: int):
    """``(width, consumers, min_bytes, producer, fused, reference_fused)`` of one producer site, bf16."""
    if site == "norm":  # input_layernorm -> q, k, v
        hidden = 4096
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        w = (torch.rand(hidden, device=device) + 0.5).to(torch.bfloat16)
        return (hidden, 3, 2 * x.numel() * 2, lambda: reference.rms_norm(x, w, 1e-5),
                lambda bits: lk.rms_norm_fake_quant(x, w, 1e-5, bits, False),
                lambda bits: reference.rms_norm_fake_quant(x, w, 1e-5, bits, False))
    inter = 11008  # silu(gate) * up -> down_proj
    g = torch.randn(tokens, inter, device=device, dtype=torch.bfloat16)
    u = torch.randn(tokens, inter, device=device, dtype=torch.bfloat16)
    return (inter, 1, 3 * g.numel() * 2, lambda: reference.swiglu(g, u),
            lambda bits: lk.swiglu_fake_quant(g, u, bits, False),
            lambda bits: reference.swiglu_fake_quant(g, u, bits, False))


def sites(device, tokens, bits_list, env, csv_arg) -> list[dict]:
    """Time each producer site: the norm feeding q/k/v, and the SwiGLU feeding down_proj."""
    on_gpu = device.type == "cuda"
    rows = []
    for site in ("norm", "swiglu"):
        width, consumers, nbytes, producer, fused, ref_fused = _site_fns(site, device, tokens)

        def per_linear(quant, producer=producer, consumers=consumers):
            def f(bits):
                h = producer()
                return [quant(h, bits, False) for _ in range(consumers)]
            return f

        fns = {
            "producer_only_eager": lambda bits, producer=producer: producer(),
            "per_linear_eager": per_linear(reference.fake_quant_activation),
            "once_eager": lambda bits, producer=producer: reference.fake_quant_activation(producer(), bits, False),
            "per_linear_triton": per_linear(lk.fake_quant_activation),
            "fused_triton": fused,
        }
        for bits in bits_list:
            base = None
            for p in SITE_PROVIDERS:
                if p.endswith("triton") and not on_gpu:
                    continue
                if p == "once_eager" and consumers == 1:
                    continue  # the same ops as per_linear_eager
                with torch.no_grad():
                    t = time_fn(lambda: fns[p](bits), device)
                    note = "" if on_gpu else "CPU time"
                    if p == "fused_triton":
                        got, want = fused(bits), ref_fused(bits)
                        if not torch.equal(got, want):
                            frac = (got != want).float().mean().item()
                            note += f"differs from reference in {100 * frac:.3f}% of elements (last bits before rounding)"
                base = t["median_ms"] if p == ("per_linear_triton" if on_gpu else "per_linear_eager") else base
                gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
                rows.append(dict(env, site=site, provider=p, tokens=tokens, width=width, bits=bits, dtype="bf16",
                                 consumers=consumers, **t, gb_per_s=gbps,
                                 pct_roofline=100 * gbps * 1e9 / H100_BYTES_PER_S if on_gpu else None,
                                 speedup_vs_per_linear=(base / t["median_ms"]) if base else None, note=note))
    print(f"producer sites (norm -> q/k/v inputs; SwiGLU -> down_proj input) | device: {env['device']} | "
          f"torch {env['torch']} | triton {env['triton']} | {env['date']}")
    print(format_table(rows, [("site", "site", ""), ("provider", "provider", ""), ("tokens", "tokens", ""),
                              ("width", "width", ""), ("bits", "bits", ""), ("median_ms", "median ms", ".3f"),
                              ("p20_ms", "p20", ".3f"), ("p80_ms", "p80", ".3f"), ("gb_per_s", "GB/s", ".1f"),
                              ("pct_roofline", "% H100 HBM", ".1f"), ("speedup_vs_per_linear", "x per-linear", ".2f"),
                              ("note", "note", "")]))
    if csv_arg != "":
        path = os.path.join(_results_dir(csv_arg), f"act_quant_sites_{device.type}.csv")
        write_csv(path, rows, SITE_COLUMNS)
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
    for placement in ("per_linear", "fused"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        lk.prepare(model, lk.LRQATConfig.preset(preset, rank=16, fuse_act_quant=placement == "fused"))

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
        path = os.path.join(_results_dir(csv_arg), f"wa_step_{device.type}.csv")
        write_csv(path, rows, STEP_COLUMNS)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
