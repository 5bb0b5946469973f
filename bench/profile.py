"""Command line: ``python -m bench.profile [--n N] [--v V] [--impl chunked] [--out DIR]``.

Where the time of one kldiv call goes on the CPU: the compiled program is traced with
``jax.profiler`` over ``--rounds`` calls, and the XLA:CPU operations that ran on the runtime's
threads (fusions, dots, reductions) are summed per operation. Each row gives an operation's
thread time per call, its share of the total, and how often it ran per call; the summary rows
give the wall time per call (median of untraced calls) and the thread time per call over wall
time, i.e. how many of the machine's cores the program kept busy. Names are XLA's, without the
numeric suffix that tells copies of one fusion apart (the two inputs' ``subtract_exponential``
fusions are one row).

Cases: ``fwd`` (the per-row KL), ``fwdbwd`` (value and both gradients), ``student`` (value and
the gradient w.r.t. the second logits only) and the suite's floors (``floor-read``,
``floor-2out``, ``floor-1out``), the same computations as the logits suite
(``bench/suites/logits.py``) on the same inputs. Writes ``DIR/profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

from bench import common

_SUFFIX = re.compile(r"\.\d+$")
_CONTROL = ("while", "conditional", "call")


def _cases(impl: str) -> dict:
    import kldiv

    def kl(a, b):
        return kldiv.kl_from_logits(a, b, impl=impl)

    def total(a, b):
        return jnp.sum(kl(a, b))

    from bench.suites.logits import _floors

    return {
        **_floors(),
        "fwd": jax.jit(kl),
        "fwdbwd": jax.jit(jax.value_and_grad(total, argnums=(0, 1))),
        "student": jax.jit(jax.value_and_grad(total, argnums=1)),
    }


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([\w\-]+)\(", re.M)


def hlo_ops(compiled_text: str) -> set[str]:
    """Names of the operations of a compiled XLA module that the profile counts: every
    instruction except control flow (``while``, ``conditional``, ``call``), whose events contain
    their bodies' events."""
    return {name for name, opcode in _INSTRUCTION.findall(compiled_text) if opcode not in _CONTROL}


def op_times(xspace_path: str, ops: set[str]) -> tuple[collections.Counter, collections.Counter]:
    """Thread time (ns) and count of the operations ``ops`` in a trace, by name without suffix.

    XLA:CPU records one event per operation on the thread that ran it: the runtime's worker
    threads or the calling thread, whose line also holds Python's and the runtime's own events;
    only events named after an operation of the module are counted.
    """
    data = jax.profiler.ProfileData.from_file(xspace_path)
    ns: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name not in ops:
                    continue
                name = _SUFFIX.sub("", ev.name)
                ns[name] += ev.duration_ns
                count[name] += 1
    return ns, count


def profile_case(fn, args, rounds: int, repeats: int) -> list[dict]:
    """Rows for one jitted function: the summary, then one row per operation (largest first)."""
    jax.block_until_ready(fn(*args))
    wall = common.timeit(fn, *args, repeats=repeats, warmup=1)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(rounds):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        ns, count = op_times(paths[-1], hlo_ops(fn.lower(*args).compile().as_text()))
    busy = sum(ns.values()) / rounds / 1e6
    rows = [
        {"op": "(wall time per call, untraced)", "ms": wall * 1e3},
        {
            "op": "(thread time per call, all ops)",
            "ms": busy,
            "note": f"{busy / (wall * 1e3):.2f} cores busy",
        },
    ]
    for name, t in ns.most_common():
        ms = t / rounds / 1e6
        rows.append(
            {
                "op": name,
                "ms": ms,
                "share": ms / busy if busy else None,
                "per_call": count[name] / rounds,
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--n", type=int, default=1024, help="rows (tokens)")
    parser.add_argument("--v", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--impl", default="chunked", help="kl_from_logits(impl=...)")
    parser.add_argument(
        "--cases",
        default="fwd,fwdbwd,student,floor-read,floor-2out,floor-1out",
        help="comma-separated",
    )
    parser.add_argument("--rounds", type=int, default=5, help="traced calls per case")
    parser.add_argument("--repeats", type=int, default=7, help="untraced timed calls per case")
    parser.add_argument("--top", type=int, default=8, help="operations printed per case")
    parser.add_argument("--out", default="bench/results", help="directory for profile.json")
    args = parser.parse_args(argv)
    if jax.default_backend() != "cpu":
        print(
            "bench.profile reads XLA:CPU's thread events; run it on the CPU backend.",
            file=sys.stderr,
        )
        return 2
    from bench.suites.logits import _inputs

    t, s = _inputs(args.n, args.v, jnp.dtype(args.dtype))
    fns = _cases(args.impl)
    rows = []
    for case in args.cases.split(","):
        print(f"profiling {case} ...", file=sys.stderr, flush=True)
        case_rows = profile_case(fns[case], (t, s), args.rounds, args.repeats)
        for r in case_rows:
            r["case"] = case
        rows.extend(case_rows)
        what = case if case.startswith("floor") else f"kl_from_logits(impl={args.impl!r})"
        print(f"\n### {case}: {what}, [{args.n}, {args.v}] {args.dtype}\n")
        print(
            common.format_table(
                case_rows[: 2 + args.top], ["op", "ms", "share", "per_call", "note"]
            )
        )
    common.write_json(f"{args.out}/profile.json", "profile", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
