"""Triton launches run on the device of their tensors (ops/_launch.py)."""

from __future__ import annotations

import ast
import pathlib
from types import SimpleNamespace

import pytest
import torch

from lrqat_kernels.ops._launch import on_device

OPS = pathlib.Path(__file__).resolve().parent.parent / "lrqat_kernels" / "ops"


def test_on_device_picks_the_tensors_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # no GPU needed: contexts are not entered
    ctx = on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1)))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    ctx = on_device(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0)))  # already current
    assert not isinstance(ctx, torch.cuda.device)
    with on_device(torch.zeros(1)):  # CPU (interpreter): nothing to switch
        pass


def _kernel_launches(tree):
    """(line, enclosing with-items) of every ``_name_kernel[grid](...)`` call."""
    out = []

    def visit(node, withs):
        if isinstance(node, ast.With):
            withs = withs + [ast.unparse(item.context_expr) for item in node.items]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            name = node.func.value
            if isinstance(name, ast.Name) and name.id.endswith("_kernel"):
                out.append((node.lineno, withs))
        for child in ast.iter_child_nodes(node):
            visit(child, withs)

    visit(tree, [])
    return out


def test_every_triton_launch_is_guarded():
    """Triton launches on the current CUDA device, not the tensors': every launch in ops/ must sit
    in ``with on_device(...)`` (a model sharded over GPUs would otherwise crash or read garbage)."""
    launches = {}
    for path in sorted(OPS.glob("*.py")):
        for line, withs in _kernel_launches(ast.parse(path.read_text())):
            launches[f"{path.name}:{line}"] = withs
    assert len(launches) >= 7, launches  # act_quant, fake_quant x2, fused_linear x2, int4_triton x2
    bad = [k for k, withs in launches.items() if not any(w.startswith("on_device(") for w in withs)]
    assert not bad, f"Triton launches without a device guard: {bad}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_a_non_current_device():
    from lrqat_kernels.ops.act_quant import act_fake_quant_forward
    from lrqat_kernels import reference as R

    x = torch.randn(8, 256, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        y = act_fake_quant_forward(x, 8, False)
    assert y.device == x.device and torch.equal(y, R.fake_quant_activation(x, 8, False))


# ------------------------------------------------------------------- the kernel switch (_launch.py)


def _layer():
    from lrqat_kernels.formats import encode_phi

    phi = encode_phi(torch.zeros(8, 32), 4, "packed_int")
    return phi, torch.zeros(2, 32), torch.zeros(8, 2), torch.ones(8, 1)


def test_use_kernels_false_sends_every_op_family_to_eager_math():
    from lrqat_kernels.ops import _launch
    from lrqat_kernels.ops.act_quant import use_triton
    from lrqat_kernels.ops.fake_quant import uses_kernels

    phi, A, B, s = _layer()
    x = torch.zeros(2, 32)
    auto = (_launch.interpreting(), _launch.interpreting())
    assert (uses_kernels(phi, A, s), use_triton(x)) == auto
    with _launch.use_kernels(False):
        assert not uses_kernels(phi, A, s) and not use_triton(x)
        assert not _launch.kernels_run_on(torch.device("cuda"))
        with _launch.use_kernels(True):
            assert (uses_kernels(phi, A, s), use_triton(x)) == auto
        assert not _launch.options().kernels
    assert _launch.options() == _launch.KernelOptions() and _launch.kernels_run_on(torch.device("cuda"))


def test_kernel_options_are_scoped_and_checked(set_kernel_options):
    from lrqat_kernels.ops import _launch, _tiles

    with _launch.kernel_options(gpu_tiles=True, bwd_programs=3) as opts:
        assert opts.gpu_tiles and opts.bwd_programs == 3
        assert not _tiles.small_tiles(True) and _tiles.target_programs(torch.device("cpu")) == 3
    assert _tiles.small_tiles(True) and _tiles.target_programs(torch.device("cpu")) == 4
    set_kernel_options(fused_gemm=True)
    assert _launch.fused_gemm_default()
    for bad, exc, msg in [(dict(kernels=1), TypeError, "kernels must be True or False"),
                          (dict(gpu_tiles="yes"), TypeError, "gpu_tiles must be True or False"),
                          (dict(fused_gemm=1), TypeError, "fused_gemm must be True, False or None"),
                          (dict(bwd_programs=0), ValueError, "bwd_programs must be None or an int >= 1"),
                          (dict(bwd_programs=2.0), ValueError, "bwd_programs must be None or an int >= 1"),
                          (dict(tiles=True), TypeError, "unknown option 'tiles'")]:
        with pytest.raises(exc, match=msg):
            set_kernel_options(**bad)
    assert _launch.options().fused_gemm and _launch.options().bwd_programs is None  # a refused change changes nothing


def test_deprecated_env_vars_still_work_and_warn(monkeypatch, set_kernel_options):
    from lrqat_kernels.ops import _launch, _tiles

    assert not _launch.fused_gemm_default()
    monkeypatch.setenv("LRQAT_FUSED_GEMM", "1")
    monkeypatch.setenv("LRQAT_BWD_PROGRAMS", "3")
    with pytest.warns(DeprecationWarning, match="LRQAT_FUSED_GEMM is deprecated"):
        assert _launch.fused_gemm_default()
    with pytest.warns(DeprecationWarning, match="LRQAT_BWD_PROGRAMS is deprecated"):
        assert _tiles.target_programs(torch.device("cpu")) == 3
    set_kernel_options(fused_gemm=False, bwd_programs=5)  # an option wins over the environment
    assert not _launch.fused_gemm_default() and _tiles.target_programs(torch.device("cpu")) == 5


def test_patching_functions_interpreting_still_reaches_the_switch(monkeypatch):
    """The old test hook (``monkeypatch.setattr(functions, "_interpreting", ...)``) keeps working for
    one release, with a DeprecationWarning."""
    from lrqat_kernels import functions
    from lrqat_kernels.ops import _launch

    with pytest.warns(DeprecationWarning, match="use_kernels"):
        monkeypatch.setattr(functions, "_interpreting", lambda: False)
    assert not _launch.kernels_run_on(torch.device("cpu"))
    assert not functions.uses_kernels(*_layer()[:2], _layer()[3])
    monkeypatch.undo()
    assert _launch._interpreting_hook is None
    assert _launch.kernels_run_on(torch.device("cpu")) == _launch.interpreting()


def test_moved_names_keep_working():
    """Names that moved in the split of ops/fake_quant.py: private helpers stay importable from it,
    public ones warn and return the new home's object."""
    from lrqat_kernels.ops import _triton_quant, aot_specs, fake_quant, fused_linear

    from lrqat_kernels.ops.fake_quant import _cast, _int_to_f32  # ops/int4_triton.py's import, until it moves

    assert _cast is _triton_quant.cast and _int_to_f32 is _triton_quant.int_to_f32
    with pytest.warns(DeprecationWarning, match="aot_specs.fake_quant_specs"):
        assert fake_quant.aot_specs is aot_specs.fake_quant_specs
    with pytest.warns(DeprecationWarning, match="aot_specs.KernelSpec"):
        assert fake_quant.KernelSpec is aot_specs.KernelSpec
    with pytest.warns(DeprecationWarning, match="aot_specs.fused_linear_specs"):
        assert fused_linear.aot_specs is aot_specs.fused_linear_specs
    with pytest.raises(AttributeError, match="kernel_options"):
        fake_quant.FORCE_GPU_TILES


def test_functional_layer_imports_no_triton():
    """``lrqat_kernels.functions`` and the switch load the op families (and Triton) only when an op runs."""
    import subprocess
    import sys

    code = ("import sys; import lrqat_kernels.functions, lrqat_kernels.ops._launch; "
            "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'lrqat_kernels.ops.'))))")
    root = str(OPS.parent.parent)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['lrqat_kernels.ops._launch']"
