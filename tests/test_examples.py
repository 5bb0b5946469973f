"""Runs each example in its reduced form (``--quick``) in-process and checks its metrics and PNGs.

The language-model examples run as scripts in subprocesses (as a user runs them, without this
suite's float64 mode); ``rl_kl_penalty`` starts from the student that ``lm_distill`` saves. The
data-parallel example needs several devices and runs in the multi-device invocation
(``XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest -m multidevice tests``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import jax
import pytest
from _subprocess import ROOT, child_env

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:  # the examples import their shared code as `_common`
    sys.path.insert(0, str(EXAMPLES))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_kldiv_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Linen dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run(name: str, tmp_path) -> dict:
    metrics = _load(name).main(["--quick", "--out", str(tmp_path)])
    assert isinstance(metrics, dict)
    for key, value in metrics.items():
        assert math.isfinite(value), (key, value)
    return metrics


def _assert_pngs(tmp_path, names):
    for name in names:
        path = tmp_path / name
        assert path.is_file(), f"missing figure {name}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vae_digits(tmp_path):
    m = _run("vae_digits", tmp_path)
    # −ELBO per image (nats) starts near 64·log 2 ≈ 44 and falls by far
    assert m["train_nelbo_last"] < m["train_nelbo_first"] - 5
    assert m["test_nelbo"] < 40
    assert m["test_kl"] > 0
    _assert_pngs(
        tmp_path,
        ["vae_digits_loss.png", "vae_digits_reconstructions.png", "vae_digits_samples.png"],
    )


def test_distill_digits(tmp_path):
    m = _run("distill_digits", tmp_path)
    assert m["teacher_acc"] > 0.6
    for objective in ("hard_labels", "forward", "reverse", "jsd"):
        assert m[f"acc_{objective}"] > 0.5, (objective, m)  # chance is 0.1
    _assert_pngs(tmp_path, ["distill_digits_loss.png", "distill_digits_accuracy.png"])


def test_linen_train_state(tmp_path):
    m = _run("linen_train_state", tmp_path)
    assert m["vae_nelbo_last"] < m["vae_nelbo_first"] - 5
    assert m["distill_loss_last"] < 0.5 * m["distill_loss_first"]
    assert m["student_acc"] > 0.4
    _assert_pngs(tmp_path, ["linen_train_state_loss.png"])


@pytest.mark.multidevice
def test_data_parallel(tmp_path):
    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
    m = _run("data_parallel", tmp_path)  # asserts loss and gradients equal the single-device ones
    assert m["devices"] == jax.device_count()
    assert m["max_rel_loss_diff"] < 1e-5 and m["max_rel_grad_diff"] < 1e-4
    assert m["final_loss"] < m["first_loss"]
    _assert_pngs(tmp_path, ["data_parallel_loss.png"])


def _script(name: str, *args: str, timeout: float = 900.0) -> str:
    """Runs ``python examples/<name>.py args...`` with this checkout first on the path."""
    # the scripts keep XLA's default code optimisation, as users run them (make test lowers it
    # for the suite's tiny programs; the scripts' training steps would run slower at level 0)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), *args],
        env=child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.long  # about a minute on one worker: tests/conftest.py starts it first
def test_lm_distill_then_rl_kl_penalty(tmp_path_factory):
    """The language-model scripts, as a user runs them: lm_distill trains and saves a student,
    rl_kl_penalty starts from it (one test, so that both run on one worker, in that order)."""
    out = tmp_path_factory.mktemp("lm_distill")
    ckpt = out / "s.npz"
    stdout = _script("lm_distill", "--quick", "--out", str(out), "--ckpt", str(ckpt))
    _check_lm_distill(out, json.loads((out / "lm_distill.json").read_text()), stdout)
    rl_out = tmp_path_factory.mktemp("rl_kl_penalty")
    stdout = _script("rl_kl_penalty", "--quick", "--out", str(rl_out), "--ref", str(ckpt))
    m = json.loads((rl_out / "rl_kl_penalty.json").read_text())
    assert m["reference"] == str(ckpt)
    _check_rl_kl_penalty(rl_out, m, stdout)


def _check_lm_distill(out, m, stdout):
    ppl = m["val_ppl"]
    assert all(math.isfinite(p) and p > 1 for p in ppl.values()), ppl
    assert ppl["untrained student"] > 0.5 * m["vocab"]  # near-uniform at initialisation
    for name in ("forward", "reverse", "jsd", "forward (logits)", "scratch"):
        assert ppl[name] < 0.5 * ppl["untrained student"], (name, ppl)
    assert ppl["teacher"] < ppl["scratch"]
    # the fused loss and the one from materialised logits train the same student
    assert m["max_abs_loss_diff_fused_vs_logits"] < 1e-3
    assert abs(ppl["forward"] - ppl["forward (logits)"]) < 0.01 * ppl["forward"]
    for key in ("fused", "logits"):
        assert m["tokens_per_second"][key] > 0 and m["temp_bytes"][key] > 0
    mem = m["memory_sweep"]
    assert len(mem["vocab"]) == len(mem["fused"]) == len(mem["logits"]) >= 2
    assert (out / "s.npz").is_file()
    assert "validation perplexity" in stdout
    _assert_pngs(out, ["lm_distill_loss.png", "lm_distill_perplexity.png", "lm_distill_memory.png"])


def _check_rl_kl_penalty(out, m, stdout):
    final = m["final"]
    assert set(final) == {"none", "k1", "k3", "k3 + k2 grad", "exact"}
    for kind, f in final.items():
        assert math.isfinite(f["kl"]) and f["kl"] >= 0, (kind, f)
        assert math.isfinite(f["reward"]), (kind, f)
    # a penalty whose gradient is that of KL(π‖π_ref) holds the policy closer than none at all
    assert final["exact"]["kl"] < final["none"]["kl"]
    assert final["k3 + k2 grad"]["kl"] < final["none"]["kl"]
    assert m["exact_fused_vs_logits_max_rel_diff"] < 1e-4
    for c in m["cost"].values():
        assert c["temp_bytes"] > 0 and c["step_seconds"] > 0
    assert "KL(π_θ‖π_ref)" in stdout
    _assert_pngs(out, ["rl_kl_penalty.png", "rl_kl_penalty_cost.png"])


def test_lm_distill_fused_loss_matches_logits():
    """The example's fused JSD loss (hidden states, temperature, mask, hard labels) equals the
    loss from materialised logits, value and gradient (forward KL: compared in the quick run)."""
    import numpy as np
    from flax import nnx

    lm = _load("lm_distill")
    t_graph, t_params = nnx.split(lm.LM(lm.LMConfig(64, 16, 1, 2, 8), rngs=nnx.Rngs(0)))
    s_graph, s_params = nnx.split(lm.LM(lm.LMConfig(64, 8, 1, 2, 8), rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 64, (3, 8)).astype(np.int32) for _ in range(2))
    mask = np.ones((3, 8), bool)
    mask[1, 5:] = False
    opts = dict(direction="jsd", temperature=2.0, hard_weight=0.5)
    fused = lm.fused_loss(s_graph, t_graph, **opts)
    logits = lm.logits_loss(s_graph, t_graph, **opts)
    va, ga = jax.jit(jax.value_and_grad(fused))(s_params, t_params, x, y, mask)
    vb, gb = jax.jit(jax.value_and_grad(logits))(s_params, t_params, x, y, mask)
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
