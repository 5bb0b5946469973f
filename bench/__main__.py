"""Command line: ``python -m bench [--suites logits,gaussian,fused] [--quick] [--out DIR]``.

Runs each suite on the default JAX backend (CPU when there is no accelerator), prints a Markdown
table per suite, and writes ``DIR/<suite>.json`` (rows + machine description + arguments) and the
suite's PNG plots. Options shared by every suite: ``--repeats``, ``--warmup``, ``--quick``,
``--out``; each suite adds its own (``python -m bench --help`` lists them all).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from bench import common

SUITES = ("logits", "gaussian", "fused")


def _load(name):
    try:
        return importlib.import_module(f"bench.suites.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.suites.{name}":
            return None
        raise


class Progress:
    """One status line per step on stderr, with the elapsed time (long runs show where they are)."""

    def __init__(self, suite: str):
        self.suite = suite
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        dt = time.perf_counter() - self.t0
        print(f"[{dt:7.1f}s] {self.suite}: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, conflict_handler="resolve"
    )
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated suites")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--out", default="bench/results", help="directory for JSON and PNG")
    modules = {}
    for name in SUITES:
        mod = _load(name)
        if mod is not None:
            modules[name] = mod
            mod.add_arguments(parser.add_argument_group(name))
    args = parser.parse_args(argv)
    wanted = [s for s in args.suites.split(",") if s]
    unknown = [s for s in wanted if s not in modules]
    if unknown:
        parser.error(f"unknown or unavailable suites {unknown}; available: {sorted(modules)}")
    os.makedirs(args.out, exist_ok=True)
    machine = common.machine_description()
    print(f"machine: {machine}")
    for name in wanted:
        mod = modules[name]
        rows = mod.run(args, Progress(name))
        print(f"\n## {name}\n")
        print(common.format_table(rows))
        common.write_json(os.path.join(args.out, f"{name}.json"), name, rows, vars(args))
        if hasattr(mod, "plot"):
            mod.plot(rows, os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
