"""Tests for kldiv.estimators: sampled-token k1/k2/k3, variants and the exact penalty."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kldiv import reductions
from kldiv.estimators import (
    ESTIMATORS,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_importance_weighted,
    kl_penalty,
    kl_penalty_exact,
    kl_straight_through,
)

FUNCS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
V = 6


# ---------------------------------------------------------------------------------------------
# Independent float64 references (numpy, textbook formulas).


def ref_k3(log_r):
    """e^l − 1 − l in float64: expm1 away from 0, its Taylor series (to l^10) near 0."""
    l = np.asarray(log_r, np.float64)
    series = sum(l**k / math.factorial(k) for k in range(10, 1, -1))
    return np.where(np.abs(l) < 1e-2, series, np.expm1(l) - l)


def log_softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def exact_kl(logits_p, logits_q):
    """KL(softmax(a)‖softmax(b)) by the textbook formula (jax, differentiable, float64)."""
    lp, lq = jax.nn.log_softmax(logits_p), jax.nn.log_softmax(logits_q)
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=V))
    phi = jnp.asarray(rng.normal(size=V))
    return theta, phi


def expected_grad(estimator_fn, theta, phi, weights=None):
    """∇_θ Σ_a w(a)·f(log π_θ(a), log π_ref(a)), w = π_θ (held fixed) unless given: the exact
    expectation over a ~ π_θ of the gradient of the per-token loss with the tokens fixed."""

    def loss(t):
        lp = jax.nn.log_softmax(t)
        w = jax.lax.stop_gradient(jnp.exp(lp)) if weights is None else weights
        return jnp.sum(w * estimator_fn(lp, jax.nn.log_softmax(phi)))

    return jax.grad(loss)(theta)


# ---------------------------------------------------------------------------------------------
# Values.


def test_formulas_match_independent_reference():
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(50)))
    lr = np.log(rng.dirichlet(np.ones(50)))
    log_r = lr - lp
    np.testing.assert_allclose(kl_k1(lp, lr), -log_r, rtol=1e-14)
    np.testing.assert_allclose(kl_k2(lp, lr), 0.5 * log_r**2, rtol=1e-14)
    np.testing.assert_allclose(kl_k3(lp, lr), np.exp(log_r) - 1 - log_r, rtol=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_k3_float32_tiny_log_ratio_accuracy(sign):
    log_r = sign * np.logspace(-10, np.log10(30.0), 400).astype(np.float32)
    got = np.asarray(kl_k3(jnp.zeros(400, jnp.float32), jnp.asarray(log_r)))
    assert got.dtype == np.float32
    want = ref_k3(log_r.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel.max() <= 1e-6, (rel.max(), log_r[rel.argmax()])
    tiny = np.abs(log_r) < 1e-2
    assert rel[tiny].max() <= 1e-6


def test_k3_float64_accuracy():
    log_r = np.concatenate([-np.logspace(-12, 2, 200), np.logspace(-12, 2, 200)])
    got = np.asarray(kl_k3(np.zeros_like(log_r), log_r))
    np.testing.assert_allclose(got, ref_k3(log_r), rtol=1e-13)


@jax.jit
def _values_and_grads(lp, lr):
    out = {}
    for name in ("k2", "k3"):
        fn = FUNCS[name]
        grads = jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b)), argnums=(0, 1))(lp, lr)
        clipped = fn(lp, lr, log_ratio_clip=20.0, max_value=10.0)
        out[name] = (fn(lp, lr), grads, clipped)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_k2_k3_nonnegative_and_gradients_not_nan(dtype, data):
    width = 32 if dtype == np.float32 else 64
    log_r = data.draw(st.lists(st.floats(-1e4, 1e4, width=width), min_size=8, max_size=8))
    base = data.draw(st.floats(-50, 0, width=32))
    lp = jnp.full(8, base, dtype)
    lr = lp + jnp.asarray(log_r, dtype)
    for v, (g_p, g_r), clipped in _values_and_grads(lp, lr).values():
        assert v.dtype == dtype
        assert not jnp.any(jnp.isnan(v)) and jnp.all(v >= 0)
        assert jnp.all(jnp.isfinite(g_p)) and jnp.all(jnp.isfinite(g_r))
        # with clipping everything is finite
        assert jnp.all(jnp.isfinite(clipped)) and jnp.all((clipped >= 0) & (clipped <= 10))


def test_k3_overflow_semantics():
    lp = jnp.zeros(4, jnp.float32)
    lr = jnp.asarray([1e4, 88.0, 89.0, -1e4], jnp.float32)
    v = kl_k3(lp, lr)
    assert v[0] == jnp.inf and v[2] == jnp.inf  # e^{log r} overflows: the rounded true value
    np.testing.assert_allclose(v[1], np.expm1(88.0) - 88.0, rtol=1e-6)
    assert v[3] == np.float32(1e4 - 1)
    g = jax.grad(lambda r: jnp.sum(kl_k3(lp, r)))(lr)
    assert jnp.all(jnp.isfinite(g)) and g[0] == jnp.finfo(jnp.float32).max
    # a where-masked overflowed token gives gradient 0, not NaN
    g = jax.grad(lambda r: jnp.sum(jnp.where(jnp.arange(4) > 0, kl_k3(lp, r), 0)))(lr)
    assert g[0] == 0 and jnp.all(jnp.isfinite(g))


def test_infinite_log_probs():
    inf = jnp.inf
    lp = jnp.asarray([0.0, -inf, -inf, -1.0])
    lr = jnp.asarray([-inf, 0.0, -inf, -1.0])
    np.testing.assert_array_equal(kl_k1(lp, lr), [inf, -inf, 0, 0])
    np.testing.assert_array_equal(kl_k2(lp, lr), [inf, inf, 0, 0])
    np.testing.assert_array_equal(kl_k3(lp, lr), [inf, inf, 0, 0])
    for fn in FUNCS.values():
        g = jax.grad(lambda a, fn=fn: jnp.sum(fn(a, lr)))(lp)
        assert not jnp.any(jnp.isnan(g))


def test_clipping():
    lp = jnp.zeros(3)
    lr = jnp.asarray([100.0, -100.0, 0.5])
    v = kl_k3(lp, lr, log_ratio_clip=20.0)
    np.testing.assert_allclose(v, ref_k3(np.array([20.0, -20.0, 0.5])), rtol=1e-14)
    v = kl_k3(lp, lr, log_ratio_clip=20.0, max_value=10.0)
    np.testing.assert_allclose(v, [10.0, 10.0, ref_k3(0.5)], rtol=1e-14)
    g = jax.grad(lambda r: jnp.sum(kl_k3(lp, r, log_ratio_clip=20.0)))(lr)
    np.testing.assert_allclose(g, [0.0, 0.0, np.expm1(0.5)], rtol=1e-14)
    with pytest.raises(ValueError, match="log_ratio_clip"):
        kl_k3(lp, lr, log_ratio_clip=0.0)
    with pytest.raises(ValueError, match="max_value"):
        kl_k3(lp, lr, max_value=-1)


def test_where_mask_sanitises_value_and_gradient():
    lp = jnp.asarray([-1.0, jnp.nan, 3e38, -2.0])
    lr = jnp.asarray([-2.0, 0.0, -jnp.inf, jnp.nan])
    keep = jnp.asarray([True, False, False, False])
    for fn in FUNCS.values():
        v = fn(lp, lr, mask=keep)
        np.testing.assert_array_equal(v[1:], 0)
        assert jnp.isfinite(v[0])
        gp, gr = jax.grad(lambda a, b, fn=fn: jnp.sum(fn(a, b, mask=keep)), (0, 1))(lp, lr)
        np.testing.assert_array_equal(gp[1:], 0)
        np.testing.assert_array_equal(gr[1:], 0)
    # numeric masks: nonzero = kept
    np.testing.assert_array_equal(
        kl_k3(lp, lr, mask=keep.astype(jnp.float32)), kl_k3(lp, lr, mask=keep)
    )


def test_dtypes():
    lp = jnp.asarray([-1.0, -2.0], jnp.bfloat16)
    lr = jnp.asarray([-1.5, -0.5], jnp.bfloat16)
    for fn in FUNCS.values():
        assert fn(lp, lr).dtype == jnp.float32
        assert fn(lp.astype(jnp.float32), lr.astype(jnp.float32)).dtype == jnp.float32
        assert fn(lp.astype(jnp.float64), lr.astype(jnp.float32)).dtype == jnp.float64
    np.testing.assert_allclose(
        kl_k3(lp, lr), ref_k3(np.asarray(lr, np.float64) - np.asarray(lp, np.float64)), rtol=1e-6
    )


def test_errors():
    with pytest.raises(TypeError, match="logp_policy"):
        kl_k3(jnp.zeros(3, jnp.int32), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`logp_policy` \(3,\), `logp_ref` \(4,\)"):
        kl_k3(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="logp_old"):
        kl_k3_importance_weighted(jnp.zeros(3), jnp.zeros(3), jnp.zeros(2))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), estimator="k4", reduction="mean")
    with pytest.raises(ValueError, match="reduction"):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), estimator="k3", reduction="avg")
    with pytest.raises(TypeError):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), estimator="k3")  # no default reduction
    with pytest.raises(ValueError, match="grad"):
        kl_straight_through(jnp.zeros(3), jnp.zeros(3), value="k3", grad="k5")
    with pytest.raises(ValueError, match="weight_clip"):
        kl_k3_importance_weighted(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), weight_clip=0)
    with pytest.raises(ValueError, match="mask"):
        kl_k3(jnp.zeros(3), jnp.zeros(3), mask=jnp.ones(2, bool))


def test_jit_vmap_grad_agree_with_eager():
    rng = np.random.default_rng(2)
    lp = jnp.asarray(np.log(rng.dirichlet(np.ones(8), size=3)))
    lr = jnp.asarray(np.log(rng.dirichlet(np.ones(8), size=3)))
    for fn in FUNCS.values():
        eager = fn(lp, lr)
        np.testing.assert_allclose(jax.jit(fn)(lp, lr), eager, rtol=1e-14)
        np.testing.assert_allclose(jax.vmap(fn)(lp, lr), eager, rtol=1e-14)
        g = jax.grad(lambda a, fn=fn: jnp.sum(fn(a, lr)))(lp)
        gj = jax.jit(jax.grad(lambda a, fn=fn: jnp.sum(fn(a, lr))))(lp)
        np.testing.assert_allclose(gj, g, rtol=1e-14)
    # per-token derivatives w.r.t. logp_policy: 1, x, 1 − e^{−x} with x = lp − lr
    x = np.asarray(lp - lr)
    for name, want in (("k1", np.ones_like(x)), ("k2", x), ("k3", -np.expm1(-x))):
        g = jax.grad(lambda a, name=name: jnp.sum(FUNCS[name](a, lr)))(lp)
        np.testing.assert_allclose(g, want, rtol=1e-12)
        # finite differences, independent of the custom JVP
        h = 1e-6
        fd = (FUNCS[name](lp + h, lr) - FUNCS[name](lp - h, lr)) / (2 * h)
        np.testing.assert_allclose(fd, want, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# Expectations, exactly by enumeration and statistically by sampling.


def test_exact_expectations_by_enumeration(pair):
    theta, phi = pair
    lp, lr = log_softmax64(theta), log_softmax64(phi)
    pi = np.exp(lp)
    kl = float(np.sum(pi * (lp - lr)))
    np.testing.assert_allclose(np.sum(pi * kl_k1(lp, lr)), kl, rtol=1e-12)
    np.testing.assert_allclose(np.sum(pi * kl_k3(lp, lr)), kl, rtol=1e-12)
    np.testing.assert_allclose(np.sum(pi * kl_k2(lp, lr)), np.sum(pi * 0.5 * (lr - lp) ** 2))
    # near π_ref: E[k2] ≈ KL (third-order bias) and Var[k3] ≪ Var[k1]
    lr_close = log_softmax64(theta + 0.05 * np.random.default_rng(3).normal(size=V))
    kl_c = np.sum(pi * (lp - lr_close))
    e_k2 = np.sum(pi * kl_k2(lp, lr_close))
    assert abs(e_k2 - kl_c) < 0.02 * kl_c
    var = {n: np.sum(pi * (FUNCS[n](lp, lr_close) - kl_c) ** 2) for n in ("k1", "k3")}
    assert var["k3"] < 0.01 * var["k1"]


@pytest.mark.parametrize("close", [False, True])
def test_sample_means_converge(pair, close):
    theta, phi = pair
    if close:
        phi = theta + 0.2 * jnp.asarray(np.random.default_rng(4).normal(size=V))
    n = 20_000
    tokens = jax.random.categorical(jax.random.key(7), theta, shape=(n,))
    lp_all, lr_all = jax.nn.log_softmax(theta), jax.nn.log_softmax(phi)
    lp, lr = lp_all[tokens], lr_all[tokens]
    pi = np.exp(log_softmax64(theta))
    kl = float(np.sum(pi * (log_softmax64(theta) - log_softmax64(phi))))
    e_k2 = float(np.sum(pi * 0.5 * (log_softmax64(phi) - log_softmax64(theta)) ** 2))
    for name, target in (("k1", kl), ("k2", e_k2), ("k3", kl)):
        v = np.asarray(FUNCS[name](lp, lr))
        se = v.std(ddof=1) / np.sqrt(n)
        assert abs(v.mean() - target) <= 5 * se, (name, v.mean(), target, se)
    if close:
        assert abs(e_k2 - kl) < 0.05 * kl


def test_importance_weighted_sampled(pair):
    theta, phi = pair
    old = theta + 0.3 * jnp.asarray(np.random.default_rng(5).normal(size=V))
    n = 20_000
    tokens = jax.random.categorical(jax.random.key(8), old, shape=(n,))
    lp = jax.nn.log_softmax(theta)[tokens]
    lr = jax.nn.log_softmax(phi)[tokens]
    lo = jax.nn.log_softmax(old)[tokens]
    v = np.asarray(kl_k3_importance_weighted(lp, lr, lo))
    kl = float(exact_kl(theta, phi))
    assert abs(v.mean() - kl) <= 5 * v.std(ddof=1) / np.sqrt(n)


# ---------------------------------------------------------------------------------------------
# Gradients as losses (tokens fixed), exactly by enumeration.


def test_gradient_claims(pair):
    theta, phi = pair
    grad_fwd = jax.grad(lambda t: exact_kl(t, phi))(theta)  # ∇ KL(π_θ‖π_ref)
    grad_rev = jax.grad(lambda t: exact_kl(phi, t))(theta)  # ∇ KL(π_ref‖π_θ)
    np.testing.assert_allclose(expected_grad(kl_k1, theta, phi), 0, atol=1e-13)
    np.testing.assert_allclose(expected_grad(kl_k2, theta, phi), grad_fwd, rtol=1e-10)
    np.testing.assert_allclose(expected_grad(kl_k3, theta, phi), grad_rev, rtol=1e-10)
    assert not np.allclose(grad_fwd, grad_rev, rtol=1e-2)  # the claim is not vacuous
    # the exact penalty's gradient is ∇KL(π_θ‖π_ref) with no sampling
    g_exact = jax.grad(lambda t: kl_penalty_exact(t, phi))(theta)
    np.testing.assert_allclose(g_exact, grad_fwd, rtol=1e-10)


@pytest.mark.parametrize("value", ESTIMATORS)
@pytest.mark.parametrize("grad", ESTIMATORS)
def test_straight_through(pair, value, grad):
    theta, phi = pair
    lp, lr = jax.nn.log_softmax(theta), jax.nn.log_softmax(phi)
    st_v = kl_straight_through(lp, lr, value=value, grad=grad)
    np.testing.assert_array_equal(st_v, FUNCS[value](lp, lr))  # exactly the value estimator
    for arg in (0, 1):

        def per_token_grad(fn, arg=arg):
            return jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=arg)(lp, lr)

        st_g = per_token_grad(lambda a, b: kl_straight_through(a, b, value=value, grad=grad))
        np.testing.assert_allclose(st_g, per_token_grad(FUNCS[grad]), rtol=1e-14)
    if (value, grad) == ("k3", "k2"):
        grad_fwd = jax.grad(lambda t: exact_kl(t, phi))(theta)
        g = expected_grad(lambda a, b: kl_straight_through(a, b, value="k3", grad="k2"), theta, phi)
        np.testing.assert_allclose(g, grad_fwd, rtol=1e-10)


def test_straight_through_non_finite_gradient_branch():
    lp = jnp.asarray([0.0, 0.0], jnp.float32)
    lr = jnp.asarray([100.0, 0.5], jnp.float32)  # k3 overflows on the first token
    v = kl_straight_through(lp, lr, value="k2", grad="k3")
    np.testing.assert_allclose(v, [5000.0, 0.125])
    g = jax.grad(lambda a: jnp.sum(kl_straight_through(a, lr, value="k2", grad="k3")))(lp)
    assert g[0] == 0 and np.isclose(g[1], -np.expm1(0.5), rtol=1e-6)


def test_importance_weighted_exact(pair):
    theta, phi = pair
    old = theta + 0.5 * jnp.asarray(np.random.default_rng(6).normal(size=V))
    lo_all = jax.nn.log_softmax(old)
    w_old = jnp.exp(lo_all)

    def is_k3(lp, lr):
        return kl_k3_importance_weighted(lp, lr, lo_all)

    # value: E_old[w·k3] = KL(π_θ‖π_ref)
    lp_all, lr_all = jax.nn.log_softmax(theta), jax.nn.log_softmax(phi)
    np.testing.assert_allclose(jnp.sum(w_old * is_k3(lp_all, lr_all)), exact_kl(theta, phi))
    # gradient with the weight differentiated: ∇KL(π_θ‖π_ref)
    grad_fwd = jax.grad(lambda t: exact_kl(t, phi))(theta)
    np.testing.assert_allclose(expected_grad(is_k3, theta, phi, w_old), grad_fwd, rtol=1e-10)

    # weight not differentiated: ∇KL(π_ref‖π_θ)
    def is_k3_sg(lp, lr):
        w = jnp.exp(jax.lax.stop_gradient(lp) - lo_all)
        return w * kl_k3(lp, lr)

    grad_rev = jax.grad(lambda t: exact_kl(phi, t))(theta)
    np.testing.assert_allclose(expected_grad(is_k3_sg, theta, phi, w_old), grad_rev, rtol=1e-10)
    # at π_old = π_θ its per-token gradient is k2's
    g_is = jax.grad(lambda a: jnp.sum(kl_k3_importance_weighted(a, lr_all, lp_all)))(lp_all)
    g_k2 = jax.grad(lambda a: jnp.sum(kl_k2(a, lr_all)))(lp_all)
    np.testing.assert_allclose(g_is, g_k2, rtol=1e-12)


def test_importance_weight_clipping():
    lp = jnp.asarray([0.0, 0.0, 0.0])
    lo = jnp.asarray([-1.0, 0.05, 1.0])  # w = e, e^{-0.05}, e^{-1}
    lr = jnp.asarray([-0.5, -0.5, -0.5])
    k3 = kl_k3(lp, lr)
    w = np.exp(np.asarray(lp - lo))
    np.testing.assert_allclose(kl_k3_importance_weighted(lp, lr, lo), w * k3, rtol=1e-14)
    np.testing.assert_allclose(
        kl_k3_importance_weighted(lp, lr, lo, weight_clip=0.2), np.clip(w, 0.8, 1.2) * k3
    )
    np.testing.assert_allclose(
        kl_k3_importance_weighted(lp, lr, lo, max_weight=1.5), np.minimum(w, 1.5) * k3
    )
    big = kl_k3_importance_weighted(jnp.zeros(1, jnp.float32), -jnp.ones(1), -jnp.full(1, 1e3))
    assert big[0] == jnp.inf
    capped = kl_k3_importance_weighted(
        jnp.zeros(1, jnp.float32), -jnp.ones(1), -jnp.full(1, 1e3), max_weight=5.0
    )
    np.testing.assert_allclose(capped, 5 * ref_k3(-1.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Reduced and exact penalties.


def test_kl_penalty_matches_reduce():
    rng = np.random.default_rng(9)
    lp = jnp.asarray(np.log(rng.uniform(0.01, 1, size=(3, 5))))
    lr = jnp.asarray(np.log(rng.uniform(0.01, 1, size=(3, 5))))
    mask = jnp.asarray(rng.uniform(size=(3, 5)) > 0.3)
    lp_garbage = jnp.where(mask, lp, jnp.nan)
    for name, fn in FUNCS.items():
        for red in ("mean", "sum", "batchmean"):
            got = kl_penalty(lp_garbage, lr, estimator=name, reduction=red, mask=mask)
            want = reductions.reduce(fn(lp, lr), red, mask=mask)
            np.testing.assert_allclose(got, want, rtol=1e-14)
        g = jax.grad(
            lambda a, name=name: kl_penalty(a, lr, estimator=name, reduction="mean", mask=mask)
        )(lp_garbage)
        assert jnp.all(jnp.isfinite(g)) and jnp.all(jnp.where(mask, True, g == 0))
    st_pen = kl_penalty(lp, lr, estimator="k3", grad_estimator="k2", reduction="sum", mask=mask)
    np.testing.assert_allclose(st_pen, reductions.reduce(kl_k3(lp, lr), "sum", mask=mask))
    g_st = jax.grad(
        lambda a: kl_penalty(a, lr, estimator="k3", grad_estimator="k2", reduction="sum")
    )(lp)
    np.testing.assert_allclose(g_st, lp - lr, rtol=1e-12)
    per_tok = kl_penalty(lp, lr, estimator="k2", reduction="none", mask=mask)
    np.testing.assert_allclose(per_tok, jnp.where(mask, kl_k2(lp, lr), 0))


def test_kl_penalty_exact():
    rng = np.random.default_rng(10)
    a = rng.normal(size=(2, 3, 7))
    b = rng.normal(size=(2, 3, 7))
    want = np.sum(np.exp(log_softmax64(a)) * (log_softmax64(a) - log_softmax64(b)), -1)
    np.testing.assert_allclose(kl_penalty_exact(a, b), want, rtol=1e-12)
    # equals E_{a~π}[k3] (and E[k1]) by enumeration
    lp, lr = log_softmax64(a), log_softmax64(b)
    np.testing.assert_allclose(np.sum(np.exp(lp) * kl_k3(lp, lr), -1), want, rtol=1e-12)
    # vocabulary axis elsewhere
    np.testing.assert_allclose(
        kl_penalty_exact(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0), axis=0), want, rtol=1e-12
    )
    # a per-position mask sanitises garbage positions
    mask = jnp.asarray([[True, False, True], [False, True, True]])
    a_bad = jnp.where(mask[..., None], a, jnp.nan)
    got = kl_penalty_exact(a_bad, b, mask=mask)
    np.testing.assert_allclose(got, np.where(mask, want, 0), rtol=1e-12)
    g = jax.grad(lambda x: jnp.sum(kl_penalty_exact(x, b, mask=mask)))(a_bad)
    assert jnp.all(jnp.isfinite(g)) and jnp.all(jnp.where(mask[..., None], True, g == 0))
    with pytest.raises(ValueError, match="mask"):
        kl_penalty_exact(a, b, mask=jnp.ones((4,), bool))
    assert kl_penalty_exact(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)).dtype == jnp.float32
