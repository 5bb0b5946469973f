"""The docstring examples: every one runs and prints what it shows, and none is missing.

Each module's examples run with ``doctest`` in float32, as users run kldiv (this test session
enables float64 in ``conftest.py``). Every public function and class (``kldiv.__all__``,
``kldiv.nnx``, ``kldiv.losses`` and ``kldiv.discrete.choose_logits_impl``) must have an
``Examples:`` section with at least one ``>>>`` line, placed after ``Args:``/``Returns:``/
``Raises:`` and before ``References:``, and the doctest collection must actually run it.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import io
import pkgutil
import re

import pytest
from _jax_compat import enable_x64

import kldiv
import kldiv.nnx

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Every module of the package, private ones included: the family's functions are defined in
# kldiv.family._kl, ... and re-exported from kldiv.family and kldiv.
MODULES = ["kldiv"] + sorted(m.name for m in pkgutil.walk_packages(kldiv.__path__, "kldiv."))


def _public_objects() -> dict[str, object]:
    """The functions and classes that must carry an example, by a name users call them by."""
    objects: dict[str, object] = {}
    for module, names in (
        (kldiv, kldiv.__all__),
        (kldiv.nnx, kldiv.nnx.__all__),
        (kldiv.losses, kldiv.losses.__all__),
        (kldiv.discrete, ["choose_logits_impl"]),
    ):
        for name in names:
            obj = getattr(module, name)
            # Constants (ESTIMATORS, F_GENERATORS, REDUCTIONS) are data, not callables.
            if callable(obj):
                objects[f"{module.__name__}.{name}"] = obj
    return objects


PUBLIC = _public_objects()


@functools.cache
def _doctests(module_name: str) -> list[doctest.DocTest]:
    """The module's docstring examples, each run in a namespace of its own (no module globals:
    an example must import what it uses, as a user copying it would)."""
    module = importlib.import_module(module_name)
    return [t for t in doctest.DocTestFinder().find(module, globs={}) if t.examples]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out = io.StringIO()
    with enable_x64(False):
        for test in _doctests(module_name):
            runner.run(test, out=out.write)
    failed, _ = runner.summarize(verbose=False)
    assert failed == 0, out.getvalue()


SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")


def _sections(doc: str) -> dict[str, str]:
    """Google-style sections of a docstring (name → body), at the docstring's own indent."""
    lines = doc.expandtabs().splitlines()
    body = [line for line in lines[1:] if line.strip()]
    indent = min((len(line) - len(line.lstrip()) for line in body), default=0)
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines[1:]:
        match = SECTION.match(line)
        if match and len(match.group(1)) == indent:
            current = match.group(2)
            sections[current] = []
        else:
            sections[current].append(line)
    return {name: "\n".join(text) for name, text in sections.items()}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_object_has_an_example(name):
    obj = PUBLIC[name]
    doc = obj.__doc__ or ""
    sections = _sections(doc)
    assert "Examples" in sections, f"{name}: no `Examples:` section"
    assert ">>>" in sections["Examples"], f"{name}: `Examples:` has no `>>>` line"
    order = list(sections)
    for before in ("Args", "Returns", "Raises"):
        if before in sections:
            assert order.index(before) < order.index("Examples"), f"{name}: Examples, {before}"
    if "References" in sections:
        assert order.index("Examples") < order.index("References"), f"{name}: References first"
    # The example is collected (and so run by test_docstring_examples) from its home module.
    home = obj.__module__
    collected = {t.name for t in _doctests(home)}
    assert f"{home}.{obj.__qualname__}" in collected, f"{name}: its example is not collected"
