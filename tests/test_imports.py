"""How the package is put together: a lazy top, imports that flow one way, files a reader can hold.

* ``import lrqat_kernels`` imports no Triton, no kernel module (``lrqat_kernels.ops.*``) and does
  not load the extension ``_C``; every public name resolves on first access.
* The module-level imports between the package's modules form no cycle, and each goes from a
  layer to the same or a lower one (``LAYERS``); a function-level import may point up (a lazy
  look-up) only where ``LAZY_UPWARD`` lists it. No module imports the package top.
* No file in ``lrqat_kernels/`` is above ``MAX_LINES`` lines unless its docstring gives the reason
  on a line starting ``Size:``.
* Names moved out of ``reference.py`` still resolve there, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PKG = "lrqat_kernels"
ROOT = Path(__file__).resolve().parents[1] / PKG
MAX_LINES = 500

#: The layers, lowest first. A module may import, at module level, only from its own layer or a
#: lower one. A new module must be placed here (``test_every_module_has_a_layer``); the modules
#: of ``ops/`` and ``export/`` take their package's layer.
LAYERS = [
    ("base", ["formats", "_version", "_io", "_ext"]),
    ("checks", ["_checks"]),
    ("reference/ops", ["reference", "ops"]),
    ("init", ["init"]),
    ("functions", ["functions", "config"]),
    # the sibling methods: functions, autograd and layers of one method in one module (docs/METHODS.md)
    ("modules", ["act_modules", "modules", "wa_quant", "l4q", "_oracle_l4q", "peqat", "_oracle_peqat", "sasq",
                 "_oracle_sasq", "pquant", "_oracle_pquant"]),
    ("api", ["api", "checkpoint", "export"]),
    ("train", ["train", "optim", "data", "distributed"]),
    ("cli", ["cli", "__main__", "demo", "demo_smollm2", "compare"]),
]
RANK = {f"{PKG}.{name}": rank for rank, (_, names) in enumerate(LAYERS) for name in names}

#: Function-level imports from a lower layer to a higher one (importer -> imported), each a lazy
#: look-up made on purpose: only these are allowed.
LAZY_UPWARD = {
    # export/_common reads deployment layers (QuantizedLinear) out of a model
    ("lrqat_kernels.export._common", "lrqat_kernels.modules"),
    ("lrqat_kernels.train", "lrqat_kernels.cli"),  # train.TrainArgs: deprecated alias of cli.TrainArgs (one release)
}


def _rank(module: str) -> int | None:
    while module:
        if module in RANK:
            return RANK[module]
        module = module.rpartition(".")[0]
    return None


def _layer(module: str) -> str:
    r = _rank(module)
    return "?" if r is None else LAYERS[r][0]


# ---- the import graph, from the source ------------------------------------------------------


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _is_module(name: str) -> bool:
    return name in MODULES


def _imports(module: str, path: Path):
    """``(target, lineno, module_level)`` for every import of a package module in ``path``.

    Module level: executed when the module is imported (not inside a def; class bodies and
    ``try`` / ``if`` blocks count, ``if TYPE_CHECKING:`` does not).
    """
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node, module_level):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PKG or alias.name.startswith(PKG + "."):
                        found.append((alias.name, child.lineno, module_level))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module if is_pkg else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{child.module}" if child.module else base
                elif child.module and (child.module == PKG or child.module.startswith(PKG + ".")):
                    base = child.module
                else:
                    continue
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((sub if _is_module(sub) else base, child.lineno, module_level))
            visit(child, module_level)

    visit(tree, True)
    return found


def _graph():
    """``{importer: [(imported, lineno, module_level)]}`` over the package's modules."""
    return {m: _imports(m, p) for m, p in MODULES.items()}


GRAPH = _graph()


def _module_level_edges() -> dict[str, set[str]]:
    """Module-level edges, with the packages a submodule import runs (``a.b.c`` runs ``a.b``)
    except the importer's own packages and the lazy top."""
    edges = {m: set() for m in MODULES}
    for importer, imports in GRAPH.items():
        for target, _, module_level in imports:
            if not module_level or target == importer:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                t = ".".join(parts[:i])
                if t != importer and not (importer + ".").startswith(t + ".") and t in MODULES:
                    edges[importer].add(t)
    return edges


# ---- 1: the lazy top ------------------------------------------------------------------------


def _run(code: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_is_lazy():
    """``import lrqat_kernels`` imports no Triton, no kernel module and does not load ``_C``."""
    got = _run(
        "import json, sys\n"
        "import lrqat_kernels\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'torch', 'lrqat_kernels'))))\n"
    )
    triton = [m for m in got if m.split(".")[0] == "triton"]
    kernels = [m for m in got if m.startswith(PKG + ".ops")]
    assert not triton, f"import lrqat_kernels imported Triton: {triton[:5]}"
    assert not kernels, f"import lrqat_kernels imported kernel modules: {kernels}"
    assert PKG + "._C" not in got, "import lrqat_kernels loaded the extension _C"
    # Nothing else either: the top is a table of names (torch comes with the first one used).
    assert set(got) <= {PKG, PKG + "._version"}, got


def test_every_public_name_resolves():
    """Each name in ``__all__`` resolves, is listed by ``dir()``, and an unknown one raises."""
    got = _run(
        "import json, lrqat_kernels as L\n"
        "bad = [n for n in L.__all__ if getattr(L, n, None) is None]\n"
        "missing = [n for n in L.__all__ if n not in dir(L)]\n"
        "try:\n"
        "    L.no_such_name\n"
        "    unknown = 'resolved'\n"
        "except AttributeError as e:\n"
        "    unknown = str(e)\n"
        "print(json.dumps(dict(bad=bad, missing=missing, unknown=unknown, n=len(L.__all__), version=L.__version__)))\n"
    )
    assert got["bad"] == [] and got["missing"] == [], got
    assert "no_such_name" in got["unknown"], got
    assert got["n"] >= 20 and got["version"]


def test_public_names_are_their_home_modules_objects():
    import lrqat_kernels as L

    for name in L.__all__:
        home = importlib.import_module(f"{PKG}.{L._PUBLIC[name]}")
        assert getattr(L, name) is getattr(home, name), name
    assert L.reference is importlib.import_module(f"{PKG}.reference")  # submodules resolve too


def test_moved_reference_names_warn_and_resolve():
    """Names that left ``reference.py`` resolve there for one release, with a DeprecationWarning;
    the package top's re-exports (``lrqat_kernels.estimate_scale``, ...) do not warn."""
    import lrqat_kernels as L
    from lrqat_kernels import _checks, act_modules, init, reference

    assert reference._MOVED, "nothing is listed as moved"
    for name, home in reference._MOVED.items():
        with pytest.warns(DeprecationWarning, match=rf"reference\.{name} moved to lrqat_kernels\.{home}\.{name}"):
            obj = getattr(reference, name)
        assert obj is getattr({"init": init, "_checks": _checks}[home], name), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert L.estimate_scale is init.estimate_scale and L.svd_init is init.svd_init
        assert L.lora_init is init.lora_init and L.rtn_quantize is init.rtn_quantize
        from lrqat_kernels.modules import ActQuantMLP, ActQuantRMSNorm  # re-exported by modules

        assert ActQuantMLP is act_modules.ActQuantMLP and ActQuantRMSNorm is act_modules.ActQuantRMSNorm
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        reference.no_such_name


def test_reference_holds_no_initialisation_or_validators():
    """The oracle defines oracles: range estimation, RTN, LoRA / SVD init and validators live elsewhere."""
    from lrqat_kernels import reference

    tree = ast.parse(Path(reference.__file__).read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert not (defined & set(reference._MOVED)), defined & set(reference._MOVED)
    assert not any(n.startswith("check_") for n in defined), sorted(n for n in defined if n.startswith("check_"))


# ---- 2, 3: one direction ------------------------------------------------------------------


def test_the_graph_is_read():
    """The walker sees imports (a broken walker would pass every test below)."""
    targets = {t for t, _, _ in GRAPH[f"{PKG}.modules"]}
    assert {f"{PKG}.formats", f"{PKG}.act_modules", f"{PKG}.init", f"{PKG}.reference"} <= targets
    lazy = {t for t, _, level in GRAPH[f"{PKG}.act_modules"] if not level}
    assert {f"{PKG}.functions", f"{PKG}.ops.act_quant"} <= lazy


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if m != PKG and _rank(m) is None)
    assert not unplaced, f"place these modules in tests/test_imports.py LAYERS: {unplaced}"


def test_no_module_imports_the_package_top():
    """``import lrqat_kernels`` / ``from lrqat_kernels import name`` / ``from . import name`` (of the
    top's names) inside the package: the top is the public API, above every layer."""
    bad = [f"{m}:{line}" for m, imports in GRAPH.items() if m != PKG for t, line, _ in imports if t == PKG]
    assert not bad, f"these import the package top (import from the defining module instead): {bad}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first walk of ``edges`` closes (empty when the graph is acyclic)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m)
    return cycles


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(_module_level_edges())
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_module_level_imports_go_down_the_layers():
    up = []
    for m, imports in GRAPH.items():
        if m == PKG:
            continue
        for t, line, module_level in imports:
            if module_level and t != PKG and (_rank(t) or 0) > (_rank(m) or 0):
                up.append(f"{m}:{line} ({_layer(m)}) imports {t} ({_layer(t)})")
    assert not up, "module-level imports against the layers (" + " -> ".join(n for n, _ in LAYERS) + "):\n" + "\n".join(up)


def test_function_level_upward_imports_are_listed():
    """A lazy import from a lower layer to a higher one is a look-up made on purpose: listed in
    ``LAZY_UPWARD`` (with the reason), or it is a layering error."""
    up = set()
    where = {}
    for m, imports in GRAPH.items():
        for t, line, module_level in imports:
            if not module_level and t != PKG and (_rank(t) or 0) > (_rank(m) or 0):
                up.add((m, t))
                where.setdefault((m, t), f"{m}:{line}")
    unlisted = sorted(up - LAZY_UPWARD)
    assert not unlisted, "unlisted upward lazy imports: " + ", ".join(f"{where[e]} -> {e[1]}" for e in unlisted)


# ---- 4: file sizes ------------------------------------------------------------------------


def test_files_are_small_or_say_why():
    big = []
    for m, path in MODULES.items():
        text = path.read_text()
        n = text.count("\n")
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.strip().startswith("Size:") for line in doc.splitlines()):
            big.append(f"{path.relative_to(ROOT.parent)} ({n} lines)")
    assert not big, f"above {MAX_LINES} lines with no 'Size:' line in the docstring: {big}"
