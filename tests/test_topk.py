"""Tests for kldiv.topk: top-k teacher KL against dense float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.experimental import checkify

import kldiv
from kldiv.topk import kl_topk_teacher, validate_topk_ids


def _case(n=4, v=50, k=8, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(n, v)) * scale
    s = rng.normal(size=(n, v)) * scale
    lpt = scipy.special.log_softmax(t, -1)
    ids = np.argsort(-lpt, -1)[:, :k]
    return ids, np.take_along_axis(lpt, ids, -1), s, lpt


def _ref(ids, lp, s, tail):
    """Dense float64 reference written from the definitions."""
    out = []
    for i in range(ids.shape[0]):
        q = scipy.special.softmax(s[i])
        p_k = np.exp(lp[i])
        q_k = q[ids[i]]
        if tail == "renormalize":
            p_, q_ = p_k / p_k.sum(), q_k / q_k.sum()
        else:
            rest = np.ones_like(q, bool)
            rest[ids[i]] = False
            p_ = np.append(p_k, 1 - p_k.sum())
            q_ = np.append(q_k, q[rest].sum())
        out.append(scipy.special.rel_entr(p_, q_).sum())
    return np.array(out)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_matches_dense_reference(tail):
    ids, lp, s, _ = _case()
    np.testing.assert_allclose(
        kl_topk_teacher(ids, lp, s, reduction="none", tail=tail), _ref(ids, lp, s, tail), rtol=1e-10
    )


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_k_equal_v_reproduces_kl_from_logits(tail):
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(2, 3, 20)) * 2
    ids = np.stack([rng.permutation(20) for _ in range(3)])
    lp = np.take_along_axis(scipy.special.log_softmax(t, -1), ids, -1)
    want = kldiv.kl_from_logits(t, s)
    np.testing.assert_allclose(
        kl_topk_teacher(ids, lp, s, reduction="none", tail=tail), want, rtol=1e-12
    )
    g = jax.grad(lambda x: jnp.sum(kl_topk_teacher(ids, lp, x, reduction="none", tail=tail)))(s)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(kldiv.kl_from_logits(t, x)))(s))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_gradient_matches_reference_autodiff(tail):
    ids, lp, s, _ = _case(seed=2)

    def dense(x):  # the same quantity from dense softmax, differentiated by plain autodiff
        lq = jax.nn.log_softmax(x, -1)
        lq_k = jnp.take_along_axis(lq, ids, -1)
        if tail == "renormalize":
            lp_ = lp - jax.nn.logsumexp(lp, -1, keepdims=True)
            lq_ = lq_k - jax.nn.logsumexp(lq_k, -1, keepdims=True)
        else:
            lp_ = jnp.concatenate([lp, jnp.log1p(-jnp.exp(lp).sum(-1, keepdims=True))], -1)
            q_tail = 1 - jnp.exp(lq_k).sum(-1, keepdims=True)
            lq_ = jnp.concatenate([lq_k, jnp.log(q_tail)], -1)
        return jnp.sum(jnp.exp(lp_) * (lp_ - lq_))

    got = jax.grad(lambda x: jnp.sum(kl_topk_teacher(ids, lp, x, reduction="none", tail=tail)))(s)
    np.testing.assert_allclose(got, jax.grad(dense)(s), rtol=1e-9, atol=1e-12)


def test_where_padding_slots_and_temperature():
    ids, lp, s, _ = _case(seed=3)
    keep = np.ones_like(ids, bool)
    keep[:, 5:] = False
    junk_ids = np.where(keep, ids, 0)
    junk_lp = np.where(keep, lp, np.nan)
    for tail in ("renormalize", "bucket"):
        got = kl_topk_teacher(
            junk_ids, junk_lp, s, reduction="none", tail=tail, where=keep, temperature=2.0
        )
        want = _ref(ids[:, :5], lp[:, :5], s / 2.0, tail)
        np.testing.assert_allclose(got, want, rtol=1e-10)
        g = jax.grad(
            lambda x, tail=tail: jnp.sum(
                kl_topk_teacher(
                    junk_ids, junk_lp, x, reduction="none", tail=tail, where=keep, temperature=2.0
                )
            )
        )(s)
        assert np.all(np.isfinite(g))


def test_reduction_and_mask():
    ids, lp, s, _ = _case(seed=4)
    mask = np.array([True, False, True, True])
    vals = kl_topk_teacher(ids, lp, s, reduction="none", tail="bucket")
    np.testing.assert_allclose(
        kl_topk_teacher(ids, lp, s, tail="bucket", reduction="mean", mask=mask),
        vals[mask].mean(),
    )


def test_tiny_student_tail_stays_finite_float32():
    # the student puts essentially all its mass on the k ids; the teacher keeps some tail mass.
    v, k = 1000, 4
    s = np.full((1, v), -40.0, np.float32)
    s[0, :k] = 10.0
    ids = np.arange(k)[None]
    lp = np.log(np.full((1, k), 0.2475, np.float32))
    val, g = jax.value_and_grad(
        lambda x: jnp.sum(kl_topk_teacher(ids, jnp.asarray(lp), x, reduction="none", tail="bucket"))
    )(jnp.asarray(s))
    assert np.isfinite(val) and val > 0 and np.all(np.isfinite(g))


def test_no_dense_float32_temporaries_in_forward():
    n, v, k = 256, 32768, 32
    ids = jnp.zeros((n, k), jnp.int32) + jnp.arange(k)
    lp = jnp.full((n, k), -4.0, jnp.float32)
    s = jnp.zeros((n, v), jnp.float32)
    for tail in ("renormalize", "bucket"):
        compiled = (
            jax.jit(
                lambda a, b, c, tail=tail: kl_topk_teacher(a, b, c, reduction="none", tail=tail)
            )
            .lower(ids, lp, s)
            .compile()
        )
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < n * v * 4 / 8, (tail, temp)


def test_bf16_student_accumulates_in_float32():
    ids, lp, s, _ = _case(seed=5)
    out = kl_topk_teacher(
        ids, lp.astype(np.float32), jnp.asarray(s, jnp.bfloat16), reduction="none", tail="bucket"
    )
    assert out.dtype == jnp.float32


def test_uint16_ids_of_a_65536_token_vocabulary():
    """kl_topk_teacher and validate_topk_ids compare uint16 ids with V = 65536 in a dtype that
    holds it (as a uint16 it is 0: every id was out of range, NaN, and the check failed)."""
    rng = np.random.default_rng(41)
    s = rng.normal(size=(2, 65536)).astype(np.float32)
    ids = np.array([[0, 40000, 65535], [5, 6, 65534]])
    lp = np.log(np.full((2, 3), 0.25, np.float32))
    for tail in ("renormalize", "bucket"):
        want = kldiv.kl_topk_teacher(ids, lp, s, tail=tail, reduction="none")
        got = kldiv.kl_topk_teacher(ids.astype(np.uint16), lp, s, tail=tail, reduction="none")
        assert np.all(np.isfinite(want))
        np.testing.assert_allclose(got, want, rtol=1e-6)
    err, out = checkify.checkify(lambda i: kldiv.validate_topk_ids(i, 65536))(ids.astype(np.uint16))
    assert err.get() is None and out.dtype == np.uint16


def test_errors():
    ids, lp, s, _ = _case()
    with pytest.raises(ValueError, match="tail"):
        kl_topk_teacher(ids, lp, s, reduction="none", tail="drop")
    with pytest.raises(TypeError, match="teacher_ids"):
        kl_topk_teacher(ids.astype(float), lp, s, reduction="none", tail="bucket")
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 7\)"):
        kl_topk_teacher(ids, lp[:, :7], s, reduction="none", tail="bucket")
    with pytest.raises(ValueError, match="leading shapes"):
        kl_topk_teacher(ids, lp, s[:3], reduction="none", tail="bucket")
    with pytest.raises(ValueError, match="temperature"):
        kl_topk_teacher(ids, lp, s, reduction="none", tail="bucket", temperature=0.0)
    f = jax.jit(
        checkify.checkify(
            lambda i, l, x: kl_topk_teacher(
                validate_topk_ids(i, x.shape[-1]), l, x, reduction="none", tail="bucket"
            )
        )
    )
    f(ids, lp, s)[0].throw()
    dup = ids.copy()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(checkify.JaxRuntimeError, match="repeats"):
        f(dup, lp, s)[0].throw()
    bad = ids.copy()
    bad[1, 0] = 50
    with pytest.raises(checkify.JaxRuntimeError, match="outside"):
        f(bad, lp, s)[0].throw()


def test_out_of_range_ids_never_alias_and_the_tail_is_exact_at_mass_one():
    s = jnp.array([[0.0, 1.0, 2.0, 3.0], [0.5, 0.0, 0.0, 1.0]])
    lp = jnp.log(jnp.array([[0.7, 0.3], [0.6, 0.4]]))  # all the mass in the top 2: empty tail
    ids = jnp.array([[3, 2], [0, 3]])
    for tail in ("renormalize", "bucket"):
        f = lambda lp, s, tail=tail: kl_topk_teacher(ids, lp, s, tail=tail, reduction="sum")  # noqa: E731
        g = jax.grad(f, (0, 1))(lp, s)
        assert all(np.all(np.isfinite(x)) for x in g)
        for bad in (-1, 4):  # a negative id must not mean id V−1; an id ≥ V must not read junk
            v = kl_topk_teacher(ids.at[0, 1].set(bad), lp, s, tail=tail, reduction="none")
            assert np.isnan(v[0]) and np.isfinite(v[1])
    # the bucket tail at mass 1 is the renormalised KL plus the student's tail mass term
    full = kl_topk_teacher(ids, lp, s, tail="bucket", reduction="none")
    q = jax.nn.softmax(s)
    q_k = jnp.take_along_axis(q, ids, -1)
    want = jnp.sum(jnp.exp(lp) * (lp - jnp.log(q_k)), -1)
    np.testing.assert_allclose(full, want, rtol=1e-10)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("softcap,logit_scale", [(3.0, None), (None, 2.0), ((None, 4.0), 0.5)])
def test_student_softcap_matches_materialised(tail, softcap, logit_scale):
    """softcap/logit_scale transform the student logits (before T), as if capped first."""
    ids, lp, s, _ = _case(seed=5, scale=6.0)
    s[0, ids[0, -1]] = -np.inf  # an impossible student token stays impossible
    cap = softcap[1] if isinstance(softcap, tuple) else softcap
    scale = 1.0 if logit_scale is None else logit_scale
    with np.errstate(invalid="ignore"):
        capped = scale * s if cap is None else cap * np.tanh(scale * s / cap)
    capped = np.where(s == -np.inf, -np.inf, capped)
    kw = dict(reduction="none", tail=tail, temperature=1.5)

    def ours(x):
        v = kl_topk_teacher(ids, lp, x, softcap=softcap, logit_scale=logit_scale, **kw)
        return jnp.sum(v), v

    (_, v), g = jax.value_and_grad(ours, has_aux=True)(s)
    want = kl_topk_teacher(ids, lp, capped, **kw)
    np.testing.assert_allclose(v, want, rtol=1e-10)
    # chain rule: the gradient of the materialised call times s·(1 − tanh²(s·x/c))
    g_ref = jax.grad(lambda y: jnp.sum(kl_topk_teacher(ids, lp, y, **kw)))(capped)
    # at the −inf token the factor is its limit: s without a cap, 0 with one (tanh' → 0); the
    # materialised gradient there is −p/T (the token's teacher mass)
    x0 = np.where(np.isfinite(s), s, 0.0)
    factor = scale if cap is None else scale * (1 - np.tanh(scale * x0 / cap) ** 2)
    factor = np.where(np.isfinite(s), factor, scale if cap is None else 0.0)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, np.asarray(g_ref) * factor, rtol=1e-8, atol=1e-13)


def test_student_softcap_teacher_entry_is_an_error():
    ids, lp, s, _ = _case()
    with pytest.raises(ValueError, match="kldiv: `softcap` of kl_topk_teacher applies to the"):
        kl_topk_teacher(ids, lp, s, reduction="none", tail="bucket", softcap=(30.0, 30.0))
    with pytest.raises(ValueError, match="kldiv: `logit_scale` must be finite"):
        kl_topk_teacher(ids, lp, s, reduction="none", tail="bucket", logit_scale=0.0)
