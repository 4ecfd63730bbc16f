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
