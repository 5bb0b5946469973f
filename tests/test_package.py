"""Structure of the package: no import cycles, imports at the top, private helpers stay private.

The layering (README, "Development"): floors 1–2 (``_checks``, ``_numerics``, ``_logits``,
``reductions``) import nothing of kldiv above them; ``fused/`` implements, ``discrete`` dispatches;
the family, losses and fused linear head sit above; ``__init__`` only re-exports.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "kldiv"
# The one import allowed inside a function: Pallas is loaded only when impl="pallas" is used.
DEFERRED_OK = {("kldiv.discrete", "kldiv.fused.pallas")}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _kldiv_imports(name: str, path: pathlib.Path):
    """(imported kldiv module, is it at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    mods = _modules()
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            targets = [] if base == "kldiv" else [base]
            # `from kldiv import family` imports the submodule kldiv.family
            targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
        for t in targets:
            if t.startswith("kldiv") and t in mods and t != name:
                out.append((t, id(node) in top))
    return out


def test_no_import_cycles_counting_function_level_imports():
    mods = _modules()
    graph = {m: {t for t, _ in _kldiv_imports(m, p)} for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m != "kldiv" and m not in state:
            visit(m)


def test_imports_sit_at_the_top_of_their_files():
    late = [
        (m, t)
        for m, p in _modules().items()
        for t, at_top in _kldiv_imports(m, p)
        if not at_top and (m, t) not in DEFERRED_OK
    ]
    assert not late, late


@pytest.mark.parametrize("name", sorted(n for n in _modules() if n != "kldiv.nnx"))
def test_all_lists_only_public_defined_names(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for item in exported:
        assert not item.startswith("_"), (name, item)
        assert hasattr(module, item), (name, item)
    parent_name, _, leaf = name.rpartition(".")
    if leaf.startswith("_"):
        # A private module exports only what its public parent package re-exports.
        parent = importlib.import_module(parent_name)
        assert set(exported) <= set(parent.__all__), (name, set(exported) - set(parent.__all__))


def test_internals_are_not_public_api():
    import kldiv

    for hidden in ("align_pair", "temper_and_mask", "exp_excess", "as_float", "omega"):
        assert hidden not in kldiv.__all__
        for sub in ("discrete", "gaussian", "estimators", "family"):
            assert hidden not in getattr(kldiv, sub).__all__
