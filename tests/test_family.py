"""Tests for kldiv.family: references, properties, limits, input spaces, edges, transformations.

References are float64 numpy/scipy formulas written independently of the library (naive
compositions, valid away from p ≈ q), and mpmath where float64 itself is not enough. Most tests
use one event shape, ``S``, so that compiled kernels are shared between tests.
"""

from __future__ import annotations

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import jax.test_util
import mpmath
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats
from _grid import grid
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

import kldiv
from kldiv import family as F

INF = math.inf
S = (3, 7)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _dirichlet(rng, shape, alpha=1.0):
    x = rng.gamma(alpha, size=shape)
    return x / x.sum(-1, keepdims=True)


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


def _log_softmax64(x, axis=-1):
    return scipy.special.log_softmax(np.asarray(x, np.float64), axis=axis)


def _pair(seed=0, zeros=False):
    rng = _rng(seed)
    p, q = _dirichlet(rng, S), _dirichlet(rng, S)
    if zeros:
        p[..., :2] = 0  # p = 0 < q, and p = q = 0
        q[..., 1] = 0
        p /= p.sum(-1, keepdims=True)
        q /= q.sum(-1, keepdims=True)
    return p, q


def _rows(p_row, q_row):
    return np.tile(np.asarray(p_row, float), (S[0], 1)), np.tile(
        np.asarray(q_row, float), (S[0], 1)
    )


# ---------------------------------------------------------------------------------------------
# Independent float64 references (probabilities along the last axis, zeros allowed).


def _ref_kl(p, q):
    return scipy.special.rel_entr(p, q).sum(-1)


def _ref_js(p, q, beta=0.5):
    m = beta * p + (1 - beta) * q
    return beta * _ref_kl(p, m) + (1 - beta) * _ref_kl(q, m)


def _ref_tv(p, q):
    return 0.5 * np.abs(p - q).sum(-1)


def _ref_hellinger(p, q):
    return 0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)


def _ref_chi2(p, q):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(q > 0, (p - q) ** 2 / np.where(q > 0, q, 1), np.where(p > 0, np.inf, 0))
    return t.sum(-1)


def _ref_renyi(p, q, alpha):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if alpha == 1:
            return _ref_kl(p, q)
        if alpha == INF:
            return np.log(np.where(p > 0, p / q, 0).max(-1))
        if alpha == 0:
            return -np.log(np.where(p > 0, q, 0).sum(-1))
        t = np.where(p > 0, p**alpha * q ** (1 - alpha), 0)
        return np.log(t.sum(-1)) / (alpha - 1)


def _ref_alpha(p, q, alpha):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        g = np.where(p > 0, p**alpha * q ** (1 - alpha), 0)
        return ((g - alpha * p - (1 - alpha) * q) / (alpha * (alpha - 1))).sum(-1)


def _ref_ce(p, q):
    with np.errstate(divide="ignore"):
        return -scipy.special.xlogy(p, q).sum(-1)


def _family(name, *params, **kw):
    """The probs, log-probs and logits functions of a family, with parameters bound."""
    fns = [
        getattr(F, name),
        getattr(F, name + "_from_log_probs"),
        getattr(F, name + "_from_logits"),
    ]
    return [lambda x, y, fn=fn, **k: fn(x, y, *params, **kw, **k) for fn in fns]


# name -> (probs fn, log-probs fn, logits fn, reference(p, q)).
DIVS = {
    "reverse_kl": (*_family("reverse_kl"), lambda p, q: _ref_kl(q, p)),
    "jeffreys": (*_family("jeffreys"), lambda p, q: _ref_kl(p, q) + _ref_kl(q, p)),
    "js": (*_family("js"), _ref_js),
    "js_0.2": (*_family("js", 0.2), lambda p, q: _ref_js(p, q, 0.2)),
    "tv": (*_family("total_variation"), _ref_tv),
    "hellinger": (*_family("squared_hellinger"), _ref_hellinger),
    "chi2": (*_family("pearson_chi2"), _ref_chi2),
    "renyi_0": (*_family("renyi", 0.0), lambda p, q: _ref_renyi(p, q, 0)),
    "renyi_0.5": (*_family("renyi", 0.5), lambda p, q: _ref_renyi(p, q, 0.5)),
    "renyi_3": (*_family("renyi", 3.0), lambda p, q: _ref_renyi(p, q, 3.0)),
    "renyi_inf": (*_family("renyi", INF), lambda p, q: _ref_renyi(p, q, INF)),
    "alpha_0.5": (*_family("alpha_divergence", 0.5), lambda p, q: _ref_alpha(p, q, 0.5)),
    "alpha_3": (*_family("alpha_divergence", 3.0), lambda p, q: _ref_alpha(p, q, 3.0)),
    "ce": (*_family("cross_entropy"), _ref_ce),
    "f_hellinger": (
        *_family("f_divergence", F.F_GENERATORS["squared_hellinger"]),
        _ref_hellinger,
    ),
}
NAMES = list(DIVS)
SPACES = ("probs", "log_probs", "logits")
BOUNDED = ["js", "js_0.2", "tv", "hellinger", "alpha_0.5", "f_hellinger"]  # finite for any supports
SYMMETRIC = ["jeffreys", "js", "tv", "hellinger"]


def _inputs(space, a, b):
    """The same pair of distributions in ``space``, from logits (−inf allowed)."""
    if space == "logits":
        return a, b
    la, lb = _log_softmax64(a), _log_softmax64(b)
    if space == "log_probs":
        return la, lb
    return np.exp(la), np.exp(lb)


def _from_probs(space, p, q):
    return (p, q) if space == "probs" else (_log(p), _log(q))


def _call(name, space, x, y, **kw):
    return DIVS[name][SPACES.index(space)](x, y, **kw)


# ---------------------------------------------------------------------------------------------
# Float64 references.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("zeros", [False, True])
def test_matches_reference(name, zeros):
    p, q = _pair(1, zeros=zeros)
    ref = DIVS[name][3](p, q)
    for space in SPACES:
        out = np.asarray(_call(name, space, *_from_probs(space, p, q)))
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-14, err_msg=f"{name} {space}")


def test_js_matches_scipy_jensenshannon():
    p, q = _pair(2)
    ref = jensenshannon(p, q, axis=-1) ** 2  # scipy returns the distance sqrt(JSD), base e
    np.testing.assert_allclose(F.js(p, q), ref, rtol=1e-10)
    np.testing.assert_allclose(F.js(p.T, q.T, axis=0), ref, rtol=1e-10)
    np.testing.assert_allclose(F.js_from_logits(np.log(p) + 3.0, np.log(q) - 2.0), ref, rtol=1e-10)


def test_cross_entropy_and_entropy_references():
    p, q = _pair(3, zeros=True)
    ref = scipy.stats.entropy(p, axis=-1)
    np.testing.assert_allclose(F.entropy(p), ref, rtol=1e-12)
    np.testing.assert_allclose(F.entropy_from_log_probs(_log(p)), ref, rtol=1e-12)
    np.testing.assert_allclose(F.entropy_from_logits(_log(p) + 5), ref, rtol=1e-12)
    # H(p, q) = H(p) + KL(p‖q).
    np.testing.assert_allclose(F.cross_entropy(p, q), F.entropy(p) + kldiv.kl(p, q), rtol=1e-12)
    # Against optax's softmax cross-entropy, value and gradient (softmax(b) − p).
    b = _rng(4).normal(size=S)
    np.testing.assert_allclose(
        F.cross_entropy_from_logits(_log(p), b), optax.softmax_cross_entropy(b, p), rtol=1e-12
    )
    g = jax.grad(lambda y: jnp.sum(F.cross_entropy_from_logits(_log(p), y)))(b)
    np.testing.assert_allclose(g, jax.nn.softmax(b) - p, atol=1e-13)


def test_special_orders_of_renyi():
    p, q = _pair(5)
    h2 = F.squared_hellinger(p, q)
    np.testing.assert_allclose(F.renyi(p, q, 0.5), -2 * np.log1p(-h2), rtol=1e-12)
    np.testing.assert_allclose(F.renyi(p, q, 2), np.log1p(F.pearson_chi2(p, q)), rtol=1e-12)
    np.testing.assert_allclose(F.renyi(p, q, INF), np.log((p / q).max(-1)), rtol=1e-12)
    np.testing.assert_array_equal(F.renyi(p, q, 1), kldiv.kl(p, q))
    pz, _ = _pair(5, zeros=True)
    np.testing.assert_allclose(F.renyi(pz, q, 0), -np.log(q[:, 2:].sum(-1)), rtol=1e-12)
    # Amari α-divergence special cases.
    np.testing.assert_allclose(F.alpha_divergence(p, q, 0.5), 4 * h2, rtol=1e-12)
    np.testing.assert_allclose(F.alpha_divergence(p, q, 2), F.pearson_chi2(p, q) / 2, rtol=1e-12)
    np.testing.assert_array_equal(F.alpha_divergence(p, q, 1), kldiv.kl(p, q))
    np.testing.assert_array_equal(F.alpha_divergence(p, q, 0), kldiv.kl(q, p))
    # Rényi from the α-divergence (normalised inputs).
    for a in (0.5, 3.0):
        ref = np.log1p(a * (a - 1) * F.alpha_divergence(p, q, a)) / (a - 1)
        np.testing.assert_allclose(F.renyi(p, q, a), ref, rtol=1e-12)


def test_reverse_kl_and_jeffreys_reuse_kl():
    p, q = _pair(6, zeros=True)
    np.testing.assert_array_equal(F.reverse_kl(p, q), kldiv.kl(q, p))
    np.testing.assert_array_equal(F.jeffreys(p, q), kldiv.kl(p, q) + kldiv.kl(q, p))
    a, b = _rng(6).normal(size=(2, *S))
    np.testing.assert_allclose(
        F.reverse_kl_from_logits(a, b, temperature=2.0),
        kldiv.kl_from_logits(b / 2, a / 2),
        rtol=1e-13,
    )


def test_js_liger_kernel_convention():
    """js(teacher, student, β) equals Liger-Kernel's per-token generalised JSD for 0 < β < 1."""
    y, x = _log_softmax64(_rng(7).normal(size=(2, *S)) * 2)  # Y = log P (teacher), X = log Q

    def liger(x, y, beta):  # transcription of Liger's loss: βP·Y + (1−β)Q·X − M log M
        p, q = np.exp(y), np.exp(x)
        m = beta * p + (1 - beta) * q
        return (beta * p * y + (1 - beta) * q * x - m * np.log(m)).sum(-1)

    for beta in (0.2, 0.5):
        np.testing.assert_allclose(F.js_from_log_probs(y, x, beta), liger(x, y, beta), rtol=1e-10)
    # Liger's end points are forward/reverse KL, the limits of JSD_β/β and JSD_β/(1 − β).
    p, q = np.exp(y), np.exp(x)
    np.testing.assert_allclose(F.js(p, q, 1e-9) / 1e-9, kldiv.kl(p, q), rtol=1e-6)
    np.testing.assert_allclose(F.js(p, q, 1 - 2**-30) * 2**30, kldiv.kl(q, p), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# f-divergences.


def test_f_divergence_generators_equal_dedicated_functions():
    p, q = _pair(8, zeros=True)
    a, b = _log(p) + 1.0, _log(q) - 2.0
    gens = F.F_GENERATORS
    cases = [
        (gens["kl"], kldiv.kl),
        (gens["reverse_kl"], F.reverse_kl),
        (gens["js"], F.js),
        (gens["total_variation"], F.total_variation),
        (gens["squared_hellinger"], F.squared_hellinger),
        (gens["pearson_chi2"], F.pearson_chi2),
        (gens["neyman_chi2"], lambda x, y: F.pearson_chi2(y, x)),
        (F.js_generator(0.2), functools.partial(F.js, beta=0.2)),
        (F.js_generator(1.0), functools.partial(F.js, beta=1.0)),
    ] + [
        (F.alpha_generator(al), functools.partial(F.alpha_divergence, alpha=al))
        for al in (0.0, 0.5, 1.0, 3.0)
    ]
    for gen, fn in cases:
        ref = np.asarray(fn(p, q))
        got = [F.f_divergence(p, q, gen)]
        if gen.name in ("kl", "js(beta=0.5)", "total_variation", "neyman_chi2", "alpha(3.0)"):
            got.append(F.f_divergence_from_logits(a, b, gen))
            got.append(F.f_divergence_from_log_probs(_log(p), _log(q), gen))
        for g in got:
            np.testing.assert_allclose(g, ref, rtol=1e-10, atol=1e-14, err_msg=gen.name)


def test_f_divergence_boundary_convention():
    p, q = _rows([0.5, 0.5, 0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0, 0, 0])
    # Σ over q > 0 of q f(p/q), plus p·f'(∞) where q = 0 < p; f'(∞) from the argument.
    f = lambda t: (t - 1) ** 2 / (t + 1)  # convex, f(1) = 0, f(t)/t → 1
    ref = 0.5 * f(1.0) + 0.5 * f(0.0) + 0.5 * 1.0
    np.testing.assert_allclose(F.f_divergence(p, q, f, f_inf_slope=1.0), ref, rtol=1e-14)
    assert np.all(np.asarray(F.f_divergence(p, q, f)) == np.inf)  # plain callables: f'(∞) = ∞
    tv = F.F_GENERATORS["total_variation"]
    np.testing.assert_allclose(F.f_divergence(p, q, tv), 0.5, rtol=1e-14)
    np.testing.assert_allclose(F.f_divergence(p, q, tv, f_inf_slope=2.0), 1.0 + 0.25)
    with pytest.raises(TypeError, match="`f`"):
        F.f_divergence(p, q, "kl")


# ---------------------------------------------------------------------------------------------
# Properties.


def _valid(x):
    """Logit rows with at least one finite entry (a distribution, zeros allowed)."""
    x = np.array(x)
    x[~np.isfinite(x).any(-1), 0] = 0.0
    return x


_logit = st.one_of(st.floats(-15, 15, allow_nan=False, width=64), st.just(-np.inf))
_logits = hnp.arrays(np.float64, S, elements=_logit).map(_valid)
_finite_logits = hnp.arrays(np.float64, S, elements=st.floats(-15, 15, width=64))


_NEAR_ZERO = np.full(S, -1.10613519e-16)
_NEAR_ZERO[0, 3] = 0.0


@settings(max_examples=25, deadline=None)
@given(_logits, _logits)
# p uniform, q uniform up to rounding: Rényi-∞'s max log(p/q) rounded to −1.6e-17 before its clamp
@example(np.zeros(S), _NEAR_ZERO)
def test_nonnegative_bounded_symmetric(a, b):
    # Eager calls reuse the kernels compiled for shape S by the other tests.
    out = {n: np.asarray(_call(n, "logits", a, b)) for n in NAMES}
    swapped = {n: np.asarray(_call(n, "logits", b, a)) for n in NAMES}
    for name, v in out.items():
        assert not np.any(np.isnan(v)), name
        assert np.all(v >= 0), name
    for name in BOUNDED:
        assert np.all(np.isfinite(out[name])), name
    assert np.all(out["js"] <= np.log(2) * (1 + 1e-12))
    h = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))
    assert np.all(out["js_0.2"] <= h * (1 + 1e-12))
    assert np.all(out["tv"] <= 1 + 1e-12) and np.all(out["hellinger"] <= 1 + 1e-12)
    for name in SYMMETRIC:
        np.testing.assert_allclose(out[name], swapped[name], rtol=1e-10, atol=1e-15)
    # JSD_β(p‖q) = JSD_{1−β}(q‖p).
    np.testing.assert_allclose(F.js_from_logits(b, a, 0.8), out["js_0.2"], rtol=1e-10, atol=1e-15)


_ORDERS = (0.0, 0.1, 0.5, 0.9, 0.999, 1.0, 1.001, 1.5, 2.0, 5.0, 20.0, INF)
_RENYI_ALL = jax.jit(lambda a, b: jnp.stack([F.renyi_from_logits(a, b, o) for o in _ORDERS]))


@settings(max_examples=25, deadline=None)
@given(_logits, _logits)
def test_renyi_nondecreasing_in_alpha(a, b):
    vals = np.asarray(_RENYI_ALL(a, b))
    assert not np.any(np.isnan(vals))
    with np.errstate(invalid="ignore"):
        diffs = np.diff(vals, axis=0)
    scale = np.where(np.isfinite(vals[1:]), np.abs(vals[1:]), 0)
    assert np.all((diffs >= -1e-9 * scale - 1e-13) | np.isinf(vals[1:])), vals


@settings(max_examples=25, deadline=None)
@given(_finite_logits, _finite_logits, st.floats(-30, 30))
def test_three_input_spaces_agree(a, b, shift):
    lp, lq = _log_softmax64(a), _log_softmax64(b)
    for name in NAMES:
        from_logits = np.asarray(_call(name, "logits", a + shift, b))
        from_log_probs = _call(name, "log_probs", lp, lq)
        from_probs = _call(name, "probs", np.exp(lp), np.exp(lq))
        np.testing.assert_allclose(from_log_probs, from_logits, rtol=1e-9, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(from_probs, from_logits, rtol=1e-8, atol=1e-13, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Limits: β → 0/1 and α → 1.


def test_js_beta_limits():
    p, q = _pair(9)
    # JSD_β/β = KL(p‖q) − β·χ²(p‖q)/2 + O(β²), and symmetrically as β → 1.
    chi_pq, chi_qp = np.asarray(F.pearson_chi2(p, q)), np.asarray(F.pearson_chi2(q, p))
    for beta in (2.0**-40, 2.0**-20):  # 1 − β is exact
        got = np.asarray(F.js(p, q, beta)) / beta
        np.testing.assert_allclose(got, kldiv.kl(p, q) - beta * chi_pq / 2, rtol=1e-6)
        got = np.asarray(F.js(p, q, 1 - beta)) / beta
        np.testing.assert_allclose(got, kldiv.kl(q, p) - beta * chi_qp / 2, rtol=1e-6)
    for space in SPACES:
        x, y = _from_probs(space, p, q)
        assert np.all(np.asarray(_call("js", space, x, y, beta=0.0)) == 0)
        assert np.all(np.asarray(_call("js", space, x, y, beta=1.0)) == 0)
    # Disjoint supports: KL is infinite, JSD_β = h(β) finite, → 0 at the ends, exactly 0 there.
    pd, qd = _rows([0.5, 0.5, 0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0, 0])
    for beta in (0.0, 2.0**-40, 0.5, 1 - 2.0**-20, 1.0):
        h = 0.0 if beta in (0, 1) else -(beta * np.log(beta) + (1 - beta) * np.log1p(-beta))
        np.testing.assert_allclose(F.js(pd, qd, beta), h, rtol=1e-12, atol=1e-300)
    g = jax.grad(lambda x: jnp.sum(F.js_from_logits(x, _log(qd), 2.0**-40)))(_log(pd))
    assert np.all(np.isfinite(g))


def _near_pair_f32(n=4, v=200, eps=1.4e-4, seed=12):
    rng = _rng(seed)
    a = (2.0 * rng.standard_normal((n, v))).astype(np.float32)
    b = (a + eps * rng.standard_normal((n, v))).astype(np.float32)
    return a, b


def test_renyi_continuous_at_one():
    p, q = _pair(10)
    kl = np.asarray(kldiv.kl(p, q))
    d = np.log(p / q)
    var = (p * d * d).sum(-1) - kl**2
    for s in (1e-3, -1e-6):
        for space in SPACES:
            got = np.asarray(
                _family("renyi", 1 + s)[SPACES.index(space)](*_from_probs(space, p, q))
            )
            err = np.abs(got - (kl + s * var / 2))
            assert np.all(err <= 3 * s * s * (1 + var)), (s, space, err)
    # In float32 near p = q: relative accuracy, also at α = 1 ± 1e-3 and 1 ± 1e-6.
    a, b = _near_pair_f32()
    lp, lq = _log_softmax64(a), _log_softmax64(b)
    for alpha in (1 - 1e-3, 1 + 1e-6):
        s = alpha - 1
        ref = np.log1p((np.exp(lp) * np.expm1(s * (lp - lq))).sum(-1)) / s
        got = np.asarray(F.renyi_from_logits(jnp.asarray(a), jnp.asarray(b), alpha))
        assert got.dtype == np.float32
        assert np.median(np.abs(got - ref) / ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# float32 accuracy when p ≈ q.


def _mp_reference(name, lp_row, lq_row):
    """High-precision value of a divergence for one row of float64 log-probabilities."""
    mpmath.mp.dps = 40
    lp = [mpmath.mpf(float(x)) for x in lp_row]
    lq = [mpmath.mpf(float(x)) for x in lq_row]
    p = [mpmath.exp(x) for x in lp]
    q = [mpmath.exp(x) for x in lq]
    pairs = list(zip(p, q, strict=True))
    if name == "js":
        return (
            sum(x * mpmath.log(2 * x / (x + y)) + y * mpmath.log(2 * y / (x + y)) for x, y in pairs)
            / 2
        )
    if name == "hellinger":
        return sum((mpmath.sqrt(x) - mpmath.sqrt(y)) ** 2 for x, y in pairs) / 2
    if name == "chi2":
        return sum((x - y) ** 2 / y for x, y in pairs)
    if name == "tv":
        return sum(abs(x - y) for x, y in pairs) / 2
    if name.startswith("renyi_"):
        al = mpmath.mpf(name.split("_")[1])
        s = sum(mpmath.exp(al * x + (1 - al) * y) for x, y in zip(lp, lq, strict=True))
        return mpmath.log(s) / (al - 1)
    raise AssertionError(name)


def _mp_rows(name, lp, lq):
    return np.array([float(_mp_reference(name, x, y)) for x, y in zip(lp, lq, strict=True)])


@pytest.mark.parametrize("name", ["js", "hellinger", "chi2", "tv", "renyi_0.5", "renyi_3"])
def test_float32_accuracy_near_equal(name):
    a, b = _near_pair_f32()
    ref = _mp_rows(name, _log_softmax64(a), _log_softmax64(b))
    got = np.asarray(_call(name, "logits", jnp.asarray(a), jnp.asarray(b)))
    assert got.dtype == np.float32 and np.all(got >= 0)
    # TV is first order in p − q, so the float32 rounding of the softmax normalisers (relative
    # eps each) enters at first order: eps/|p/q − 1| ≈ 4e-4 is its conditioning here.
    tol = 1e-3 if name == "tv" else 1e-5
    assert np.median(np.abs(got - ref) / ref) < tol, np.abs(got - ref) / ref
    # float32 log-probabilities are normalised only to ~1e-7, more than the divergence (~1e-8)
    # itself, so no value is "right" there; they stay non-negative and finite.
    lp, lq = jax.nn.log_softmax(jnp.asarray(a)), jax.nn.log_softmax(jnp.asarray(b))
    got = np.asarray(_call(name, "log_probs", lp, lq))
    assert np.all(got >= 0) and np.all(np.isfinite(got))


def test_textbook_js_fails_the_same_target():
    """Shows the accuracy test can fail: the float32 textbook JSD misses it by far."""
    a, b = _near_pair_f32()
    ref = _mp_rows("js", _log_softmax64(a), _log_softmax64(b))
    lp, lq = jax.nn.log_softmax(jnp.asarray(a)), jax.nn.log_softmax(jnp.asarray(b))
    lm = jnp.logaddexp(lp, lq) - jnp.log(2.0).astype(jnp.float32)
    textbook = 0.5 * jnp.sum(jnp.exp(lp) * (lp - lm) + jnp.exp(lq) * (lq - lm), axis=-1)
    assert np.median(np.abs(np.asarray(textbook) - ref) / ref) > 0.1


# ---------------------------------------------------------------------------------------------
# Gradients.


def _naive(name, lp, lq):
    """Textbook jnp formulas in log-probabilities (interior points)."""
    p, q = jnp.exp(lp), jnp.exp(lq)
    if name == "reverse_kl":
        return jnp.sum(q * (lq - lp), -1)
    if name == "jeffreys":
        return jnp.sum((p - q) * (lp - lq), -1)
    if name.startswith("js"):
        beta = 0.2 if name == "js_0.2" else 0.5
        lm = jnp.log(beta * p + (1 - beta) * q)
        return jnp.sum(beta * p * (lp - lm) + (1 - beta) * q * (lq - lm), -1)
    if name == "tv":
        return 0.5 * jnp.sum(jnp.abs(p - q), -1)
    if name in ("hellinger", "f_hellinger"):
        return 0.5 * jnp.sum((jnp.exp(lp / 2) - jnp.exp(lq / 2)) ** 2, -1)
    if name == "chi2":
        return jnp.sum((p - q) ** 2 / q, -1)
    if name.startswith("renyi_"):
        al = float(name.split("_")[1])
        if al == INF:
            return jnp.max(lp - lq, -1)
        if al == 0:
            return -jax.nn.logsumexp(jnp.where(lp > -jnp.inf, lq, -jnp.inf), -1)
        return jax.nn.logsumexp(al * lp + (1 - al) * lq, -1) / (al - 1)
    if name.startswith("alpha_"):
        al = float(name.split("_")[1])
        g = jnp.exp(al * lp + (1 - al) * lq)
        return jnp.sum(g - al * p - (1 - al) * q, -1) / (al * (al - 1))
    if name == "ce":
        return -jnp.sum(p * lq, -1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", NAMES)
def test_logits_gradients_match_textbook_autodiff(name):
    rng = _rng(11)
    a, b = rng.normal(size=(2, *S)) * 1.5
    if name == "renyi_0":
        a[:, :2] = -np.inf  # otherwise D_0 = 0 everywhere
    w = np.arange(1.0, 4.0)

    def ours(x, y):
        return jnp.sum(w * _call(name, "logits", x, y, temperature=1.7))

    def naive(x, y):
        return jnp.sum(w * _naive(name, jax.nn.log_softmax(x / 1.7), jax.nn.log_softmax(y / 1.7)))

    got = jax.grad(ours, (0, 1))(a, b)
    want = jax.grad(naive, (0, 1))(a, b)
    np.testing.assert_allclose(got[0], np.where(np.isfinite(a), want[0], 0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9, atol=1e-12)


# Values that are exact functions of unnormalised inputs, so finite differences apply.
_FD_NAMES = ["js", "tv", "hellinger", "chi2", "alpha_0.5", "alpha_3", "ce", "f_hellinger"]


@pytest.mark.parametrize("name", _FD_NAMES)
def test_gradients_match_finite_differences(name):
    rng = _rng(13)
    p, q = 0.1 + 0.5 * _dirichlet(rng, S), 0.1 + 0.5 * _dirichlet(rng, S)
    assert np.min(np.abs(p - q)) > 1e-3  # away from the kink of |p − q|
    spaces = ("probs", "log_probs") if name in ("js", "alpha_3", "chi2") else ("probs",)
    for space in spaces:  # forward mode is checked against reverse mode elsewhere
        jax.test_util.check_grads(
            lambda x, y, s=space: _call(name, s, x, y), _from_probs(space, p, q), 1, ["rev"]
        )


def test_renyi_probability_gradients_are_centred_partials():
    """The probability-space Rényi gradient is the textbook partial minus a constant."""
    p, q = _pair(14)
    for alpha in (0.5, 3.0, INF):
        gp, gq = jax.grad(lambda x, y, al=alpha: jnp.sum(F.renyi(x, y, al)), (0, 1))(p, q)
        tp, tq = jax.grad(
            lambda x, y, al=alpha: jnp.sum(_naive(f"renyi_{al}", jnp.log(x), jnp.log(y))), (0, 1)
        )(p, q)
        for g, t, r in ((gp, tp, p), (gq, tq, q)):
            # They agree on the simplex tangent space (Σ dp = 0) ...
            np.testing.assert_allclose(
                g - g.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True), atol=1e-10
            )
            assert np.allclose((g * r).sum(-1), 0, atol=1e-12)  # ... and the gradient is centred


@pytest.mark.parametrize("name", NAMES)
def test_finite_gradients_at_zero_entries(name):
    """p = q = 0, p = 0 < q and masked NaN entries: values as references, gradients finite."""
    nan = np.nan
    p = np.array(
        [
            [0.0, 0.0, 0.3, 0.4, 0.3, 0.0, nan],
            [0.2, 0.3, 0.0, 0.5, 0.0, 0.0, nan],
            [0.1, 0.2, 0.3, 0.4, 0.0, 0.0, nan],
        ]
    )
    q = np.array(
        [
            [0.0, 0.4, 0.3, 0.1, 0.2, 0.0, nan],
            [0.25, 0.25, 0.0, 0.5, 0.0, 0.0, nan],
            [0.4, 0.3, 0.2, 0.1, 0.0, 0.0, nan],
        ]
    )
    where = np.arange(7) < 6
    ref = DIVS[name][3](np.nan_to_num(p), np.nan_to_num(q))
    for space in SPACES:
        x, y = _from_probs(space, p, q)
        val = np.asarray(_call(name, space, x, y, where=where))
        np.testing.assert_allclose(val, ref, rtol=1e-10, atol=1e-14, err_msg=f"{name} {space}")
        loss = lambda x, y, s=space: jnp.sum(_call(name, s, x, y, where=where))
        finite = np.isfinite(val)  # reverse KL and Jeffreys are infinite on the first row
        assert np.sum(finite) >= 2, name
        for g in jax.grad(loss, (0, 1))(x, y):
            assert np.all(np.isfinite(g[finite])), (name, space, g)
            assert np.all(g[:, -1] == 0)


# ---------------------------------------------------------------------------------------------
# Edges.


def test_support_mismatch_gives_inf_not_nan():
    p, q = _rows([0.5, 0.5, 0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0, 0, 0])
    expect_inf = ["jeffreys", "reverse_kl", "chi2", "renyi_3", "renyi_inf", "alpha_3", "ce"]
    for name in NAMES:
        for space in SPACES:
            v = np.asarray(_call(name, space, *_from_probs(space, p, q)))
            assert not np.any(np.isnan(v)), (name, space)
            assert np.all((v == np.inf) == (name in expect_inf)), (name, space, v)
            np.testing.assert_allclose(v, DIVS[name][3](p, q), rtol=1e-12)


def test_disjoint_supports():
    p, q = _rows([0.5, 0.5, 0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(F.js(p, q), np.log(2), rtol=1e-14)
    np.testing.assert_allclose(F.total_variation(p, q), 1.0)
    np.testing.assert_allclose(F.squared_hellinger(p, q), 1.0)
    assert np.all(np.asarray(F.renyi(p, q, 0.5)) == np.inf)
    assert np.all(np.asarray(F.renyi(p, q, 0)) == np.inf)
    np.testing.assert_allclose(F.alpha_divergence(p, q, 0.5), 4.0)


def test_masked_vocabulary():
    """−inf logits and ``where`` (with NaN/inf behind the mask) drop entries from everything."""
    a, b = _rng(15).normal(size=(2, *S))
    keep = np.arange(7) < 5
    a_nan, b_nan = np.where(keep, a, np.nan), np.where(keep, b, np.inf)
    a_inf, b_inf = np.where(keep, a, -np.inf), np.where(keep, b, -np.inf)
    p, q = np.exp(_log_softmax64(a_inf)), np.exp(_log_softmax64(b_inf))
    for name in NAMES:
        ref = DIVS[name][3](p, q)
        np.testing.assert_allclose(_call(name, "logits", a_inf, b_inf), ref, rtol=1e-10)
        np.testing.assert_allclose(
            _call(name, "logits", a_nan, b_nan, where=keep), ref, rtol=1e-10, err_msg=name
        )


def test_empty_row_gives_zero():
    nothing = np.zeros(S, bool)
    for name in NAMES:
        for space in SPACES:
            x, y = _inputs(space, np.zeros(S), np.zeros(S))
            assert np.all(np.asarray(_call(name, space, x, y, where=nothing)) == 0), (name, space)
        empty = np.full(S, -np.inf)
        assert np.all(np.asarray(_call(name, "logits", empty, empty)) == 0), name
    assert np.all(np.asarray(F.entropy_from_logits(np.full(S, -np.inf))) == 0)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_huge_logits_finite(scale):
    a, b = (_rng(16).normal(size=(2, *S)) * scale).astype(np.float32)
    b[0] = a[0]
    b[1, 1:] = a[1, 1:]
    for name in BOUNDED + ["ce", "renyi_0.5"]:
        val, grads = jax.value_and_grad(
            lambda x, y, n=name: jnp.sum(_call(n, "logits", x, y)), (0, 1)
        )(a, b)
        assert np.isfinite(val) and val >= 0, name
        assert all(np.all(np.isfinite(g)) for g in grads), name
    np.testing.assert_allclose(F.entropy_from_logits(a), [0.0] * 3, atol=1e-6)  # one-hot rows
    np.testing.assert_allclose(F.js_from_logits(a, b)[0], 0.0, atol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
    a, b = (_rng(17).normal(size=(2, *S)) * 2).astype(np.float32)
    for space in SPACES:
        x, y = _inputs(space, a, b)
        x16, y16 = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
        x32, y32 = x16.astype(jnp.float32), y16.astype(jnp.float32)
        for name in NAMES if space == "probs" else ["js", "renyi_0.5", "ce"]:
            out = _call(name, space, x16, y16)
            assert out.dtype == jnp.float32, (name, space)
            np.testing.assert_allclose(out, _call(name, space, x32, y32), rtol=1e-6)
    assert F.entropy_from_logits(jnp.asarray(a, dtype)).dtype == jnp.float32


def test_float64_stays_float64_and_float32_stays_float32():
    p, q = _pair(18)
    for name in NAMES:
        assert _call(name, "probs", p, q).dtype == jnp.float64
        out = _call(name, "probs", p.astype(np.float32), q.astype(np.float32))
        assert out.dtype == jnp.float32, name
        np.testing.assert_allclose(out, _call(name, "probs", p, q), rtol=1e-5)


def test_broadcast_and_axis():
    p, _ = _pair(19)
    prior = _dirichlet(_rng(19), (7,))
    tiled = np.broadcast_to(prior, S)
    for name in NAMES:
        ref = np.asarray(_call(name, "probs", p, tiled))
        np.testing.assert_allclose(_call(name, "probs", p, prior), ref, rtol=1e-14)
        np.testing.assert_allclose(_call(name, "probs", p.T, tiled.T, axis=0), ref, rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# jit / vmap / grad.

_TRANSFORM_NAMES = {
    "logits": ["jeffreys", "js", "chi2", "renyi_0", "renyi_0.5", "renyi_inf", "f_hellinger"],
    "log_probs": ["js", "renyi_0", "f_hellinger"],
    "probs": ["js", "renyi_inf", "f_hellinger"],
}


@pytest.mark.parametrize("space", SPACES)
def test_jit_vmap_grad_agree_with_eager(space):
    x, y = _inputs(space, *_rng(20).normal(size=(2, *S)))
    w = jnp.arange(1.0, 4.0)

    def f(x, y):  # several kinds of core at once: one compilation per transformation
        return jnp.stack([_call(n, space, x, y) for n in _TRANSFORM_NAMES[space]])

    eager = np.asarray(f(x, y))
    np.testing.assert_allclose(jax.jit(f)(x, y), eager, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(jax.vmap(f, out_axes=1)(x, y), eager, rtol=1e-13, atol=1e-15)
    if space != "logits":  # gradients in these spaces: the finite-difference tests
        return
    np.testing.assert_allclose(
        jax.vmap(f, in_axes=(0, None), out_axes=1)(x, y[0]), f(x, y[0]), rtol=1e-13, atol=1e-15
    )
    loss = lambda x, y: jnp.sum(f(x, y) * w)
    g_eager = jax.grad(loss, (0, 1))(x, y)
    g_jit = jax.jit(jax.grad(loss, (0, 1)))(x, y)
    for u, v in zip(g_eager, g_jit, strict=True):
        assert np.all(np.isfinite(u))
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)
    # Forward mode agrees with reverse mode.
    tx, ty = _rng(21).normal(size=(2, *S))
    _, jvp = jax.jit(lambda *a: jax.jvp(loss, a[:2], a[2:]))(x, y, tx, ty)
    np.testing.assert_allclose(jvp, np.sum(g_eager[0] * tx) + np.sum(g_eager[1] * ty), rtol=1e-10)


def test_entropy_gradient_and_temperature():
    a = _rng(21).normal(size=S)
    g = jax.grad(lambda x: jnp.sum(F.entropy_from_logits(x, temperature=2.0)))(a)
    want = jax.grad(lambda x: jnp.sum(_naive("ce", *(2 * [jax.nn.log_softmax(x / 2)]))))(a)
    np.testing.assert_allclose(g, want, atol=1e-12)
    jax.jit(lambda t: F.js_from_logits(a, a[::-1], temperature=t))(2.0)  # traced temperature


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_messages():
    p, q = _pair(22)
    with pytest.raises(TypeError, match="`q`.*int"):
        F.js(p, np.ones(S, np.int32))
    with pytest.raises(TypeError, match="`logits`"):
        F.entropy_from_logits(np.ones(S, np.int32))
    with pytest.raises(TypeError, match="`log_q`"):
        F.reverse_kl_from_log_probs(np.log(p), np.ones(S, np.int32))
    with pytest.raises(ValueError, match=r"`p` \(3, 7\).*`q` \(2, 7\)"):
        F.total_variation(p, q[:2])
    with pytest.raises(ValueError, match="beta"):
        F.js(p, q, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        F.renyi(p, q, -0.5)
    with pytest.raises(ValueError, match="alpha"):
        F.alpha_divergence(p, q, INF)
    with pytest.raises(TypeError, match="alpha.*Python number"):
        jax.jit(lambda a: F.renyi(p, q, a))(2.0)
    with pytest.raises(TypeError, match="where"):
        F.pearson_chi2(p, q, where=np.ones(S))
    with pytest.raises(ValueError, match="axis"):
        F.squared_hellinger(p, q, axis=2)
    with pytest.raises(ValueError, match="temperature"):
        F.js_from_logits(p, q, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Soft-capped and scaled logits: the same as materialising c·tanh(s·x/c) first.


def _capped(x, softcap, logit_scale):
    s = 1.0 if logit_scale is None else logit_scale
    y = s * x if softcap is None else softcap * jnp.tanh(s * x / softcap)
    return jnp.where(x == -jnp.inf, -jnp.inf, y)


@pytest.mark.parametrize(
    *grid(  # every divergence and every transform; the full grid under -m slow
        {
            "name": NAMES,
            "softcap,logit_scale": [(3.0, None), (None, 0.5), ((4.0, None), (None, 2.0))],
        }
    )
)
def test_logits_softcap_matches_materialised(name, softcap, logit_scale):
    """Values and gradients equal capping the logits first (float64), with a mask, −inf logits
    and a temperature; pair form (teacher, student) included."""
    rng = _rng(21)
    a, b = rng.normal(size=(2, *S)) * 6
    a[0, 1] = b[0, 1] = -np.inf
    where = np.ones(S, bool)
    where[1, 2] = False
    a[1, 2] = np.nan
    caps = softcap if isinstance(softcap, tuple) else (softcap, softcap)
    scales = logit_scale if isinstance(logit_scale, tuple) else (logit_scale, logit_scale)
    w = np.arange(1.0, 4.0)

    def ours(x, y):
        v = _call(
            name,
            "logits",
            x,
            y,
            where=where,
            temperature=1.3,
            softcap=softcap,
            logit_scale=logit_scale,
        )
        return jnp.sum(w * v), v

    def materialised(x, y):
        xc = _capped(jnp.where(where, x, 0.0), caps[0], scales[0])
        yc = _capped(y, caps[1], scales[1])
        v = _call(name, "logits", xc, yc, where=where, temperature=1.3)
        return jnp.sum(w * v), v

    (_, v), g = jax.value_and_grad(ours, (0, 1), has_aux=True)(a, b)
    (_, rv), rg = jax.value_and_grad(materialised, (0, 1), has_aux=True)(a, b)
    np.testing.assert_allclose(v, rv, rtol=1e-10, atol=1e-13)
    for gi, ri in zip(g, rg, strict=True):
        assert np.all(np.isfinite(gi))
        np.testing.assert_allclose(gi, np.where(where, ri, 0), rtol=1e-8, atol=1e-12)


def test_entropy_from_logits_softcap():
    x = np.array([[40.0, 1.0, -np.inf, -30.0]])
    got = F.entropy_from_logits(x, softcap=10.0, logit_scale=0.5)
    want = F.entropy_from_logits(_capped(jnp.asarray(x), 10.0, 0.5))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    with pytest.raises(TypeError, match="`softcap` of entropy_from_logits"):
        F.entropy_from_logits(x, softcap=(1.0, 2.0))
    with pytest.raises(ValueError, match="kldiv: `softcap` must be finite"):
        F.js_from_logits(x, x, softcap=-1.0)
