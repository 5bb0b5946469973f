"""Tests for kldiv.discrete: references, properties, edges, transformations, accuracy.

Every logits test runs against every implementation in ``kldiv.discrete.LOGIT_IMPLS``; those of
``"auto"`` (at these sizes on the CPU it picks the XLA path) only under ``-m slow``, as the
property suite (tests/test_properties.py) runs ``"auto"`` in ``make test``.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
import scipy.special
from _grid import grid
from _jax_compat import enable_x64, unregister_event_duration_listener
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import kldiv
from kldiv.discrete import LOGIT_IMPLS

IMPLS = [i for i in LOGIT_IMPLS if i != "auto"] + ["auto"]
IMPL_PARAMS = [pytest.param(i, marks=(pytest.mark.slow,) if i == "auto" else ()) for i in IMPLS]


@pytest.fixture(params=IMPL_PARAMS)
def impl(request):
    return request.param


def _rng(seed=0):
    return np.random.default_rng(seed)


def _dirichlet(rng, shape, alpha=1.0):
    x = rng.gamma(alpha, size=shape)
    return x / x.sum(-1, keepdims=True)


def _ref_kl(p, q, axis=-1):
    return scipy.special.rel_entr(np.asarray(p, np.float64), np.asarray(q, np.float64)).sum(axis)


def _log_softmax64(x, axis=-1):
    return scipy.special.log_softmax(np.asarray(x, np.float64), axis=axis)


# ---------------------------------------------------------------------------------------------
# Float64 references.


@pytest.mark.parametrize("shape,axis", [((7,), -1), ((4, 5), -1), ((3, 6, 2), 1), ((5, 3), 0)])
def test_kl_matches_scipy(shape, axis):
    rng = _rng(1)
    p = np.moveaxis(_dirichlet(rng, np.moveaxis(np.empty(shape), axis, -1).shape), -1, axis)
    q = np.moveaxis(_dirichlet(rng, np.moveaxis(np.empty(shape), axis, -1).shape), -1, axis)
    np.testing.assert_allclose(kldiv.kl(p, q, axis=axis), _ref_kl(p, q, axis), rtol=1e-12)
    np.testing.assert_allclose(
        kldiv.kl_from_log_probs(np.log(p), np.log(q), axis=axis), _ref_kl(p, q, axis), rtol=1e-12
    )


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_kl_from_logits_matches_scipy(impl, axis):
    rng = _rng(2)
    a, b = rng.normal(size=(2, 6, 5, 9)) * 3
    ref = _ref_kl(np.exp(_log_softmax64(a, axis)), np.exp(_log_softmax64(b, axis)), axis=axis)
    np.testing.assert_allclose(kldiv.kl_from_logits(a, b, axis=axis, impl=impl), ref, rtol=1e-11)


def test_float32_values_match_reference(impl):
    rng = _rng(3)
    a = rng.normal(size=(16, 300)).astype(np.float32) * 2
    b = rng.normal(size=(16, 300)).astype(np.float32) * 2
    ref = _ref_kl(np.exp(_log_softmax64(a)), np.exp(_log_softmax64(b)))
    out = kldiv.kl_from_logits(jnp.asarray(a), jnp.asarray(b), impl=impl)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# Properties.

_floats = st.floats(-20, 20, allow_nan=False, width=64)


@st.composite
def _logit_pairs(draw):
    n = draw(st.integers(1, 3))
    v = draw(st.integers(1, 12))
    a = draw(hnp.arrays(np.float64, (n, v), elements=_floats))
    b = draw(hnp.arrays(np.float64, (n, v), elements=_floats))
    return a, b


@settings(max_examples=25, deadline=None)
@given(_logit_pairs())
def test_nonnegative_and_zero_iff_equal(pair):
    a, b = pair
    out = np.asarray(kldiv.kl_from_logits(a, b, impl="xla"))
    assert np.all(out >= 0)
    assert np.all(np.asarray(kldiv.kl_from_logits(a, a, impl="xla")) == 0)
    pa, pb = np.exp(_log_softmax64(a)), np.exp(_log_softmax64(b))
    differ = np.abs(pa - pb).max(-1) > 1e-6
    assert np.all(out[differ] > 0)


@settings(max_examples=25, deadline=None)
@given(_logit_pairs(), st.floats(-50, 50), st.floats(-50, 50))
def test_logits_invariant_to_row_constant(pair, ca, cb):
    a, b = pair
    np.testing.assert_allclose(
        kldiv.kl_from_logits(a + ca, b + cb, impl="xla"),
        kldiv.kl_from_logits(a, b, impl="xla"),
        rtol=1e-9,
        atol=1e-12,
    )


@settings(max_examples=25, deadline=None)
@given(_logit_pairs())
def test_three_input_spaces_agree(pair):
    a, b = pair
    lp, lq = _log_softmax64(a), _log_softmax64(b)
    from_logits = kldiv.kl_from_logits(a, b, impl="xla")
    np.testing.assert_allclose(kldiv.kl_from_log_probs(lp, lq), from_logits, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kldiv.kl(np.exp(lp), np.exp(lq)), from_logits, rtol=1e-9, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(_logit_pairs())
def test_logits_gradient_is_softmax_difference(pair):
    a, b = pair
    ga, gb = jax.grad(lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y)), argnums=(0, 1))(a, b)
    pa, pb = np.exp(_log_softmax64(a)), np.exp(_log_softmax64(b))
    np.testing.assert_allclose(gb, pb - pa, atol=1e-12)
    # d/da: p·(log p − log q − KL), from the definition.
    lr = _log_softmax64(a) - _log_softmax64(b)
    ref_ga = pa * (lr - (pa * lr).sum(-1, keepdims=True))
    np.testing.assert_allclose(ga, ref_ga, atol=1e-10)


def test_gradients_match_impls(impl):
    rng = _rng(4)
    a, b = rng.normal(size=(2, 5, 40)) * 2
    f = lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl=impl) * jnp.arange(1.0, 6.0))
    g = lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl="xla") * jnp.arange(1.0, 6.0))
    for got, want in zip(jax.grad(f, (0, 1))(a, b), jax.grad(g, (0, 1))(a, b), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_grad_matches_finite_differences():
    rng = _rng(5)
    p, q = _dirichlet(rng, (2, 3, 6), alpha=20.0)  # entries far from 0 for finite differences
    jax.test_util.check_grads(lambda x, y: kldiv.kl(x, y), (p, q), order=1, modes=["fwd", "rev"])
    lp, lq = np.log(p), np.log(q)
    jax.test_util.check_grads(kldiv.kl_from_log_probs, (lp, lq), order=1, modes=["fwd", "rev"])
    a, b = rng.normal(size=(2, 3, 6))
    jax.test_util.check_grads(
        lambda x, y: kldiv.kl_from_logits(x, y, impl="xla"), (a, b), order=2, modes=["fwd", "rev"]
    )


# ---------------------------------------------------------------------------------------------
# Support edges.


def test_zero_probabilities():
    p = jnp.array([0.0, 0.5, 0.5, 0.0])
    q = jnp.array([0.0, 0.5, 0.25, 0.25])
    assert np.isclose(kldiv.kl(p, q), 0.5 * np.log(2))
    assert kldiv.kl(p, p) == 0
    # optax's composition returns NaN here; kldiv the true value.
    assert np.isnan(optax.losses.kl_divergence(jnp.log(q), p))
    gp, gq = jax.grad(lambda x, y: kldiv.kl(x, y), (0, 1))(p, q)
    assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gq))
    np.testing.assert_allclose(gq, 1 - np.array([0.0, 1.0, 2.0, 0.0]))


def test_support_mismatch_gives_inf_not_nan():
    p = jnp.array([0.5, 0.5])
    q = jnp.array([1.0, 0.0])
    assert kldiv.kl(p, q) == np.inf
    assert kldiv.kl_from_log_probs(jnp.log(p), jnp.log(q)) == np.inf
    assert kldiv.kl_from_logits(jnp.array([0.0, 0.0]), jnp.array([0.0, -jnp.inf])) == np.inf
    # the other direction is finite: q's zero is where p has mass... reversed.
    assert np.isclose(kldiv.kl(q, p), np.log(2))


def test_log_probs_neg_inf_edges():
    lp = jnp.array([-jnp.inf, np.log(0.5), np.log(0.5)])
    lq = jnp.array([-jnp.inf, np.log(0.25), np.log(0.75)])
    ref = 0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75)
    assert np.isclose(kldiv.kl_from_log_probs(lp, lq), ref)
    g = jax.grad(lambda x, y: kldiv.kl_from_log_probs(x, y), (0, 1))(lp, lq)
    assert all(np.all(np.isfinite(x)) for x in g)
    np.testing.assert_allclose(g[1], np.array([0, 0.25, 0.75]) - np.array([0, 0.5, 0.5]))


def test_masked_vocabulary_neg_inf_logits(impl):
    a = jnp.array([[-jnp.inf, 1.0, 2.0, -jnp.inf], [0.5, -jnp.inf, 0.0, 3.0]])
    b = jnp.array([[-jnp.inf, 0.0, 2.5, 1.0], [-1.0, -jnp.inf, 0.5, 2.0]])
    ref = _ref_kl(np.exp(_log_softmax64(a)), np.exp(_log_softmax64(b)))
    val, grads = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl=impl)), (0, 1)
    )(a, b)
    np.testing.assert_allclose(val, ref.sum(), rtol=1e-12)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(grads[1], np.exp(_log_softmax64(b)) - np.exp(_log_softmax64(a)))


@pytest.mark.parametrize("space", ["probs", "log_probs", "logits"])
def test_where_excludes_entries_whatever_they_hold(space, impl):
    rng = _rng(6)
    keep = np.array([[True, True, False, True, False]] * 3)
    a, b = rng.normal(size=(2, 3, 5))
    junk = np.where(keep, 0.0, np.array([np.nan, np.inf, -np.inf, np.nan, np.inf]))
    if space == "logits":
        fn = lambda x, y, w=None: kldiv.kl_from_logits(x, y, where=w, impl=impl)
        x, y = a, b
        ref_fn = lambda x, y: kldiv.kl_from_logits(
            np.where(keep, x, -np.inf), np.where(keep, y, -np.inf), impl="xla"
        )
    else:
        if impl != IMPLS[0]:
            pytest.skip("impl only applies to logits")
        p, q = np.exp(_log_softmax64(a)), np.exp(_log_softmax64(b))
        x, y = (p, q) if space == "probs" else (np.log(p), np.log(q))
        fn = (
            (lambda x, y, w=None: kldiv.kl(x, y, where=w))
            if space == "probs"
            else (lambda x, y, w=None: kldiv.kl_from_log_probs(x, y, where=w))
        )
        ref_fn = lambda x, y: np.sum(
            np.where(
                keep, scipy.special.kl_div(*(np.exp([x, y]) if space != "probs" else (x, y))), 0
            ),
            -1,
        )
    x_junk, y_junk = x + junk, y + junk
    val = fn(x_junk, y_junk, keep)
    np.testing.assert_allclose(val, ref_fn(x, y), rtol=1e-12)
    grads = jax.grad(lambda u, v: jnp.sum(fn(u, v, keep)), (0, 1))(x_junk, y_junk)
    for g in grads:
        assert np.all(np.isfinite(g))
        assert np.all(np.asarray(g)[~keep] == 0)


def test_where_must_be_boolean_and_broadcast():
    p = jnp.ones((2, 3)) / 3
    with pytest.raises(TypeError, match="where"):
        kldiv.kl(p, p, where=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(4,\).*\(2, 3\)"):
        kldiv.kl(p, p, where=jnp.ones((4,), bool))


def test_empty_row_gives_zero(impl):
    a = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    w = jnp.array([[True, True], [False, False]])
    val, g = jax.value_and_grad(
        lambda x: jnp.sum(kldiv.kl_from_logits(x, x + 1, where=w, impl=impl))
    )(a)
    assert np.isfinite(val) and val == 0
    assert np.all(g[1] == 0)  # the empty row: exactly 0
    # p = q in the first row: its gradient q − p cancels to 0 up to the rounding of p and q
    # (compiled code may form the two exponentials by different instructions)
    np.testing.assert_allclose(g[0], 0.0, rtol=0, atol=4 * np.finfo(np.float64).eps)


@pytest.mark.parametrize("scale", [1e4, 1e20, 1e38])
def test_huge_logits_finite(impl, scale):
    a = jnp.array([[1.0, 0.0, -1.0, 0.5]], jnp.float32) * scale
    b = jnp.array([[1.0, 0.5, -1.0, 0.0]], jnp.float32) * scale
    val, grads = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl=impl)), (0, 1)
    )(a, b)
    assert np.isfinite(val) and val >= 0
    assert all(np.all(np.isfinite(g)) for g in grads)
    # Opposite extremes: p and q put their mass on different ends of ±3e38 logits.
    c = jnp.array([[3e38, 0.0]], jnp.float32)
    d = jnp.array([[-3e38, -3e38]], jnp.float32)
    np.testing.assert_allclose(kldiv.kl_from_logits(c, d, impl=impl), [np.log(2)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Temperature, broadcasting, dtypes.


def test_temperature(impl):
    rng = _rng(7)
    a, b = rng.normal(size=(2, 4, 10))
    np.testing.assert_allclose(
        kldiv.kl_from_logits(a, b, temperature=2.5, impl=impl),
        kldiv.kl_from_logits(a / 2.5, b / 2.5, impl="xla"),
        rtol=1e-12,
    )
    g = jax.grad(lambda y: jnp.sum(kldiv.kl_from_logits(a, y, temperature=2.5, impl=impl)))(b)
    np.testing.assert_allclose(
        g, (np.exp(_log_softmax64(b / 2.5)) - np.exp(_log_softmax64(a / 2.5))) / 2.5, atol=1e-12
    )
    for bad in (0, -1.0, 0.0):
        with pytest.raises(ValueError, match="temperature"):
            kldiv.kl_from_logits(a, b, temperature=bad)
    # traced temperatures (annealing schedules) are accepted.
    jax.jit(lambda t: kldiv.kl_from_logits(a, b, temperature=t, impl=impl))(2.0)


def test_broadcast_one_row_against_batch(impl):
    rng = _rng(8)
    prior = rng.normal(size=(9,))
    batch = rng.normal(size=(4, 9))
    out = kldiv.kl_from_logits(prior, batch, impl=impl)
    assert out.shape == (4,)
    for i in range(4):
        np.testing.assert_allclose(out[i], kldiv.kl_from_logits(prior, batch[i], impl="xla"))
    p = _dirichlet(rng, (9,))
    assert kldiv.kl(p, _dirichlet(rng, (3, 9))).shape == (3,)
    with pytest.raises(ValueError, match=r"`logits_p` \(4, 9\).*`logits_q` \(3, 9\)"):
        kldiv.kl_from_logits(batch, rng.normal(size=(3, 9)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(impl, dtype):
    rng = _rng(9)
    a = jnp.asarray(rng.normal(size=(3, 2000)), dtype)
    b = jnp.asarray(rng.normal(size=(3, 2000)), dtype)
    out = kldiv.kl_from_logits(a, b, impl=impl)
    assert out.dtype == jnp.float32
    ref = _ref_kl(
        np.exp(_log_softmax64(np.asarray(a, np.float64))),
        np.exp(_log_softmax64(np.asarray(b, np.float64))),
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    p = jax.nn.softmax(a.astype(jnp.float32)).astype(dtype)
    assert kldiv.kl(p, p).dtype == jnp.float32
    g = jax.grad(lambda y: jnp.sum(kldiv.kl_from_logits(a, y, impl=impl)))(b)
    assert g.dtype == dtype


def test_float64_stays_float64():
    p = np.array([0.2, 0.8])
    assert kldiv.kl(p, p[::-1]).dtype == jnp.float64
    assert kldiv.kl_from_logits(p, p[::-1]).dtype == jnp.float64


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad agree with eager.


def test_jit_vmap_agree_with_eager(impl):
    rng = _rng(10)
    a, b = rng.normal(size=(2, 3, 4, 11))
    f = lambda x, y: kldiv.kl_from_logits(x, y, impl=impl)
    eager = f(a, b)
    np.testing.assert_allclose(jax.jit(f)(a, b), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f)(a, b), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f, in_axes=(None, 0))(a[0], b), f(a[0][None], b))
    g_eager = jax.grad(lambda x: jnp.sum(f(x, b)))(a)
    np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.sum(f(x, b))))(a), g_eager)
    p, q = _dirichlet(rng, (2, 5, 7))
    np.testing.assert_allclose(jax.jit(kldiv.kl)(p, q), kldiv.kl(p, q), rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(kldiv.kl)(p, q), kldiv.kl(p, q), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# torch parity (F.kl_div with log_target=True; torch takes the model's log-probs first).


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_torch_parity(reduction):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = _rng(11)
    a, b = rng.normal(size=(2, 6, 13))
    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    want = F.kl_div(
        F.log_softmax(tb, -1), F.log_softmax(ta, -1), log_target=True, reduction=reduction
    )
    want.backward()

    def ours(x, y):
        return kldiv.reduce(kldiv.kl_from_logits(x, y), reduction)

    got, (ga, gb) = jax.value_and_grad(ours, (0, 1))(a, b)
    np.testing.assert_allclose(got, want.item(), rtol=1e-12)
    np.testing.assert_allclose(ga, ta.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), atol=1e-12)
    lp, lq = _log_softmax64(a), _log_softmax64(b)
    np.testing.assert_allclose(
        kldiv.reduce(kldiv.kl_from_log_probs(lp, lq), reduction), want.item(), rtol=1e-12
    )


# ---------------------------------------------------------------------------------------------
# Accuracy when p ≈ q (the regime of late distillation and RL penalties).


def _near_pair(n=256, v=1000, eps=1.4e-4, seed=12):
    rng = _rng(seed)
    a = (2.0 * rng.standard_normal((n, v))).astype(np.float32)
    b = (a + eps * rng.standard_normal((n, v))).astype(np.float32)
    ref = _ref_kl(np.exp(_log_softmax64(a)), np.exp(_log_softmax64(b)))
    return a, b, ref


def test_accuracy_target_near_equal(impl):
    a, b, ref = _near_pair()
    assert 3e-9 < np.median(ref) < 3e-8  # KL ≈ 1e-8
    out = np.asarray(jax.jit(lambda x, y: kldiv.kl_from_logits(x, y, impl=impl))(a, b))
    assert np.all(out >= 0)
    assert np.median(np.abs(out - ref) / ref) <= 1e-3


def _near_equal_errors(impl, t, offset=0.0, seed=43):
    """KL of float32 logits whose softmaxes are nearly equal at temperature ``t``, the student's
    logits the teacher's plus ``offset`` and a small noise, against the float64 reference:
    (values, reference). Rows 0–31 hold their first 64 entries 100 below the row maxima: the
    chunked path's sampled centres (the first V/16 columns) lie far below them."""
    with enable_x64(False):
        rng = _rng(seed)
        a = (3.0 * rng.standard_normal((64, 1024))).astype(np.float32)
        a[:32, :64] -= 100.0
        b = (a + offset + 1e-4 * rng.standard_normal(a.shape)).astype(np.float32)
        a64, b64 = a.astype(np.float64) / t, b.astype(np.float64) / t
        ref = _ref_kl(np.exp(_log_softmax64(a64)), np.exp(_log_softmax64(b64)))
        out = np.asarray(
            jax.jit(lambda x, y: kldiv.kl_from_logits(x, y, temperature=t, impl=impl))(a, b),
            np.float64,
        )
    assert np.all(out >= 0)
    return out, ref


@pytest.mark.parametrize("t", [2.0, 4.0, 0.5])
def test_accuracy_near_equal_at_a_temperature(impl, t):
    """At T ≠ 1 the log-ratio of the entries is formed from the untempered centred differences
    before the division (``_numerics.centred_half_difference``): dividing each logit first
    rounded each independently (this test at 74deac3: medians of 7.9e-5 to 2.3e-4 at T = 2 and
    4). The chunked path's sampled centres also compensate the tempered exponentials for that
    rounding."""
    out, ref = _near_equal_errors(impl, t)
    rel = np.abs(out - ref) / ref
    assert np.median(rel) <= 1e-5, np.median(rel)
    # the row constant log(Σe^a/Σe^b) errs by ~eps, which moves the KL at second order: ~1e-14
    # absolute, a visible share of the smallest KLs here (2e-11 at T = 0.5)
    assert np.all(np.abs(out - ref) <= 2e-4 * ref + 2e-14), (rel.max(), ref[rel.argmax()])


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_accuracy_near_equal_with_an_offset(impl, t):
    """A student whose logits are the teacher's plus a large constant (softmax ignores it) and a
    small noise: x = log(p/q) is tiny against the offset, so the centred log-ratio must be formed
    without rounding the offset into each entry (``_numerics.centred_half_difference``: the
    half-difference of the entries and that of the row centres, each error-free). Rounding
    (a − b) or (a − ma) alone would cost each x an absolute eps·300, about 1e-4 of these x."""
    out, ref = _near_equal_errors(impl, t, offset=300.7, seed=44)
    rel = np.abs(out - ref) / ref
    assert np.median(rel) <= 1e-5, np.median(rel)


def test_textbook_formula_fails_the_same_target():
    """Shows the accuracy test can fail: optax's float32 composition misses it by far."""
    a, b, ref = _near_pair()
    lp, lq = jax.nn.log_softmax(jnp.asarray(a)), jax.nn.log_softmax(jnp.asarray(b))
    textbook = np.asarray(optax.losses.kl_divergence_with_log_targets(lq, lp))
    assert np.median(np.abs(textbook - ref) / ref) > 0.1
    assert np.any(textbook < 0)


def test_probability_space_stays_nonnegative_near_equal():
    a, b, _ = _near_pair(n=64)
    p = jax.nn.softmax(jnp.asarray(a))
    q = jax.nn.softmax(jnp.asarray(b))
    assert np.all(np.asarray(kldiv.kl(p, q)) >= 0)
    assert np.all(np.asarray(kldiv.kl_from_log_probs(jnp.log(p), jnp.log(q))) >= 0)


# ---------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_messages():
    p = jnp.ones((2, 3)) / 3
    with pytest.raises(TypeError, match="int32"):
        kldiv.kl(jnp.ones((2, 3), jnp.int32), p)
    with pytest.raises(TypeError, match="`logits_q`.*int"):
        kldiv.kl_from_logits(p, jnp.ones((2, 3), int))
    with pytest.raises(ValueError, match=r"`log_p` \(2, 3\).*`log_q` \(2, 4\)"):
        kldiv.kl_from_log_probs(p, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="axis"):
        kldiv.kl(p, p, axis=2)
    with pytest.raises(ValueError, match="impl"):
        kldiv.kl_from_logits(p, p, impl="cuda")


def test_checkify_validation():
    good = jnp.array([[0.25, 0.75]])
    bad = jnp.array([[0.5, 0.75]])
    f = checkify.checkify(lambda p, q: kldiv.kl(kldiv.validate_probs(p), q))
    err, _ = jax.jit(f)(good, good)
    err.throw()
    err, _ = jax.jit(f)(bad, good)
    with pytest.raises(checkify.JaxRuntimeError, match="does not sum to 1"):
        err.throw()
    err, _ = jax.jit(f)(jnp.array([[-0.25, 1.25]]), good)
    with pytest.raises(checkify.JaxRuntimeError, match="negative"):
        err.throw()
    g = checkify.checkify(lambda lp: kldiv.validate_log_probs(lp))
    err, _ = g(jnp.log(bad))
    with pytest.raises(checkify.JaxRuntimeError, match="sum to 1"):
        err.throw()


def test_masked_infinite_example_does_not_poison_gradients(impl):
    """A +inf example (support mismatch) masked out downstream leaves finite gradients."""
    keep = jnp.array([True, False])
    p = jnp.array([[0.25, 0.75], [0.5, 0.5]])
    q = jnp.array([[0.5, 0.5], [1.0, 0.0]])

    def check(f, *args):
        for g in jax.grad(lambda *a: kldiv.reduce(f(*a), "mean", mask=keep), (0, 1))(*args):
            assert np.all(np.isfinite(g)), g

    check(kldiv.kl, p, q)
    check(kldiv.kl_from_log_probs, jnp.log(p), jnp.log(q))
    check(lambda a, b: kldiv.kl_from_logits(a, b, impl=impl), jnp.log(p), jnp.log(q))


# ---------------------------------------------------------------------------------------------
# Edge classes (each fixed once, in the shared tempering/numerics), on every implementation.
# tests/test_properties.py draws them at random; these are the named cases.


def _f32(x):
    return jnp.asarray(x, jnp.float32)


_JAX_BEFORE_0_8 = tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 8)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_temperature_with_large_finite_logits(impl):
    with enable_x64(False):
        x = _f32([[0.0, 0.0, 1e10]])
        assert float(kldiv.kl_from_logits(x, x, temperature=3.0, impl=impl)[0]) == 0.0
        g = jax.grad(lambda a: kldiv.kl_from_logits(a, x + 1, temperature=3.0, impl=impl)[0])(x)
        assert np.all(np.isfinite(g))
        # Near the float32 maximum with T < 1: finite where the KL is representable.
        a, b = _f32([[3e38, 2.9e38, 0.0]]), _f32([[2.9e38, 3e38, 0.0]])
        v = kldiv.kl_from_logits(a, b, temperature=0.5, impl=impl)
        assert np.isinf(v[0]) or np.isfinite(v[0])
        assert not np.isnan(v[0])
        same = kldiv.kl_from_logits(a, a, temperature=0.5, impl=impl)
        assert float(same[0]) == 0.0
        # A tiny T: finite gradients where the value is finite.
        p, q = _f32([[0.0, 1.0, 2.0]]), _f32([[2.0, 1.0, 0.0]])
        g = jax.grad(lambda b: kldiv.kl_from_logits(p, b, temperature=1e-30, impl=impl)[0])(q)
        assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 1e29


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_neg_inf_student_logit_where_p_has_mass_gets_minus_p_over_t(impl):
    """A −inf student logit in a kept entry where p has mass (the row's KL is +inf): its
    gradient is the closed form's q − p = −p, times 1/T, at every temperature and on every
    path (the XLA path at T ≠ 1 selects −inf there, and a select alone would have given 0);
    with a traced T the same, and the T-gradient stays finite."""
    with enable_x64(False):
        a = _f32([[0.3, -1.0, 2.0, 0.5], [1.0, 0.0, -1.0, 0.2]])
        b = _f32([[0.1, 0.4, -np.inf, -0.3], [0.0, 1.0, 0.5, -0.5]])
        for t in (1.0, 2.0, 0.25, jnp.float32(2.0)):
            tf = float(t)
            p = jax.nn.softmax(np.asarray(a, np.float64) / tf, axis=-1)

            def f(y, t=t):
                return jnp.sum(kldiv.kl_from_logits(a, y, temperature=t, impl=impl))

            g = np.asarray(jax.grad(f)(b))
            np.testing.assert_allclose(g[0, 2], -p[0, 2] / tf, rtol=1e-5, err_msg=str(t))
            assert np.all(np.isfinite(g)), g
        tg = jax.grad(lambda t: jnp.sum(kldiv.kl_from_logits(a, b, temperature=t)[1:]))(2.0)
        assert np.isfinite(tg)
        if impl in ("chunked", "pallas") and _JAX_BEFORE_0_8:
            # JAX 0.7 (the supported floor) fails at trace time inside JAX (an AssertionError
            # from linear_util.Store) when a fused path's custom VJP, differentiated above
            # w.r.t. the student logits with a traced T, is differentiated w.r.t. T: it reuses
            # the first trace. The same on 74deac3; the pinned JAX does not.
            return
        # through the row at +inf: the saturated derivatives' plain products, which may
        # overflow to ±inf but are never NaN (a doubled saturated cotangent overflowed before
        # the division's rule and met y = 0 at the row maximum: 0·inf)
        a2, b2 = _f32([[-4.568, 2.4325]]), _f32([[-np.inf, -4.3957]])
        for x, y in ((a, b), (a2, b2)):
            tg = jax.grad(
                lambda t, x=x, y=y: jnp.sum(kldiv.kl_from_logits(x, y, temperature=t, impl=impl))
            )(jnp.float32(2.0))
            assert not np.isnan(tg), tg


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_traced_temperature_gradient_with_inf_and_masked_nan(impl):
    with enable_x64(False):
        a = _f32([[0.0, -np.inf, 1.0, np.nan], [2.0, 1.0, -np.inf, np.nan]])
        b = _f32([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
        where = np.array([[True, True, True, False]] * 2)

        def f(t):
            return jnp.sum(kldiv.kl_from_logits(a, b, where=where, temperature=t, impl=impl))

        for t in (jnp.float32(2.0), jnp.array([2.0, 0.5], jnp.float32)):  # scalar, per row
            g = jax.grad(f)(t)
            assert np.all(np.isfinite(g)), g
        eps = 1e-3
        fd = (f(jnp.float32(2.0 + eps)) - f(jnp.float32(2.0 - eps))) / (2 * eps)
        np.testing.assert_allclose(jax.grad(f)(jnp.float32(2.0)), fd, rtol=2e-2)
        # vmap over per-row temperatures
        per_row = jax.vmap(
            jax.grad(lambda t, x, y, w: kldiv.kl_from_logits(x, y, where=w, temperature=t)),
        )(jnp.array([2.0, 0.5]), a, b, where)
        assert np.all(np.isfinite(per_row))


def test_per_row_temperature_and_bad_temperatures():
    rng = _rng(40)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    t = np.array([1.0, 2.0, 0.5])
    want = [kldiv.kl_from_logits(a[i], b[i], temperature=t[i]) for i in range(3)]
    np.testing.assert_allclose(kldiv.kl_from_logits(a, b, temperature=t), want, rtol=1e-12)
    for bad, err in (("2", TypeError), (True, TypeError), (0.0, ValueError), (-1, ValueError),
                     (np.nan, ValueError), (np.ones(4), ValueError)):  # fmt: skip
        with pytest.raises(err, match="temperature"):
            kldiv.kl_from_logits(a, b, temperature=bad)
    # concrete arrays are held to the bounds of numbers: finite and at least the smallest
    # normal number of the compute dtype (an infinite one gave KL = 0 for its rows)
    with enable_x64(False):
        a32, b32 = _f32(a), _f32(b)
        for bad in (np.array(np.inf), jnp.float32(np.inf), np.array([1.0, np.inf, 2.0]),
                    np.array(1e-39, np.float32), np.array([1.0, 2.0, -1.0])):  # fmt: skip
            with pytest.raises(ValueError, match=r"`temperature` must be finite and ≥ 1.18e-38"):
                kldiv.kl_from_logits(a32, b32, temperature=bad)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_finite_values_that_overflow_intermediates(impl):
    with enable_x64(False):
        a, b = _f32([[2e38, 2e38]]), _f32([[2e38, -2e38]])
        v = kldiv.kl_from_logits(a, b, impl=impl)
        np.testing.assert_allclose(v, [2e38], rtol=1e-6)
        g = jax.grad(lambda y: kldiv.kl_from_logits(a, y, impl=impl)[0])(b)
        assert np.all(np.isfinite(g))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_representable_kl_of_huge_logits_at_a_small_temperature(impl):
    """q of one entry underflows at T = 0.25 although its KL term is representable: KL ≈ 1.6e38
    (not +inf, the log-ratio is formed before the division), and the gradient's entries are
    the chain rule's products on every path: +inf where the derivative is beyond float32's
    range, the same finite value elsewhere (the XLA path multiplied the cotangent by 2/T and
    then by 1/2, overflowing where (g·gx)/T does not)."""
    with enable_x64(False):
        a = _f32([[-2.80964495e38] * 3])
        b = _f32([[1.83105469e34, 1.83105469e34, -1.22335415e38]])
        t = 0.25
        v, ga = jax.value_and_grad(
            lambda x: jnp.sum(kldiv.kl_from_logits(x, b, temperature=t, impl=impl))
        )(a)
    lq = scipy.special.log_softmax(np.asarray(b, np.float64) / t, -1)
    want = np.sum((np.log(1 / 3) - lq) / 3)
    np.testing.assert_allclose(v, want, rtol=1e-6)
    # ∂KL/∂a_v = p_v·(x_v − KL)/T: −2.18e38 for the first two entries, 4.35e38 (beyond) for the last
    np.testing.assert_allclose(ga[0, :2], [(np.log(2 / 3) - want) / 3 / t] * 2, rtol=1e-5)
    assert ga[0, 2] == np.inf


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_p_row_without_support_gives_zero(impl):
    a = np.full((2, 4), -np.inf)
    a[1] = [0.0, 1.0, 2.0, 3.0]
    b = _rng(41).normal(size=(2, 4))
    v = kldiv.kl_from_logits(a, b, impl=impl)
    assert v[0] == 0 and v[1] > 0
    ga, gb = jax.grad(lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl=impl)), (0, 1))(a, b)
    assert np.all(ga[0] == 0) and np.all(gb[0] == 0)
    masked = kldiv.kl_from_logits(b, b[::-1], where=np.zeros((2, 4), bool), impl=impl)
    np.testing.assert_array_equal(masked, [0.0, 0.0])  # the all-masked row agrees
    # ... whatever q holds, NaN included (the Pallas kernel gave NaN); NaN in p with q empty
    # is NaN on every path
    b_nan = np.where(np.arange(4) == 1, np.nan, b)
    for t in (1.0, 2.0):
        v, gb = jax.value_and_grad(
            lambda y, t=t: jnp.sum(kldiv.kl_from_logits(a[:1], y, impl=impl, temperature=t))
        )(b_nan[:1])
        assert v == 0 and np.all(gb == 0)
    assert np.isnan(kldiv.kl_from_logits(b_nan[:1], a[:1], impl=impl)[0])


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_nan_in_unmasked_input_propagates(impl):
    a = np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]])
    b = np.zeros((2, 3))
    v = kldiv.kl_from_logits(a, b, impl=impl)
    assert np.isnan(v[0]) and np.isfinite(v[1])
    v = kldiv.kl_from_logits(b, a, impl=impl)
    assert np.isnan(v[0]) and np.isfinite(v[1])


def test_array_likes_and_empty_vocabulary():
    np.testing.assert_allclose(
        kldiv.kl([0.5, 0.5], [0.25, 0.75]), 0.5 * np.log(2) + 0.5 * np.log(2 / 3), rtol=1e-12
    )
    np.testing.assert_array_equal(kldiv.kl_from_logits(np.zeros((3, 0)), np.zeros((3, 0))), 0)
    with pytest.raises(TypeError, match="logits_p"):
        kldiv.kl_from_logits("ab", [1.0])


# ---------------------------------------------------------------------------------------------
# Soft-capped and scaled logits (softcap=, logit_scale=): logits ← c·tanh(s·x/c), then ÷T.

SOFTCAP_IMPLS = ("xla", "chunked", "pallas", "auto")
TRANSFORMS = [
    (30.0, None),
    (2.0, 0.5),
    (None, 3.0),
    ((5.0, None), None),
    ((None, 4.0), (0.5, 2.0)),
    ((10.0, 20.0), (None, 1.5)),
]


def _per_side(value):
    return value if isinstance(value, tuple) else (value, value)


def _materialise(x, softcap, logit_scale):
    """c·tanh(s·x/c) (or s·x) in float64 numpy, −inf kept: the reference transform."""
    x = np.asarray(x, np.float64)
    s = 1.0 if logit_scale is None else logit_scale
    with np.errstate(invalid="ignore", over="ignore"):
        y = s * x if softcap is None else softcap * np.tanh(s * x / softcap)
    return np.where(x == -np.inf, -np.inf, y)


def _materialise_pair(a, b, softcap, logit_scale):
    caps, scales = _per_side(softcap), _per_side(logit_scale)
    return (
        _materialise(a, caps[0], scales[0]),
        _materialise(b, caps[1], scales[1]),
    )


def _softcap_inputs(seed=0, shape=(6, 9), scale=20.0):
    rng = _rng(seed)
    a = rng.normal(size=shape) * scale
    b = rng.normal(size=shape) * scale
    a[0, 2] = b[0, 2] = -np.inf  # an impossible token in both
    a[1, 3] = -np.inf  # p = 0 there, q > 0
    where = rng.random(shape) > 0.2
    where[:, 0] = True
    a[~where] = np.nan  # masked junk touches nothing
    return a, b, where


@pytest.mark.parametrize(
    *grid(
        {"softcap,logit_scale": TRANSFORMS, "impl_": SOFTCAP_IMPLS, "traced": [False, True]},
        cover=[("impl_", "traced")],  # the full grid under -m slow
    )
)
def test_softcap_matches_materialised_logits(softcap, logit_scale, impl_, traced):
    """Values and both gradients equal capping the logits first (float64 reference), with a
    mask, −inf logits, NaN in masked entries and Python or traced per-row temperatures."""
    a, b, where = _softcap_inputs()
    t = jnp.linspace(0.5, 3.0, a.shape[0]) if traced else 1.7

    def f(x, y, temp):
        v = kldiv.kl_from_logits(
            x,
            y,
            where=where,
            temperature=temp,
            impl=impl_,
            softcap=softcap,
            logit_scale=logit_scale,
        )
        return jnp.sum(v * jnp.arange(1.0, 1.0 + v.shape[0])), v

    (_, v), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(a, b, t)
    ref_a, ref_b = _materialise_pair(a, b, softcap, logit_scale)

    def ref_f(x, y, temp):
        v = kldiv.kl_from_logits(x, y, where=where, temperature=temp, impl="xla")
        return jnp.sum(v * jnp.arange(1.0, 1.0 + v.shape[0])), v

    (_, rv), rg = jax.value_and_grad(ref_f, argnums=(0, 1, 2), has_aux=True)(ref_a, ref_b, t)
    np.testing.assert_allclose(v, rv, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g[2], rg[2], rtol=1e-8, atol=1e-12)  # d/dT
    # d/dx = d/dy · (chain-rule factor of the transform), the factor by autodiff of the
    # float64 reference transform.
    caps, scales = _per_side(softcap), _per_side(logit_scale)
    for x, gx, rgx, c, s in zip((a, b), g[:2], rg[:2], caps, scales, strict=True):
        s_ = 1.0 if s is None else s
        xs = np.where(np.isfinite(x), x, 0.0)
        factor = s_ * np.ones_like(xs) if c is None else s_ * (1 - np.tanh(s_ * xs / c) ** 2)
        expected = np.where(where, np.asarray(rgx) * factor, 0.0)
        assert np.all(np.isfinite(gx))
        np.testing.assert_allclose(gx, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("impl_", SOFTCAP_IMPLS)
def test_softcap_keeps_neg_inf_logits_impossible(impl_):
    """−inf logits stay −inf: the entry keeps probability 0 (c·tanh(−inf) = −c would not)."""
    a = np.array([[3.0, -np.inf, 1.0, 0.5]])
    b = np.array([[1.0, -np.inf, 2.0, -0.5]])
    keep = np.array([[True, False, True, True]])
    v = kldiv.kl_from_logits(a, b, softcap=2.0, impl=impl_)
    dropped = kldiv.kl_from_logits(a, b, softcap=2.0, impl=impl_, where=keep)
    np.testing.assert_allclose(v, dropped, rtol=1e-14)
    # Only the student −inf: p > 0 where q = 0 stays +inf.
    b2 = np.array([[1.0, 0.3, -np.inf, -0.5]])
    assert np.isposinf(kldiv.kl_from_logits(a, b2, softcap=2.0, impl=impl_))[0]


@pytest.mark.parametrize(
    *grid(
        {
            "impl_": SOFTCAP_IMPLS,
            "softcap,logit_scale": [
                (30.0, None),
                (30.0, 2.0),
                (None, 2.0),
                (None, 1e30),
                (1e-3, 1e4),
            ],
        },  # every transform and every impl; the full grid under -m slow
    )
)
def test_softcap_logits_near_float32_max_stay_finite(impl_, softcap, logit_scale):
    """Logits up to ±3e38 in float32: finite values and gradients, no NaN, also where s·x
    overflows (tanh saturates; without a cap s·x saturates to the largest float32)."""
    with enable_x64(False):
        a = jnp.array([[3e38, -3e38, 1.0, 0.0], [1e38, 2e38, -3e38, 5.0]], jnp.float32)
        b = jnp.array([[-3e38, 3e38, 0.0, 1.0], [2e38, 1e38, 3e38, -5.0]], jnp.float32)

        def f(x, y):
            v = kldiv.kl_from_logits(
                x, y, softcap=softcap, logit_scale=logit_scale, impl=impl_, temperature=0.7
            )
            return jnp.sum(v), v

        (_, v), (ga, gb) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(a, b)
        jv = jax.jit(lambda x, y: f(x, y)[1])(a, b)
    assert not np.any(np.isnan(np.asarray(v))) and np.all(np.asarray(v) >= 0)
    assert np.all(np.isfinite(np.asarray(ga))) and np.all(np.isfinite(np.asarray(gb)))
    np.testing.assert_allclose(jv, v, rtol=1e-6)
    if softcap is not None and softcap >= 1:  # capped logits: an ordinary, finite KL
        assert np.all(np.isfinite(np.asarray(v)))


@pytest.mark.parametrize("impl_", SOFTCAP_IMPLS)
def test_softcap_nan_propagates_and_masked_nan_touches_nothing(impl_):
    a = np.array([[1.0, np.nan, 0.5], [1.0, 2.0, np.nan]])
    b = np.array([[0.0, 1.0, 0.5], [0.5, 2.5, 1.0]])
    v = np.asarray(kldiv.kl_from_logits(a, b, softcap=5.0, impl=impl_))
    assert np.all(np.isnan(v))
    keep = ~np.isnan(a)
    g = jax.grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, where=keep, softcap=5.0, impl=impl_)),
        argnums=(0, 1),
    )(a, b)
    assert all(np.all(np.isfinite(gi)) and np.all(np.asarray(gi)[~keep] == 0) for gi in g)


@pytest.mark.parametrize("impl_", SOFTCAP_IMPLS)
def test_softcap_bf16_and_float32_near_equal(impl_):
    """16-bit inputs are transformed in float32; float32 stays accurate when p ≈ q."""
    rng = _rng(3)
    a = (rng.normal(size=(8, 64)) * 5).astype(np.float32).astype(np.float64)
    b = (a + 1e-3 * rng.normal(size=a.shape)).astype(np.float32).astype(np.float64)
    ref = np.asarray(kldiv.kl_from_logits(*_materialise_pair(a, b, 30.0, 0.5)))
    assert np.all(ref > 0)
    with enable_x64(False):
        v32 = kldiv.kl_from_logits(
            jnp.asarray(a, jnp.float32),
            jnp.asarray(b, jnp.float32),
            softcap=30.0,
            logit_scale=0.5,
            impl=impl_,
        )
        a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
        v16 = kldiv.kl_from_logits(a16, b16, softcap=30.0, logit_scale=0.5, impl=impl_)
        g16 = jax.grad(lambda y: jnp.sum(kldiv.kl_from_logits(a16, y, softcap=30.0, impl=impl_)))(
            b16
        )
    assert v32.dtype == jnp.float32 and v16.dtype == jnp.float32 and g16.dtype == jnp.bfloat16
    # float32: relative accuracy although p ≈ q (KL ~1e-7 here, far below float32's eps times
    # the entropy, where the textbook Σ p(log p − log q) is pure rounding noise); what is left
    # is the float32 rounding of the transformed logits themselves.
    np.testing.assert_allclose(v32, ref, rtol=2e-2)
    ref16 = kldiv.kl_from_logits(
        *_materialise_pair(np.asarray(a16, np.float64), np.asarray(b16, np.float64), 30.0, 0.5)
    )
    np.testing.assert_allclose(v16, ref16, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_softcap_fused_paths_equal_xla_under_jit(impl):
    """Per chunk (chunked) and per vocabulary block (Pallas: several blocks of 16 here), values
    and both gradients equal the XLA path's."""
    a, b, where = _softcap_inputs(seed=4, shape=(7, 40))
    kw = dict(where=where, softcap=(20.0, 10.0), logit_scale=0.8, temperature=2.0)
    extra = {"block": 16} if impl == "pallas" else {}

    def fused(x, y):
        if impl == "pallas":
            from kldiv.fused.pallas import kl_logits_pallas

            tr = kldiv._checks.logit_transforms(0.8, (20.0, 10.0), jnp.float64)
            return kl_logits_pallas(x, y, where=where, temperature=2.0, transforms=tr, **extra)
        return kldiv.kl_from_logits(x, y, impl=impl, **kw)

    w = np.arange(1.0, 8.0)
    ref, ref_g = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl="xla", **kw) * w), (0, 1)
    )(a, b)
    got, got_g = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(fused(x, y) * w), (0, 1)))(a, b)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    for g, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)


def test_softcap_of_one_and_none_are_identity():
    a, b, where = _softcap_inputs(seed=5)
    ref = kldiv.kl_from_logits(a, b, where=where)
    same = kldiv.kl_from_logits(a, b, where=where, logit_scale=1.0, softcap=(None, None))
    np.testing.assert_array_equal(same, ref)


@pytest.mark.parametrize(
    "kw,err,msg",
    [
        (dict(softcap=0.0), ValueError, "`softcap` must be finite and"),
        (dict(softcap=-1.0), ValueError, "`softcap` must be finite"),
        (dict(softcap=float("nan")), ValueError, "`softcap` must be finite"),
        (dict(logit_scale=float("inf")), ValueError, "`logit_scale` must be finite"),
        (dict(logit_scale=1e39), ValueError, "`logit_scale` must be finite and in"),
        (dict(softcap=True), TypeError, "`softcap` must be None, a Python number"),
        (dict(softcap=jnp.array(30.0)), TypeError, "`softcap` must be None"),
        (dict(logit_scale=(1.0, 2.0, 3.0)), ValueError, "`logit_scale` as a pair"),
        (dict(softcap=(30.0, "a")), TypeError, "`softcap`"),
    ],
)
def test_softcap_validation_errors(kw, err, msg):
    with enable_x64(False), pytest.raises(err, match=msg):
        kldiv.kl_from_logits(jnp.zeros((2, 3)), jnp.zeros((2, 3)), **kw)


def _backend_compiles(f) -> int:
    """How many programs XLA compiles while ``f()`` runs, or loads from a persistent compilation
    cache (``make test`` shares one between its processes; the runtime records its compile
    event for either)."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT

    count = [0]

    def listener(event, duration, **kwargs):
        del duration, kwargs
        count[0] += event == BACKEND_COMPILE_EVENT

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(f())
    finally:
        unregister_event_duration_listener(listener)
    return count[0]


_COMPILE_CALLS = ["kl", "kl_from_log_probs", "xla", "chunked", "pallas", "auto", "where", "T"]


@pytest.mark.parametrize("to_device", [False, True], ids=["numpy", "jax"])
@pytest.mark.parametrize("call", _COMPILE_CALLS)
def test_an_eager_call_compiles_one_program_per_shape(call, to_device):
    # A width no other test uses, one per case, so that the first call meets an empty cache;
    # numpy inputs and device arrays alike (jnp.asarray of a numpy array compiles a copy).
    v = 1237 + 2 * _COMPILE_CALLS.index(call) + to_device
    rng = _rng(7)
    a = rng.normal(size=(3, v)).astype(np.float32)
    b = rng.normal(size=a.shape).astype(np.float32)
    lp, lq = scipy.special.log_softmax(a, -1), scipy.special.log_softmax(b, -1)
    p, q, m = np.exp(lp), np.exp(lq), a > -1.0
    if to_device:
        a, b, lp, lq, p, q, m = jax.block_until_ready(
            tuple(map(jnp.asarray, (a, b, lp, lq, p, q, m)))
        )
    f = {
        "kl": lambda: kldiv.kl(p, q),
        "kl_from_log_probs": lambda: kldiv.kl_from_log_probs(lp, lq),
        "where": lambda: kldiv.kl_from_logits(a, b, where=m),
        "T": lambda: kldiv.kl_from_logits(a, b, temperature=2.0),
    }.get(call, lambda: kldiv.kl_from_logits(a, b, impl=call))
    assert _backend_compiles(f) == 1
    assert _backend_compiles(f) == 0  # the second call of that shape reuses it
