"""Every ```python block of README.md runs.

The README is split into sections at its ``## `` headings (the text before the first heading is
a section of its own). Each section's python blocks run in order in one namespace of their own,
so a section can be moved or rewritten without breaking another. Two HTML comments, invisible
on a rendered page, complete a block:

* ``<!-- setup`` ... ``-->`` on the lines before a block: python that runs first in the same
  namespace (the arrays and sizes a fragment takes as given);
* ``<!-- not-run: reason -->`` right before a block: the block is only compiled, never run.

A block that imports an optional package that is not installed is skipped, not failed.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# Third-party packages a README block may use that kldiv itself does not need.
OPTIONAL = {"flax", "optax", "torch", "tensorflow_probability", "sklearn", "matplotlib"}

FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->\s*$")
SETUP_OPEN = re.compile(r"^<!--\s*setup\s*$")
DOCS_MARK = re.compile(r"^<!--\s*docs:(start|end)\s+(\S+)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the first code line
    code: str
    setup: str = ""
    setup_line: int = 0
    not_run: str | None = None


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block] = dataclasses.field(default_factory=list)


def _parse(text: str) -> tuple[list[Section], list[tuple[int, str, str]], list[str]]:
    """Sections with their python blocks, the docs markers, and mistakes in the markup."""
    lines = text.splitlines()
    sections = [Section("(top)")]
    docs_marks: list[tuple[int, str, str]] = []
    problems: list[str] = []
    setup, setup_line, not_run = "", 0, None
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            ticks, lang = fence.groups()
            j = i + 1
            while j < len(lines) and not lines[j].startswith(ticks):
                j += 1
            if lang == "python":
                block = Block(i + 2, "\n".join(lines[i + 1 : j]) + "\n", setup, setup_line, not_run)
                sections[-1].blocks.append(block)
            elif setup or not_run is not None:
                problems.append(f"line {i + 1}: setup/not-run comment before a {lang!r} block")
            setup, setup_line, not_run = "", 0, None
            i = j + 1
            continue
        if line.startswith("## "):
            if setup or not_run is not None:
                problems.append(f"line {i + 1}: setup/not-run comment not followed by a block")
            setup, setup_line, not_run = "", 0, None
            sections.append(Section(line[3:].strip()))
        elif SETUP_OPEN.match(line):
            j = i + 1
            while j < len(lines) and lines[j].strip() != "-->":
                j += 1
            setup, setup_line = "\n".join(lines[i + 1 : j]) + "\n", i + 2
            i = j
        elif m := NOT_RUN.match(line):
            not_run = m.group(1)
            if not not_run:
                problems.append(f"line {i + 1}: not-run marker without a reason")
        elif m := DOCS_MARK.match(line):
            docs_marks.append((i + 1, m.group(1), m.group(2)))
        i += 1
    return sections, docs_marks, problems


SECTIONS, DOCS_MARKS, PROBLEMS = _parse(README.read_text(encoding="utf-8"))
BLOCKS = [b for s in SECTIONS for b in s.blocks]


def _compile(code: str, line: int):
    # Padding with newlines makes tracebacks point at the README's own line numbers.
    return compile("\n" * (line - 1) + code, str(README), "exec")


def test_readme_markup_is_well_formed():
    assert not PROBLEMS
    assert BLOCKS, "README.md has no python block"
    # docs/ includes README text between these markers: each name opens once, then closes.
    opened: dict[str, int] = {}
    closed: set[str] = set()
    for line, kind, name in DOCS_MARKS:
        if kind == "start":
            assert name not in opened, f"line {line}: docs:start {name} twice"
            opened[name] = line
        else:
            assert name in opened and name not in closed, f"line {line}: stray docs:end {name}"
            closed.add(name)
    assert set(opened) == closed, f"unclosed docs markers: {set(opened) - closed}"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}" for b in BLOCKS])
def test_python_block_compiles(block):
    """Every block, run or not, is valid python (a signature belongs in a ```text block)."""
    _compile(block.code, block.line)
    if block.setup:
        _compile(block.setup, block.setup_line)


@pytest.mark.parametrize(
    "section",
    [s for s in SECTIONS if any(b.not_run is None for b in s.blocks)],
    ids=lambda s: s.title,
)
def test_python_blocks_run(section):
    namespace: dict = {"__name__": "__readme__"}
    for block in section.blocks:
        if block.not_run is not None:
            continue
        try:
            if block.setup:
                exec(_compile(block.setup, block.setup_line), namespace)
            exec(_compile(block.code, block.line), namespace)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] in OPTIONAL:
                pytest.skip(f"README.md:{block.line} needs {e.name}")
            raise
