"""Tests for kldiv.vae: the KL part of an ELBO (β, Optax-driven annealing, free bits, dataset
scaling), checked against direct numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kldiv import gaussian, vae

M, D = 6, 4


def _kl_per_dim(seed=0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(M, D))
    log_var = rng.normal(size=(M, D))
    ref = 0.5 * (mean**2 + np.exp(log_var) - 1 - log_var)  # independent closed form
    return mean, log_var, ref


def test_elbo_kl_every_reduction_matches_formula():
    _, _, per_dim = _kl_per_dim()
    kl = per_dim.sum(-1)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    beta = 0.3
    expected = {
        "sum": beta * kl[mask].sum(),
        "mean": beta * kl[mask].mean(),
        "batchmean": beta * kl[mask].sum() / M,
        "dataset": beta * kl[mask].sum() * 1000 / M,
        "none": beta * np.where(mask, kl, 0),
    }
    for reduction, want in expected.items():
        extra = {"dataset_size": 1000} if reduction == "dataset" else {}
        got = vae.elbo_kl(kl, reduction=reduction, beta=beta, mask=mask, **extra)
        np.testing.assert_allclose(got, want, rtol=1e-13, err_msg=reduction)


def test_dataset_reduction_is_unbiased_for_the_dataset_sum():
    # Averaging the N/M × minibatch-sum estimate over a partition into minibatches gives the
    # whole-dataset sum exactly (Kingma & Welling 2014, eq. 8).
    rng = np.random.default_rng(1)
    kl_all = rng.exponential(size=24)
    batches = kl_all[rng.permutation(24)].reshape(4, 6)
    estimates = [vae.elbo_kl(b, reduction="dataset", dataset_size=24) for b in batches]
    np.testing.assert_allclose(np.mean(estimates), kl_all.sum(), rtol=1e-13)


def test_reduction_is_required_and_validated():
    kl = jnp.ones(3)
    with pytest.raises(TypeError):
        vae.elbo_kl(kl)  # no default reduction
    with pytest.raises(TypeError):
        vae.free_bits_kl(jnp.ones((3, 2)), 0.1)
    with pytest.raises(TypeError):
        vae.vae_kl(jnp.ones((3, 2)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="unknown reduction"):
        vae.elbo_kl(kl, reduction="avg")
    with pytest.raises(ValueError, match="dataset_size"):
        vae.elbo_kl(kl, reduction="dataset")


def test_optax_schedule_drives_beta():
    kl = jnp.arange(1.0, 5.0)
    warmup = optax.linear_schedule(0.0, 1.0, transition_steps=100)
    for step, factor in [(0, 0.0), (25, 0.25), (100, 1.0), (1000, 1.0)]:
        got = vae.elbo_kl(kl, reduction="sum", beta=warmup, step=step)
        np.testing.assert_allclose(got, factor * 10.0, rtol=1e-6)
    # Traced steps under jit (the optimiser's step counter).
    f = jax.jit(lambda k, s: vae.elbo_kl(k, reduction="mean", beta=warmup, step=s))
    np.testing.assert_allclose(f(kl, jnp.asarray(50)), 0.5 * 2.5, rtol=1e-6)
    cosine = optax.cosine_decay_schedule(2.0, decay_steps=10)
    np.testing.assert_allclose(
        vae.elbo_kl(kl, reduction="sum", beta=cosine, step=5), cosine(5) * 10.0, rtol=1e-6
    )
    assert float(vae.kl_weight(0.7)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="step="):
        vae.elbo_kl(kl, reduction="sum", beta=warmup)
    with pytest.raises(ValueError, match="schedule"):
        vae.elbo_kl(kl, reduction="sum", beta=0.5, step=3)


def test_cyclical_schedule_values():
    sched = vae.cyclical_kl_schedule(10, ramp_fraction=0.5, peak=2.0, num_cycles=2)
    steps = np.array([0, 1, 2, 5, 7, 9, 10, 12, 15, 19, 20, 25, 100])
    want = np.array([0, 0.4, 0.8, 2, 2, 2, 0, 0.8, 2, 2, 2, 2, 2])
    np.testing.assert_allclose([float(sched(s)) for s in steps], want, atol=1e-12)
    np.testing.assert_allclose(jax.jit(sched)(jnp.asarray(steps)), want, atol=1e-6)
    endless = vae.cyclical_kl_schedule(4, ramp_fraction=1.0)
    np.testing.assert_allclose(endless(jnp.arange(9)), [0, 0.25, 0.5, 0.75, 0, 0.25, 0.5, 0.75, 0])
    for bad in [dict(cycle_steps=0), dict(cycle_steps=4, ramp_fraction=0.0)]:
        with pytest.raises(ValueError):
            vae.cyclical_kl_schedule(**bad)
    with pytest.raises(ValueError):
        vae.cyclical_kl_schedule(4, num_cycles=0)


def test_free_bits_mean_is_kingma_et_al_formula_and_gradient():
    mean, log_var, per_dim = _kl_per_dim(2)
    lam = float(np.median(per_dim.mean(0)))  # some dimensions below the floor, some above
    got = vae.free_bits_kl(per_dim, lam, reduction="mean")
    np.testing.assert_allclose(got, np.maximum(per_dim.mean(0), lam).sum(), rtol=1e-13)

    def loss(m, lv):
        kl = gaussian.kl_standard_normal(m, lv, per_dim=True)
        return vae.free_bits_kl(kl, lam, reduction="mean")

    gm, glv = jax.grad(loss, (0, 1))(mean, log_var)
    active = per_dim.mean(0) > lam
    assert active.any() and (~active).any()
    np.testing.assert_allclose(gm, np.where(active, mean / M, 0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(glv, np.where(active, np.expm1(log_var) / 2 / M, 0), rtol=1e-12)


def test_free_bits_every_reduction():
    _, _, kl = _kl_per_dim(3)
    lam = np.array([0.1, 0.5, 1.0, 3.0])
    mask = np.array([1, 0, 1, 1, 1, 0], bool)
    kept = kl[mask]
    expected = {
        "mean": np.maximum(kept.mean(0), lam).sum(),
        "sum": np.maximum(kept.sum(0), mask.sum() * lam).sum(),
        "batchmean": np.maximum(kept.sum(0) / M, mask.sum() / M * lam).sum(),
        "dataset": np.maximum(kept.sum(0) * 50 / M, mask.sum() * 50 / M * lam).sum(),
        "none": np.where(mask, np.maximum(kl, lam).sum(-1), 0),
    }
    for reduction, want in expected.items():
        extra = {"dataset_size": 50} if reduction == "dataset" else {}
        got = vae.free_bits_kl(kl, lam, reduction=reduction, mask=mask, beta=2.0, **extra)
        np.testing.assert_allclose(got, 2.0 * want, rtol=1e-13, err_msg=reduction)
    # Token-level latents [M, T, D] with a [M, T] mask.
    kl3 = np.stack([kl, kl[::-1]], axis=1)
    mask3 = np.stack([mask, mask[::-1]], axis=1)
    got = vae.free_bits_kl(kl3, 0.4, reduction="mean", mask=mask3)
    np.testing.assert_allclose(got, np.maximum(kl3[mask3].mean(0), 0.4).sum(), rtol=1e-13)


def test_free_bits_zero_floor_is_plain_kl():
    _, _, kl = _kl_per_dim(4)
    np.testing.assert_allclose(
        vae.free_bits_kl(kl, 0.0, reduction="mean"),
        vae.elbo_kl(kl.sum(-1), reduction="mean"),
        rtol=1e-13,
    )


def test_free_bits_bad_input():
    kl = jnp.ones((3, 4))
    with pytest.raises(ValueError, match="≥ 0"):
        vae.free_bits_kl(kl, -0.1, reduction="mean")
    with pytest.raises(ValueError, match=r"\(4,\)"):
        vae.free_bits_kl(kl, jnp.ones(3), reduction="mean")
    with pytest.raises(ValueError, match="per-dimension"):
        vae.free_bits_kl(jnp.ones(3), 0.1, reduction="mean")
    with pytest.raises(TypeError):
        vae.free_bits_kl(jnp.ones((3, 4), jnp.int32), 0.1, reduction="mean")
    with pytest.raises(TypeError):
        vae.free_bits_kl(kl, jnp.ones(4, jnp.int32), reduction="mean")


def test_vae_kl_composes_the_pieces():
    mean, log_var, per_dim = _kl_per_dim(5)
    sched = optax.linear_schedule(0.0, 1.0, 10)
    got = vae.vae_kl(mean, log_var, reduction="dataset", dataset_size=600, beta=sched, step=3)
    np.testing.assert_allclose(got, 0.3 * per_dim.sum() * 100, rtol=1e-12)
    got = vae.vae_kl(mean, log_var, reduction="mean", free_bits=0.3)
    np.testing.assert_allclose(got, np.maximum(per_dim.mean(0), 0.3).sum(), rtol=1e-12)
    f32 = vae.vae_kl(mean.astype(np.float32), log_var.astype(np.float32), reduction="sum")
    assert f32.dtype == jnp.float32
    # Summed over latents, never averaged: "mean" divides by examples only.
    np.testing.assert_allclose(
        vae.vae_kl(mean, log_var, reduction="mean"), per_dim.sum(-1).mean(), rtol=1e-13
    )


def test_axis_name_gives_global_statistics():
    _, _, kl = _kl_per_dim(6)
    shards = kl.reshape(2, M // 2, D)
    f = jax.vmap(
        lambda k: vae.free_bits_kl(k, 0.5, reduction="mean", axis_name="data"), axis_name="data"
    )
    np.testing.assert_allclose(f(shards), vae.free_bits_kl(kl, 0.5, reduction="mean") * np.ones(2))
    g = jax.vmap(
        lambda k: vae.elbo_kl(k.sum(-1), reduction="mean", axis_name="data"), axis_name="data"
    )
    np.testing.assert_allclose(g(shards), kl.sum(-1).mean() * np.ones(2), rtol=1e-13)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lam=st.floats(0.0, 3.0))
def test_free_bits_bounds(seed, lam):
    # Σ_j max(mean KL_j, λ) lies between the plain KL term and plain KL + D·λ, and ≥ D·λ.
    rng = np.random.default_rng(seed)
    kl = rng.exponential(size=(5, D))
    got = float(vae.free_bits_kl(kl, lam, reduction="mean"))
    plain = kl.mean(0).sum()
    assert plain - 1e-12 <= got <= plain + D * lam + 1e-12
    assert got >= D * lam - 1e-12
