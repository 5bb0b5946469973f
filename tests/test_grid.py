"""The covering grids of tests/_grid.py hold what they promise: every value of every axis and
every combination of each covered group in the default run, the rest of the product under slow."""

import itertools

from _grid import grid


def _default_and_slow(names, params):
    default = [p.values for p in params if not p.marks]
    slow = [p.values for p in params if p.marks]
    assert all(m.name == "slow" for p in params for m in p.marks)
    return default, slow


def test_covering_subset_and_full_product():
    axes = {"a": [1, 2, 3], "b,c": [(10, "x"), (20, "y")], "d": [False, True]}
    names, params = grid(axes, cover=[("b,c", "d")])
    assert names == "a,b,c,d"
    default, slow = _default_and_slow(names, params)
    full = [(a, b, c, d) for a, (b, c), d in itertools.product(*axes.values())]
    assert sorted(default + slow) == sorted(full)  # nothing lost, nothing doubled
    assert {v[0] for v in default} == {1, 2, 3}
    assert {(v[1], v[2], v[3]) for v in default} == {
        (b, c, d) for (b, c), d in itertools.product(axes["b,c"], axes["d"])
    }
    assert len(default) == 4 < len(full) == 12


def test_without_cover_each_value_once_at_least():
    names, params = grid({"x": list(range(5)), "y": "pq"})
    default, _ = _default_and_slow(names, params)
    assert {v[0] for v in default} == set(range(5)) and {v[1] for v in default} == {"p", "q"}
    assert len(default) == 5
