"""Sphinx configuration: API reference from the docstrings, guides included from README.md."""

import importlib
import pkgutil
import re

import kldiv

project = "kldiv"
author = "kldiv contributors"
copyright = "kldiv contributors"
release = kldiv.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# The guides are README sections, included with their own headings: a page may start at ## or
# ###, and the README's headings are not cross-reference targets.
suppress_warnings = ["myst.header"]

# API reference: api/index.md lists the modules, and autosummary writes one page per module from
# _templates/autosummary/module.rst. `kldiv` documents its whole flat __all__; a module page
# documents the part of its __all__ that the module defines (kldiv.losses re-exports
# kl_penalty, ... from the modules that document them).
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_typehints_description_target = "documented"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


def _reexports(modname: str) -> list[str]:
    """Names in ``modname.__all__`` that another public kldiv module defines (and documents)."""
    module = importlib.import_module(modname)
    names = []
    for name in getattr(module, "__all__", []):
        home = getattr(getattr(module, name), "__module__", None) or modname
        public = home.startswith("kldiv") and not any(p.startswith("_") for p in home.split("."))
        if public and home != modname and not home.startswith(modname + "."):
            names.append(name)
    return names


autosummary_context = {
    "reexports": {
        m.name: _reexports(m.name)
        for m in pkgutil.walk_packages(kldiv.__path__, "kldiv.")
        if not any(part.startswith("_") for part in m.name.split("."))
    }
}

# Every reference must resolve, except those to other projects' types: the build is offline, so
# there is no intersphinx inventory for them.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|numpy|np|jnp|flax|nnx|optax|typing|collections)(\..*)?"),
    (r"py:.*", r"(Array|ArrayLike|DTypeLike|Any|Callable|Sequence|Literal)"),
]

html_theme = "furo"
html_title = f"kldiv {release}"

# Docstrings write absolute values and conditionals as plain text, |x| and p(z|x); kldiv defines
# no RST substitutions, so a bar is always text. Escape bars outside ``literals`` and literal
# blocks before napoleon and docutils read them.
_LITERAL = re.compile(r"(``.+?``)")


def _escape_bars(app, what, name, obj, options, lines):
    block_indent = None
    for i, line in enumerate(lines):
        text = line.lstrip()
        indent = len(line) - len(text)
        if block_indent is not None:
            if not text or indent > block_indent:
                continue
            block_indent = None
        if "|" in line:
            parts = _LITERAL.split(line)
            lines[i] = "".join(p if p.startswith("``") else p.replace("|", r"\|") for p in parts)
        if text.endswith("::"):
            block_indent = indent


def _flat_name(app, env, node, contnode):
    """An unqualified name that no module page documents, e.g. :func:`vae_kl` in kldiv.losses'
    docstring (a re-export), resolves to the flat API entry, kldiv.vae_kl, if there is one."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or "." in target or not hasattr(kldiv, target):
        return None
    domain = env.get_domain("py")
    flat = node.deepcopy()
    flat["reftarget"], flat["py:module"], flat["py:class"] = f"kldiv.{target}", None, None
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], flat["reftarget"], flat, contnode
    )


def setup(app):
    app.connect("autodoc-process-docstring", _escape_bars, priority=100)
    app.connect("missing-reference", _flat_name)
