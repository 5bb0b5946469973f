"""``python -m bench.profile`` keeps working: on a tiny shape it traces every case and attributes
thread time to the compiled module's operations (the chunked forward's loop body included)."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(
    not hasattr(jax.profiler, "ProfileData") or jax.default_backend() != "cpu",
    reason="needs jax.profiler.ProfileData and the CPU backend",
)


def test_profile_attributes_time_to_operations(tmp_path):
    from bench import profile

    argv = ["--n", "64", "--v", "512", "--rounds", "2", "--repeats", "1", "--out", str(tmp_path)]
    assert profile.main(argv) == 0
    rows = json.loads((tmp_path / "profile.json").read_text())["rows"]
    by_case: dict[str, list[dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    assert set(by_case) == {"fwd", "fwdbwd", "student", "floor-read", "floor-2out", "floor-1out"}
    for case, case_rows in by_case.items():
        wall, busy, *ops = case_rows
        assert wall["ms"] > 0 and busy["ms"] > 0, case
        assert ops and abs(sum(r["ms"] for r in ops) - busy["ms"]) < 1e-6 * max(1.0, busy["ms"])
        assert not any(r["op"].startswith(("while", "end: ", "$")) for r in ops), case
    # 64 rows of 512 float32 fit one chunk; the forward's reductions are operations of the module
    assert any(r["per_call"] >= 1 for r in by_case["fwd"][2:])


def test_hlo_ops_skips_control_flow():
    from bench.profile import hlo_ops

    text = """
  %while.1 = (s32[], f32[4]{0}) while(%tuple.1), condition=%c, body=%b
  %fusion.2 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f
  ROOT %dot = f32[4,1]{1,0} dot(%a, %b), lhs_contracting_dims={1}
"""
    assert hlo_ops(text) == {"fusion.2", "dot"}
