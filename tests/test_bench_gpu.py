"""``make gpu-check`` cannot rot: its script runs here in dry-run form (tiny shapes, Pallas in
interpret mode off GPU), and every peer that is missing becomes a marked row, not a crash."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    cmd = [sys.executable, "-m", "bench.gpu", "--dry-run", "--repeats", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_dry_run.json").read_text())["rows"]
    impls = {r["impl"] for r in rows}
    assert {"kldiv-pallas", "kldiv-xla", "kldiv-chunked", "kldiv-auto", "optax"} <= impls
    assert any(r["case"] == "copy bandwidth" and r["GB/s"] > 0 for r in rows)
    for r in rows:
        if r["impl"].startswith("kldiv-"):
            # every kldiv path agrees with the XLA path on the same inputs
            assert r["value_rel_err"] < 1e-5 and r["grad_max_err"] < 1e-4, r
        if "fwd_ms" not in r and "fwdbwd_ms" not in r and r["case"] != "copy bandwidth":
            assert r["note"].startswith(("not installed", "failed")), r


def test_test_subprocess_stops_at_its_timeout():
    """A test run longer than ``--test-timeout`` becomes a row that says so (rc 124), so that the
    benchmarks after it still run within the machine's time limit."""
    sys.path.insert(0, str(ROOT))
    from bench.gpu import _test_suites

    row = _test_suites(lambda _: None, 2)
    assert row["rc"] == 124 and row["note"].startswith("timed out after 2 s"), row
    assert row["seconds"] < 60
