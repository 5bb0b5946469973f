"""Tests for kldiv.closed_forms: Bernoulli (from logits) and Dirichlet KL.

References: TFP's closed forms in float64 (``tfp.substrates.jax``) and mpmath at 40 digits where
float64 compositions cancel (p ≈ q).
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import jax.test_util
import mpmath
import numpy as np
import pytest
import tensorflow_probability.substrates.jax as tfp
from hypothesis import given, settings
from hypothesis import strategies as st

from kldiv import closed_forms as C

tfd = tfp.distributions


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# Bernoulli.


def _mp_bernoulli(a, b):
    mpmath.mp.dps = 40
    a, b = mpmath.mpf(float(a)), mpmath.mpf(float(b))
    p, pc = 1 / (1 + mpmath.exp(-a)), 1 / (1 + mpmath.exp(a))
    q, qc = 1 / (1 + mpmath.exp(-b)), 1 / (1 + mpmath.exp(b))
    return float(p * mpmath.log(p / q) + pc * mpmath.log(pc / qc))


def test_bernoulli_matches_tfp():
    a, b = _rng(0).normal(size=(2, 4, 5)) * 4
    bern = lambda x: tfd.Bernoulli(logits=jnp.asarray(x), dtype=jnp.float64)  # float64 throughout
    ref = tfd.kl_divergence(bern(a), bern(b))
    out = C.kl_bernoulli_from_logits(a, b)
    assert out.dtype == jnp.float64 and out.shape == (4, 5)
    np.testing.assert_allclose(out, ref, rtol=1e-10)


_GRID_A = [-1e4, -300.0, -30.0, -3.0, 0.0, 2.0, 30.0, 300.0, 1e4]
_GRID_D = [1e-3, 0.5, 3.0, 50.0, 1e3, 2e4]


def _grid():
    a = np.array([x for x in _GRID_A for d in _GRID_D for s in (1, -1)], np.float32)
    b = np.array([x + s * d for x in _GRID_A for d in _GRID_D for s in (1, -1)], np.float32)
    ref = np.array([_mp_bernoulli(x, y) for x, y in zip(a, b, strict=True)])
    return a, b, ref


def test_bernoulli_float32_accuracy_near_equal_and_extreme():
    a, b, ref = _grid()
    out = np.asarray(jax.jit(C.kl_bernoulli_from_logits)(a, b))
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    # Relative accuracy wherever the reference is a normal float32 number.
    normal = ref > 1e-37
    rel = np.abs(out[normal] - ref[normal]) / ref[normal]
    assert np.max(rel) < 2e-5, (a[normal][np.argmax(rel)], b[normal][np.argmax(rel)], rel.max())
    assert np.all(out[~normal] <= 1e-37)


def test_textbook_bernoulli_fails_near_equal():
    """Shows the accuracy test can fail: σ(a)(a − b) + softplus(b) − softplus(a) in float32."""
    a = np.float32([0.3, -2.0, 5.0])
    b = a + np.float32(1e-3)
    ref = np.array([_mp_bernoulli(x, y) for x, y in zip(a, b, strict=True)])
    textbook = jax.nn.sigmoid(a) * (a - b) + jax.nn.softplus(b) - jax.nn.softplus(a)
    assert np.max(np.abs(np.asarray(textbook) - ref) / ref) > 1e-2
    ours = np.asarray(C.kl_bernoulli_from_logits(a, b))
    assert np.max(np.abs(ours - ref) / ref) < 1e-5


def test_bernoulli_infinite_logits():
    inf = np.inf
    a = np.array([inf, inf, -inf, 0.0, inf, -inf])
    b = np.array([inf, 0.0, 0.0, inf, -inf, -inf])
    out = np.asarray(C.kl_bernoulli_from_logits(a, b))
    np.testing.assert_allclose(out[:3], [0.0, np.log(2), np.log(2)], rtol=1e-15)
    assert out[3] == inf and out[4] == inf and out[5] == 0
    # Entries with an infinite value, dropped by the slice, do not poison the gradient.
    g = jax.grad(lambda x, y: jnp.sum(C.kl_bernoulli_from_logits(x, y)[:3]), (0, 1))(a, b)
    assert all(np.all(np.isfinite(t)) for t in g)


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(np.float64, (8,), elements=st.floats(-1e4, 1e4, width=64)),
    hnp.arrays(np.float64, (8,), elements=st.floats(-1e4, 1e4, width=64)),
)
def test_bernoulli_nonnegative_zero_iff_equal(a, b):
    out = np.asarray(C.kl_bernoulli_from_logits(a, b))
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    assert np.all(np.asarray(C.kl_bernoulli_from_logits(a, a)) == 0)
    differ = (np.abs(a - b) > 1e-3 * (1 + np.abs(a))) & (np.minimum(np.abs(a), np.abs(b)) < 30)
    assert np.all(out[differ] > 0)


def test_bernoulli_gradients():
    a, b = _rng(1).normal(size=(2, 6)) * 3
    jax.test_util.check_grads(C.kl_bernoulli_from_logits, (a, b), order=1, modes=["fwd", "rev"])
    ga, gb = jax.grad(lambda x, y: jnp.sum(C.kl_bernoulli_from_logits(x, y)), (0, 1))(a, b)
    p, q = jax.nn.sigmoid(a), jax.nn.sigmoid(b)
    np.testing.assert_allclose(ga, p * (1 - p) * (a - b), rtol=1e-12)
    np.testing.assert_allclose(gb, q - p, rtol=1e-12, atol=1e-15)
    # Huge logits: finite gradients.
    big = np.array([1e4, -1e4, 1e4]), np.array([-1e4, 1e4, 1e4 + 1])
    for g in jax.grad(lambda x, y: jnp.sum(C.kl_bernoulli_from_logits(x, y)), (0, 1))(*big):
        assert np.all(np.isfinite(g))


def test_bernoulli_broadcast_vmap_jit_dtypes():
    a = _rng(2).normal(size=(3, 1))
    b = _rng(3).normal(size=(4,))
    out = C.kl_bernoulli_from_logits(a, b)
    assert out.shape == (3, 4)
    full = C.kl_bernoulli_from_logits(np.broadcast_to(a, (3, 4)), np.broadcast_to(b, (3, 4)))
    np.testing.assert_array_equal(out, full)
    np.testing.assert_allclose(jax.vmap(C.kl_bernoulli_from_logits, (0, None))(a, b), out)
    np.testing.assert_allclose(jax.jit(C.kl_bernoulli_from_logits)(a, b), out, rtol=1e-15)
    a16 = jnp.asarray(a, jnp.bfloat16)
    out16 = C.kl_bernoulli_from_logits(a16, jnp.asarray(b, jnp.bfloat16))
    assert out16.dtype == jnp.float32
    assert C.kl_bernoulli_from_logits(np.float32(1.0), np.float32(0.0)).dtype == jnp.float32
    with pytest.raises(TypeError, match="`logits_q`"):
        C.kl_bernoulli_from_logits(a, np.ones(4, np.int32))
    with pytest.raises(ValueError, match=r"`logits_p` \(3, 2\).*`logits_q` \(4,\)"):
        C.kl_bernoulli_from_logits(np.ones((3, 2)), b)


# ---------------------------------------------------------------------------------------------
# Dirichlet.


def _mp_dirichlet(a, b):
    mpmath.mp.dps = 40
    a = [mpmath.mpf(float(x)) for x in a]
    b = [mpmath.mpf(float(x)) for x in b]
    a0, b0 = sum(a), sum(b)
    lg, dg = mpmath.loggamma, mpmath.digamma
    out = lg(a0) - lg(b0) - sum(lg(x) - lg(y) for x, y in zip(a, b, strict=True))
    return float(out + sum((x - y) * (dg(x) - dg(a0)) for x, y in zip(a, b, strict=True)))


def _tfp_dirichlet(a, b):
    return np.asarray(tfd.kl_divergence(tfd.Dirichlet(a), tfd.Dirichlet(b)))


def test_dirichlet_matches_tfp():
    rng = _rng(4)
    a = rng.gamma(1.0, size=(6, 5)) * np.array([[0.1], [1], [10], [100], [1], [0.05]])
    b = rng.gamma(1.0, size=(6, 5)) * np.array([[0.1], [1], [10], [100], [0.05], [1]])
    b[1] = a[1] * (1 + 0.3 * rng.uniform(-1, 1, size=5))  # the close branch
    out = C.kl_dirichlet(a, b)
    assert out.dtype == jnp.float64 and out.shape == (6,)
    np.testing.assert_allclose(out, _tfp_dirichlet(a, b), rtol=1e-10)


_NEAR_CASES = [
    (scale, eps) for scale in (1e-2, 1.0, 30.0, 1e3) for eps in (1e-6, 1e-3, 0.1, 0.45, 0.55)
]


def _near_dirichlet(scale, eps, seed=5, k=4):
    rng = _rng(seed)
    a = rng.gamma(2.0, size=k) * scale + 1e-3
    b = a * (1 + eps * np.where(rng.uniform(size=k) < 0.5, -1, 1) * rng.uniform(0.5, 1, size=k))
    return a, b


def test_dirichlet_accuracy_near_equal():
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        rels = []
        for scale, eps in _NEAR_CASES:
            a, b = (x.astype(dtype) for x in _near_dirichlet(scale, eps))
            ref = _mp_dirichlet(a, b)
            out = float(C.kl_dirichlet(a, b))
            rels.append(abs(out - ref) / ref)
        assert max(rels) < tol, (dtype, rels)


def test_closed_form_dirichlet_fails_near_equal():
    """Shows the accuracy test can fail: TFP's float64 closed form cancels when β ≈ α."""
    rels = []
    for scale in (1e-2, 1.0, 1e3):
        a, b = _near_dirichlet(scale, 1e-6)
        rels.append(abs(_tfp_dirichlet(a, b) - _mp_dirichlet(a, b)) / _mp_dirichlet(a, b))
    assert max(rels) > 1e-5


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(np.float64, (2, 4), elements=st.floats(1e-2, 1e3, width=64)),
    hnp.arrays(np.float64, (2, 4), elements=st.floats(1e-2, 1e3, width=64)),
)
def test_dirichlet_nonnegative_zero_iff_equal(a, b):
    out = np.asarray(C.kl_dirichlet(a, b))
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    assert np.all(np.asarray(C.kl_dirichlet(a, a)) == 0)
    ref = _tfp_dirichlet(a, b)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-9 * np.abs(a).sum())


def test_dirichlet_gradients():
    rng = _rng(6)
    a = rng.gamma(2.0, size=(2, 4)) + 0.5
    for b in (rng.gamma(2.0, size=(2, 4)) + 0.5, a * (1 + 0.2 * rng.uniform(-1, 1, (2, 4)))):
        jax.test_util.check_grads(C.kl_dirichlet, (a, b), order=1, modes=["fwd", "rev"])
        got = jax.grad(lambda x, y: jnp.sum(C.kl_dirichlet(x, y)), (0, 1))(a, b)
        want = jax.grad(lambda x, y: jnp.sum(_tfp_kl(x, y)), (0, 1))(a, b)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-12)


def _tfp_kl(a, b):
    return tfd.kl_divergence(tfd.Dirichlet(a), tfd.Dirichlet(b))


def test_dirichlet_broadcast_vmap_jit_dtypes():
    rng = _rng(7)
    a = rng.gamma(2.0, size=(3, 5)) + 0.1
    prior = np.array([0.7])  # symmetric prior, broadcast over the event axis
    out = C.kl_dirichlet(a, prior)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, _tfp_dirichlet(a, np.full((3, 5), 0.7)), rtol=1e-10)
    np.testing.assert_allclose(jax.vmap(C.kl_dirichlet, (0, None))(a, prior), out, rtol=1e-13)
    np.testing.assert_allclose(jax.jit(C.kl_dirichlet)(a, prior), out, rtol=1e-13)
    out16 = C.kl_dirichlet(jnp.asarray(a, jnp.bfloat16), jnp.asarray(prior, jnp.bfloat16))
    assert out16.dtype == jnp.float32
    with pytest.raises(ValueError, match="scalar"):
        C.kl_dirichlet(np.float64(1.0), np.float64(2.0))
    with pytest.raises(TypeError, match="`concentration_p`"):
        C.kl_dirichlet(np.ones((2, 3), np.int32), a[:2, :3])
    with pytest.raises(ValueError, match="do not broadcast"):
        C.kl_dirichlet(a, a[:, :4])
