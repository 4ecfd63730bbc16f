"""Shared helpers of the benchmarks: timing, memory, environment, CSV.

* :func:`time_fn`: median / p20 / p80 in milliseconds, with CUDA events on a GPU (after a
  synchronise per repetition) and ``time.perf_counter`` on the CPU.
* :func:`peak_memory`: peak bytes a callable allocates beyond what was live before it (CUDA
  caching-allocator statistics; on a Linux CPU the peak resident set size, reset per call).
* :func:`saved_for_backward`: bytes autograd keeps between forward and backward, storages
  counted once (``torch.autograd.graph.saved_tensors_hooks``).
* :func:`environment` / :func:`write_csv`: every CSV row carries device, torch, triton, date.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from typing import Callable, Iterable

import torch

#: H100 SXM HBM3 bandwidth, the roofline the GPU numbers are compared with.
H100_BYTES_PER_S = 3.35e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, device: torch.device, *, setup: Callable | None = None, warmup: int = 3,
            reps: int = 20, max_seconds: float = 5.0) -> dict:
    """Time ``fn()`` (or ``fn(setup())``, with ``setup`` untimed): ``warmup`` runs, then up to
    ``reps`` timed ones (stopping early after ``max_seconds`` once 3 are in).

    Returns:
        ``{"median_ms", "p20_ms", "p80_ms", "reps"}``.
    """
    def call():
        return fn(setup()) if setup is not None else fn()

    for _ in range(warmup):
        call()
    sync(device)
    times = []
    start_all = time.perf_counter()
    for _ in range(reps):
        arg = setup() if setup is not None else None
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg) if setup is not None else fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(arg) if setup is not None else fn()
            times.append((time.perf_counter() - t0) * 1e3)
        del arg
        if time.perf_counter() - start_all > max_seconds and len(times) >= 3:
            break
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": len(times)}


def peak_memory(fn: Callable, device: torch.device, *, setup: Callable | None = None) -> int | None:
    """Peak bytes allocated while ``fn()`` (or ``fn(setup())``) runs, above what was live before
    it (``setup`` runs first, outside the measurement); None where unknown."""
    arg = setup() if setup is not None else None

    def call():
        return fn(arg) if setup is not None else fn()

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    # CPU: growth of Linux's peak resident set size over the call, from a trimmed heap
    # (clear_refs "5" resets VmHWM; malloc_trim returns free heap pages, which the call would
    # otherwise reuse unseen). With glibc's mmap threshold at 64 KiB every tensor above it is
    # mmap'd and unmapped on free, so the RSS follows tensor memory; it includes allocator
    # overhead, so compare providers, not bytes. Only for this measurement: timed with every
    # allocation an mmap + page faults, CPU cases ran ~3x slower, so the threshold goes back to
    # glibc's dynamic maximum (32 MiB, where the default settles once large blocks are freed).
    _set_mmap_threshold(1 << 16)
    _malloc_trim()  # free heap pages go back to the OS: reusing them would not show in the RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status("VmRSS")
        call()
        return max(0, _proc_status("VmHWM") - before)
    except OSError:
        return None
    finally:
        _set_mmap_threshold(32 << 20)


def _malloc_trim() -> None:
    """``malloc_trim(0)`` (glibc; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_mmap_threshold(nbytes: int) -> None:
    """``mallopt(M_MMAP_THRESHOLD, nbytes)`` (glibc; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def saved_for_backward(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn(), bytes saved for backward)`` counting each storage once."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            nbytes = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
            key, nbytes = (id(t), t.device), t.numel() * t.element_size()
        seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional for the eager providers
        triton_version = "none"
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def write_csv(path: str, rows: Iterable[dict], columns: list[str]) -> None:
    """Write ``rows`` (dicts) with ``columns`` in that order; creates the folder. Atomic: a
    temporary file renamed over ``path``, so an interrupted run leaves the old CSV whole."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A plain text table: ``columns`` are ``(key, header, format)`` triples."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None or v == "" else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.rjust(w) if j else c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# ---- the pytest-benchmark suite (bench/test_*.py, bench/conftest.py) ------------------------
#
# Schema: pytest-benchmark's JSON (``--benchmark-json``). Each benchmark's ``extra_info`` names
# the case (op, impl, mode, device, shape, dtype, what ran) and, once the run is over, its time
# over each baseline impl of its group (``vs_<impl>``: median / that impl's median, same run).

#: /proc/cpuinfo flags worth naming in a result (vector ISAs the kernels and oneDNN choose from).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> dict:
    """``{"model", "flags", "logical_cpus"}`` from ``/proc/cpuinfo`` (flags: those of :data:`CPU_FLAGS`)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                if ":" in line:
                    k, v = (t.strip() for t in line.split(":", 1))
                    info.setdefault(k, v)
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "flags": [f for f in CPU_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
    }


def suite_machine_info() -> dict:
    """What ``pytest_benchmark_update_machine_info`` adds under ``"lrqat"``: CPU model and ISA
    flags, the INT4 kernel's instruction sets, torch / triton / CUDA versions and GPU, torch
    threads, the 1-minute load average and the date (bench/conftest.py takes them at the start)."""
    env = environment(torch.device("cpu"))
    cpu = cpu_info()
    try:
        from lrqat_kernels.ops.int4_linear import cpu_isas

        isas = list(cpu_isas())
    except Exception as exc:  # an install without the INT4 module still benchmarks the rest
        isas = [f"unknown ({type(exc).__name__})"]
    try:
        from lrqat_kernels import _ext

        native = bool(_ext.load_extension())
    except Exception:
        native = False
    return {
        "date": env["date"],
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "logical_cpus": cpu["logical_cpus"],
        "int4_cpu_isas": isas,
        "native_extension": native,
        "torch": env["torch"],
        "triton": env["triton"],
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


def lrqat_layer(out_features: int, in_features: int, *, rank: int, bits: int, phi_format: str,
                group_size: int | None, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """The trainable LR-QAT layer's tensors, as ``LRQATLinear`` keeps them.

    Returns:
        ``{"phi", "lora_A", "lora_B", "scale"}``: ``phi`` encoded in ``phi_format`` (``[out, in]``,
        ``[out, in // 2]`` uint8 for packed_int), ``lora_A`` ``[rank, in]`` and ``lora_B``
        ``[out, rank]`` in ``dtype``, fp32 ``scale`` ``[out, in // group_size]`` (``[out, 1]``
        per channel); the last three require grad.
    """
    from lrqat_kernels.formats import encode_phi, qrange

    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = qrange(bits)
    groups = 1 if group_size is None else in_features // group_size
    phi = encode_phi(torch.rand(out_features, in_features, generator=gen) * (qmax - qmin) + qmin, bits, phi_format)
    lora_A = torch.randn(rank, in_features, generator=gen) / in_features**0.5
    lora_B = torch.randn(out_features, rank, generator=gen) * 0.01
    scale = torch.rand(out_features, groups, generator=gen) * 0.01 + 0.01
    return {
        "phi": phi.to(device),
        "lora_A": lora_A.to(dtype).to(device).requires_grad_(),
        "lora_B": lora_B.to(dtype).to(device).requires_grad_(),
        "scale": scale.to(device).requires_grad_(),
    }


def zero_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


def time_case(benchmark, fn: Callable[[], object], *, device: str, group: str, baselines: tuple[str, ...],
              **extra) -> object:
    """Time ``fn()`` with pytest-benchmark as one case of ``group``; returns ``fn()``'s last result.

    ``extra`` goes to ``benchmark.extra_info`` (``impl`` names this case in its group);
    ``baselines`` are the impls of the group its ratios are taken against. On CUDA each call is
    followed by a synchronise, so the wall-clock timer sees the kernels' time (and a call of
    microseconds also its launch and synchronise overhead: read such groups as ratios).
    """
    benchmark.group = group
    benchmark.extra_info.update(extra, device=device, baselines=list(baselines))
    if device == "cuda":
        def run():
            out = fn()
            torch.cuda.synchronize()
            return out
    else:
        run = fn
    return benchmark(run)


def add_ratios(entries: list[dict]) -> list[dict]:
    """Set ``extra_info["vs_<impl>"]`` = median / the median of ``impl`` in the same group, for
    every impl in the entry's ``extra_info["baselines"]`` that ran; in place.

    Args:
        entries: pytest-benchmark JSON benchmarks (``{"group", "extra_info", "stats": {"median"}}``).
    """
    medians = {(e["group"], e["extra_info"].get("impl")): e["stats"]["median"] for e in entries}
    for e in entries:
        for base in e["extra_info"].get("baselines", ()):
            ref = medians.get((e["group"], base))
            if ref:
                e["extra_info"][f"vs_{base}"] = e["stats"]["median"] / ref
    return entries


def ratio_table(entries: list[dict]) -> str:
    """A plain text table of :func:`add_ratios`'d entries: group, impl, median ms, ratios."""
    bases = sorted({b for e in entries for b in e["extra_info"].get("baselines", ())})
    rows = [dict(group=e["group"], impl=e["extra_info"].get("impl", e.get("name")),
                 median_ms=e["stats"]["median"] * 1e3,
                 **{f"vs_{b}": e["extra_info"].get(f"vs_{b}") for b in bases})
            for e in sorted(entries, key=lambda e: (e["group"] or "", e["stats"]["median"]))]
    return format_table(rows, [("group", "group", ""), ("impl", "impl", ""), ("median_ms", "median ms", ".4f")]
                        + [(f"vs_{b}", f"x {b}", ".2f") for b in bases])


def check_same_product(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 2e-2) -> float:
    """``max |got - want| / max |want|``; raises AssertionError above ``tol`` (a case times only
    what computes the reference's result: 16-bit rounding and a flipped rounding step pass)."""
    got, want = got.detach().float(), want.detach().float()
    rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
    if not rel <= tol:  # also catches NaN
        raise AssertionError(f"{what}: output differs from the reference (max rel error {rel:.3g} > {tol})")
    return rel
