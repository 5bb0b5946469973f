"""Tests for kldiv.losses: optax drop-ins and training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

import kldiv
from kldiv import losses


def _probs(rng, shape):
    x = rng.gamma(1.0, size=shape)
    return x / x.sum(-1, keepdims=True)


@pytest.mark.parametrize("axis", [-1, 0, (1, 2), None])
def test_drop_ins_match_optax(axis):
    rng = np.random.default_rng(0)
    p = _probs(rng, (3, 4, 5))
    log_q = np.log(_probs(rng, (3, 4, 5)))
    where = rng.random((3, 4, 5)) > 0.3
    for w in (None, where):
        np.testing.assert_allclose(
            losses.kl_divergence(log_q, p, axis=axis, where=w),
            optax.losses.kl_divergence(log_q, p, axis=axis, where=w),
            rtol=1e-12,
        )
        np.testing.assert_allclose(
            losses.kl_divergence_with_log_targets(log_q, np.log(p), axis=axis, where=w),
            optax.losses.kl_divergence_with_log_targets(log_q, np.log(p), axis=axis, where=w),
            rtol=1e-12,
        )


def test_drop_ins_match_optax_on_unnormalised_inputs_and_gradients():
    rng = np.random.default_rng(1)
    t = rng.random((4, 6)) * 2  # not distributions: optax's Σ p(log p − log q), possibly < 0
    lq = rng.normal(size=(4, 6))
    np.testing.assert_allclose(
        losses.kl_divergence(lq, t), optax.losses.kl_divergence(lq, t), rtol=1e-12
    )
    for argnums in (0, 1):
        np.testing.assert_allclose(
            jax.grad(lambda a, b: jnp.sum(losses.kl_divergence(a, b)), argnums)(lq, t),
            jax.grad(lambda a, b: jnp.sum(optax.losses.kl_divergence(a, b)), argnums)(lq, t),
            rtol=1e-12,
        )


def test_drop_ins_true_value_where_optax_is_nan():
    p = jnp.array([0.0, 0.5, 0.5])
    q = jnp.array([0.0, 0.25, 0.75])
    assert np.isnan(optax.losses.kl_divergence(jnp.log(q), p))
    want = scipy.special.rel_entr(np.asarray(p), np.asarray(q)).sum()
    assert np.isclose(losses.kl_divergence(jnp.log(q), p), want)
    assert np.isclose(losses.kl_divergence_with_log_targets(jnp.log(q), jnp.log(p)), want)
    g = jax.grad(lambda lq: losses.kl_divergence(lq, p))(jnp.log(q))
    np.testing.assert_allclose(g, -p)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_distillation_directions(direction):
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(2, 4, 3, 10))
    mask = rng.random((4, 3)) > 0.4
    got = losses.distillation_loss(
        t, s, reduction="mean", mask=mask, temperature=2.0, direction=direction
    )
    pair = (t, s) if direction == "forward" else (s, t)
    want = kldiv.reduce(kldiv.kl_from_logits(*pair, temperature=2.0), "mean", mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    scaled = losses.distillation_loss(
        t,
        s,
        reduction="mean",
        mask=mask,
        temperature=2.0,
        direction=direction,
        scale_by_temperature_squared=True,
    )
    np.testing.assert_allclose(scaled, 4 * want, rtol=1e-12)
    g_t = jax.grad(lambda x: losses.distillation_loss(x, s, reduction="sum"))(t)
    assert np.all(g_t == 0)  # teacher frozen by default


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_distillation_softcap_and_scale_follow_teacher_and_student(direction):
    """A (teacher, student) soft-cap and logit scale apply to the teacher and the student in
    every direction: equal to materialising c·tanh(s·x/c) per side and taking the divergence."""
    rng = np.random.default_rng(3)
    t, s = rng.normal(size=(2, 4, 3, 10)) * 30
    caps, scales = (20.0, 8.0), (0.5, 2.0)

    def capped(x, c, k):
        return c * np.tanh(k * x / c)

    tc, sc = capped(t, caps[0], scales[0]), capped(s, caps[1], scales[1])
    got = losses.distillation_loss(
        t, s, reduction="none", temperature=1.5, direction=direction, beta=0.3,
        softcap=caps, logit_scale=scales,
    )  # fmt: skip
    want = losses.distillation_loss(
        tc, sc, reduction="none", temperature=1.5, direction=direction, beta=0.3
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_distillation_passes_reduction_arguments():
    """dataset_size, count and batch_size reach kldiv.reduce (N/M scaling, global counts)."""
    rng = np.random.default_rng(4)
    t, s = rng.normal(size=(2, 4, 3, 10))
    mask = rng.random((4, 3)) > 0.4
    values = kldiv.kl_from_logits(t, s)
    for reduction, kw in [
        ("dataset", dict(dataset_size=1000)),
        ("dataset", dict(dataset_size=1000, batch_size=16)),
        ("mean", dict(count=20.0)),
        ("batchmean", dict(batch_size=8)),
    ]:
        got = losses.distillation_loss(t, s, reduction=reduction, mask=mask, **kw)
        want = kldiv.reduce(values, reduction, mask=mask, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_distillation_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        losses.distillation_loss(jnp.zeros(3), jnp.zeros(3), reduction="sum", direction="both")
    with pytest.raises(TypeError):
        losses.distillation_loss(jnp.zeros(3), jnp.zeros(3))  # reduction has no default


def test_train_step_compiles_once():
    traces = []
    rng = np.random.default_rng(3)
    t = jnp.asarray(rng.normal(size=(4, 8)))

    @jax.jit
    def step(s):
        traces.append(1)
        return jax.value_and_grad(
            lambda x: losses.distillation_loss(t, x, reduction="batchmean", temperature=2.0)
        )(s)

    for i in range(4):
        step(jnp.asarray(rng.normal(size=(4, 8))) + i)
    assert len(traces) == 1
