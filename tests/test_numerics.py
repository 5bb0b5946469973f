"""Tests for kldiv._numerics: the one implementation of ω and e^r − 1 − r, against mpmath."""

import jax
import jax.numpy as jnp
import mpmath
import numpy as np

from kldiv._numerics import exp_excess, kl_terms, omega, saturate


def test_exp_excess_against_high_precision():
    r = np.array([-120, -60, -3, -1.0001, -1, -0.9999, -0.5, -0.3, -0.25, -0.2499, -1e-3,
                  -1e-8, 0, 1e-8, 1e-3, 0.2, 0.25, 0.3, 0.9999, 1, 1.0001, 10, 60])  # fmt: skip
    with mpmath.workdps(50):
        ref = np.array([float(mpmath.expm1(mpmath.mpf(v)) - mpmath.mpf(v)) for v in r])
    np.testing.assert_allclose(exp_excess(jnp.asarray(r)), ref, rtol=4e-15)
    # float32 against the exact value at the float32 inputs, on a dense grid across both
    # branches (series below |r| = 1, exp(r) − 1 − r above): a few ulps everywhere.
    r32 = np.concatenate([r[np.abs(r) <= 60], np.linspace(-3, 3, 2001)]).astype(np.float32)
    with mpmath.workdps(50):
        ref32 = np.array([float(mpmath.expm1(mpmath.mpf(float(v))) - mpmath.mpf(float(v)))
                          for v in r32])  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(exp_excess(jnp.asarray(r32)), np.float64), ref32, rtol=1e-6
    )
    assert float(exp_excess(jnp.float32(0))) == 0.0
    inf = exp_excess(jnp.asarray([-np.inf, np.inf, np.nan]))
    assert inf[0] == np.inf and inf[1] == np.inf and np.isnan(inf[2])
    np.testing.assert_allclose(jax.grad(exp_excess)(1e-9), np.expm1(1e-9), rtol=1e-15)


def test_omega_against_high_precision():
    """ω(x) = x + expm1(−x) (k3 as a function of x) in float32, relative to mpmath over
    |x| in [1e-10, 30] on both sides of 0: within 3e-7 everywhere, exactly 0 at 0."""
    x = np.logspace(-10, np.log10(30), 1500)
    x = np.concatenate([x, -x, [0.0]]).astype(np.float32)
    with mpmath.workdps(40):
        ref = np.array(
            [float(mpmath.mpf(float(v)) + mpmath.expm1(-mpmath.mpf(float(v)))) for v in x]
        )
    got = np.asarray(omega(jnp.asarray(x)), np.float64)
    nz = ref > 0
    assert np.all(got[~nz] == 0)
    assert np.max(np.abs(got[nz] - ref[nz]) / ref[nz]) < 3e-7
    x64 = np.array([-3.0, -1e-5, 0.0, 1e-5, 3.0])
    with mpmath.workdps(40):
        ref64 = [float(mpmath.mpf(v) + mpmath.expm1(-mpmath.mpf(v))) for v in x64]
    np.testing.assert_allclose(omega(jnp.asarray(x64)), ref64, rtol=1e-14, atol=0)
    edge = omega(jnp.asarray([-np.inf, np.inf, np.nan, -200.0], jnp.float32))
    assert edge[0] == np.inf and edge[1] == np.inf and np.isnan(edge[2]) and edge[3] == np.inf
    # The derivative saturates instead of reaching −inf.
    assert np.isfinite(jax.grad(omega)(jnp.float32(-200.0)))


def test_kl_terms_series_and_direct_branches_agree_with_omega():
    p = np.full(7, 0.3)
    x = np.array([-0.5, -0.2499, -1e-3, 0.0, 1e-3, 0.2499, 0.5])
    q = p * np.exp(-x)
    np.testing.assert_allclose(kl_terms(p, q, x), p * np.asarray(omega(jnp.asarray(x))), rtol=1e-14)


def test_saturate():
    g = jnp.asarray([-np.inf, np.inf, np.nan, 1.0], jnp.float32)
    big = np.finfo(np.float32).max
    np.testing.assert_array_equal(saturate(g), [-big, big, 0.0, 1.0])
    out = saturate(g, nan_to_zero=False)
    assert np.isnan(out[2]) and out[0] == -big
