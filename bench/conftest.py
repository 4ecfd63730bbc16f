"""pytest-benchmark suites: every fused op against the eager reference, the INT4 GEMMs against torch's.

    pytest bench --benchmark-only                                # quick shapes: CPU, and CUDA when present
    pytest bench --benchmark-only --bench-full                   # LLaMA-2-7B shapes
    pytest bench --benchmark-only --bench-device cuda --benchmark-json bench/results/pytest_bench_cuda.json
    pytest bench --benchmark-disable                             # each case once, untimed (a smoke test)

Groups (``benchmark.group``) hold one op, shape, mode and device; their members are the impls
(``extra_info["impl"]``), so the default ``--benchmark-group-by=group`` puts ours beside the
reference. After the run each case carries ``vs_<baseline>`` (its median over the baseline's, same
run) in ``extra_info`` and the terminal shows those ratios; ``machine_info["lrqat"]`` names the CPU
model and ISA flags, torch / triton / CUDA versions, threads and the load average at the start and
end. ``--bench-full`` is for a GPU or a large CPU: its 4096-token cases take minutes each on 2 cores.

On CPU the "ours" impls are what a user of the package gets on a CPU: the fused ops' eager CPU
path (the Triton kernels run on CUDA) and the C++ INT4 kernels. The Triton interpreter is not a
timing: ``TRITON_INTERPRET`` is cleared here before anything imports triton (the op cases skip if
it is set again).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # never a timing, on CPU or CUDA tensors (tests/test_bench.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from _common import add_ratios, ratio_table, suite_machine_info  # noqa: E402

#: (name, out_features, in_features): LLaMA-2-7B linears, and the quick set (each side / 8).
LINEAR_FULL = [("qkvo", 4096, 4096), ("gate_up", 11008, 4096), ("down", 4096, 11008)]
LINEAR_QUICK = [(name, o // 8, i // 8) for name, o, i in LINEAR_FULL]
#: Tokens of a linear's input.
TOKENS_FULL = [1, 16, 4096]
TOKENS_QUICK = [16, 256]
#: (tokens, width) of the activation quantisers: the hidden size (RMSNorm's output, 4096) and the
#: MLP's (SwiGLU's output, 11008); the plain quantiser takes both.
NORM_FULL, MLP_FULL = [(4096, 4096)], [(4096, 11008)]
NORM_QUICK, MLP_QUICK = [(256, 4096)], [(256, 11008)]
#: (name, N, K) of the INT4 GEMMs, and their M (tokens).
INT4_FULL = LINEAR_FULL
INT4_QUICK = LINEAR_FULL[:1]
M_FULL = [1, 4, 16, 64, 256]
M_QUICK = [1, 16]
DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    group = parser.getgroup("lrqat bench")
    group.addoption("--bench-full", action="store_true", default=False,
                    help="LLaMA-2-7B shapes and token counts (default: the quick set, each side / 8, "
                         "about 2 minutes on 2 CPU cores)")
    group.addoption("--bench-device", default="all", choices=("all", *DEVICES),
                    help="devices to benchmark (default all: CUDA cases skip without a CUDA device)")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("bench/ needs pytest-benchmark: pip install -e '.[bench]'")


def _ids(cases) -> list[str]:
    """``qkvo-512x512`` for named shapes, ``256x4096`` for plain ones, ``16`` for numbers."""
    def one(c):
        if not isinstance(c, tuple):
            return str(c)
        name, dims = (c[0], c[1:]) if isinstance(c[0], str) else (None, c)
        return (f"{name}-" if name else "") + "x".join(str(v) for v in dims)
    return [one(c) for c in cases]


def pytest_generate_tests(metafunc):
    """Parametrize by fixture name: ``device``, ``linear_shape``, ``tokens``, ``act_shape``,
    ``norm_shape``, ``mlp_shape``, ``int4_shape``, ``m``; quick or ``--bench-full`` sets."""
    full = metafunc.config.getoption("bench_full")
    if "device" in metafunc.fixturenames:
        want = metafunc.config.getoption("bench_device")
        devices = [d for d in DEVICES if want in ("all", d)]
        params = [pytest.param(d, marks=pytest.mark.skipif(d == "cuda" and not torch.cuda.is_available(),
                                                            reason="no CUDA device")) for d in devices]
        metafunc.parametrize("device", params)
    table = {
        "linear_shape": LINEAR_FULL if full else LINEAR_QUICK,
        "tokens": TOKENS_FULL if full else TOKENS_QUICK,
        "act_shape": NORM_FULL + MLP_FULL if full else NORM_QUICK + MLP_QUICK,
        "norm_shape": NORM_FULL if full else NORM_QUICK,
        "mlp_shape": MLP_FULL if full else MLP_QUICK,
        "int4_shape": INT4_FULL if full else INT4_QUICK,
        "m": M_FULL if full else M_QUICK,
    }
    for name, cases in table.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, cases, ids=_ids(cases))


def pytest_collection_modifyitems(config, items):
    """The suite clears TRITON_INTERPRET for the whole process; tests/ need it on a CPU."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    outside = sorted({str(i.path) for i in items if not str(i.path).startswith(here)})
    if outside:
        raise pytest.UsageError(f"run bench/ on its own (it clears TRITON_INTERPRET, which tests/ need), "
                                f"not with {outside[0]}")


_START: dict = {}


def pytest_sessionstart(session):
    """The date and load average when the run starts (machine info is written at its end)."""
    _START.update(suite_machine_info())


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    info = dict(_START or suite_machine_info())
    info["load_average_start"] = info.pop("load_average", None)
    info["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info["shapes"] = "full" if config.getoption("bench_full") else "quick"
    machine_info["lrqat"] = info


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Ratios into each case's ``extra_info``; the raw per-round times only with
    ``--benchmark-save-data`` (as pytest-benchmark's own ``--benchmark-save`` does)."""
    add_ratios(output_json["benchmarks"])
    if not config.getoption("benchmark_save_data"):
        for b in output_json["benchmarks"]:
            b["stats"].pop("data", None)


def pytest_terminal_summary(terminalreporter, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or bs.disabled or not bs.benchmarks:
        return
    entries = [dict(group=b.group, name=b.name, extra_info=dict(b.extra_info), stats={"median": b.stats.median})
               for b in bs.benchmarks if not b.has_error]
    if not entries:
        return
    terminalreporter.write_sep("-", "lrqat: median and ratio to each baseline of the group (same run)")
    terminalreporter.write_line(ratio_table(add_ratios(entries)))
