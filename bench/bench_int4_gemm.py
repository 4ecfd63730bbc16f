"""Benchmark of the deployment INT4 GEMM on GPUs (W4A16) against cuBLAS and torch's tinygemm.

    .venv/bin/python bench/bench_int4_gemm.py                # all shapes and M, CSV + PNG in bench/results/
    .venv/bin/python bench/bench_int4_gemm.py --quick        # one shape, a few M, no files
    .venv/bin/python bench/bench_int4_gemm.py --dtype fp16 --group 64

Without a CUDA device it prints that no GPU timing was taken and exits 0 (nothing is written).

Providers, all ``y = x @ W^T`` with x ``[M, K]`` and a ``[N, K]`` layer:

* ``cublas``: ``F.linear`` with a dense fp16/bf16 weight (the baseline; speedups are vs it).
* ``tinygemm``: ``torch.ops.aten._weight_int4pack_mm`` on ``_convert_weight_to_int4pack`` (torch's
  own W4A16, bf16 only); scales_and_zeros ``[K / g, N, 2]`` with ``w = (u4 - 8) * s + zero``.
* ``lrqat_cuda``: our CUDA kernel (csrc/int4_gpu) on a weight prepacked once, 16-bit scales
  (``--scale-dtype fp32`` for fp32 scales). Only when ``_C`` was built with CUDA.
* ``lrqat_triton``: our Triton kernel (lrqat_kernels/ops/int4_triton.py), standard layout.
* ``lrqat_auto``: the dispatcher ``int4_linear(backend="auto")``: what a model gets by default
  (Triton for small M, dequantise + cuBLAS for large M); the CSV's ``auto_backend`` says which ran.

Every provider's output is checked against the fp32 product before it is timed (a wrong kernel is
reported and not timed). Timing: ``triton.testing.do_bench`` (it zeroes a 256 MiB buffer before
every repetition, so the weights come from HBM as in a real model, not from L2), p20 / p50 / p80.

Metrics: time (us), TFLOP/s = 2 M N K / t, GB/s = bytes moved / t with bytes = weight bytes
(incl. scales, zero points) + x + y, and % of the HBM roofline = GB/s / peak (from a table by
device name; "?" when the device is not in it). The CSV records device, driver, torch, triton
and CUDA versions. The PNG plots speedup over cuBLAS vs M, one panel per layer shape.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_csv  # noqa: E402

from lrqat_kernels.formats import pack_nibbles  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
# (name, N = out_features, K = in_features)
SHAPES = [
    ("llama2-7b.qkvo", 4096, 4096),
    ("llama2-7b.gate_up", 11008, 4096),
    ("llama2-7b.down", 4096, 11008),
    ("llama3-8b.qo", 4096, 4096),
    ("llama3-8b.kv", 1024, 4096),
    ("llama3-8b.gate_up", 14336, 4096),
    ("llama3-8b.down", 4096, 14336),
]
PROVIDERS = ("cublas", "tinygemm", "lrqat_cuda", "lrqat_triton", "lrqat_auto")

# Peak HBM bandwidth (bytes/s) by device-name substring; first match wins (most specific first).
PEAK_BW = [
    ("H200", 4.8e12),
    ("H100 SXM", 3.35e12),
    ("H100 80GB HBM3", 3.35e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("A10G", 0.6e12),
    ("A10", 0.6e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("L4", 0.3e12),
    ("A6000", 0.768e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
]


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW:
        if key in name:
            return bw
    return None


def versions() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    try:
        driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else ""
    except Exception:
        driver = ""
    return dict(
        device=props.name,
        sm=f"{props.major}{props.minor}",
        sms=props.multi_processor_count,
        driver=driver,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


class Layer:
    """One quantised layer in every provider's format (built once per shape)."""

    def __init__(self, N: int, K: int, group: int, dtype: torch.dtype, scale_dtype: torch.dtype, seed: int = 0,
                 device: str = "cuda"):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.N, self.K, self.group, self.dtype = N, K, group, dtype
        w_int = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
        self.scale = (torch.rand(N, K // group, generator=gen) * 0.01 + 0.002).to(device)
        self.w_int = w_int.to(device)
        self.qweight = pack_nibbles(w_int).to(device)
        self.w_hat32 = self.scale.repeat_interleave(group, dim=1) * self.w_int.float()
        self.w_dense = self.w_hat32.to(dtype)
        self.scale_dtype = scale_dtype
        self._gpu = None
        self._tiny = None

    def gpu_weight(self):
        if self._gpu is None:
            from lrqat_kernels.ops.int4_cuda import int4_cuda_prepack

            self._gpu = int4_cuda_prepack(self.qweight, self.scale, None, self.group, scale_dtype=self.scale_dtype)
        return self._gpu

    def tinygemm_weight(self, inner_k_tiles: int = 8):
        if self._tiny is None:
            u4 = (self.w_int.int() + 8).to(torch.uint8)  # unsigned nibbles
            # tinygemm's uint8 input packs column 2j in the HIGH nibble (torchao convention).
            packed = ((u4[:, 0::2] << 4) | u4[:, 1::2]).contiguous()
            w = torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles)
            sz = torch.stack([self.scale.t(), torch.zeros_like(self.scale.t())], dim=-1)  # [K/g, N, 2]
            self._tiny = (w, sz.to(torch.bfloat16).contiguous())
        return self._tiny

    def weight_bytes(self, provider: str) -> int:
        if provider == "cublas":
            return self.N * self.K * self.dtype.itemsize
        n_groups = self.K // self.group
        if provider == "tinygemm":
            return self.N * self.K // 2 + n_groups * self.N * 2 * 2
        sbytes = self.scale_dtype.itemsize if provider == "lrqat_cuda" else 4
        return self.N * self.K // 2 + n_groups * self.N * sbytes


def make_fn(provider: str, layer: Layer, x: torch.Tensor):
    """A zero-argument callable computing y with ``provider``, or a string saying why it can't run."""
    if provider == "cublas":
        return lambda: F.linear(x, layer.w_dense)
    if provider == "tinygemm":
        if x.dtype != torch.bfloat16:
            return "tinygemm needs bf16 x"
        if layer.K % 1024 or layer.N % 8 or layer.group not in (32, 64, 128, 256):
            return "shape/group not supported by tinygemm"
        try:
            w, sz = layer.tinygemm_weight()
        except Exception as exc:  # API differences between torch versions
            return f"tinygemm unavailable: {type(exc).__name__}: {exc}"
        return lambda: torch.ops.aten._weight_int4pack_mm(x, w, layer.group, sz)
    if provider == "lrqat_cuda":
        from lrqat_kernels.ops.int4_cuda import cuda_kernel_available, int4_cuda_linear

        if not cuda_kernel_available():
            return "lrqat_kernels._C has no CUDA kernel (built without CUDA?)"
        w = layer.gpu_weight()
        return lambda: int4_cuda_linear(x, w)
    if provider == "lrqat_triton":
        from lrqat_kernels.ops.int4_triton import int4_linear_triton

        return lambda: int4_linear_triton(x, layer.qweight, layer.scale, None, layer.group)
    if provider == "lrqat_auto":
        from lrqat_kernels.ops.int4_linear import int4_linear

        return lambda: int4_linear(x, layer.qweight, layer.scale, None, layer.group, backend="auto")
    raise ValueError(provider)


def auto_choice(layer: Layer, M: int) -> str:
    """The backend ``backend="auto"`` runs for this layer at M (the M rule)."""
    from lrqat_kernels.ops.int4_linear import auto_backend

    return auto_backend(layer.qweight.device, M, layer.N, layer.K, layer.group)


def check(provider: str, fn, layer: Layer, x: torch.Tensor) -> float:
    """Max |y - y_fp32| / max |y_fp32|; raises if far outside what a 16-bit output allows."""
    y = fn().float()
    ref = x.float() @ layer.w_hat32.t()
    if provider == "lrqat_cuda" and layer.scale_dtype != torch.float32:
        ref = x.float() @ (layer.gpu_weight().scale[:, : layer.N].float().t().repeat_interleave(layer.group, 1)
                           * layer.w_int.float()).t()
    rel = ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    if not math.isfinite(rel) or rel > 2e-2:
        raise AssertionError(f"{provider}: output differs from the fp32 reference (max rel error {rel:.3g})")
    return rel


def bench_one(fn) -> tuple[float, float, float]:
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return tuple(t * 1e3 for t in q)  # ms -> us


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="first shape, M in {1, 16, 256, 4096}, no files")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--scale-dtype", choices=("x", "fp32"), default="x",
                    help="scale dtype of the prepacked CUDA weight: x's 16-bit dtype (default) or fp32")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="all", help="comma-separated shape names or 'all'")
    ap.add_argument("--csv", default=os.path.join(RESULTS_DIR, "int4_gemm.csv"), help="'' for none")
    ap.add_argument("--plot", default=os.path.join(RESULTS_DIR, "int4_gemm_speedup.png"), help="'' for none")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting new shapes after this many seconds and write what was measured (0: no limit)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_int4_gemm: no CUDA device (torch.cuda.is_available() is False): no GPU timing was "
              "taken and no results were written. Run this on a machine with an NVIDIA GPU.")
        return 0

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    scale_dtype = dtype if args.scale_dtype == "x" else torch.float32
    providers = [p for p in args.providers.split(",") if p]
    for p in providers:
        if p not in PROVIDERS:
            ap.error(f"unknown provider {p!r}; known: {PROVIDERS}")
    ms = [int(m) for m in args.ms.split(",") if m]
    shapes = SHAPES if args.shapes == "all" else [s for s in SHAPES if s[0] in args.shapes.split(",")]
    if args.quick:
        shapes, ms = shapes[:1], [1, 16, 256, 4096]
    info = versions()
    peak = peak_bandwidth(info["device"])
    print(f"# {info['device']} (sm_{info['sm']}, {info['sms']} SMs), torch {info['torch']}, CUDA {info['cuda']}, "
          f"triton {info['triton']}; HBM peak {'%.2f TB/s' % (peak / 1e12) if peak else 'unknown (not in table)'}")
    print(f"# x {args.dtype}, group {args.group}, CUDA-kernel scales {scale_dtype}")

    rows = []
    # One CSV, appended run after run (device column). It is rewritten whole (atomically) after each
    # shape, so rows of older runs keep their values under a header that has gained columns, and a
    # run killed by a time limit keeps the shapes it finished.
    old_rows = []
    if args.csv and not args.quick and os.path.exists(args.csv):
        with open(args.csv, newline="") as f:
            old_rows = list(csv.DictReader(f))
    t_start = time.monotonic()
    for name, N, K in shapes:
        if args.budget_s and time.monotonic() - t_start > args.budget_s:
            print(f"\n# stopped early: budget of {args.budget_s:.0f} s reached before {name} (rerun with --shapes)")
            break
        layer = Layer(N, K, args.group, dtype, scale_dtype)
        print(f"\n## {name}: N={N} K={K}")
        print(f"{'M':>6} {'provider':>13} {'us':>9} {'TFLOP/s':>8} {'GB/s':>7} {'%HBM':>6} {'x cuBLAS':>9}")
        for M in ms:
            x = torch.randn(M, K, device="cuda").to(dtype)
            base = None
            for prov in providers:
                fn = make_fn(prov, layer, x)
                if isinstance(fn, str):
                    print(f"{M:>6} {prov:>13}  skipped: {fn}")
                    continue
                try:
                    err = check(prov, fn, layer, x)
                    p20, p50, p80 = bench_one(fn)
                except Exception as exc:  # a failing provider must not stop the others
                    print(f"{M:>6} {prov:>13}  FAILED: {type(exc).__name__}: {exc}")
                    continue
                moved = layer.weight_bytes(prov) + M * K * dtype.itemsize + M * N * dtype.itemsize
                gbps = moved / (p50 * 1e-6) / 1e9
                tflops = 2 * M * N * K / (p50 * 1e-6) / 1e12
                pct = 100 * gbps * 1e9 / peak if peak else float("nan")
                if prov == "cublas":
                    base = p50
                speedup = base / p50 if base else float("nan")
                print(f"{M:>6} {prov:>13} {p50:9.2f} {tflops:8.2f} {gbps:7.0f} {pct:6.1f} {speedup:9.2f}")
                rows.append(dict(info, shape=name, N=N, K=K, M=M, dtype=args.dtype, group=args.group,
                                 scale_dtype=str(scale_dtype).replace("torch.", ""), provider=prov,
                                 us_p20=round(p20, 3), us_p50=round(p50, 3), us_p80=round(p80, 3),
                                 tflops=round(tflops, 3), gbps=round(gbps, 1),
                                 pct_hbm_roofline=round(pct, 1) if peak else "", speedup_vs_cublas=round(speedup, 3),
                                 max_rel_err=f"{err:.2e}",
                                 auto_backend=auto_choice(layer, M) if prov == "lrqat_auto" else ""))
        del layer
        torch.cuda.empty_cache()
        if args.csv and not args.quick and rows:
            append_csv(args.csv, rows, old_rows)
            print(f"# {len(rows)} rows of this run in {args.csv}")

    if args.quick or not rows:
        return 0
    if args.plot:
        plot(rows, args.plot, info)
    return 0


def append_csv(path: str, rows: list[dict], old_rows: list[dict]) -> None:
    """Write ``old_rows + rows`` to ``path`` atomically, under a header that holds both's columns."""
    columns = list(dict.fromkeys([*(old_rows[0] if old_rows else {}), *rows[0]]))
    write_csv(path, old_rows + rows, columns)


def plot(rows, path: str, info: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot (pip install matplotlib)")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cols = min(3, len(shapes))
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, shape in zip(axes.flat, shapes):
        sub = [r for r in rows if r["shape"] == shape]
        for prov in PROVIDERS:
            pts = sorted((r["M"], r["speedup_vs_cublas"]) for r in sub if r["provider"] == prov)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} (N={sub[0]['N']}, K={sub[0]['K']})", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup vs cuBLAS")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"INT4 W4A16 vs cuBLAS: {info['device']}, torch {info['torch']}, CUDA {info['cuda']}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
