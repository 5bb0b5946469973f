"""Shared test configuration: float64 references need x64; the longest tests first; the time of
each test module."""

import collections

import jax

jax.config.update("jax_enable_x64", True)


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` (tests/test_examples.py: the language-model scripts, about a minute
    on one worker) are collected first: xdist hands them out at the start, and the other worker
    shares out the rest of the suite around them instead of one worker finishing them alone at
    the end. The order is stable otherwise."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_terminal_summary(terminalreporter):
    """Seconds per test module (setup, call and teardown summed over every worker), the 15
    largest: where the suite's time goes, printed with every run (CI's budget is kept from it)."""
    totals: collections.Counter = collections.Counter()
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid, duration = getattr(report, "nodeid", ""), getattr(report, "duration", None)
            if nodeid and isinstance(duration, float):
                totals[nodeid.split("::")[0]] += duration
    if totals:
        terminalreporter.write_sep("=", "seconds per test module (all workers)")
        for path, seconds in totals.most_common(15):
            terminalreporter.write_line(f"{seconds:8.1f}  {path}")
        terminalreporter.write_line(f"{sum(totals.values()):8.1f}  (all modules)")
