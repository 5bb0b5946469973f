"""One property suite over every implementation of ``kl_from_logits`` and every edge class.

Hypothesis draws logits (ordinary ranges and up to ±3e38), ``where`` masks, rows of −inf, NaN in
masked entries, 16-bit inputs, temperatures (Python numbers, tiny to huge, and traced arrays,
one per row) and logit transforms (``softcap``/``logit_scale``, numbers or (teacher, student)
pairs) and the rows' cotangents (1, or per row: 0, negative, above 1, NaN), and asserts for every
``impl`` (xla, chunked, pallas in interpret mode, in blocks of 16 entries so that rows span
several; auto too in the slow budget: at these shapes on CPU it is the XLA path):

* valid input never gives NaN, the value is ≥ 0, and the gradient is finite wherever the value
  is (and 0 at masked entries);
* every implementation equals the XLA path within a stated tolerance (values and gradients);
* on small float64 cases the gradient equals central finite differences.

The default budget runs in ``make test``; ``KLDIV_HYPOTHESIS_PROFILE=slow`` (``make test-slow``)
runs a larger one.
"""

from __future__ import annotations

import os

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _jax_compat import enable_x64
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import kldiv

settings.register_profile(
    "default",
    max_examples=5,
    deadline=None,
    derandomize=True,
    # No shrinking in the default budget: each example compiles every implementation.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "slow", max_examples=300, deadline=None, suppress_health_check=list(HealthCheck)
)
PROFILE = os.environ.get("KLDIV_HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)

# The Pallas kernel in blocks of 16 vocabulary entries (its smallest block), so that a row of 17
# spans two blocks and the suite checks its one-pass merge (kldiv._numerics.merge_block_kl), not
# only its single-block case: the default block covers any V ≤ 4096 in one.
PALLAS_BLOCK = 16


@pytest.fixture(autouse=True, scope="module")
def _small_pallas_blocks():
    from kldiv.fused import pallas

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pallas, "block_size", lambda v, max_block=PALLAS_BLOCK: PALLAS_BLOCK)
        yield


# "auto" runs one of the others (on CPU, at these shapes, the XLA path itself:
# tests/test_fused.py checks the choice); the default budget leaves it out, the slow one keeps it.
SLOW = PROFILE == "slow"
IMPLS = ("xla", "chunked", "pallas") + (("auto",) if SLOW else ())
# A few fixed shapes keep the number of compilations (Pallas interpret mode) bounded.
SHAPES = ((2, 5), (3, 17))
BIG = 3e38
COTANGENTS = [1.0, 0.0, -2.5, 0.5, 7.0, np.nan]


@st.composite
def cases(draw, big=False):
    shape = draw(st.sampled_from(SHAPES))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4] + ([1e37, BIG] if big else [])))
    elements = st.floats(-1.0, 1.0, allow_nan=False, width=64)
    a = draw(hnp.arrays(np.float64, shape, elements=elements)) * scale
    b = draw(hnp.arrays(np.float64, shape, elements=elements)) * scale
    where = draw(hnp.arrays(np.bool_, shape, elements=st.booleans()))
    where[:, 0] = True  # most rows keep something; some rows are emptied below
    if draw(st.booleans()):
        where[-1, :] = False  # an all-masked row
    # NaN and ±inf in masked entries must touch nothing.
    junk = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
    a = np.where(where, a, junk)
    b = np.where(where, b, -junk if np.isfinite(junk) else junk)
    if draw(st.booleans()):  # −inf logits in kept entries (zero probability), never a whole q row
        a[0, -1] = -np.inf
    if draw(st.booleans()):  # a q entry of zero probability where p may have mass (KL = +inf)
        b[0, -2] = -np.inf
    if draw(st.booleans()):  # a p row with no support (every logit −inf, nothing masked)
        a[-1, :] = -np.inf
    t = draw(st.sampled_from([1.0, 0.25, 3.0, 1e-3, 1e3]))
    dtype = draw(st.sampled_from([np.float32, np.float32, jnp.bfloat16, np.float16]))
    if dtype != np.float32 and scale > 1e4:  # 16-bit inputs: finite within their range
        dtype = np.float32
    # the rows' cotangent: 1 (a sum of the rows), or one per row (0, negative, NaN among them)
    cot = draw(
        st.one_of(
            st.just(np.ones(shape[0])),
            hnp.arrays(np.float64, shape[0], elements=st.sampled_from(COTANGENTS)),
        )
    )
    return a, b, where, t, dtype, cot


def _value_and_grads(impl, a, b, where, t, traced, cot, **kw):
    """Values, and the gradients for the rows' cotangent ``cot`` (a VJP)."""
    temp = jnp.full(a.shape[:-1], t, jnp.float32) if traced else t

    def grads(*argnums):
        def f(*xy):
            x, y = (xy[argnums.index(i)] if i in argnums else (a, b)[i] for i in (0, 1))
            return kldiv.kl_from_logits(x, y, where=where, temperature=temp, impl=impl, **kw)

        vals, pull = jax.vjp(f, *((a, b)[i] for i in argnums))
        return vals, pull(jnp.asarray(cot, vals.dtype))

    vals, gs = grads(0, 1)
    if impl in ("chunked", "pallas"):
        # the student's gradient alone too (a frozen teacher, the distillation case): the
        # chunked path forms it in its forward pass (kldiv/fused/chunked.py), same semantics
        gs = (*gs, *grads(1)[1])
    return np.asarray(vals, np.float64), [np.asarray(g, np.float64) for g in gs]


def _run(case, traced, impls=IMPLS, **kw):
    a, b, where, t, dtype, *cot = case
    cot = cot[0] if cot else np.ones(a.shape[0])
    with enable_x64(False):
        a_, b_ = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        results = {
            impl: _value_and_grads(impl, a_, b_, where, t, traced, cot, **kw) for impl in impls
        }
    return results, cot, np.dtype(dtype)


def _representable(a, b, where, t, grad_unit=1.0):
    """Rows whose every logit derivative is below float32's range: |∂KL/∂a_v| = p_v·|x_v −
    KL|/T with |x_v| ≤ (span of a + span of b)/T + log V and KL ≤ that, times the transforms'
    largest derivative. Logits near ±3e38 at T < 1 can give a representable KL whose gradient is
    not (±inf, the chain rule's overflowing product, on every path)."""
    kept = where & np.isfinite(a) & np.isfinite(b)

    def span(x):
        hi = np.max(np.where(kept, x, -np.inf), -1)
        lo = np.min(np.where(kept, x, np.inf), -1)
        return np.where(np.any(kept, -1), hi - lo, 0.0)

    with np.errstate(over="ignore", invalid="ignore"):
        x = (span(a) + span(b)) * grad_unit / t + np.log(a.shape[-1])
        return 2 * x / t * grad_unit < np.finfo(np.float32).max / 4


def _check(run, where, t, grad_unit=1.0, representable=None):
    """``grad_unit``: the largest factor by which a logit transform scales the gradient;
    ``representable``: rows whose gradients are within float32's range (default: all)."""
    results, cot, dtype = run
    ref_v, ref_g = results["xla"]
    for impl, (v, g) in results.items():
        assert not np.any(np.isnan(v)), (impl, v)
        assert np.all(v >= 0), (impl, v)
        finite_rows = np.isfinite(v) & np.isfinite(cot)
        bounded = finite_rows if representable is None else finite_rows & representable
        for gi in g:
            # float16 gradients beyond 65504 overflow to ±inf, as autodiff's cast of the
            # float32 gradient gives them (and as dynamic loss scaling expects to see them);
            # bfloat16 and float32 share float32's range
            if dtype != np.float16:
                assert np.all(np.isfinite(gi[bounded])), (impl, gi)
            assert np.all(gi[~where] == 0), impl
        # Every impl equals the XLA path: relative in value, relative to the row's gradient
        # scale in gradients (float32 arithmetic on differently ordered sums).
        both = np.isfinite(v) & np.isfinite(ref_v)
        np.testing.assert_array_equal(np.isinf(v), np.isinf(ref_v), err_msg=impl)
        np.testing.assert_allclose(v[both], ref_v[both], rtol=2e-4, atol=1e-5, err_msg=impl)
        for gi, ri in zip(g, ref_g + ref_g[1:] * (len(g) - len(ref_g)), strict=True):
            rows = finite_rows & np.isfinite(ref_v)
            # NaN exactly where the XLA path has it: a NaN cotangent reaches every kept entry
            np.testing.assert_array_equal(np.isnan(gi), np.isnan(ri), err_msg=impl)
            np.testing.assert_array_equal(np.isinf(gi[rows]), np.isinf(ri[rows]), err_msg=impl)
            gi, ri = (np.where(np.isinf(ri), 0.0, x) for x in (gi, ri))
            both_g = np.maximum(np.abs(ri[rows]), np.abs(gi[rows]))
            # Logit gradients are (q − p)/T and p·(x − KL)/T (times the transform's s): their
            # natural unit is s/T, and a row whose gradient cancels to ~0 (p one-hot) keeps a
            # float32 residue of a few eps·s·(1 + KL)/T (p·(x − KL) with x ≈ KL, x and KL each
            # rounded): the unit below lets each path's residue reach 1.7·eps·s·(1 + KL)/T, so
            # two paths may differ by twice that (the XLA path compiled at LLVM's level 0 and
            # the chunked path on a one-hot row: 6 and 4 eps·KL on opposite sides of the
            # float64 value, 2.1e-6 and 0.95e-6 against 1.45e-6).
            kl_row = np.where(both, ref_v, 0.0)[rows][:, None]
            unit = 2e-4 * max(1.0, 1.0 / t) * max(1.0, grad_unit) * (1.0 + kl_row)
            unit = unit * np.maximum(1.0, np.abs(cot[rows]))[:, None]
            scale = np.maximum(np.max(both_g, axis=-1, keepdims=True, initial=0), unit)
            np.testing.assert_allclose(
                gi[rows] / scale, ri[rows] / scale, rtol=0, atol=2e-3, err_msg=impl
            )


# A one-hot p that q also concentrates on (gradient ≈ 0), its maximum 27 above the maximum of its
# first column: the chunked path's sampled centre (the first V/16 columns: column 0) lies far
# below the row maximum, where rounded exponents x − centre and a rounded log Σexp would cost
# the gradient an absolute eps·27 (see kldiv/fused/chunked.py). The second row is ordinary.
_ONE_HOT = (
    np.array([[-10.17, -20.43, 16.55, -26.06, -27.8], [0.3, -1.2, 2.0, 0.5, -0.7]]),
    np.array([[-8.48, -2.68, 24.81, 5.63, -20.02], [1.1, 0.4, -0.9, 0.2, 1.5]]),
    np.ones((2, 5), bool),
    1.0,
    np.float32,
)


@given(cases())
@example(_ONE_HOT)
def test_every_impl_same_semantics_python_temperature(case):
    _check(_run(case, traced=False), case[2], case[3])


@given(cases())
def test_every_impl_same_semantics_traced_per_row_temperature(case):
    _check(_run(case, traced=True), case[2], case[3])


@given(cases(big=True))
def test_logits_up_to_float32_max_stay_finite(case):
    a, b, where, t, _, cot = case
    case = (np.clip(a, -BIG, BIG), np.clip(b, -BIG, BIG), where, t, np.float32, cot)
    _check(_run(case, traced=False), where, t, representable=_representable(*case[:4]))


# Soft-capped and scaled logits (softcap=, logit_scale=): the same semantics on every impl.
TRANSFORM_IMPLS = IMPLS
transforms = st.tuples(
    st.sampled_from([None, 30.0, 0.5, 1e4, (30.0, None), (None, 5.0)]),
    st.sampled_from([None, 0.1, 2.0, 1e3, (2.0, 0.5)]),
)


def _grad_unit(logit_scale):
    """The largest logit scale (the transforms' derivatives are at most s)."""
    values = logit_scale if isinstance(logit_scale, tuple) else (logit_scale,)
    return max([1.0] + [float(v) for v in values if v is not None])


@given(cases(), transforms, st.booleans())
def test_softcap_every_impl_same_semantics(case, transform, traced):
    softcap, logit_scale = transform
    kw = dict(softcap=softcap, logit_scale=logit_scale)
    _check(_run(case, traced, TRANSFORM_IMPLS, **kw), case[2], case[3], _grad_unit(logit_scale))


@given(cases(big=True), transforms)
def test_softcap_logits_up_to_float32_max_stay_finite(case, transform):
    a, b, where, t, _, cot = case
    case = (np.clip(a, -BIG, BIG), np.clip(b, -BIG, BIG), where, t, np.float32, cot)
    softcap, logit_scale = transform
    results = _run(case, False, TRANSFORM_IMPLS, softcap=softcap, logit_scale=logit_scale)
    unit = _grad_unit(logit_scale)
    _check(results, where, t, unit, _representable(*case[:4], unit))


@given(
    hnp.arrays(np.float64, (2, 4), elements=st.floats(-4, 4, width=64)),
    hnp.arrays(np.float64, (2, 4), elements=st.floats(-4, 4, width=64)),
    st.sampled_from([0.5, 1.0, 2.0]),
)
@settings(max_examples=4)
def test_gradients_match_float64_finite_differences(a, b, t):
    where = np.array([[True, True, False, True], [True, True, True, True]])
    weights = np.array([1.0, 2.0])
    eps = 1e-6
    # one perturbation of one entry per leading index: every difference quotient in one call
    steps = np.eye(a.size).reshape((a.size, *a.shape)) * eps
    stack = lambda x: np.broadcast_to(x, steps.shape)  # noqa: E731
    for impl in ("xla", "chunked", "pallas"):

        def kl(x, y, impl=impl):
            v = kldiv.kl_from_logits(x, y, where=stack(where)[: len(x)], temperature=t, impl=impl)
            return jnp.sum(v * weights, axis=-1)

        ga, gb = jax.grad(lambda x, y: kl(x[None], y[None])[0], argnums=(0, 1))(a, b)
        for which, g in ((0, ga), (1, gb)):
            plus, minus = [stack(a), stack(b)], [stack(a), stack(b)]
            plus[which] = plus[which] + steps
            minus[which] = minus[which] - steps
            fd = (np.asarray(kl(*plus)) - np.asarray(kl(*minus))) / (2 * eps)
            np.testing.assert_allclose(g, fd.reshape(a.shape), rtol=1e-6, atol=1e-8, err_msg=impl)


@pytest.mark.slow
def test_slow_profile_is_available():
    """``make test-slow`` sets KLDIV_HYPOTHESIS_PROFILE=slow for the properties above."""
    assert settings.get_profile("slow").max_examples >= 300
