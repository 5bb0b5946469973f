"""The environment of the Python subprocesses that tests start (the examples, a second compile)."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# make test lowers LLVM's optimisation level for the suite's tiny programs (Makefile, OPT0)
OPT_LEVEL_FLAG = "--xla_backend_optimization_level"


def child_env(opt_level: str | None = None) -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH``, without ``JAX_ENABLE_X64``, and
    with ``XLA_FLAGS`` at XLA's default optimisation level (or at ``opt_level``); the other
    flags (a host device count) are kept."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("JAX_ENABLE_X64", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(OPT_LEVEL_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + ([f"{OPT_LEVEL_FLAG}={opt_level}"] if opt_level else []))
    return env
