"""The package's layering, checked on its source: algorithms below, the study above, entry points on top.

    leaves (no package imports: logs, cli, stats, patterns, ...) -> store, dist -> data, models -> scoring -> distill -> study -> analysis
    -> entry points (profiles, params, pipeline, train, prompt_distill, compare, verify)

A module imports only from its own layer or below (at the top of the file or inside a function), the
package has no import cycle, no private name (``_x``) is used outside the module that defines it, and no
function is longer than MAX_LINES lines or takes more than MAX_PARAMS parameters, except the ones listed
in OVERSIZED, which may only shrink.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llmft_utils"
LAYERS = [
    {"__init__", "cli", "logs", "progress", "probes", "stats", "calibration", "hub", "patterns"},
    {"store", "dist"},
    {"data", "models"},
    {"scoring"},
    {"distill"},
    {"study"},
    {"analysis"},
    {"profiles", "params", "pipeline", "train", "prompt_distill", "compare", "verify"},
]
MAX_LINES, MAX_PARAMS = 80, 10
# functions over the limits today (name: (lines, parameters)); each may only shrink, and leaves the list below both
OVERSIZED: dict = {}


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__") or "__init__": p
            for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> int:
    top = mod.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imported(mod: str, path: Path) -> list[tuple[str, list[str], int, bool]]:
    """``(module, names, line, at_top)`` of every package import in ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if mod == "__init__":
        package = []
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [a.name for a in node.names]
            if not node.module:  # from . import a, b: each name is a module (or the package's __version__)
                for n in names:
                    full = ".".join([*base, n]) if base or n != "__version__" else "__init__"
                    out.append((full if (PKG / Path(*full.split("."))).with_suffix(".py").exists()
                                or (PKG / Path(*full.split("."))).is_dir() else target or "__init__", [n], node.lineno,
                                id(node) in top))
            else:
                out.append((target, names, node.lineno, id(node) in top))
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if name and name.split(".")[0] == "llmft_utils":
                out.append((name.removeprefix("llmft_utils.") or "__init__", [a.name for a in node.names], node.lineno,
                            id(node) in top))
    return out


def test_layers_never_import_upwards():
    bad = []
    for mod, path in modules().items():
        for target, _, line, _ in imported(mod, path):
            if layer(target) > layer(mod):
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} (layer {layer(mod)}) imports {target} "
                           f"(layer {layer(target)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_module_level():
    graph = {mod: {t for t, _, _, top in imported(mod, path) if top and t != mod} for mod, path in modules().items()}
    graph = {m: {t if t in graph else t.rsplit(".", 1)[0] for t in ts} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m):], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t != m and not m.startswith(t + "."):  # a submodule importing its own package's face is not a cycle
                visit(t, [*stack, m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_no_private_name_crosses_a_module():
    bad = []
    mods = modules()
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = set()
        for target, names, line, _ in imported(mod, path):
            for n in names:
                if n.startswith("_") and n != "__version__":
                    bad.append(f"{mod}:{line}: imports {target}.{n}")
                if target in mods or target.split(".")[0] in {"scoring", "distill", "study", "analysis"}:
                    aliases.add(n)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod}:{node.lineno}: uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def functions():
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n_params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                n_params -= bool(a.args) and a.args[0].arg in ("self", "cls")
                yield f"{mod}.{node.name}", node.end_lineno - node.lineno + 1, n_params


def test_functions_are_short_and_take_few_parameters():
    seen = {}
    for name, lines, n_params in functions():
        if lines > MAX_LINES or n_params > MAX_PARAMS:
            seen[name] = (lines, n_params)
    new = {n: v for n, v in seen.items() if n not in OVERSIZED}
    grown = {n: (v, OVERSIZED[n]) for n, v in seen.items() if n in OVERSIZED and (v[0] > OVERSIZED[n][0]
                                                                                   or v[1] > OVERSIZED[n][1])}
    fixed = sorted(set(OVERSIZED) - set(seen))
    assert not new, f"functions over {MAX_LINES} lines or {MAX_PARAMS} parameters: {new}"
    assert not grown, f"listed functions that grew (now, listed): {grown}"
    assert not fixed, f"no longer over the limits, remove from OVERSIZED: {fixed}"


@pytest.mark.parametrize("mutation", ["upward", "private"])
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, mutation):
    """The checks themselves: a data module importing the study, and a private name imported across modules."""
    pkg = tmp_path / "llmft_utils"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "study").mkdir()
    (pkg / "study" / "__init__.py").write_text("")
    (pkg / "study" / "plan.py").write_text("_hidden = 1\nvisible = 2\n")
    (pkg / "data.py").write_text("from .study.plan import visible\n" if mutation == "upward" else "")
    (pkg / "models.py").write_text("from .data import _x\n" if mutation == "private" else "")
    (pkg / "data.py").write_text((pkg / "data.py").read_text() + "_x = 1\n")
    monkeypatch.setitem(globals(), "PKG", pkg)
    check = test_layers_never_import_upwards if mutation == "upward" else test_no_private_name_crosses_a_module
    with pytest.raises(AssertionError, match="imports"):
        check()
