"""Tests for kldiv.fused: the chunked and Pallas paths of kl_from_logits.

The whole of tests/test_discrete.py also runs against these paths (it is parameterised over
``kldiv.discrete.LOGIT_IMPLS``). Here: several chunks per call (row counts that are not a
multiple of the chunk), float64 references from scipy, edges, memory, Pallas in interpret mode,
the Triton lowering, and the ``"auto"`` choice.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from _grid import grid
from _jax_compat import enable_x64
from _subprocess import child_env
from hypothesis import given, settings
from hypothesis import strategies as st

import kldiv
from kldiv import discrete
from kldiv.fused import chunked, pallas


def _rng(seed=0):
    return np.random.default_rng(seed)


def _ref_kl_and_grads(a, b):
    """Float64 KL(softmax(a)‖softmax(b)) per row and its gradients, from scipy log-softmax."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):  # all −inf rows: NaN here, patched by the callers
        lp, lq = scipy.special.log_softmax(a, -1), scipy.special.log_softmax(b, -1)
        p, q = np.exp(lp), np.exp(lq)
        kl = scipy.special.rel_entr(p, q).sum(-1)
        ga = np.where(p > 0, p * (lp - lq - kl[..., None]), 0.0)
    return kl, ga, q - p


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks on small test shapes (a few hundred bytes per chunk)."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 3 * 8 * 16)


def _value_and_grads(f, a, b, weights):
    return jax.value_and_grad(lambda x, y: jnp.sum(f(x, y) * weights), (0, 1))(a, b)


# ---------------------------------------------------------------------------------------------
# Chunked path against float64 references.


@pytest.mark.parametrize("n,v,chunk", [(1, 5, 1), (7, 16, 3), (10, 33, 4), (12, 8, 12), (9, 3, 20)])
def test_chunked_matches_reference(n, v, chunk):
    rng = _rng(n + v)
    a, b = rng.normal(size=(2, n, v)) * 3
    w = rng.uniform(0.5, 2.0, size=n)
    val, (ga, gb) = _value_and_grads(
        lambda x, y: chunked.kl_logits_chunked(x, y, chunk_size=chunk), a, b, w
    )
    kl, ref_ga, ref_gb = _ref_kl_and_grads(a, b)
    np.testing.assert_allclose(val, np.sum(kl * w), rtol=1e-12)
    np.testing.assert_allclose(ga, ref_ga * w[:, None], atol=1e-13)
    np.testing.assert_allclose(gb, ref_gb * w[:, None], atol=1e-13)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_public_api_batch_shape_axis_and_broadcast(impl, small_chunks):
    rng = _rng(1)
    a = rng.normal(size=(3, 11, 4)) * 2  # event axis 1
    b = rng.normal(size=(3, 11, 4)) * 2
    out = kldiv.kl_from_logits(a, b, axis=1, impl=impl)
    ref, _, _ = _ref_kl_and_grads(np.moveaxis(a, 1, -1), np.moveaxis(b, 1, -1))
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    # one reference row against a batch; gradient w.r.t. the shared row sums over the batch.
    prior, batch = rng.normal(size=(11,)), rng.normal(size=(5, 11))
    val, (gp, gq) = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl=impl)), (0, 1)
    )(prior, batch)
    kl, ref_ga, ref_gb = _ref_kl_and_grads(np.broadcast_to(prior, batch.shape), batch)
    np.testing.assert_allclose(val, kl.sum(), rtol=1e-12)
    np.testing.assert_allclose(gp, ref_ga.sum(0), atol=1e-13)
    np.testing.assert_allclose(gq, ref_gb, atol=1e-13)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_where_with_nan_and_neg_inf_entries(impl, small_chunks):
    rng = _rng(2)
    a, b = rng.normal(size=(2, 6, 9))
    keep = rng.random((6, 9)) > 0.3
    keep[4] = False  # a row with no entries left
    a_bad = np.where(keep, a, np.nan)
    b_bad = np.where(keep, b, np.inf)
    val, (ga, gb) = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, where=keep, impl=impl)), (0, 1)
    )(a_bad, b_bad)
    kl, ref_ga, ref_gb = _ref_kl_and_grads(np.where(keep, a, -np.inf), np.where(keep, b, -np.inf))
    kl = np.nan_to_num(kl)
    np.testing.assert_allclose(val, kl.sum(), rtol=1e-12)
    np.testing.assert_allclose(ga, np.nan_to_num(ref_ga), atol=1e-13)
    np.testing.assert_allclose(gb, np.nan_to_num(ref_gb), atol=1e-13)
    assert np.all(ga[~keep] == 0) and np.all(gb[~keep] == 0)
    # −inf logits in the inputs themselves (a vocabulary mask baked into the logits).
    a_inf = np.where(keep, a, -np.inf)
    b_inf = np.where(keep, b, -np.inf)
    out = kldiv.kl_from_logits(a_inf, b_inf, impl=impl)
    np.testing.assert_allclose(out, kl, rtol=1e-12)
    # p > 0 where q = 0 gives +inf, never NaN.
    b_off = b_inf.copy()
    b_off[0, np.argmax(keep[0])] = -np.inf
    assert np.isposinf(kldiv.kl_from_logits(a_inf, b_off, impl=impl)[0])


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_temperature_and_low_precision(impl, small_chunks):
    rng = _rng(3)
    a, b = rng.normal(size=(2, 5, 40)) * 4
    t = 2.5
    val, (ga, gb) = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, temperature=t, impl=impl)), (0, 1)
    )(a, b)
    kl, ref_ga, ref_gb = _ref_kl_and_grads(a / t, b / t)
    np.testing.assert_allclose(val, kl.sum(), rtol=1e-12)
    np.testing.assert_allclose(ga, ref_ga / t, atol=1e-13)
    np.testing.assert_allclose(gb, ref_gb / t, atol=1e-13)
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    out = kldiv.kl_from_logits(a16, b16, impl=impl)
    assert out.dtype == jnp.float32
    kl16, _, ref_gb16 = _ref_kl_and_grads(np.asarray(a16, np.float64), np.asarray(b16, np.float64))
    np.testing.assert_allclose(out, kl16, rtol=2e-6)
    g = jax.grad(lambda y: jnp.sum(kldiv.kl_from_logits(a16, y, impl=impl)))(b16)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float64), ref_gb16, atol=1e-2)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_huge_logits_and_accuracy_near_equal(impl, small_chunks):
    rng = _rng(4)
    # finite float32 logits of any size: finite values and gradients.
    a = jnp.asarray(rng.normal(size=(4, 7)) * 1e37, jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, 7)) * 1e37, jnp.float32)
    val, grads = jax.value_and_grad(
        lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, impl=impl)), (0, 1)
    )(a, b)
    assert np.isfinite(val) and val >= 0
    assert all(np.all(np.isfinite(g)) for g in grads)
    # p ≈ q in float32: relative accuracy of a tiny KL (the textbook formula loses every digit).
    base = rng.normal(size=(6, 300)) * 3
    a32 = jnp.asarray(base, jnp.float32)
    b32 = jnp.asarray(base + 1e-3 * rng.normal(size=base.shape), jnp.float32)
    out = kldiv.kl_from_logits(a32, b32, impl=impl)
    ref, _, _ = _ref_kl_and_grads(np.asarray(a32, np.float64), np.asarray(b32, np.float64))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4)
    assert np.all(np.asarray(kldiv.kl_from_logits(a32, a32, impl=impl)) == 0)
    # Equal up to the rounding of a + 7: a KL of order 1e-14, not the ~1e-7 noise of cancellation.
    shifted = np.asarray(kldiv.kl_from_logits(a32, a32 + 7.0, impl=impl))
    assert np.all((shifted >= 0) & (shifted < 1e-12)), shifted


def test_jit_vmap_and_grad_agree(small_chunks):
    rng = _rng(5)
    a, b = rng.normal(size=(2, 3, 5, 13))
    f = lambda x, y: kldiv.kl_from_logits(x, y, impl="chunked")  # noqa: E731
    eager = f(a, b)
    np.testing.assert_allclose(jax.jit(f)(a, b), eager, rtol=1e-13)
    np.testing.assert_allclose(jax.vmap(f)(a, b), eager, rtol=1e-13)
    g = jax.grad(lambda x, y: jnp.sum(f(x, y) ** 2), (0, 1))
    want = g(a, b)
    for got in (jax.jit(g)(a, b), jax.vmap(g)(a, b)):  # the sum over examples decouples
        for g1, g2 in zip(got, want, strict=True):
            np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-14)


@settings(max_examples=8, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_xla_property(shape, chunk, seed):
    rng = _rng(seed)
    a, b = rng.normal(size=(2, *shape)) * rng.uniform(0.1, 20)
    w = rng.normal(size=shape[0])
    got = _value_and_grads(lambda x, y: chunked.kl_logits_chunked(x, y, chunk_size=chunk), a, b, w)
    want = _value_and_grads(lambda x, y: kldiv.kl_from_logits(x, y, impl="xla"), a, b, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-11, atol=1e-14)
    for g1, g2 in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Sampled centres: chunks whose first columns cannot centre them are recomputed on the row maxima.

_SAMPLE_CASES = ["gap", "big-sum", "masked-sample", "neg-inf-sample", "nan-outside", "pos-inf",
                 "tiny-t", "masked-tiny-t", "huge", "empty-row"]  # fmt: skip


def _sample_case(case, dtype):
    """[6, 64] logits (sample: the first 4 columns) where rows 2–3 (the second chunk of two
    rows) defeat the sampled centres in the way ``case`` names; other rows are plain."""
    rng = _rng(11)
    a, b = rng.normal(size=(2, 6, 64)) * 2
    where, t = None, 1.0
    if case == "gap":  # e^{1000} overflows float64 as well
        a[2, 40], b[3, 50] = 1000.0, 1000.0
    elif case == "big-sum":  # a finite Σexp above 1/tiny: 1/Σexp would be subnormal (→ 0)
        gap = 87.0 if dtype == jnp.float32 else 708.5
        a[2, 40:42] = a[2, :4].max() + gap
        b[3, 50:52] = b[3, :4].max() + gap
    elif case == "masked-sample":  # no live entry in the sample: centred on 0, far above the row
        where = np.ones(a.shape, bool)
        where[2, :4] = False
        a[2, :4] = np.nan  # garbage under the mask
        a[2] -= 60.0
    elif case == "neg-inf-sample":
        b[3, :4] = -np.inf
        b[3] -= 60.0
    elif case == "nan-outside":
        a[2, 30] = np.nan
    elif case == "pos-inf":
        b[3, 20] = np.inf
    elif case == "tiny-t":
        t = 1e-4
    elif case == "masked-tiny-t":  # the fallback's row maxima must skip the masked garbage too
        where = np.ones(a.shape, bool)
        where[:, 20:24] = False
        a[:, 20:24], b[:, 20:24] = np.nan, np.inf
        t = 1e-3
    elif case == "huge":
        a[2:4] = rng.uniform(-3e38, 3e38, size=(2, 64))
        b[2:4] = rng.uniform(-3e38, 3e38, size=(2, 64))
    elif case == "empty-row":
        a[2], b[2] = -np.inf, -np.inf
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype), where, t


# Compiled once per (dtype, mask or none, temperature) and shared by the cases below.
@functools.partial(jax.jit, static_argnames=("dtype", "t"))
def _sampled_stats(a, b, w, dtype, t):
    return chunked._chunk_kl(a, b, w, dtype, t, (None, None), 4)


@functools.partial(jax.jit, static_argnames=("t", "chunk"))
def _chunked_rows(a, b, w, t, chunk):
    return chunked.kl_logits_chunked(a, b, where=w, temperature=t, chunk_size=chunk)


@functools.partial(jax.jit, static_argnames=("impl", "t"))
def _weighted_value_and_grads(a, b, w, impl, t):
    def f(x, y):
        kl = kldiv.kl_from_logits(x, y, where=w, temperature=t, impl=impl)
        return jnp.sum(jnp.where(jnp.isfinite(kl), kl, 0.0) * jnp.arange(1, 7))

    return jax.value_and_grad(f, (0, 1))(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("case", _SAMPLE_CASES)
def test_chunks_that_defeat_sampled_centres_fall_back_to_xla_semantics(case, dtype):
    a, b, where, t = _sample_case(case, dtype)
    assert chunked.centre_columns(a.shape[1]) == 4
    # The sampled statistics of rows 2–3 are rejected (the fallback runs); those of rows 0–1,
    # where the sample is ordinary, are kept (the test exercises both branches of the loop).
    w = None if where is None else jnp.asarray(where)
    tiny_t = case.endswith("tiny-t")
    for rows, accepted in ((slice(0, 2), not tiny_t), (slice(2, 4), False)):
        stats = _sampled_stats(a[rows], b[rows], None if w is None else w[rows], dtype, t)
        assert bool(chunked._accepted(stats[1], stats[2])) == accepted, rows

    want_rows = kldiv.kl_from_logits(a, b, where=w, temperature=t, impl="xla")
    rtol = 2e-5 if dtype == jnp.float32 else 1e-12
    for chunk in (2, 3, None):  # chunks of two rows; chunks across the edge; one chunk
        got_rows = _chunked_rows(a, b, w, t, chunk)
        np.testing.assert_allclose(got_rows, want_rows, rtol=rtol, atol=0)
    got = _weighted_value_and_grads(a, b, w, "chunked", t)
    want = _weighted_value_and_grads(a, b, w, "xla", t)
    np.testing.assert_allclose(got[0], want[0], rtol=rtol)
    for g1, g2 in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g1, g2, rtol=rtol, atol=rtol * 1e-3)


# ---------------------------------------------------------------------------------------------
# Storage dtypes, masks and temperatures applied inside the fused paths (per chunk / block).


def _xla_value_and_grads(a, b, weights, **kw):
    return _value_and_grads(
        lambda x, y: kldiv.kl_from_logits(x, y, impl="xla", **kw), a, b, weights
    )


def _assert_output_rounding_close(got, want):
    """Equal up to float32 rounding (both computed in float32, in different orders) and one
    rounding to the output dtype (both cast at the end)."""
    assert got.dtype == want.dtype
    eps_out = float(jnp.finfo(got.dtype).eps)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    f32_noise = 8 * float(jnp.finfo(jnp.float32).eps) * np.max(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=eps_out, atol=f32_noise)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize(
    "dtypes,t",
    [
        ((jnp.bfloat16, jnp.bfloat16), 2.5),
        ((jnp.float16, jnp.float16), 1.0),
        ((jnp.bfloat16, jnp.float32), 1.0),
    ],
    ids=["bf16-T2.5", "f16", "bf16-f32"],
)
def test_low_precision_inputs_match_xla(impl, dtypes, t, small_chunks):
    rng = _rng(6)
    a = jnp.asarray(rng.normal(size=(6, 37)) * 3, dtypes[0])
    b = jnp.asarray(rng.normal(size=(6, 37)) * 3, dtypes[1])
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=6), jnp.float32)
    val, grads = _value_and_grads(
        lambda x, y: kldiv.kl_from_logits(x, y, temperature=t, impl=impl), a, b, w
    )
    want_val, want_grads = _xla_value_and_grads(a, b, w, temperature=t)
    assert val.dtype == jnp.float32
    np.testing.assert_allclose(val, want_val, rtol=1e-6)
    for g, want, x in zip(grads, want_grads, (a, b), strict=True):
        assert g.dtype == x.dtype  # gradients in the inputs' dtypes
        _assert_output_rounding_close(g, want)
    # and against a float64 reference on the same (rounded) inputs
    a64, b64 = np.asarray(a, np.float64) / t, np.asarray(b, np.float64) / t
    kl, ref_ga, ref_gb = _ref_kl_and_grads(a64, b64)
    np.testing.assert_allclose(val, np.sum(kl * np.asarray(w, np.float64)), rtol=1e-5)
    for g, ref in zip(grads, (ref_ga, ref_gb), strict=True):
        ref = ref * np.asarray(w, np.float64)[:, None] / t
        scale = np.max(np.abs(ref))
        eps = float(jnp.finfo(g.dtype).eps)
        np.testing.assert_allclose(np.asarray(g, np.float64), ref, atol=4 * eps * scale)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_where_with_garbage_and_temperature_match_xla(impl, dtype, small_chunks):
    rng = _rng(7)
    n, v, t = 7, 40, 2.5
    a, b = rng.normal(size=(2, n, v)) * 3
    keep = rng.random((n, v)) > 0.3
    keep[2] = False  # a row with no entries left
    garbage = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=(2, n, v))
    a = jnp.asarray(np.where(keep, a, garbage[0]), dtype)
    b = jnp.asarray(np.where(keep, b, garbage[1]), dtype)
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=n), jnp.float32)
    kw = dict(where=keep, temperature=t)
    val, grads = _value_and_grads(lambda x, y: kldiv.kl_from_logits(x, y, impl=impl, **kw), a, b, w)
    want_val, want_grads = _xla_value_and_grads(a, b, w, **kw)
    assert np.isfinite(val)
    np.testing.assert_allclose(val, want_val, rtol=1e-6)
    for g, want in zip(grads, want_grads, strict=True):
        assert g.dtype == dtype
        _assert_output_rounding_close(g, want)
        assert np.all(np.asarray(g, np.float32)[~keep] == 0)
        assert np.all(np.isfinite(np.asarray(g, np.float32)))
    # independent reference: masked entries as −inf logits, float64
    a64 = np.where(keep, np.asarray(a, np.float64), -np.inf) / t
    b64 = np.where(keep, np.asarray(b, np.float64), -np.inf) / t
    kl, ref_ga, ref_gb = _ref_kl_and_grads(a64, b64)
    np.testing.assert_allclose(
        val, np.sum(np.nan_to_num(kl) * np.asarray(w, np.float64)), rtol=1e-5
    )
    # masked entries get exactly zero gradient even where the cotangent is NaN
    w_nan = w.at[0].set(jnp.nan)
    ga = jax.grad(lambda x: jnp.sum(kldiv.kl_from_logits(x, b, impl=impl, **kw) * w_nan))(a)
    assert np.all(np.asarray(ga, np.float32)[~keep] == 0)


def test_chunked_where_and_temperature_under_vmap_and_jit(small_chunks):
    rng = _rng(8)
    a, b = rng.normal(size=(2, 3, 5, 13))
    keep = rng.random((3, 5, 13)) > 0.3
    f = lambda x, y, m: kldiv.kl_from_logits(x, y, where=m, temperature=2.0, impl="chunked")  # noqa: E731
    want = kldiv.kl_from_logits(a, b, where=keep, temperature=2.0, impl="xla")
    np.testing.assert_allclose(f(a, b, keep), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(f)(a, b, keep), want, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f)(a, b, keep), want, rtol=1e-12)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_traced_temperature_gradient(impl, small_chunks):
    """An array temperature is applied before the custom VJP, so its gradient flows."""
    rng = _rng(9)
    a, b = rng.normal(size=(2, 4, 11)) * 2
    keep = rng.random((4, 11)) > 0.2
    w = rng.uniform(0.5, 2.0, size=4)

    def loss(x, y, t, impl):
        return jnp.sum(kldiv.kl_from_logits(x, y, where=keep, temperature=t, impl=impl) * w)

    t = jnp.asarray(2.5)
    got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(a, b, t, impl)
    want = jax.grad(loss, (0, 1, 2))(a, b, t, "xla")
    for g1, g2 in zip(got, want, strict=True):
        np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-14)
    h = 1e-6  # independent check of d/dT by central differences (float64)
    fd = (loss(a, b, t + h, "xla") - loss(a, b, t - h, "xla")) / (2 * h)
    np.testing.assert_allclose(got[2], fd, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Memory: O(N) residuals, temporaries independent of N.


def _optax_loss(a, b):
    lp, lq = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    return jnp.sum(optax.losses.kl_divergence_with_log_targets(lq, lp))


def _temp_bytes(f, n, v):
    x = jax.ShapeDtypeStruct((n, v), jnp.float32)
    grad = jax.jit(jax.value_and_grad(f, (0, 1)))
    return grad.lower(x, x).compile().memory_analysis().temp_size_in_bytes


def test_chunked_temporary_memory_is_small_and_flat_in_n():
    chunked_loss = lambda a, b: jnp.sum(kldiv.kl_from_logits(a, b, impl="chunked"))  # noqa: E731
    ours = _temp_bytes(chunked_loss, 512, 8192)
    peer = _temp_bytes(_optax_loss, 512, 8192)
    assert ours <= 0.1 * peer, (ours, peer)
    # Four times the rows: the composition's temporaries grow 4× (O(N·V)); ours grow only by the
    # per-row statistics, a few scalars per row (O(N)).
    ours_4n = _temp_bytes(chunked_loss, 2048, 8192)
    assert ours_4n - ours <= 64 * (2048 - 512), (ours, ours_4n)
    assert _temp_bytes(_optax_loss, 2048, 8192) >= 3.9 * peer


_OPTIMISED_PROGRAM = """
import json, re, jax, jax.numpy as jnp, kldiv
x = jax.ShapeDtypeStruct((256, 4096), jnp.bfloat16)
out = {}
for argnums in ((0, 1), (1,)):
    loss = lambda a, b: jnp.sum(kldiv.kl_from_logits(a, b, temperature=2.0, impl="chunked"))
    c = jax.jit(jax.value_and_grad(loss, argnums)).lower(x, x).compile()
    text = re.sub(r", metadata=\\{[^}]*\\}", "", c.as_text())
    out[str(argnums)] = [text, c.memory_analysis().temp_size_in_bytes]
print(json.dumps(out))
"""


def _optimised_program(opt_level: str | None) -> dict:
    env = child_env(opt_level)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile in both runs
    proc = subprocess.run(
        [sys.executable, "-c", _OPTIMISED_PROGRAM], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_optimised_hlo_does_not_depend_on_llvm_opt_level():
    """make test compiles at --xla_backend_optimization_level=0 (Makefile, OPT0): that level is
    LLVM's, after XLA's HLO passes, so the tested fusions, loops and buffers are those shipped."""
    default, level0 = _optimised_program(None), _optimised_program("0")
    for argnums in default:
        (text, temp), (text0, temp0) = default[argnums], level0[argnums]
        assert " while(" in text and temp > 0  # the chunk loop, compiled
        assert temp == temp0, (argnums, temp, temp0)
        assert text == text0, argnums


@pytest.mark.parametrize(
    *grid(  # every pair of settings; all 16 under -m slow
        {
            "dtype": [jnp.bfloat16, jnp.float32],
            "masked": [False, True],
            "softcap": [None, 30.0],
            "argnums": [(0, 1), (1,)],
        },
        cover=[
            ("dtype", "masked"),
            ("dtype", "softcap"),
            ("dtype", "argnums"),
            ("masked", "softcap"),
            ("masked", "argnums"),
            ("softcap", "argnums"),
        ],
    )
)
def test_chunked_makes_no_full_size_compute_dtype_copies(
    dtype, masked, softcap, argnums, monkeypatch
):
    """bf16 inputs, a mask, a temperature or a soft-cap add no [N, V] float32 temporaries
    (forward and backward): the cast, transform, division and mask happen per chunk."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 64 * 1024)
    n, v = 2048, 8192
    x = jax.ShapeDtypeStruct((n, v), dtype)
    mask = jax.ShapeDtypeStruct((n, v), jnp.bool_)
    t = 2.0 if masked else 1.0
    kw = {} if softcap is None else dict(softcap=softcap, logit_scale=0.5)

    def loss(a, b, m=None):
        return jnp.sum(kldiv.kl_from_logits(a, b, where=m, temperature=t, impl="chunked", **kw))

    args = (x, x, mask) if masked else (x, x)
    grad = jax.jit(jax.grad(loss, argnums))
    temp = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * n * v * 4, temp


# ---------------------------------------------------------------------------------------------
# Pallas kernel (interpret mode on CPU; small shapes, it is slow).


@pytest.mark.parametrize("n,v,block", [(3, 37, 16), (2, 16, 16), (4, 5, None)])
def test_pallas_interpret_matches_reference(n, v, block):
    rng = _rng(v)
    a, b = rng.normal(size=(2, n, v)) * 3
    a[0, :4] = -np.inf  # masked entries inside a block and a partial last block
    b[0, :4] = -np.inf
    w = rng.uniform(0.5, 2.0, size=n)
    val, (ga, gb) = _value_and_grads(
        lambda x, y: pallas.kl_logits_pallas(x, y, interpret=True, block=block), a, b, w
    )
    kl, ref_ga, ref_gb = _ref_kl_and_grads(a, b)
    np.testing.assert_allclose(val, np.sum(kl * w), rtol=1e-12)
    np.testing.assert_allclose(ga, np.nan_to_num(ref_ga) * w[:, None], atol=1e-13)
    np.testing.assert_allclose(gb, ref_gb * w[:, None], atol=1e-13)


@pytest.mark.parametrize("t", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("block", [16, 64])
def test_pallas_one_pass_forward_keeps_accuracy_across_blocks(t, block):
    """The forward merges per-block KLs by the chain rule (every term ≥ 0): float32 keeps its
    relative accuracy near p ≈ q over many blocks, and a first block unlike the rest (where the
    c̃-shifted form Σp·ω(d − c̃) − ω(c − c̃) would overflow: c̃ − c ≈ 100 > log(float32 max))
    gives the exact value, not NaN or inf."""
    rng = _rng(7)
    v = 300
    a = rng.normal(size=(4, v)) * 4
    b = a + 1e-3 * rng.normal(size=(4, v))  # p ≈ q: KL ~ 1e-7
    b[1] = a[1] + 3.0  # the same distribution: KL = 0 exactly in exact arithmetic
    uniform = np.zeros(v)
    shifted = np.zeros(v)
    shifted[:block] = -100.0  # the first block holds almost none of q's mass
    holey = rng.normal(size=v)
    holey_a = holey.copy()
    holey_a[16:80] = -np.inf  # whole blocks where p is empty and q is not
    a = np.concatenate([a, uniform[None], shifted[None], holey_a[None]])
    b = np.concatenate([b, shifted[None], uniform[None], holey[None]])
    a, b = (x.astype(np.float32).astype(np.float64) for x in (a, b))  # exact float32 inputs
    ref = _ref_kl_and_grads(a / t, b / t)[0]
    a32, b32 = (jnp.asarray(x, jnp.float32) for x in (a, b))
    with enable_x64(False):
        got = np.asarray(pallas.kl_logits_pallas(a32, b32, block=block, temperature=t))
        xla = np.asarray(kldiv.kl_from_logits(a32, b32, temperature=t))
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    rows = [0, 2, 3, 4, 5, 6]
    err, xla_err = (np.abs(x[rows] / ref[rows] - 1) for x in (got, xla))
    # float32's relative accuracy at every T (the log-ratios are formed before the division by
    # T, _numerics.centred_half_difference: before that, dividing each logit first cost the
    # two-pass XLA path up to ~7e-5 here at T ≠ 1); 9e-7 at most in a run at T = 0.5
    assert err.max() <= 3e-6 and xla_err.max() <= 3e-6, (err, xla_err)
    assert got[1] <= 1e-9


def test_pallas_block_size():
    assert pallas.block_size(5) == 16
    assert pallas.block_size(1000) == 1024
    assert pallas.block_size(151936) == pallas.MAX_BLOCK


def _lower_for_gpu(shape, dtype, masked, t):
    """StableHLO text of value_and_grad of the Pallas path lowered for a CUDA target, with the
    production index width (no x64): no GPU is needed to lower."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    m = jax.ShapeDtypeStruct(shape, jnp.bool_) if masked else None
    f = jax.value_and_grad(
        lambda a, b, m: jnp.sum(
            pallas.kl_logits_pallas(a, b, where=m, temperature=t, interpret=False)
        ),
        (0, 1),
    )
    with enable_x64(False):
        try:
            return jax.jit(f).trace(x, x, m).lower(lowering_platforms=("cuda",)).as_text()
        except (ImportError, RuntimeError) as e:  # jaxlib without Triton/CUDA lowering support
            pytest.skip(f"no Triton lowering available: {e}")


def _kernel_calls(text: str) -> list[str]:
    """The custom calls of the lowered module that carry one of our kernels (found by the
    kernel names in their payload, whatever the custom-call target is called)."""
    calls = re.findall(r"stablehlo\.custom_call @[^\n]*", text)
    return [c for c in calls if "fwd_kernel" in c or "bwd_kernel" in c]


@pytest.mark.parametrize("dtype,masked", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_pallas_lowers_for_gpu(dtype, masked):
    """The kernels lower for a CUDA target (compiling to machine code and running need a GPU
    and are `make gpu-check`'s job), also with bf16 inputs, a boolean mask and a temperature
    applied inside the kernels: one forward and one backward kernel."""
    calls = _kernel_calls(_lower_for_gpu((64, 5000), dtype, masked, 2.0 if masked else 1.0))
    assert len(calls) == 2
    assert sum("bwd_kernel" in c for c in calls) == 1


def test_pallas_operands_get_64_bit_offsets_at_large_sizes():
    """At [16384, 151936] (N·V ≥ 2^31) a one-byte mask would be indexed with wrapping 32-bit
    offsets; it is widened to two bytes, so that every operand exceeds 2^32 bytes and gets
    64-bit offsets. Lowered with the production index width (no x64)."""
    n, v = 16384, 151936
    assert pallas.wide_offsets_dtype(jnp.bool_, n * v) == jnp.int16
    assert pallas.wide_offsets_dtype(jnp.bool_, 1024 * v) == jnp.bool_
    assert pallas.wide_offsets_dtype(jnp.bfloat16, n * v) == jnp.bfloat16
    assert pallas.wide_offsets_dtype(jnp.float8_e4m3fn, n * v) == jnp.bfloat16
    text = _lower_for_gpu((n, v), jnp.bfloat16, True, 1.0)
    calls = _kernel_calls(text)
    assert len(calls) == 2
    for call in calls:
        operands = re.findall(r"tensor<(\d+)x(\d+)x(\w+)>", call)
        big = [(int(a) * int(b), t) for a, b, t in operands if int(a) * int(b) >= 2**31]
        assert big, call[:200]
        for size, t in big:
            itemsize = {"i1": 1, "i8": 1, "i16": 2, "bf16": 2, "f16": 2, "f32": 4}[t]
            assert size * itemsize > 2**32, (size, t)


# ---------------------------------------------------------------------------------------------
# Dispatch.


def test_auto_choice():
    big = (1024, 32768)
    # Only implementations verified on a backend are picked: the Pallas kernel has not passed
    # `make gpu-check` on GPU hardware, and the chunked path was measured on CPU only.
    assert discrete.choose_logits_impl(big, backend="gpu") == "xla"
    assert discrete.choose_logits_impl(big, backend="cuda") == "xla"
    assert discrete.choose_logits_impl(big, backend="cpu") == "chunked"
    assert discrete.choose_logits_impl(big, backend="tpu") == "xla"
    assert discrete.choose_logits_impl((4, 100), backend="cpu") == "xla"
    assert discrete.choose_logits_impl((0, 100), backend="gpu") == "xla"
    n = discrete.AUTO_CHUNKED_MIN_ELEMENTS
    assert discrete.choose_logits_impl((n // 8, 8), backend="cpu") == "chunked"
    assert discrete.choose_logits_impl((n // 8 - 1, 8), backend="cpu") == "xla"


def test_unknown_impl_and_empty_inputs():
    with pytest.raises(ValueError, match="impl"):
        kldiv.kl_from_logits(np.zeros(3), np.zeros(3), impl="triton")
    for impl in ("chunked", "pallas"):
        out = kldiv.kl_from_logits(np.zeros((0, 4)), np.zeros((0, 4)), impl=impl)
        assert out.shape == (0,)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_frozen_teacher_costs_no_teacher_gradient(impl):
    """Distillation differentiates the student only: the backward pass then computes and
    writes one [N, V] gradient, not two (custom VJP with symbolic zeros)."""
    n, v = 8, 300
    a, b = (jnp.asarray(_rng(s).normal(size=(n, v)), jnp.float32) for s in (1, 2))

    def f(x, y):
        return jnp.sum(kldiv.kl_from_logits(x, y, temperature=2.0, impl=impl))

    def big_outputs(argnums):
        jaxpr = jax.make_jaxpr(jax.grad(f, argnums))(a, b).jaxpr
        if impl == "pallas":
            calls = [e for e in _eqns(jaxpr) if e.primitive.name == "pallas_call"]
            return sum(o.aval.shape == (n, v) for e in calls for o in e.outvars)
        return sum(e.primitive.name == "exp" and e.outvars[0].aval.shape == (n, v)
                   for e in _eqns(jaxpr))  # fmt: skip

    assert big_outputs(1) < big_outputs((0, 1))
    if impl == "pallas":
        assert big_outputs(1) == 1 and big_outputs((0, 1)) == 2
    # both gradients from the paths' own statistics agree with the XLA path's to float32
    # rounding (the student-only chunked gradient is formed in the forward pass, on row maxima)
    xla = functools.partial(kldiv.kl_from_logits, temperature=2.0, impl="xla")
    want = jax.grad(lambda x, y: jnp.sum(xla(x, y)), 1)(a, b)
    atol = 8 * float(jnp.finfo(jnp.float32).eps) * float(jnp.max(jnp.abs(want)))
    for got in (jax.grad(f, 1)(a, b), jax.grad(f, (0, 1))(a, b)[1]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("value", [False, True], ids=["grad", "value_and_grad"])
def test_unit_cotangent_leaves_no_pass_after_the_forward(value):
    """The student gradient formed in the forward pass is the result itself when each row's
    cotangent is 1 (a sum of the rows, the seed of ``value_and_grad``): no ``[N, V]`` operation
    follows the chunk loop. A mean keeps one pass, the scaling (the control)."""
    n, v = 64, 512
    x = jax.ShapeDtypeStruct((n, v), jnp.float32)

    def passes_after_loop(reduce):
        def loss(a, b):  # the chunk size given: a traced kl_from_logits may be cached
            return reduce(chunked.kl_logits_chunked(a, b, chunk_size=8))

        f = (jax.value_and_grad if value else jax.grad)(loss, argnums=1)
        text = jax.jit(f).lower(x, x).compile().as_text()
        entry = text[text.index("ENTRY") :].splitlines()
        loop = next(i for i, line in enumerate(entry) if " while(" in line)
        big = re.compile(rf"= f32\[{n},{v}\]\S* fusion\(")
        return sum(bool(big.search(line)) for line in entry[loop + 1 :])

    assert passes_after_loop(jnp.sum) == 0
    assert passes_after_loop(jnp.mean) == 1


def test_float16_gradients_beyond_its_range_are_inf_on_every_path():
    """float16 logits at a tiny temperature: gradients whose float32 value exceeds 65504
    overflow to ±inf in the cast to float16, as autodiff through the XLA path gives them (and as
    dynamic loss scaling expects to find them); the same entries on every path, for both
    gradients and for the student's alone, and finite where the float32 gradient fits."""
    a = np.array([[0.0, 5.0, 10.0, 2.0], [1.0, 0.5, 0.0, -1.0]])
    b = np.array([[10.0, 5.0, 0.0, 1.0], [0.9, 0.6, 0.1, -1.2]])
    t = 1e-5

    def grads(impl, dtype, argnums):
        x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        f = lambda x, y: jnp.sum(kldiv.kl_from_logits(x, y, temperature=t, impl=impl))  # noqa: E731
        g = jax.grad(f, argnums)(x, y)
        return [np.asarray(gi, np.float64) for gi in (g if isinstance(g, tuple) else (g,))]

    with enable_x64(False):
        wide = grads("xla", jnp.float32, (0, 1))
        too_big = [np.abs(g) > 65504 for g in wide]
        assert any(m.any() for m in too_big) and not all(m.all() for m in too_big)
        for impl in ("xla", "chunked", "pallas"):
            for argnums, want in (((0, 1), too_big), (1, too_big[1:])):
                got = grads(impl, jnp.float16, argnums)
                for g, m, w in zip(got, want, wide[-len(want) :], strict=True):
                    np.testing.assert_array_equal(np.isinf(g), m, err_msg=impl)
                    np.testing.assert_allclose(g[~m], w[~m], rtol=2e-3, atol=1e-3 * 65504)


_FORMED_FORWARD_CASES = {
    "plain": {},
    "masked-garbage": {"where": True},
    "temperature": {"temperature": 0.3},
    "softcap-scale": {"softcap": (4.0, 6.0), "logit_scale": (1.5, 0.5)},
    "bf16-other": {"other_dtype": jnp.bfloat16},
}


@pytest.mark.parametrize("wrt", [0, 1, (0, 1)])
@pytest.mark.parametrize("case", list(_FORMED_FORWARD_CASES))
def test_formed_forward_and_recomputed_gradients_equal_xla(case, wrt, small_chunks):
    """When one input is differentiated (and stored in the compute dtype), the chunked path
    forms its gradient in the forward pass and the backward pass scales it by the cotangent:
    the same values and gradients as the XLA path, also with a cotangent that is 0, negative,
    huge, infinite or NaN on a row (masked entries stay exactly 0), and under vmap. With both
    differentiated the recomputing backward runs: the same checks."""
    kw = dict(_FORMED_FORWARD_CASES[case])
    other_dtype = kw.pop("other_dtype", jnp.float32)
    n, v = 11, 257
    a, b = (_rng(s).normal(size=(n, v)) * 3 for s in (5, 6))
    where = None
    if kw.pop("where", False):
        where = _rng(7).random((n, v)) > 0.3
        where[:, 0] = True
        a[~where], b[~where] = np.nan, np.inf
        kw["where"] = jnp.asarray(where)
    x = [jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)]
    narrow = 1 if wrt == (0, 1) else 1 - wrt
    x[narrow] = x[narrow].astype(other_dtype)
    # per-row cotangents: |g| below and above 1, 0, negative; huge (gx·g overflows in places)
    # and +inf; NaN on the last row
    weights = jnp.asarray(np.r_[np.linspace(-2, 3, n - 3), 3e38, np.inf, np.nan], jnp.float32)

    def loss(impl):
        def f(*xy):
            kl = kldiv.kl_from_logits(*xy, impl=impl, **kw)
            return jnp.sum(jnp.where(weights == 0, 0.0, kl * weights))

        return jax.jit(jax.value_and_grad(f, wrt))

    (got_v, got), (want_v, want) = loss("chunked")(*x), loss("xla")(*x)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
    pairs = list(zip(got, want, strict=True)) if wrt == (0, 1) else [(got, want)]
    for got_g, want_g in pairs:
        assert got_g.dtype == want_g.dtype
        tol = 1e-5 if got_g.dtype == jnp.float32 else 1e-2
        scale = float(jnp.nanmax(jnp.abs(want_g[:-3])))
        np.testing.assert_allclose(
            np.asarray(got_g[:-3], np.float32),
            np.asarray(want_g[:-3], np.float32),
            rtol=tol,
            atol=tol / 10 * scale,
        )
        # huge and infinite cotangents: the chain rule's plain products, as autodiff through
        # the XLA path forms them: ±inf where a product overflows or the cotangent is
        # infinite, never a saturated value in their place
        big, want_big = np.asarray(got_g[-3:-1], np.float32), np.asarray(want_g[-3:-1], np.float32)
        assert np.all(np.isinf(want_big[1][want_big[1] != 0]))
        np.testing.assert_array_equal(np.isinf(big), np.isinf(want_big))
        np.testing.assert_array_equal(np.isnan(big), np.isnan(want_big))
        np.testing.assert_array_equal(np.sign(big), np.sign(want_big))
        fin = np.isfinite(want_big[0])
        atol = tol / 10 * float(np.max(np.abs(want_big[0][fin]), initial=0))
        np.testing.assert_allclose(big[0][fin], want_big[0][fin], rtol=tol, atol=atol)
        # the NaN cotangent of the last row propagates as on the XLA path (exactly 0 where
        # masked)
        np.testing.assert_array_equal(np.isnan(got_g[-1]), np.isnan(want_g[-1]))
        assert np.all(np.isnan(got_g[-1][where[-1]] if where is not None else got_g[-1]))
        if where is not None:
            assert np.all(np.asarray(got_g)[~where] == 0)
    # under vmap: the same gradients
    f = jax.vmap(lambda *xy: loss("chunked")(*xy)[1], in_axes=0)
    mapped = jax.tree.leaves(f(*(y[None] for y in x)))
    for m, got_g in zip(mapped, jax.tree.leaves(got), strict=True):
        m, got_g = np.asarray(m[0], np.float32), np.asarray(got_g, np.float32)
        # every row, the huge, infinite and NaN ones included (the same ±inf and NaN entries)
        atol = 1e-6 * np.max(np.abs(got_g[:-3][np.isfinite(got_g[:-3])]))
        np.testing.assert_allclose(m, got_g, rtol=1e-6, atol=atol)
