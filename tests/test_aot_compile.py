"""Ahead-of-time compilation of every Triton kernel configuration the launchers can pick.

No GPU needed: ``triton.compile`` builds PTX for ``GPUTarget("cuda", 80 | 90, 32)`` and Triton's
bundled ``ptxas -v`` reports registers and spills (``CompiledKernel.n_regs`` is only filled on a
device). The configurations come from the launchers' own tables
(``ops.aot_specs.all_specs()``), compiled with the launch
options the launchers use (``enable_fp_fusion=False``) and the divisibility-by-16 the JIT would
see for LLaMA shapes. Default configurations (bf16 factors, rank 32) must not spill.

Run with ``-s`` to see the table of registers / spills / shared memory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")


from lrqat_kernels.ops import _tiles  # noqa: E402  (the launch tables: fwd_config, bwd_config)
from lrqat_kernels.ops import aot  # noqa: E402
from lrqat_kernels.ops import aot_specs  # noqa: E402

ARCHS = (80, 90)


def all_specs():
    return aot_specs.all_specs()


def compile_spec(spec: aot_specs.KernelSpec, arch: int, constexprs: dict | None = None) -> dict:
    """Compile ``spec`` for ``sm_<arch>`` (``ops.aot``, launch options as the launchers: no FP fusion);
    return registers, spills, shared bytes and the PTX."""
    res, ptx = aot._compile(spec.kernel, spec.signature, dict(spec.constexprs, **(constexprs or {})), arch,
                            spec.num_warps, spec.num_stages, divisible=spec.divisible, enable_fp_fusion=False,
                            return_ptx=True)
    return dict(name=spec.name, arch=arch, regs=res.registers, spill_stores=res.spill_stores,
                spill_loads=res.spill_loads, shared=res.shared_bytes, warps=spec.num_warps, default=spec.default,
                approx=res.approx_ops, i2f=res.i2f_ops, ptx=ptx)


def ptx_facts(ptx: str) -> dict:
    return dict(
        rne_const="0f4B400000" in ptx and "0fCB400000" in ptx,  # (z + c) - c kept, c = 1.5 * 2^23
        contractible=bool(re.search(r"\b(add|sub|mul)\.f32\b", ptx)),  # fp32 op without .rn
        mul_s64="mul.lo.s64" in ptx,
        div_rn="div.rn.f32" in ptx,  # IEEE division (L4Q's v = (Z - b) / s through tl.math.div_rn)
    )


def _compile_job(job) -> dict:
    i, arch, extra = job
    r = compile_spec(all_specs()[i], arch, extra)
    r.update(ptx_facts(r.pop("ptx")))
    return r


def _compile_all() -> list[dict]:
    """Runs in a child process with TRITON_INTERPRET=0 (the parent's kernels are interpreted)."""
    specs = all_specs()
    jobs = [(i, arch, None) for i in range(len(specs)) for arch in ARCHS]
    i64 = next(i for i, s in enumerate(specs) if s.default and s.name.startswith("fwd") and "int8" not in s.name)
    jobs.append((i64, 90, {"I64": True}))
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_compile_job, jobs))
    results[-1]["name"] += "+I64"
    return results


@pytest.fixture(scope="module")
def reports():
    """Compile every spec for every arch (in a child process: kernels must not be interpreted)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        with open(out) as f:
            results = json.load(f)
    print(f"\n{'config':36} {'arch':>5} {'warps':>5} {'regs':>5} {'spill st/ld':>12} {'shared B':>9}")
    for r in results:
        flag = " (default)" if r["default"] else ""
        print(f"{r['name']:36} sm_{r['arch']} {r['warps']:5} {r['regs']:5} {r['spill_stores']:5}/{r['spill_loads']:<6} "
              f"{r['shared']:9}{flag}")
    return {(r["name"], r["arch"]): r for r in results}


def test_every_config_compiles_for_sm80_and_sm90(reports):
    names = {s.name for s in all_specs()}
    assert len(names) == len(all_specs()), "spec names must be unique"
    assert {(n, a) for n in names for a in ARCHS} <= set(reports)
    for r in reports.values():
        assert 0 < r["regs"] <= 255
        assert r["shared"] <= (163 if r["arch"] == 80 else 227) * 1024


def test_phi0_decode_has_no_int_to_float_conversions(reports):
    """Every packed_int / fixed_point decode (and everything else in these kernels) avoids I2F."""
    with_i2f = [f"{r['name']} sm_{r['arch']}: {r['i2f']}" for r in reports.values() if r["i2f"]]
    assert not with_i2f, with_i2f


def test_default_configs_do_not_spill(reports):
    defaults = [r for r in reports.values() if r["default"]]
    assert defaults
    spilled = [f"{r['name']} sm_{r['arch']}: {r['spill_stores']} B" for r in defaults if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills in default configurations: " + ", ".join(spilled)


def test_no_forward_config_spills(reports):
    """Every forward config, every rank and factor dtype: the forward is one pass over Phi0 and
    must stay at that memory bound (fp32 factors at R_PAD = 128 used to spill ~8 KB a thread
    under Triton 3.6 before the rank loop of ``_lowrank_chunked``)."""
    fwd = [r for r in reports.values() if r["name"].startswith("fwd")]
    assert any("fp32-R128" in r["name"] for r in fwd)
    spilled = [f"{r['name']} sm_{r['arch']}: {r['spill_stores']} B" for r in fwd if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills in forward configurations: " + ", ".join(spilled)


def test_backward_configs_spill_at_most_a_few_words(reports):
    """Every backward table row, every rank and factor dtype: at most 16 bytes of spills a thread
    (ptxas's own choice in two fp32 rows, L1-resident). Rows that spilled 100-150 B (bf16 at
    R_PAD = 128 on sm_80, fp32 at R_PAD = 128 and fused fp32 at 64 on sm_90) were re-chosen from
    sweeps over tile shapes."""
    bwd = [r for r in reports.values() if r["name"].startswith("bwd")]
    assert any("R128" in r["name"] for r in bwd)
    spilled = [f"{r['name']} sm_{r['arch']}: {r['spill_stores']} B" for r in bwd if max(r["spill_stores"], r["spill_loads"]) > 16]
    assert not spilled, "register spills in backward configurations: " + ", ".join(spilled)


def test_launcher_configs_are_the_enumerated_ones():
    """The configs the launchers compute for real LLaMA-2-7B problems are among the compiled ones."""
    compiled_fwd = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["R_PAD"], s.constexprs["R_CHUNK"],
                     s.constexprs["GPT"], s.num_warps) for s in all_specs() if s.name.startswith("fwd")}
    compiled_bwd = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["R_PAD"], s.constexprs["GPT"],
                     s.constexprs["FUSED_G"], s.constexprs["SPLIT_BF16"], s.num_warps)
                    for s in all_specs() if s.name.startswith("bwd")}
    import torch

    for out, inn in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for rank in (8, 16, 32, 64, 128):
            for g in (inn, 128) + ((32,) if rank == 32 else ()):
                for dt in (torch.bfloat16, torch.float32):
                    c = _tiles.fwd_config(out, inn, rank, g, dt, interpret=False)
                    assert (c.block_m, c.block_n, c.r_pad, c.r_chunk, c.gpt, c.num_warps) in compiled_fwd, (out, inn, rank, g)
                    for fused in (False, True):
                        b = _tiles.bwd_config(out, inn, rank, g, dt, fused_g=fused, interpret=False)
                        key = (b.block_m, b.block_n, b.r_pad, b.gpt, fused, dt == torch.bfloat16, b.num_warps)
                        assert key in compiled_bwd, (out, inn, rank, g, dt, fused)


def test_ptx_keeps_the_rounding_and_no_contraction(reports):
    """The 1.5 * 2^23 round-half-even constants survive (no algebraic folding of (z + c) - c),
    with enable_fp_fusion=False every fp32 add/mul carries .rn (ptxas may not fuse it), and no
    approximate division / square root (Triton's fp32 ``/`` is ``div.full.f32``) is emitted."""
    for (name, arch), r in reports.items():
        if name.startswith("fwd") and "int8" not in name:
            assert r["rne_const"], f"{name} sm_{arch}: round-half-even constants missing"
        assert not r["contractible"], f"{name} sm_{arch}: contractible fp32 op in PTX"
        assert not r["approx"], f"{name} sm_{arch}: approximate fp32 math in PTX ({r['approx']}): use tl.div_rn / tl.sqrt_rn"


def test_int64_offsets_variant(reports):
    """With I64 the row offsets are 64-bit products; without, the address math stays 32-bit."""
    spec = next(s for s in aot_specs.fake_quant_specs() if s.default and s.name.startswith("fwd") and "int8" not in s.name)
    assert not reports[(spec.name, 90)]["mul_s64"]
    assert reports[(spec.name + "+I64", 90)]["mul_s64"]


def test_l4q_configs_divide_exactly_and_do_not_spill(reports):
    """The L4Q mode of the fake-quant kernels (``aot_specs.l4q_specs``): ``v = (Z - b) / s`` is an
    IEEE ``div.rn.f32`` (LR-QAT's kernels divide nowhere); no forward row spills; backward rows
    follow LR-QAT's backward rule (at most 16 B a thread): under Triton 3.8 only the G-free rows
    with fp32 factors spill (4 B, one arch each; nothing launches them from ``l4q.py``), under
    Triton 3.9 also ``bwd-l4q-wfp16-fp32-R16-gpt1`` on sm_90 (16 B)."""
    l4q = {k: r for k, r in reports.items() if "-l4q" in k[0]}
    assert {s.name for s in aot_specs.l4q_specs()} == {k[0] for k in l4q}
    assert any(k[0].startswith("fwd-l4q") and "R128" in k[0] for k in l4q)
    assert any(k[0].startswith("bwd-l4q_fused_g") for k in l4q)
    for (name, arch), r in reports.items():
        assert r["div_rn"] == ("-l4q" in name), f"{name} sm_{arch}: div.rn.f32 {'missing' if r['div_rn'] else 'unexpected'}"
    spilled = [f"{n} sm_{a}: {r['spill_stores']} B" for (n, a), r in l4q.items()
               if max(r["spill_stores"], r["spill_loads"]) > (16 if n.startswith("bwd") else 0)]
    assert not spilled, "register spills in L4Q configurations: " + ", ".join(spilled)


def test_l4q_launcher_configs_are_the_enumerated_ones():
    """The configs the L4Q launchers compute at LLaMA-2-7B shapes (same tables as LR-QAT) are compiled
    in their L4Q mode, for the W0 / factor dtypes the layer runs with."""
    import torch

    specs = aot_specs.l4q_specs()
    fwd = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["R_PAD"], s.constexprs["R_CHUNK"],
            s.constexprs["GPT"], s.num_warps) for s in specs if s.name.startswith("fwd")}
    bwd = {(s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.constexprs["R_PAD"], s.constexprs["GPT"],
            s.constexprs["SPLIT_BF16"], s.num_warps) for s in specs if s.name.startswith("bwd-l4q-")}
    for out, inn in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for rank in (8, 16, 32, 64, 128):
            for g in (inn, 128) + ((32,) if rank == 32 else ()):
                for dt in (torch.bfloat16, torch.float32):
                    c = _tiles.fwd_config(out, inn, rank, g, dt, interpret=False)
                    assert (c.block_m, c.block_n, c.r_pad, c.r_chunk, c.gpt, c.num_warps) in fwd, (out, inn, rank, g, dt)
                    b = _tiles.bwd_config(out, inn, rank, g, dt, fused_g=False, interpret=False)
                    assert (b.block_m, b.block_n, b.r_pad, b.gpt, dt == torch.bfloat16, b.num_warps) in bwd, (out, inn, rank, g, dt)


if __name__ == "__main__":  # child process of the ``reports`` fixture
    with open(sys.argv[1], "w") as f:
        json.dump(_compile_all(), f)
