"""Tests for kldiv.gaussian: closed-form Gaussian KLs against TensorFlow Probability (float64),
an independent chain-rule reference, high-precision references for tiny KLs, and edge cases."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import tensorflow_probability.substrates.jax as tfp
from hypothesis import given, settings
from hypothesis import strategies as st

from kldiv import gaussian as raw

tfd = tfp.distributions

# Jitted entry points: one compilation per input shape instead of one per primitive (fast tests);
# trace-time checks raise the same errors under jit.
g = SimpleNamespace(
    **{
        name: jax.jit(getattr(raw, name), static_argnames=("per_dim",))
        if "per_dim" in inspect.signature(getattr(raw, name)).parameters
        else jax.jit(getattr(raw, name))
        for name in raw.__all__
    }
)

SIZES = (1, 3, 16, 64)
BATCH = 4
RTOL64 = 1e-10

DIAG_FNS = {
    # name: (function, converter from log-variance to the function's parameterisation)
    "log_var": (g.kl_diag, lambda lv: lv),
    "scale": (g.kl_diag_scale, lambda lv: np.exp(0.5 * lv)),
    "log_scale": (g.kl_diag_log_scale, lambda lv: 0.5 * lv),
}
STD_FNS = {
    "log_var": (g.kl_standard_normal, lambda lv: lv),
    "scale": (g.kl_standard_normal_scale, lambda lv: np.exp(0.5 * lv)),
    "log_scale": (g.kl_standard_normal_log_scale, lambda lv: 0.5 * lv),
}


# ---------------------------------------------------------------------------------------------
# Parameter generators (numpy float64) and references.


def _diag_params(rng, d, batch=(BATCH,), shared=False):
    mp = rng.normal(size=(*batch, d))
    lvp = rng.normal(scale=0.7, size=(*batch, d))
    qbatch = () if shared else batch
    mq = rng.normal(size=(*qbatch, d))
    lvq = rng.normal(scale=0.7, size=(*qbatch, d))
    return mp, lvp, mq, lvq


def _tril(rng, batch, d):
    off = np.tril(rng.normal(scale=0.4 / np.sqrt(d), size=(*batch, d, d)), -1)
    diag = np.exp(rng.normal(scale=0.3, size=(*batch, d)))
    return off + diag[..., None] * np.eye(d)


def _full_params(rng, d, batch=(BATCH,), shared=False):
    qbatch = () if shared else batch
    return (
        rng.normal(size=(*batch, d)),
        _tril(rng, batch, d),
        rng.normal(size=(*qbatch, d)),
        _tril(rng, qbatch, d),
    )


def _tfp_diag(mp, lvp, mq, lvq):
    p = tfd.MultivariateNormalDiag(mp, np.exp(0.5 * lvp))
    q = tfd.MultivariateNormalDiag(mq, np.exp(0.5 * lvq))
    return np.asarray(tfd.kl_divergence(p, q))


def _tfp_full(mp, lp, mq, lq):
    return np.asarray(
        tfd.kl_divergence(tfd.MultivariateNormalTriL(mp, lp), tfd.MultivariateNormalTriL(mq, lq))
    )


def _lowrank_cov(diag, factor):
    cov = diag[..., None] * np.eye(diag.shape[-1])
    if factor is not None:
        cov = cov + factor @ np.swapaxes(factor, -1, -2)
    return cov


def _tfp_lowrank(mp, dp, up, mq, dq, uq):
    lp = np.linalg.cholesky(_lowrank_cov(dp, up))
    lq = np.linalg.cholesky(_lowrank_cov(dq, uq))
    return _tfp_full(mp, lp, mq, lq)


def _chain_rule_terms(mp, sp, mq, sq):
    """E_p[KL(p(z_i|z_<i) ‖ q(z_i|z_<i))] from conditional Gaussians (no Cholesky factors)."""
    d = mp.shape[0]
    out = np.empty(d)
    for i in range(d):
        a = slice(0, i)
        if i == 0:
            bp = bq = np.zeros(0)
            vp, vq = sp[0, 0], sq[0, 0]
        else:
            bp = np.linalg.solve(sp[a, a], sp[a, i])
            bq = np.linalg.solve(sq[a, a], sq[a, i])
            vp, vq = sp[i, i] - sp[i, a] @ bp, sq[i, i] - sq[i, a] @ bq
        c = mp[i] - mq[i] - bq @ (mp[a] - mq[a])
        second = c**2 + (bp - bq) @ sp[a, a] @ (bp - bq)
        out[i] = 0.5 * (vp / vq - 1 - np.log(vp / vq) + second / vq)
    return out


def _mp_kl_cov(mp, sp, mq, sq):
    """KL between Gaussians with covariances sp, sq in 50-digit arithmetic."""
    with mpmath.workdps(50):
        sp_, sq_ = mpmath.matrix(sp.tolist()), mpmath.matrix(sq.tolist())
        dm = mpmath.matrix((np.asarray(mp, np.float64) - 0).tolist()) - mpmath.matrix(
            np.asarray(mq, np.float64).tolist()
        )
        sq_inv = sq_**-1
        tr = sum((sq_inv * sp_)[i, i] for i in range(sp.shape[0]))
        maha = (dm.T * sq_inv * dm)[0, 0]
        return float(
            0.5 * (tr - sp.shape[0] + mpmath.log(mpmath.det(sq_) / mpmath.det(sp_)) + maha)
        )


def _mp_kl_diag(mp, lvp, mq, lvq):
    with mpmath.workdps(50):
        total = mpmath.mpf(0)
        for a, b, c, e in zip(mp, lvp, mq, lvq, strict=True):
            a, b, c, e = (mpmath.mpf(float(v)) for v in (a, b, c, e))
            total += 0.5 * (e - b + (mpmath.exp(b) + (a - c) ** 2) / mpmath.exp(e) - 1)
        return float(total)


# ---------------------------------------------------------------------------------------------
# Against TFP in float64.


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared_prior"])
@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("param", sorted(DIAG_FNS))
def test_diag_matches_tfp(param, d, shared):
    rng = np.random.default_rng(d)
    mp, lvp, mq, lvq = _diag_params(rng, d, shared=shared)
    fn, conv = DIAG_FNS[param]
    got = fn(mp, conv(lvp), mq, conv(lvq))
    assert got.dtype == jnp.float64 and got.shape == (BATCH,)
    np.testing.assert_allclose(got, _tfp_diag(mp, lvp, mq, lvq), rtol=RTOL64, atol=0)


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("param", sorted(STD_FNS))
def test_standard_normal_matches_tfp(param, d):
    rng = np.random.default_rng(100 + d)
    mp, lvp, _, _ = _diag_params(rng, d)
    fn, conv = STD_FNS[param]
    got = fn(mp, conv(lvp))
    assert got.dtype == jnp.float64
    ref = _tfp_diag(mp, lvp, np.zeros(d), np.zeros(d))
    np.testing.assert_allclose(got, ref, rtol=RTOL64, atol=0)


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared_prior"])
@pytest.mark.parametrize("d", SIZES)
def test_full_matches_tfp(d, shared):
    rng = np.random.default_rng(200 + d)
    mp, lp, mq, lq = _full_params(rng, d, shared=shared)
    got = g.kl_full(mp, lp, mq, lq)
    assert got.dtype == jnp.float64 and got.shape == (BATCH,)
    np.testing.assert_allclose(got, _tfp_full(mp, lp, mq, lq), rtol=RTOL64, atol=0)


LOWRANK_CASES = [(d, (2, 3)) for d in SIZES] + [(16, (None, 2)), (16, (3, None))]


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared_prior"])
@pytest.mark.parametrize(("d", "ranks"), LOWRANK_CASES)
def test_lowrank_matches_tfp(d, ranks, shared):
    rng = np.random.default_rng(300 + d)
    qbatch = () if shared else (BATCH,)
    kp, kq = ranks
    mp, mq = rng.normal(size=(BATCH, d)), rng.normal(size=(*qbatch, d))
    dp = np.exp(rng.normal(scale=0.5, size=(BATCH, d)))
    dq = np.exp(rng.normal(scale=0.5, size=(*qbatch, d)))
    up = None if kp is None else rng.normal(scale=0.7, size=(BATCH, d, kp))
    uq = None if kq is None else rng.normal(scale=0.7, size=(*qbatch, d, kq))
    got = g.kl_lowrank(mp, dp, up, mq, dq, uq)
    assert got.dtype == jnp.float64 and got.shape == (BATCH,)
    np.testing.assert_allclose(got, _tfp_lowrank(mp, dp, up, mq, dq, uq), rtol=RTOL64, atol=0)


@pytest.mark.parametrize("d", SIZES)
def test_per_dim_diag_is_univariate_kl(d):
    rng = np.random.default_rng(400 + d)
    mp, lvp, mq, lvq = _diag_params(rng, d)
    ref = np.asarray(
        tfd.kl_divergence(tfd.Normal(mp, np.exp(0.5 * lvp)), tfd.Normal(mq, np.exp(0.5 * lvq)))
    )
    for fn, conv in DIAG_FNS.values():
        got = fn(mp, conv(lvp), mq, conv(lvq), per_dim=True)
        assert got.shape == (BATCH, d)
        np.testing.assert_allclose(got, ref, rtol=RTOL64, atol=0)
    ref0 = np.asarray(tfd.kl_divergence(tfd.Normal(mp, np.exp(0.5 * lvp)), tfd.Normal(0.0, 1.0)))
    for fn, conv in STD_FNS.values():
        np.testing.assert_allclose(fn(mp, conv(lvp), per_dim=True), ref0, rtol=RTOL64, atol=0)


@pytest.mark.parametrize("shared", [False, True], ids=["batched", "shared_prior"])
@pytest.mark.parametrize("d", (1, 3, 16))
def test_full_per_dim_is_chain_rule(d, shared):
    rng = np.random.default_rng(500 + d)
    mp, lp, mq, lq = _full_params(rng, d, shared=shared)
    got = np.asarray(g.kl_full(mp, lp, mq, lq, per_dim=True))
    assert got.shape == (BATCH, d) and (got >= 0).all()
    lqb = np.broadcast_to(lq, lp.shape)
    mqb = np.broadcast_to(mq, mp.shape)
    for b in range(BATCH):
        ref = _chain_rule_terms(mp[b], lp[b] @ lp[b].T, mqb[b], lqb[b] @ lqb[b].T)
        np.testing.assert_allclose(got[b], ref, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), _tfp_full(mp, lp, mq, lq), rtol=RTOL64)


def test_diagonal_factors_reduce_to_kl_diag():
    rng = np.random.default_rng(7)
    mp, lvp, mq, lvq = _diag_params(rng, 5)
    lp = np.exp(0.5 * lvp)[..., None] * np.eye(5)
    lq = np.exp(0.5 * lvq)[..., None] * np.eye(5)
    np.testing.assert_allclose(
        g.kl_full(mp, lp, mq, lq, per_dim=True), g.kl_diag(mp, lvp, mq, lvq, per_dim=True), 1e-13
    )
    np.testing.assert_allclose(
        g.kl_lowrank(mp, np.exp(lvp), None, mq, np.exp(lvq), None),
        g.kl_diag(mp, lvp, mq, lvq),
        rtol=1e-13,
    )


# ---------------------------------------------------------------------------------------------
# Broadcasting and shared priors.


def test_shared_prior_paths_agree():
    rng = np.random.default_rng(8)
    mp, lp, mq, lq = _full_params(rng, 6, batch=(2, 3), shared=True)
    shared = g.kl_full(mp, lp, mq, lq, per_dim=True)
    unit = g.kl_full(mp, lp, mq[None, None], lq[None, None], per_dim=True)
    bcast = g.kl_full(mp, lp, mq, np.broadcast_to(lq, lp.shape), per_dim=True)
    assert shared.shape == (2, 3, 6)
    np.testing.assert_allclose(shared, bcast, rtol=1e-12)
    np.testing.assert_allclose(unit, bcast, rtol=1e-12)
    # One posterior against a batch of priors, and batched means with a shared covariance.
    one_p = g.kl_full(
        mp[0, 0], lp[0, 0], np.broadcast_to(mq, (5, 6)), np.broadcast_to(lq, (5, 6, 6))
    )
    assert one_p.shape == (5,)
    np.testing.assert_allclose(one_p, _tfp_full(mp[0, 0], lp[0, 0], mq, lq), rtol=1e-12)
    shared_cov = g.kl_full(mp, lp[0, 0], mq, lq)
    np.testing.assert_allclose(shared_cov, _tfp_full(mp, lp[0, 0], mq, lq), rtol=1e-12)


def test_batch_axes_kept_and_broadcast():
    rng = np.random.default_rng(9)
    mp, lvp, _, _ = _diag_params(rng, 4, batch=(2, 3))
    assert g.kl_standard_normal(mp, lvp).shape == (2, 3)
    assert g.kl_standard_normal(mp, lvp, per_dim=True).shape == (2, 3, 4)
    # Shared variance with per-example means.
    out = g.kl_diag(mp, lvp[0, 0], np.zeros(4), np.zeros(4))
    np.testing.assert_allclose(out, g.kl_standard_normal(mp, np.broadcast_to(lvp[0, 0], mp.shape)))
    # Low-rank with a batch of posteriors against one unbatched prior, extra batch axes.
    up = rng.normal(size=(2, 3, 4, 2))
    out = g.kl_lowrank(mp, np.exp(lvp), up, np.zeros(4), np.ones(4), rng.normal(size=(4, 1)))
    assert out.shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# Gradients, jit and vmap.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_standard_normal_analytic_gradients(dtype):
    rng = np.random.default_rng(10)
    mean = jnp.asarray(rng.normal(size=(3, 8)) * 2, dtype)
    lv = jnp.asarray(np.linspace(-8, 8, 24).reshape(3, 8), dtype)
    lv = lv.at[0, 0].set(0).at[0, 1].set(1e-3)  # the series branch
    gm, glv = jax.grad(lambda m, v: jnp.sum(g.kl_standard_normal(m, v)), (0, 1))(mean, lv)
    tol = 1e-6 if dtype == jnp.float32 else 1e-14
    np.testing.assert_allclose(gm, mean, rtol=tol)
    np.testing.assert_allclose(glv, np.expm1(np.asarray(lv, np.float64)) / 2, rtol=tol, atol=0)
    # Scale and log-scale forms: ∂/∂σ = σ − 1/σ, ∂/∂log σ = σ² − 1.
    s = jnp.exp(lv / 2)
    gs = jax.grad(lambda x: jnp.sum(g.kl_standard_normal_scale(mean, x)))(s)
    gls = jax.grad(lambda x: jnp.sum(g.kl_standard_normal_log_scale(mean, x)))(lv / 2)
    s64 = np.asarray(s, np.float64)
    np.testing.assert_allclose(gs, s64 - 1 / s64, rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(gls, np.expm1(np.asarray(lv, np.float64)), rtol=tol, atol=0)


def _cases(rng, d=5):
    """(name, function, float64 args, TFP reference function) for every public function."""
    mp, lvp, mq, lvq = _diag_params(rng, d)
    fp, lp, fq, lq = _full_params(rng, d)
    dp, dq = np.exp(lvp), np.exp(lvq)
    up, uq = rng.normal(size=(BATCH, d, 2)), rng.normal(size=(BATCH, d, 3))
    zero, one = np.zeros((BATCH, d)), np.ones((BATCH, d))
    sd = lambda v: np.exp(0.5 * v)  # noqa: E731
    return [
        ("std", raw.kl_standard_normal, (mp, lvp), lambda m, v: _tfp_diag_j(m, v, zero, zero)),
        (
            "std_scale",
            raw.kl_standard_normal_scale,
            (mp, sd(lvp)),
            lambda m, s: _tfp_diag_j(m, 2 * jnp.log(s), zero, zero),
        ),
        (
            "std_log_scale",
            raw.kl_standard_normal_log_scale,
            (mp, lvp / 2),
            lambda m, s: _tfp_diag_j(m, 2 * s, zero, zero),
        ),
        ("diag", raw.kl_diag, (mp, lvp, mq, lvq), _tfp_diag_j),
        (
            "diag_scale",
            raw.kl_diag_scale,
            (mp, sd(lvp), mq, sd(lvq)),
            lambda a, b, c, e: _tfp_diag_j(a, 2 * jnp.log(b), c, 2 * jnp.log(e)),
        ),
        (
            "diag_log_scale",
            raw.kl_diag_log_scale,
            (mp, lvp / 2, mq, lvq / 2),
            lambda a, b, c, e: _tfp_diag_j(a, 2 * b, c, 2 * e),
        ),
        ("full", raw.kl_full, (fp, lp, fq, lq), _tfp_full_j),
        ("full_shared", raw.kl_full, (fp, lp, fq[0], lq[0]), _tfp_full_j),
        ("lowrank", raw.kl_lowrank, (mp, dp, up, mq, dq, uq), _tfp_lowrank_j),
        ("lowrank_shared", raw.kl_lowrank, (mp, dp, up, mq[0], dq[0], uq[0]), _tfp_lowrank_j),
        ("diag_vs_one", raw.kl_diag_scale, (mp, sd(lvp), zero, one), None),
    ]


def _tfp_diag_j(mp, lvp, mq, lvq):
    p = tfd.MultivariateNormalDiag(mp, jnp.exp(0.5 * lvp))
    return tfd.kl_divergence(p, tfd.MultivariateNormalDiag(mq, jnp.exp(0.5 * lvq)))


def _tfp_full_j(mp, lp, mq, lq):
    p, q = tfd.MultivariateNormalTriL(mp, lp), tfd.MultivariateNormalTriL(mq, lq)
    return tfd.kl_divergence(p, q)


def _tfp_lowrank_j(mp, dp, up, mq, dq, uq):
    def chol(d, u):
        return jnp.linalg.cholesky(
            d[..., None] * jnp.eye(d.shape[-1]) + u @ jnp.swapaxes(u, -1, -2)
        )

    return _tfp_full_j(mp, chol(dp, up), mq, chol(dq, uq))


def _tril_if_square(x):
    x = np.asarray(x)
    return np.tril(x) if x.ndim >= 2 and x.shape[-1] == x.shape[-2] else x


@pytest.mark.parametrize("idx", range(11))
def test_jit_vmap_grad_agree_with_eager_and_tfp(idx):
    name, fn, args, ref_fn = _cases(np.random.default_rng(11))[idx]
    args = tuple(jnp.asarray(a) for a in args)
    argnums = tuple(range(len(args)))
    value, grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a)), argnums))(*args)
    jitted = jax.jit(fn)(*args)
    np.testing.assert_allclose(value, jnp.sum(jitted), rtol=1e-13)
    if not name.startswith("lowrank"):  # op-by-op execution of the QR loop is slow to dispatch
        np.testing.assert_allclose(fn(*args), jitted, rtol=1e-13)
    # Per example under vmap: values equal the batched call, gradients w.r.t. p's parameters
    # equal the batched gradient (q is shared, i.e. not mapped, in the *_shared cases).
    n_p = len(args) // 2 if name.endswith("shared") else len(args)
    in_axes = tuple(0 if i < n_p else None for i in range(len(args)))
    vvals, vgrads = jax.jit(jax.vmap(jax.value_and_grad(fn, argnums[:n_p]), in_axes=in_axes))(*args)
    np.testing.assert_allclose(vvals, jitted, rtol=1e-13)
    for a, b in zip(vgrads, grads[:n_p], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    if ref_fn is not None:
        ref_value, ref_grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(ref_fn(*a)), argnums))(
            *args
        )
        np.testing.assert_allclose(value, ref_value, rtol=1e-10)
        for a, b in zip(grads, ref_grads, strict=True):
            # TFP's gradient w.r.t. a scale_tril includes its (unused) upper triangle.
            np.testing.assert_allclose(
                _tril_if_square(a), _tril_if_square(b), rtol=1e-8, atol=1e-10
            )


# ---------------------------------------------------------------------------------------------
# Numerics: extreme log-variances, identical distributions, tiny KLs, never negative.


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def test_float32_log_var_range_finite():
    lv = jnp.linspace(-60, 60, 241, dtype=jnp.float32)[:, None] * jnp.ones((1, 3), jnp.float32)
    mean = jnp.full_like(lv, 3.0)
    for fn, arg in [
        (g.kl_standard_normal, lv),
        (g.kl_standard_normal_log_scale, lv / 2),
        (g.kl_standard_normal_scale, jnp.exp(lv / 2)),
    ]:
        val, grads = jax.value_and_grad(lambda m, v, f=fn: jnp.sum(f(m, v)), (0, 1))(mean, arg)
        assert val.dtype == jnp.float32 and _finite((val, grads)), fn.__name__
    # Pairs: every (lv_p, lv_q) in [−60, 60]² whose KL is representable in float32, i.e.
    # lv_p − lv_q ≤ 80 (e^{88} overflows float32; beyond that the true KL does too).
    a, b = jnp.meshgrid(jnp.linspace(-60, 60, 61), jnp.linspace(-60, 60, 61))
    a, b = a.reshape(-1, 1).astype(jnp.float32), b.reshape(-1, 1).astype(jnp.float32)
    ok = np.asarray(a - b)[:, 0] <= 80
    mp, mq = jnp.full_like(a, 1e3), jnp.full_like(a, -2e3)
    for fn, conv in [(g.kl_diag, 1.0), (g.kl_diag_log_scale, 0.5)]:
        val = fn(mp, conv * a, mq, conv * b)
        grads = jax.grad(lambda *x, f=fn: jnp.sum(f(*x)[ok]), (0, 1, 2, 3))(
            mp, conv * a, mq, conv * b
        )
        assert _finite((val[ok], [x[ok] for x in grads])), fn.__name__
        # Beyond lv_p − lv_q ≈ 88 the true KL, ≥ e^{lv_p − lv_q}/2, exceeds float32's range.
        assert bool(jnp.all(jnp.isinf(val[(a - b)[:, 0] > 89])))
    # Full covariance with diagonal factors e^{lv/2} against a standard normal prior.
    d = 3
    lp = jnp.exp(lv / 2)[..., None] * jnp.eye(d, dtype=jnp.float32) + jnp.tril(
        jnp.full((d, d), 0.5, jnp.float32), -1
    )
    val, grads = jax.value_and_grad(
        lambda m, l: jnp.sum(
            g.kl_full(m, l, jnp.zeros(d, jnp.float32), jnp.eye(d, dtype=jnp.float32))
        ),
        (0, 1),
    )(mean, lp)
    assert _finite((val, grads))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_identical_distributions_give_exactly_zero(dtype):
    rng = np.random.default_rng(12)
    std_one = {"std": 0.0, "std_scale": 1.0, "std_log_scale": 0.0}
    for name, fn, args, _ in _cases(rng):
        if name in ("diag_vs_one", "full_shared", "lowrank_shared"):
            continue
        if name in std_one:  # p = N(0, I) in the function's own parameterisation
            args = (np.zeros_like(args[0]), np.full_like(args[1], std_one[name]))
        else:
            args = args[: len(args) // 2] * 2
        args = tuple(jnp.asarray(a, dtype) for a in args)
        argnums = tuple(range(len(args)))
        vals, grads = jax.jit(jax.vmap(jax.value_and_grad(fn, argnums)))(*args)
        assert not np.any(np.asarray(vals)), (name, vals)
        assert all(not np.any(np.asarray(x)) for x in grads), name
    # A shared prior that equals some posteriors of the batch.
    fp, lp, _, _ = _full_params(rng, 4)
    fp, lp = jnp.asarray(fp, dtype), jnp.asarray(lp, dtype)
    out = jax.jit(g.kl_full)(fp, lp, fp[1], lp[1])
    assert float(out[1]) == 0.0 and bool(jnp.all(out[jnp.array([0, 2, 3])] > 0))


def test_tiny_kl_keeps_relative_accuracy_in_float32():
    rng = np.random.default_rng(13)
    d = 8
    mp = (rng.normal(size=(6, d)) * 1e-4).astype(np.float32)
    lvp = (rng.normal(size=(6, d)) * 1e-4).astype(np.float32)
    mq = (mp + rng.normal(size=(6, d)) * 1e-5).astype(np.float32)
    lvq = (lvp + rng.normal(size=(6, d)) * 1e-4).astype(np.float32)
    got = np.asarray(g.kl_standard_normal(mp, lvp), np.float64)
    ref = [_mp_kl_diag(mp[i], lvp[i], np.zeros(d), np.zeros(d)) for i in range(6)]
    np.testing.assert_allclose(got, ref, rtol=2e-6)
    got = np.asarray(g.kl_diag(mp, lvp, mq, lvq), np.float64)
    ref = [_mp_kl_diag(mp[i], lvp[i], mq[i], lvq[i]) for i in range(6)]
    np.testing.assert_allclose(got, ref, rtol=2e-6)
    # Full covariance: L_q = L_p + tiny perturbation, KL ≈ 1e-9.
    lp = _tril(rng, (3,), 4).astype(np.float32)
    lq = (lp + np.tril(rng.normal(size=lp.shape)) * 3e-5).astype(np.float32)
    m = np.zeros((3, 4), np.float32)
    got = np.asarray(g.kl_full(m, lp, m, lq), np.float64)
    lp64, lq64 = lp.astype(np.float64), lq.astype(np.float64)
    ref = [_mp_kl_cov(m[i], lp64[i] @ lp64[i].T, m[i], lq64[i] @ lq64[i].T) for i in range(3)]
    assert max(ref) < 1e-7
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    # TFP in float32 has no such accuracy: it cancels to noise at this size.
    tfp32 = np.asarray(_tfp_full(m, lp, m, lq), np.float64)
    assert np.max(np.abs(tfp32 - ref) / np.asarray(ref)) > 1e-2


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.0, 1e-7, 1e-4, 1e-2, 1.0, 10.0]),
)
def test_never_negative_float32(seed, scale):
    rng = np.random.default_rng(seed)
    d = 5
    mp = rng.normal(size=(4, d)).astype(np.float32)
    lvp = rng.normal(size=(4, d)).astype(np.float32)
    mq = (mp + scale * rng.normal(size=mp.shape)).astype(np.float32)
    lvq = (lvp + scale * rng.normal(size=lvp.shape)).astype(np.float32)
    lp = _tril(rng, (4,), d).astype(np.float32)
    lq = (lp + scale * np.tril(rng.normal(size=lp.shape))).astype(np.float32)
    lq[..., range(d), range(d)] = np.abs(lq[..., range(d), range(d)]) + 1e-3
    up = rng.normal(size=(4, d, 2)).astype(np.float32)
    uq = (up + scale * rng.normal(size=up.shape)).astype(np.float32)
    dp, dq = np.exp(lvp), np.exp(lvq)
    outs = [
        g.kl_diag(mp, lvp, mq, lvq, per_dim=True),
        g.kl_standard_normal(scale * mp, scale * lvp, per_dim=True),
        g.kl_full(mp, lp, mq, lq, per_dim=True),
        g.kl_lowrank(mp, dp, up, mq, dq, uq),
    ]
    for out in outs:
        assert out.dtype == jnp.float32
        assert bool(jnp.all(out >= 0)), out
    # Against float64 (same function, x64): float32 keeps relative accuracy of the diagonal KL.
    ref = np.asarray(g.kl_diag(*(x.astype(np.float64) for x in (mp, lvp, mq, lvq))))
    got = np.asarray(jnp.sum(outs[0], -1), np.float64)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=0)


def test_degenerate_scales_give_inf():
    m = jnp.zeros((1, 2))
    assert np.isinf(g.kl_diag_scale(m, jnp.array([[0.0, 1.0]]), m, jnp.ones((1, 2))))[0]
    assert np.isinf(g.kl_diag_scale(m, jnp.ones((1, 2)), m, jnp.array([[1.0, 0.0]])))[0]
    assert np.isinf(g.kl_standard_normal_scale(m, jnp.array([[0.0, 1.0]])))[0]


def test_upper_triangle_and_diagonal_sign_are_immaterial():
    rng = np.random.default_rng(14)
    mp, lp, mq, lq = _full_params(rng, 5)
    ref = g.kl_full(mp, lp, mq, lq)
    junk = np.triu(rng.normal(size=lp.shape), 1) * 100
    np.testing.assert_array_equal(g.kl_full(mp, lp + junk, mq, lq - junk), ref)
    flip = np.where(rng.random(5) < 0.5, -1.0, 1.0)
    np.testing.assert_allclose(g.kl_full(mp, lp * flip, mq, lq * flip[::-1]), ref, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# dtypes and bad input.


def test_dtypes():
    m32, lv32 = jnp.zeros((2, 3), jnp.float32), jnp.ones((2, 3), jnp.float32)
    assert g.kl_standard_normal(m32, lv32).dtype == jnp.float32
    assert g.kl_standard_normal(m32.astype(jnp.bfloat16), lv32.astype(jnp.bfloat16)).dtype == (
        jnp.float32
    )
    assert g.kl_standard_normal(m32.astype(jnp.float16), lv32).dtype == jnp.float32
    assert g.kl_diag(m32, lv32, m32.astype(jnp.float64), lv32).dtype == jnp.float64
    eye = jnp.eye(3, dtype=jnp.bfloat16)
    assert g.kl_full(m32, eye, m32, eye).dtype == jnp.float32
    assert g.kl_lowrank(m32, lv32, None, m32, lv32, None).dtype == jnp.float32
    # Identical bfloat16 parameters give exactly 0 too.
    rng = np.random.default_rng(15)
    fp, lp, _, _ = (jnp.asarray(a, jnp.bfloat16) for a in _full_params(rng, 3))
    assert not np.any(np.asarray(g.kl_full(fp, lp, fp, lp)))
    assert not np.any(np.asarray(g.kl_diag(fp, fp, fp, fp)))
    # bf16 inputs are computed in float32: the value equals the float32 result on the same values.
    lvb = jnp.asarray([[0.3, -1.0, 2.0]], jnp.bfloat16)
    np.testing.assert_array_equal(
        g.kl_standard_normal(lvb, lvb),
        g.kl_standard_normal(lvb.astype(jnp.float32), lvb.astype(jnp.float32)),
    )


def test_non_floating_inputs_raise_type_error():
    i = jnp.zeros((2, 3), jnp.int32)
    f = jnp.zeros((2, 3), jnp.float32)
    with pytest.raises(TypeError, match="`log_var`.*int32"):
        g.kl_standard_normal(f, i)
    with pytest.raises(TypeError, match="`mean_q`"):
        g.kl_diag(f, f, i, f)
    with pytest.raises(TypeError, match="`scale_tril_q`"):
        g.kl_full(f, jnp.eye(3), f, jnp.eye(3, dtype=jnp.int32))
    with pytest.raises(TypeError, match="`cov_factor_p`"):
        g.kl_lowrank(f, f, jnp.zeros((2, 3, 1), jnp.int8), f, f, None)
    with pytest.raises(TypeError, match="`scale`"):
        g.kl_standard_normal_scale(f, np.ones((2, 3), bool))


def test_bad_shapes_raise_value_error_naming_shapes():
    f = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"`mean_p` \(2, 3\).*`log_var_q` \(2, 4\)"):
        g.kl_diag(f, f, f, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"event sizes differ.*`log_var` \(3,\)"):
        g.kl_standard_normal(jnp.zeros((3, 2)), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"square.*`scale_tril_p`.*\(2, 3, 4\)"):
        g.kl_full(f, jnp.zeros((2, 3, 4)), f, jnp.eye(3))
    with pytest.raises(ValueError, match=r"`scale_tril_q` \(4, 4\)"):
        g.kl_full(f, jnp.eye(3), f, jnp.eye(4))
    with pytest.raises(ValueError, match=r"`scale_tril_p` must have shape \[\.\.\., D, D\]"):
        g.kl_full(f, jnp.ones(3), f, jnp.eye(3))
    with pytest.raises(ValueError, match=r"`mean` must have shape \[\.\.\., D\]; got shape \(\)"):
        g.kl_standard_normal(jnp.float32(0), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"do not broadcast.*`mean_q` \(5, 3\)"):
        g.kl_diag(f, f, jnp.zeros((5, 3)), f)
    with pytest.raises(ValueError, match=r"`cov_factor_q` \(2, 4, 1\)"):
        g.kl_lowrank(f, f, None, f, f, jnp.zeros((2, 4, 1)))
