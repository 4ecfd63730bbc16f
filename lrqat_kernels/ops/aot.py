"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU.

Used by tests (and by anyone checking a kernel change on a CPU-only machine) to prove that a
kernel configuration compiles for sm_80 / sm_90 and to read its resource usage. Registers and
spills come from ``ptxas -v`` (Triton's bundled ptxas) on the generated PTX, because
``CompiledKernel.n_regs`` is only filled in when the kernel is loaded onto a device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AOTResult:
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    #: approximate fp32 instructions in the PTX (``div.full`` / ``*.approx``), comma-separated; "" when none.
    #: Triton's ``/`` on fp32 is ``div.full.f32``: kernels that must match torch use ``tl.div_rn``.
    #: libdevice's ``expf`` (torch's exp) shows as ``ex2.approx.ftz.f32`` after an exact range
    #: reduction; Triton's own ``tl.exp`` as ``ex2.approx.f32``.
    approx_ops: str = ""
    #: the distinct global load / store forms in the PTX (``ld.global.v4.b32`` etc.), comma-separated:
    #: a memory-bound kernel reaches the HBM roofline only with 16-byte accesses (``.v4.b32``).
    global_ops: str = ""
    #: the distinct tensor-core instructions, with wgmma's operand sources:
    #: ``wgmma.m64n128k16.f32.bf16.bf16(A=reg)`` (A from registers) or ``(A=smem)``; ``mma.sync...``.
    mma_ops: str = ""
    #: register -> shared memory stores inside the kernel's loops (TTGIR ``local_alloc`` of a value,
    #: ``local_store``); async global -> shared copies (cp.async / TMA) not counted. 0 means every
    #: MMA operand in the main loop comes from registers or straight from global memory.
    loop_smem_stores: int = 0
    #: the distinct ``pendings`` of the wgmma waits inside loops, comma-separated ("" without wgmma):
    #: "0" means the loop waits for every wgmma it issued (no MMA overlaps the next tile's work).
    loop_wgmma_pendings: str = ""
    #: the distinct int -> float conversions (``cvt.rn.f32.s32`` etc., I2F: an eighth of the FP32
    #: rate on sm_80 / sm_90), comma-separated; "" when none.
    i2f_ops: str = ""

    def __str__(self) -> str:
        return (
            f"{self.name} sm_{self.arch} warps={self.num_warps} stages={self.num_stages}: "
            f"{self.registers} regs, spills {self.spill_stores}B st / {self.spill_loads}B ld, "
            f"{self.shared_bytes} B shared" + (f", approx: {self.approx_ops}" if self.approx_ops else "")
        )


def _ptxas(arch: int) -> str:
    import triton

    root = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas", "ptxas-blackwell"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return "ptxas"


def aot_compile(fn, signature: dict, constexprs: dict, *, arch: int, num_warps: int = 4, num_stages: int = 3) -> AOTResult:
    """Compile ``fn`` (a ``@triton.jit`` kernel) for ``sm_<arch>`` and report its resources.

    Under ``TRITON_INTERPRET=1`` kernels are interpreter objects that cannot be compiled, so the
    work runs in a subprocess without the interpreter (see :func:`aot_compile_many`).

    Args:
        fn: the kernel.
        signature: ``{arg: type}`` for every argument, e.g. ``{"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}``.
        constexprs: values of the ``constexpr`` arguments.
        arch: 80, 86, 89, 90, ...
    """
    spec = dict(signature=signature, constexprs=constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages)
    return aot_compile_many(fn, [spec])[0]


def aot_compile_many(fn, specs: list[dict]) -> list[AOTResult]:
    """Compile ``fn`` once per spec (keys as :func:`aot_compile`'s arguments); one subprocess in all
    when the interpreter is on."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        inner = getattr(fn, "fn", fn)
        payload = json.dumps(dict(module=inner.__module__, name=inner.__name__, specs=specs))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = (
            "import importlib, json, sys; from dataclasses import asdict; from lrqat_kernels.ops import aot; "
            "p = json.loads(sys.stdin.read()); fn = getattr(importlib.import_module(p['module']), p['name']); "
            "print(json.dumps([asdict(aot._compile(fn, **s)) for s in p['specs']]))"
        )
        proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT compile of {inner.__name__} failed:\n{proc.stderr[-4000:]}")
        return [AOTResult(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    return [_compile(fn, **s) for s in specs]


def _ptxas_command(arch: int, enable_fp_fusion: bool) -> list[str]:
    """Triton's bundled ptxas with the flags Triton's own compile step passes it."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

        exe, gpu = get_ptxas(arch).path, sm_arch_from_capability(arch)
    except (ImportError, AttributeError, TypeError):  # other Triton releases
        exe, gpu = _ptxas(arch), f"sm_{arch}{'a' if arch >= 90 else ''}"
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}"]
    return [exe, *flags] + ([] if enable_fp_fusion else ["--fmad=false"])


def _mma_ops(ptx: str) -> list[str]:
    """Distinct ``mma.sync`` / ``wgmma.mma_async`` forms; for wgmma whether A comes from registers
    (``{%r..}`` fragment) or a shared-memory descriptor (B always comes from shared memory)."""
    ops = set()
    for line in ptx.splitlines():
        m = re.search(r"\b(mma\.sync\.aligned\.[a-z0-9.]+|wgmma\.mma_async\.sync\.aligned\.([a-z0-9.]+))\s+(.*)", line)
        if m is None:
            continue
        if m.group(2) is None:
            ops.add(m.group(1))
        else:  # operands: {d...}, A, B, ...: A is a {..} register list or a 64-bit descriptor
            a = m.group(3).split("}", 1)[1].lstrip(", ")
            ops.add(f"wgmma.{m.group(2)}(A={'reg' if a.startswith('{') else 'smem'})")
    return sorted(ops)


def _in_loops(ttgir: str):
    """The TTGIR lines inside ``scf.for`` / ``scf.while`` bodies (nested ones included)."""
    depth, loop_depths = 0, []
    for line in ttgir.splitlines():
        if re.search(r"\bscf\.(for|while)\b", line):
            loop_depths.append(depth)
        elif loop_depths:
            yield line
        depth += line.count("{") - line.count("}")
        while loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()


def _loop_smem_stores(ttgir: str) -> int:
    """Register -> shared stores inside the loops of a TTGIR module."""
    return sum(bool(re.search(r"ttg\.local_store\b|ttg\.local_alloc %", line)) for line in _in_loops(ttgir))


def _loop_wgmma_pendings(ttgir: str) -> list[str]:
    """Distinct ``pendings`` of ``warp_group_dot_wait`` inside the loops of a TTGIR module."""
    found = set()
    for line in _in_loops(ttgir):
        if "warp_group_dot_wait" in line:
            m = re.search(r"pendings = (\d+)", line)
            if m:
                found.add(m.group(1))
    return sorted(found, key=int)


def _compile(fn, signature, constexprs, arch, num_warps, num_stages, divisible=(), enable_fp_fusion=True,
             return_ptx=False):
    """Compile one spec; ``divisible`` names the pointer / integer arguments the JIT would see as
    multiples of 16 at real shapes (without the hint Triton neither vectorises nor pipelines those
    loads, and the numbers would describe a kernel that never runs). Returns an :class:`AOTResult`,
    or ``(AOTResult, ptx)`` with ``return_ptx``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": enable_fp_fusion})
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([*_ptxas_command(arch, enable_fp_fusion), ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel.metadata.name} sm_{arch}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas output:\n{log}")
    res = AOTResult(
        name=kernel.metadata.name, arch=arch, num_warps=num_warps, num_stages=num_stages,
        registers=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
        shared_bytes=int(kernel.metadata.shared),
        approx_ops=",".join(sorted(set(re.findall(
            r"\b((?:div|sqrt|rsqrt|rcp)\.(?:full|approx)[a-z0-9.]*|(?:ex2|lg2|sin|cos|tanh)\.approx[a-z0-9.]*)", ptx)))),
        global_ops=",".join(sorted(set(re.findall(r"\b(?:ld|st)\.global[a-z0-9.]*", ptx)))),
        mma_ops=",".join(_mma_ops(ptx)),
        i2f_ops=",".join(sorted(set(re.findall(r"\bcvt\.rn\.f32\.[su](?:8|16|32|64)\b", ptx)))),
        loop_smem_stores=_loop_smem_stores(kernel.asm.get("ttgir", "")),
        loop_wgmma_pendings=",".join(_loop_wgmma_pendings(kernel.asm.get("ttgir", ""))),
    )
    return (res, ptx) if return_ptx else res
