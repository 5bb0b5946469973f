"""Parameter grids: the full product under ``-m slow`` (``make test-slow``), a covering subset in
the default run (``make test``).

``@pytest.mark.parametrize(*grid({"a": [...], "b,c": [(b1, c1), ...]}, cover=[("a", "b,c")]))``
runs, by default, a subset of the product of the axes that holds every value of every axis and
every combination of values of each group of axes in ``cover``; the other cases of the product
are marked ``slow``. An axis whose name lists several arguments takes tuples, unpacked into them.
The subset is chosen greedily in product order (deterministic: the same cases in every run).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest


def grid(axes: dict[str, Sequence], cover: Sequence[Sequence[str]] = ()) -> tuple[str, list]:
    names = list(axes)
    for group in cover:
        unknown = set(group) - set(names)
        assert not unknown, f"cover names unknown axes {sorted(unknown)}"
    groups = [(n,) for n in names] + [tuple(g) for g in cover]
    index = {n: i for i, n in enumerate(names)}
    cases = list(itertools.product(*(range(len(axes[n])) for n in names)))

    def items(case):
        return {(g, tuple(case[index[n]] for n in g)) for g in groups}

    wanted = set().union(*(items(c) for c in cases))
    chosen: set[int] = set()
    while wanted:
        best = max(range(len(cases)), key=lambda i: (len(items(cases[i]) & wanted), -i))
        chosen.add(best)
        wanted -= items(cases[best])

    params = []
    for i, case in enumerate(cases):
        values: list = []
        for n, k in zip(names, case, strict=True):
            v = axes[n][k]
            values.extend(v if "," in n else (v,))
        marks = () if i in chosen else (pytest.mark.slow,)
        params.append(pytest.param(*values, marks=marks))
    return ",".join(names), params
