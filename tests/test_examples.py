"""Runs each example in its reduced form (``--quick``) in-process and checks its metrics and PNGs.

The data-parallel example needs several devices and runs in the multi-device invocation
(``XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest -m multidevice tests``).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import jax
import pytest

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
