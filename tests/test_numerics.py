"""Tests for kldiv._numerics: ω and e^r − 1 − r against mpmath; the one-pass KL block merge."""

import functools

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import scipy.special

from kldiv._numerics import (
    BlockKL,
    block_kl,
    exp_excess,
    kl_terms,
    log_ratio,
    merge_block_kl,
    omega,
    saturate,
)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log_ratio_is_accurate_near_one_and_far_from_it(dtype):
    """log(s/t) to the accuracy of its own size: near s/t = 1 (log1p of the exact-ish difference)
    and for sums about different centres, s/t down to e^{-80} (there 1 + (s − t)/t keeps no bit
    of s/t); NaN and inf as log s − log t gives them."""
    eps = float(np.finfo(dtype).eps)
    s = np.array([1 + eps, 1 - eps, 1 + 64 * eps, 1.3, 0.6, 1.5, 0.5, 2.0, 0.49, 1.0, 7.0, 1.0,
                  1e30], dtype)  # fmt: skip
    t = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, np.exp(36.0), 1.0, np.exp(80.0), 3.0], dtype)
    got = np.asarray(log_ratio(jnp.asarray(s), jnp.asarray(t)), np.float64)
    with mpmath.workdps(50):
        ref = np.array([float(mpmath.log(mpmath.mpf(float(x)) / mpmath.mpf(float(y))))
                        for x, y in zip(s, t, strict=True)])  # fmt: skip
    # within 64 ulps: XLA:CPU's float64 log1p is off by up to ~25 ulps at −0.4
    np.testing.assert_allclose(got, ref, rtol=64 * eps)
    odd = log_ratio(
        jnp.asarray([np.nan, np.inf, 1.0, np.inf], dtype),
        jnp.asarray([1, 1, np.inf, np.inf], dtype),
    )
    assert np.isnan(odd[0]) and odd[1] == np.inf and odd[2] == -np.inf and np.isnan(odd[3])
    # zeros: the probabilities' edges (p = 0 < q: −inf, q = 0 < p: +inf, both 0: NaN)
    zeros = log_ratio(
        jnp.asarray([0.0, 0.5, 0.0, np.nan], dtype), jnp.asarray([0.5, 0, 0, 0], dtype)
    )
    assert zeros[0] == -np.inf and zeros[1] == np.inf and np.isnan(zeros[2]) and np.isnan(zeros[3])
    # the gradient is finite away from the edges and never NaN at them (safe branches)
    g = jax.grad(lambda p: jnp.sum(log_ratio(p, jnp.asarray(0.5, dtype))))(
        jnp.asarray([0, 0.5, 1.0], dtype)
    )
    np.testing.assert_allclose(g, [0.0, 2.0, 1.0], rtol=8 * eps)


def test_saturate():
    g = jnp.asarray([-np.inf, np.inf, np.nan, 1.0], jnp.float32)
    big = np.finfo(np.float32).max
    np.testing.assert_array_equal(saturate(g), [-big, big, 0.0, 1.0])
    out = saturate(g, nan_to_zero=False)
    assert np.isnan(out[2]) and out[0] == -big


@functools.partial(jax.jit, static_argnames="t")
def _merge_block(state, x, y, t):
    """``state`` merged with the block ``x``, ``y`` (one compiled program per width and T)."""
    cx, cy = (jnp.max(z, -1, keepdims=True) for z in (x, y))
    cx, cy = (jnp.where(jnp.isfinite(c), c, 0.0) for c in (cx, cy))
    xt, yt = ((z - c) / t for z, c in ((x, cx), (y, cy)))
    return merge_block_kl(state, block_kl(xt, yt, cx, cy, 0 * cx, 0 * cy), t)


def _one_pass(a, b, cuts, t=1.0):
    """KL per row by merging the :class:`BlockKL` states of the blocks between ``cuts``."""
    state = BlockKL(*(jnp.full((a.shape[0], 1), v) for v in (-np.inf, 0, -np.inf, 0, 0, 0)))
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        state = _merge_block(state, jnp.asarray(a[:, lo:hi]), jnp.asarray(b[:, lo:hi]), t)
    return np.asarray(state.kl[:, 0])


def _exact(a, b):
    with np.errstate(invalid="ignore"):
        lp, lq = scipy.special.log_softmax(a, -1), scipy.special.log_softmax(b, -1)
        return scipy.special.rel_entr(np.exp(lp), np.exp(lq)).sum(-1)


@pytest.mark.parametrize("t", [1.0, 0.25, 4.0])
def test_merged_block_kl_is_the_kl_of_the_whole_row(t):
    """The chain rule over any partition gives the row's KL (float64), whatever the blocks."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 5, 40)) * 3
    b[1] = a[1] + 7.0  # the same distribution
    a[2, 10:20] = -np.inf  # p empty in a whole block
    b[3, :8] = -np.inf  # q empty where p is not: +inf
    a[3, :8] = -np.inf  # ... unless p is empty there too
    want = _exact(a / t, b / t)
    for cuts in ([0, 40], [0, 1, 40], [0, 10, 20, 30, 40], [0, 3, 7, 19, 20, 39, 40]):
        np.testing.assert_allclose(_one_pass(a, b, cuts, t), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_merged_block_kl_where_q_underflows_under_p_mass(t):
    """A block where q's entries underflow to 0 (below float32's smallest normal) although p's
    do not: its log mass ratio u counts p's mass there. Without it u was log1p(−1) = −inf for
    [100, 0] against [0, 100] (NaN after the merge), and too small where only part of p's
    mass was dropped."""
    a = np.zeros((2, 6), np.float32)
    b = np.zeros((2, 6), np.float32)
    a[0, 4], b[0, 5] = 100.0 * t, 100.0 * t
    rng = np.random.default_rng(5)
    a[1], b[1] = (30 * rng.normal(size=(2, 6))).astype(np.float32)
    want = _exact(a.astype(np.float64) / t, b.astype(np.float64) / t)
    for cuts in ([0, 2, 6], [0, 3, 6], [0, 1, 2, 3, 4, 5, 6]):
        got = _one_pass(a, b, cuts, t)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-6)


def test_merged_block_kl_edges():
    a = np.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -np.inf, -np.inf], [np.nan, 0, 0, 0]])
    b = np.array([[0.0, -np.inf, 0.0, 0.0], [-np.inf, -np.inf, -np.inf, -np.inf], [0.0, 0, 0, 0]])
    got = _one_pass(a, b, [0, 2, 4])
    assert got[0] == np.inf  # p > 0 where q = 0
    assert got[1] == np.inf  # q has no support at all
    assert np.isnan(got[2])  # NaN propagates
    # every block empty in both: 0, as an all-masked row
    empty = np.full((1, 4), -np.inf)
    assert _one_pass(empty, empty, [0, 2, 4])[0] == 0
    # p empty in every block, q not: 0, as a p row without support on every path (the merge's
    # two-point terms gave Σq = 1)
    q_row = np.array([[0.3, -1.0, 2.0, 0.5]])
    assert _one_pass(empty, q_row, [0, 2, 4])[0] == 0
    assert _one_pass(empty, q_row, [0, 1, 2, 3, 4])[0] == 0
