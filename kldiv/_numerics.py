"""Elementwise numerics shared by every divergence kernel (XLA, chunked, Pallas).

The central identity: with x = log(p/q),

    p·log(p/q) − p + q  =  p·ω(x),    ω(x) = x + expm1(−x) = Σ_{k≥2} (−x)^k / k!  ≥ 0.

Every term is non-negative, so a sum of them never cancels; summed over a normalised pair it is
KL(p‖q) exactly, because Σ(q − p) = 0. Near x = 0 (p ≈ q), ``x + expm1(-x)`` cancels to
second order, so ω is evaluated from its Taylor series there; elsewhere ``p·x − p + q`` is exact to
a few ulps. See Csiszár (1991) for this (generalised) form of the KL divergence.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__: list[str] = []

# kl_terms: |x| below this uses the series; above it p·x − p + q loses at most ~5 bits.
SERIES_THRESHOLD = 0.25
# omega / exp_excess: |x| below this uses the series (with the terms of _series_terms).
_OMEGA_SERIES_MAX = 1.0


def _series_terms(dtype, bound: float) -> int:
    """Terms of the series of ω(x)/x² that reach ``dtype``'s precision for |x| < ``bound``."""
    eps = float(jnp.finfo(dtype).eps)
    n = 1
    # The truncation error after n terms, relative to the sum (≥ 1/2·e^{-|x|}), is below
    # 2·bound^n/(n + 2)!·e^{bound}.
    while 2 * bound**n / math.factorial(n + 2) * math.exp(bound) > eps / 16:
        n += 1
    return n


def _omega_over_x2(x: jax.Array, bound: float) -> jax.Array:
    """ω(x)/x² = Σ_{j≥0} (−x)^j/(j+2)! by Horner, with enough terms for |x| < ``bound`` in x's
    dtype. The one series of ω: :func:`kl_terms` and :func:`omega` both use it."""
    n_terms = _series_terms(x.dtype, bound)
    coefs = [(-1.0) ** j / math.factorial(j + 2) for j in range(n_terms)]
    acc = jnp.full_like(x, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * x + c
    return acc


def saturate(g: jax.Array, *, nan_to_zero: bool = True) -> jax.Array:
    """Derivatives that are never ±inf: ±inf → ±finfo.max; NaN → 0 unless ``nan_to_zero=False``.

    Used where a value is +inf (support mismatch, overflow): its partial derivatives are infinite
    or undefined there (inf − inf), and a masked-out example must not turn them into 0·inf = NaN
    downstream. ``nan_to_zero=False`` keeps NaN where NaN comes from NaN input (propagation).
    """
    big = jnp.finfo(g.dtype).max
    g = jnp.clip(g, -big, big)
    return jnp.where(jnp.isnan(g), jnp.zeros_like(g), g) if nan_to_zero else g


@jax.custom_jvp
def omega(x: jax.Array) -> jax.Array:
    """ω(x) = x + expm1(−x) = e^{−x} − 1 + x ≥ 0, relatively accurate for every x.

    The one implementation of ω (and of e^r − 1 − r = ω(−r), :func:`exp_excess`). For |x| < 1 the
    Taylor series Σ_{k≥2} (−x)^k/k! (Horner, :func:`_omega_over_x2`, as many terms as the dtype
    needs); elsewhere (e^{−x} − 1) + x, which is within a few ulps there since ω(x) ≥ 0.36 for
    |x| ≥ 1 and needs only ``exp``. ω(±inf) = +inf; ω(x) = +inf where e^{−x} overflows (the
    correctly rounded value); NaN propagates. The derivative 1 − e^{−x} = −expm1(−x) is a closed
    form that saturates at −finfo.max instead of reaching −inf.
    """
    small = jnp.abs(x) < _OMEGA_SERIES_MAX  # NaN compares False and propagates through `direct`
    xs = jnp.where(small, x, jnp.zeros_like(x))
    series = xs * xs * _omega_over_x2(xs, _OMEGA_SERIES_MAX)
    xd = jnp.where(x == -jnp.inf, jnp.zeros_like(x), x)
    direct = jnp.where(x == -jnp.inf, jnp.inf, (jnp.exp(-xd) - 1) + xd)
    return jnp.where(small, series, direct)


@omega.defjvp
def _omega_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return omega(x), saturate(-jnp.expm1(-x), nan_to_zero=False) * dx


@jax.custom_jvp
def exp_excess(r: jax.Array) -> jax.Array:
    """e^r − 1 − r = ω(−r) ≥ 0 (:func:`omega`): exact 0 at r = 0, relatively accurate for every
    r; r = −∞ and r = +∞ give +∞. Its derivative is the closed form expm1(r)."""
    return omega(-r)


@exp_excess.defjvp
def _exp_excess_jvp(primals, tangents):
    (r,), (dr,) = primals, tangents
    return exp_excess(r), jnp.expm1(r) * dr


def kl_terms(p: jax.Array, q: jax.Array, x: jax.Array) -> jax.Array:
    """p·log(p/q) − p + q given x = log(p/q); exact edge semantics, never negative.

    p·ω(x) from the series of ω where |x| < ``SERIES_THRESHOLD``, else p·x − p + q (which uses
    q itself, exact, rather than p·e^{−x}). p = 0 gives q (so p = q = 0 gives 0 whatever x
    holds); p > 0 with q = 0 (x = +inf) gives +inf.
    """
    small = jnp.abs(x) < SERIES_THRESHOLD  # NaN compares False
    xs = jnp.where(small, x, jnp.zeros_like(x))
    series = p * (xs * xs) * _omega_over_x2(xs, SERIES_THRESHOLD)
    px = jnp.where(p > 0, p * jnp.where(p > 0, x, jnp.zeros_like(x)), jnp.zeros_like(p))
    direct = px - p + q
    return jnp.maximum(jnp.where(small, series, direct), 0)


def check_axis_name(axis_name) -> None:
    """ValueError naming ``axis_name`` unless each of its names is bound here (inside
    ``jax.shard_map``, ``pmap`` or ``vmap`` with that axis name); JAX's own error is a bare
    assertion."""
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    for name in names:
        try:
            jax.lax.axis_size(name)
        except Exception:  # NameError or AssertionError, depending on the JAX version
            raise ValueError(
                f"kldiv: `axis_name`={axis_name!r} names no mapped axis here; call it inside "
                f"jax.shard_map (or pmap/vmap) over an axis named {name!r}, or pass "
                "axis_name=None."
            ) from None


def psum(x: jax.Array, axis_name=None) -> jax.Array:
    """``jax.lax.psum`` over ``axis_name``, or ``x`` itself when it is None."""
    if axis_name is None:
        return x
    check_axis_name(axis_name)
    return jax.lax.psum(x, axis_name)


def varying_axes(x) -> frozenset:
    """The mapped axes over which ``x`` varies inside ``shard_map`` with ``check_vma=True``
    (empty outside it, and with ``check_vma=False``)."""
    if x is None:
        return frozenset()
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX ≥ 0.10
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # JAX 0.7–0.9


def _to_varying(x, axes: tuple):
    if hasattr(jax.lax, "pcast"):  # JAX ≥ 0.8
        return jax.lax.pcast(x, axes, to="varying")
    return jax.lax.pvary(x, axes)  # pyright: ignore[reportAttributeAccessIssue]  (JAX 0.7)


def match_vma(*xs, exclude: frozenset = frozenset()) -> tuple[Any, ...]:
    """The arrays made varying over the same mapped axes (inside ``shard_map``), None kept.

    A custom VJP's backward pass must return cotangents of the same type as the primal inputs;
    inside ``jax.shard_map`` (with its default ``check_vma=True``) a replicated input (a shared
    prior, a replicated LM-head weight) is *invariant* over the mapped axis while its cotangent,
    computed from sharded data, varies. Casting every input to the union of the inputs' varying
    axes before the custom VJP makes the types agree; the transpose of that cast sums the
    cotangent over the axis, which is exactly the gradient of a replicated input. Outside
    ``shard_map`` (or for arrays without a varying-axes type) it returns the inputs unchanged.

    ``exclude``: mapped axes that no array is made varying over (each keeps its own type there),
    e.g. the vocabulary axis of a head split over it, over which the hidden states stay
    replicated and their cotangent is summed explicitly.
    """
    vmas = [varying_axes(x) for x in xs]
    union = frozenset().union(*vmas) - frozenset(exclude)
    return tuple(
        x if x is None or union <= vma else _to_varying(x, tuple(sorted(union - vma)))
        for x, vma in zip(xs, vmas, strict=True)
    )


def axis_names(axis_name) -> tuple:
    """``axis_name`` (a name, a tuple of names or None) as a tuple of names."""
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, tuple) else (axis_name,)


def two_diff(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Error-free a − b = hi + lo (Knuth's TwoSum); lo = 0 where hi is not finite."""
    hi = a - b
    bb = hi - a
    lo = (a - (hi - bb)) + (-b - bb)
    return hi, jnp.where(jnp.isfinite(hi), lo, jnp.zeros_like(lo))


def safe_max(x: jax.Array, axis: int = -1, axis_name=None) -> jax.Array:
    """Row maximum with empty (all −inf) rows mapped to 0 so that x − max stays −inf, not NaN.

    With ``axis_name`` the maximum is taken across the shards of that mapped axis as well.
    """
    return _global_finite_max(jnp.max(x, axis=axis, keepdims=True, initial=-jnp.inf), axis_name)


def _global_finite_max(m: jax.Array, axis_name) -> jax.Array:
    """Local row maxima → across the shards of ``axis_name`` (when given), 0 where not finite."""
    if axis_name is not None:
        check_axis_name(axis_name)
        m = jax.lax.pmax(m, axis_name)
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def safe_max_pair(a: jax.Array, b: jax.Array, axis_name=None) -> tuple[jax.Array, jax.Array]:
    """``(safe_max(a), safe_max(b))`` of two arrays of one shape, in one variadic reduction.

    XLA emits one reduction per :func:`safe_max`, each a pass of its own over its input; one
    reduction of the pair reads both rows in a single pass, with the same values. The maxima
    are centres, never differentiated (every result is invariant to them), hence
    ``stop_gradient``; a variadic reduction has no derivative rule of its own.
    """
    a, b = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
    init = (jnp.array(-jnp.inf, a.dtype), jnp.array(-jnp.inf, b.dtype))

    def both_max(x, y):
        return jnp.maximum(x[0], y[0]), jnp.maximum(x[1], y[1])

    ma, mb = jax.lax.reduce((a, b), init, both_max, (a.ndim - 1,))
    return _global_finite_max(ma[..., None], axis_name), _global_finite_max(
        mb[..., None], axis_name
    )


def logits_stats(a: jax.Array, b: jax.Array, axis_name=None):
    """Per-row statistics of two logit rows along the last axis.

    Returns (ma, mb, sa, sb): row maxima (0 for empty rows) and Σ exp(· − max) (0 for empty rows,
    where every entry is −inf; :func:`logits_terms` reads that as "no support"). With
    ``axis_name`` the last axis is a shard of a vocabulary split over that mapped axis, and the
    statistics are global.
    """
    return logits_stats_and_exps(a, b, axis_name)[0]


def logits_stats_and_exps(a: jax.Array, b: jax.Array, axis_name=None):
    """``((ma, mb, sa, sb), (ea, eb))``: :func:`logits_stats` and the exponentials it summed,
    for :func:`logits_terms` on a chunk of rows (see :func:`exp_and_sum`)."""
    ma, mb = safe_max_pair(a, b, axis_name)
    (ea, sa), (eb, sb) = exp_and_sum(a, ma, axis_name), exp_and_sum(b, mb, axis_name)
    return (ma, mb, sa, sb), (ea, eb)


def sum_exp(x: jax.Array, m: jax.Array, axis_name=None) -> jax.Array:
    """Σ exp(x − m) along the last axis (kept), 0 for empty rows: the normaliser of
    :func:`logits_stats` given the row maxima ``m`` from :func:`safe_max`."""
    return exp_and_sum(x, m, axis_name)[1]


def exp_and_sum(
    x: jax.Array, m: jax.Array, axis_name=None, compensated: bool = False
) -> tuple[jax.Array, jax.Array]:
    """e^{x − m} and its row sum (:func:`sum_exp`), for callers that pass the exponentials on to
    :func:`logits_terms` (``exps=``) so that each is formed once.

    That pays where a row is in cache or in registers (a chunk of rows, a kernel's block): the
    chunked forward computes them once for the normaliser and the terms. On whole arrays it
    would keep an ``[N, V]`` array of them between the two passes, so the XLA path recomputes.

    ``compensated``: e^{x − m} formed from the error-free x − m = hi + lo (:func:`two_diff`) as
    e^{hi}·(1 + lo), for a centre ``m`` that may lie far below the row maximum. Rounding x − m
    costs e^{x − m} a relative error of up to eps·|x − m|/2: nothing about the row maximum (the
    entries that dominate the sum lie near it), but eps·15 for an entry 30 above the centre,
    which a large KL sees at first order in each p, and the gradients in log Σexp
    (:func:`recentre`).
    """
    if compensated:
        d, lo = two_diff(x, m)
        e = jnp.exp(d)
        e = e + e * lo
    else:
        e = jnp.exp(x - m)
    return e, psum(jnp.sum(e, axis=-1, keepdims=True), axis_name)


def two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Error-free a·b = p + e (Dekker's product, without a fused multiply-add), for finite
    operands whose product and splitting constant times each stay finite."""
    nmant = jnp.finfo(a.dtype).nmant
    split = jnp.asarray(2.0 ** ((nmant + 2) // 2) + 1, a.dtype)

    def halves(x):
        c = split * x
        hi = c - (c - x)
        return hi, x - hi

    p = a * b
    (ah, al), (bh, bl) = halves(a), halves(b)
    return p, (((ah * bh - p) + ah * bl) + al * bh) + al * bl


def tempered_exp_and_sum(x: jax.Array, c: jax.Array, temperature: float):
    """e^{(x − c)/T} and its row sum for raw logits ``x`` and raw centres ``c`` (cast, masked
    and transformed: ``_logits.temper_and_mask`` at T = 1), compensated for the roundings of
    x − c and of the division, like :func:`exp_and_sum` (``compensated=True``) at T = 1.

    ``_logits.temper_and_mask`` forms a = 2·fl(h/T) with h = fl(x/2 − c/2); the exact value is
    a + δ with δ = 2·((h − fl(a/2·T)) − err + lo)/T, lo the rounding of h (:func:`two_diff`),
    err that of the product (:func:`two_prod`). About a centre far below the row maximum (a
    sampled one) the rounding costs each exponential a relative error of eps·|x − c|/(2T),
    which e^a·(1 + δ) removes. Entries with |a| beyond 2^40 (their exponential is 0 or
    overflows anyway) and non-finite ones are left uncompensated.
    """
    hi, lo = two_diff(0.5 * x, 0.5 * c)
    t = jnp.asarray(temperature, x.dtype)
    ah = hi / t
    ok = jnp.abs(ah) < 2.0**40  # NaN and ±inf compare False
    ah_ok = jnp.where(ok, ah, jnp.zeros_like(ah))
    prod, err = two_prod(ah_ok, t)
    delta = 2 * (((jnp.where(ok, hi, 0) - prod) - err) + jnp.where(ok, lo, 0)) / t
    e = jnp.exp(2 * ah)
    e = e + e * jnp.where(ok, delta, jnp.zeros_like(delta))
    return e, jnp.sum(e, axis=-1, keepdims=True)


def recentre(m: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The same row statistics about the row's log-normaliser: (m', s') with s'·e^{m'} = s·e^m to
    a few ulp, m' = m + log s rounded, and s' within a few ulp of 1.

    :func:`logits_terms` forms log p = (x − m) − log s. About a centre far below the row maximum
    (s ≫ 1) both parts carry an absolute rounding error of about eps·log s, whatever log p is:
    the KL sees it only at second order (constants over a row cancel), its gradient
    p·(log(p/q) − KL) at first order, e.g. eps·30 on the gradient ≈ 0 of a one-hot row. About m'
    the dominant entries have x − m' ≈ log p, formed exactly (x and m' are close), and log s' is
    small and accurate, as about the row maximum. m' − m is split error-free (:func:`two_diff`),
    so that s' = s·e^{−(m' − m)} is formed from exponentials of exact arguments (in two halves
    where one e^{−(m' − m)} would be subnormal).

    Rows with s = 0 (no support) or a non-finite s or m are returned as they are.

    Examples:
      >>> import jax.numpy as jnp
      >>> from kldiv._numerics import recentre
      >>> m, s = recentre(jnp.array([2.0]), jnp.array([jnp.e**3]))
      >>> print(f"{float(m[0]):.4f} {float(s[0]):.4f}")
      5.0000 1.0000
    """
    ok = (s > 0) & jnp.isfinite(s) & jnp.isfinite(m)
    m_new = m + jnp.log(jnp.where(ok, s, jnp.ones_like(s)))
    ok = ok & jnp.isfinite(m_new)
    m_new = jnp.where(ok, m_new, m)
    hi, lo = two_diff(m_new, m)
    # one exponential where e^{−hi} is a normal number (hi ≤ log s < 64 for all but sums near
    # the dtype's maximum), two halves beyond
    direct = hi < 64
    one = jnp.exp(-jnp.where(direct, hi, jnp.zeros_like(hi)))
    half = jnp.exp(-0.5 * jnp.where(direct, jnp.zeros_like(hi), hi))
    scaled = jnp.where(direct, s * one, (s * half) * half)
    return m_new, jnp.where(ok, scaled * jnp.exp(-lo), s)


def log_ratio(p: jax.Array, q: jax.Array) -> jax.Array:
    """log(p/q) for p, q ≥ 0 (probabilities, densities, sums of exponentials), accurate as p/q → 1
    and far from it.

    log1p((p − q)/q) where p/q lies in [1/2, 3/2] (relative accuracy as p/q → 1, where
    log p − log q would cancel), else log p − log q (where 1 + (p − q)/q would lose the bits of a
    ratio far from 1: up to all of them for sums about different centres, e.g. p/q = e^{−36}).
    Edges: p = 0 < q gives −inf, q = 0 < p gives +inf, p = q = 0 gives NaN (callers decide what
    an empty pair means), q = +inf gives −inf for finite p; NaN propagates.
    """
    close = (q > 0) & jnp.isfinite(q) & (jnp.abs(p - q) <= 0.5 * q)
    q_near = jnp.where(close, q, jnp.ones_like(q))
    near = jnp.log1p(jnp.where(close, (p - q) / q_near, jnp.zeros_like(p)))
    p_safe = jnp.where(p == 0, jnp.ones_like(p), p)
    q_safe = jnp.where(q == 0, jnp.ones_like(q), q)
    far = jnp.log(p_safe) - jnp.log(q_safe)
    edge = jnp.where(p == 0, jnp.where(q == 0, jnp.nan, -jnp.inf), jnp.inf)
    far = jnp.where(((p == 0) | (q == 0)) & ~(jnp.isnan(p) | jnp.isnan(q)), edge, far)
    return jnp.where(close, near, far)


def centred_half_difference(xa, xb, ca, cb, temperature=None):
    """((xa − ca) − (xb − cb))/(2T) per entry: the halved log-ratio of the entries of
    softmax(xa/T) and softmax(xb/T) before the normalisers, with ``ca``, ``cb`` the rows'
    (raw) centres, for :func:`logits_terms` (``centred=``).

    Formed as ((xa − xb)/2 − (ca − cb)/2), each half-difference error-free (:func:`two_diff`:
    one per entry, one per row), and only then divided by T: dividing each logit first (the
    tempered logits) rounds each to eps·|x − c|/T independently, an absolute error in their
    difference that the KL of nearly equal distributions sees at first order
    (``tests/test_discrete.py::test_accuracy_near_equal_at_a_temperature``). Where the result is
    small against the offset ca − cb, the two high parts lie within a factor 2 of each other
    and their difference is exact (Sterbenz); elsewhere it is rounded once, relative to the
    result. The halves keep every step finite for finite logits up to ±finfo.max. At T = 1 it
    is the centred log-ratio that :func:`logits_terms` forms itself. ``temperature``: None or 1
    for none, a Python number, or an array broadcastable against the rows.
    """
    h, lo = two_diff(0.5 * xa, 0.5 * xb)
    ch, cl = two_diff(0.5 * ca, 0.5 * cb)
    d = (h - ch) + (lo - cl)
    if temperature is None or (isinstance(temperature, (int, float)) and temperature == 1):
        return d
    return d / jnp.asarray(temperature, d.dtype)


def logits_terms(a, b, ma, mb, sa, sb, exps=None, centred=None):
    """p, q and x/2 = log(p/q)/2 for logit rows given their statistics (:func:`logits_stats`).

    x is formed from the error-free centred logits, (a − ma) − (b − mb), minus
    log(sa/sb) (:func:`log_ratio`), so it keeps relative accuracy when p ≈ q whatever the
    logits' offset; all-row constants only shift x, which moves Σ p·ω(x) at second order. It is
    returned halved (every step scaled by the exact factor ½) so that it stays finite for finite
    logits up to ±3.4e38, whose gaps reach 6.8e38: use it through :func:`logit_kl_terms` and
    :func:`kl_logits_grads`, which form p·x as 2·(p·x/2).

    p = e^{a − ma}/sa (and q alike), which XLA compiles as e^{a − ma}·(1/sa): the caller's sums
    must lie in [1, 1/tiny] (or be 0), so that the reciprocal is a normal number (a subnormal one
    is flushed to zero on CPU); about the row maxima 1 ≤ sa ≤ V.

    Rows without support (sa = 0 or sb = 0: every entry −inf or masked) give probabilities 0. A
    row where p has no support also gets q = 0: it contributes 0 to every divergence and its
    gradients, exactly like a row whose entries are all masked.

    ``exps``: (e^{a − ma}, e^{b − mb}) from :func:`exp_and_sum`, or None to form them here (as
    e^{2·(a/2 − ma/2)}: an expression XLA does not merge with :func:`sum_exp`'s, so that whole
    arrays are not kept between the passes).

    ``centred``: for tempered logits (a = (x_a − c_a)/T), the halved centred log-ratio of the
    untempered ones, :func:`centred_half_difference` — (a − ma) − (b − mb) formed before the
    division, so that it keeps its relative accuracy at T ≠ 1; None: from ``a`` and ``b``.
    """
    sa1 = jnp.where(sa > 0, sa, jnp.ones_like(sa))
    sb1 = jnp.where(sb > 0, sb, jnp.ones_like(sb))
    half_log_norm_ratio = 0.5 * log_ratio(sa1, sb1)
    dh = centred_half_difference(a, b, ma, mb) if centred is None else centred
    xh = dh - half_log_norm_ratio
    # e^{a − ma} = e^{2·(a/2 − ma/2)} (a − ma ≤ 0 cannot overflow to a wrong value)
    if exps is None:
        exps = (jnp.exp(2 * (0.5 * a - 0.5 * ma)), jnp.exp(2 * (0.5 * b - 0.5 * mb)))
    ea, eb = exps
    p = ea / sa1
    q = jnp.where(sa > 0, eb / sb1, jnp.zeros_like(eb))
    return p, q, xh


def logit_kl_terms(p: jax.Array, q: jax.Array, xh: jax.Array) -> jax.Array:
    """:func:`kl_terms` given x/2 (from :func:`logits_terms`) instead of x: p·x − p + q with
    p·x = 2·(p·x/2), finite whenever the term is."""
    small = jnp.abs(xh) < 0.5 * SERIES_THRESHOLD  # NaN compares False
    xs = jnp.where(small, 2 * xh, jnp.zeros_like(xh))
    series = p * (xs * xs) * _omega_over_x2(xs, SERIES_THRESHOLD)
    px = 2 * (p * jnp.where(p > 0, xh, jnp.zeros_like(xh)))  # 0 where p = 0, whatever x is
    return jnp.maximum(jnp.where(small, series, px - p + q), 0)


# ---------------------------------------------------------------------------------------------
# Helpers for the fused paths (row chunks, vocabulary blocks): the same statistics, terms and
# gradients as above, split into pieces that can be merged across blocks of one row.


def kl_logits_grads(p, q, xh, kl):
    """Closed-form gradients of KL(softmax(a)‖softmax(b)) per entry, from :func:`logits_terms`
    (``xh`` = x/2).

    ∂KL/∂a = p·(x − KL) (0 where p = 0) and ∂KL/∂b = q − p, with ``kl`` the row's KL broadcast
    against the row (shape ``[..., 1]``). Never NaN for non-NaN input: where the row's KL is
    +inf the coefficients saturate (:func:`saturate`).
    """
    xs = jnp.where(p > 0, xh, jnp.zeros_like(xh))
    ga = jnp.where(p > 0, 2 * (p * xs) - p * kl, jnp.zeros_like(p))
    return saturate(ga), q - p


def _scaled(d, temperature: float):
    return d if temperature == 1 else d / temperature


def _block_weight(m, s, m_all, temperature: float):
    """log of a block's share s·e^{(m − m_all)/T} of Σexp about the merged maximum (−inf for an
    empty block), and the share itself."""
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, jnp.zeros_like(m_all))
    empty = (m == -jnp.inf) | (s <= 0)
    gap = _scaled(jnp.where(empty, m_safe, m) - m_safe, temperature)
    log_w = jnp.where(empty, -jnp.inf, gap + jnp.log(jnp.where(empty, 1.0, s)))
    return log_w, jnp.where(empty, jnp.zeros_like(s), s * jnp.exp(gap))


class BlockKL(NamedTuple):
    """Online state of KL(softmax(a/T)‖softmax(b/T)) over the blocks of one row seen so far.

    ``ma``, ``mb``: raw (untempered) maxima, −inf while empty; ``sa``, ``sb``: Σ exp((x − m)/T)
    about them; ``u``: log(sa/sb), kept with the relative accuracy of its own size (it is formed
    as log1p of the summed differences, not from ``sa`` and ``sb``); ``kl``: the KL of the two
    distributions restricted to (and renormalised over) those blocks (0 while p is empty).
    Created per block by :func:`block_kl`, merged with :func:`merge_block_kl`, whose identity is
    ``(−inf, 0, −inf, 0, 0, 0)``; :func:`finish_stats` turns the maxima and sums into the
    convention of :func:`logits_stats`.
    """

    ma: jax.Array
    sa: jax.Array
    mb: jax.Array
    sb: jax.Array
    u: jax.Array
    kl: jax.Array


def block_kl(a, b, ma, mb, ta, tb, centred=None) -> BlockKL:
    """The :class:`BlockKL` of one block of tempered, masked logit rows ``a``, ``b`` (as
    ``_logits.temper_and_mask`` gives them, centred on the block's raw maxima ``ma``, ``mb``,
    whose tempered values are ``ta``, ``tb``); the last axis is reduced (kept as size 1).

    The block's KL is that of every other path (:func:`logits_terms`, :func:`logit_kl_terms`);
    u = log(sa/sb) = log1p(Σ_{q>0} q·expm1(d) + Σ_{q=0} e^{a − ma}/sb), d the centred log-ratio
    of each entry, so that it has relative accuracy when p ≈ q (the merge needs the blocks' mass
    ratios to that accuracy). The second sum is the mass of p where q is 0 (−inf, or underflowed
    below the smallest normal number although p's entry did not: e.g. logits [100, 0] against
    [0, 100]), which q·e^d cannot carry; without it u was log1p(−1) = −inf there.
    """
    (ea, sa), (eb, sb) = exp_and_sum(a, ta), exp_and_sum(b, tb)
    p, q, xh = logits_terms(a, b, ta, tb, sa, sb, (ea, eb), centred)
    kl = jnp.sum(logit_kl_terms(p, q, xh), axis=-1, keepdims=True)
    sb1 = jnp.where(sb > 0, sb, jnp.ones_like(sb))
    dh = xh + 0.5 * log_ratio(jnp.where(sa > 0, sa, sb1), sb1)  # d/2, centred
    live = q > 0
    ratio = jnp.where(live, q * jnp.expm1(2 * jnp.where(live, dh, 0)), ea / sb1)
    rel = jnp.sum(ratio, -1, keepdims=True)
    u = jnp.where((sa > 0) & (sb > 0), jnp.log1p(rel), jnp.log(sa) - jnp.log(sb))
    m_a = jnp.where(sa > 0, ma, -jnp.inf)
    m_b = jnp.where(sb > 0, mb, -jnp.inf)
    return BlockKL(m_a, sa, m_b, sb, u, kl)


def merge_block_kl(x: BlockKL, y: BlockKL, temperature: float = 1.0) -> BlockKL:
    """The state of the union of two disjoint sets of blocks of one row (one-pass KL).

    The chain rule of the KL divergence over a partition: with π_i, ρ_i the masses of p and q
    on the parts,

        KL(p‖q) = π_1·KL_1 + π_2·KL_2 + KL([π_1, π_2] ‖ [ρ_1, ρ_2]),

    every term ≥ 0, so nothing cancels however the parts differ. The two-point KL needs the
    parts' log mass ratios x_i = log(π_i/ρ_i) to the accuracy of their own size (near p ≈ q
    they are tiny): y_i = log(A_i/B_i) − (m_a − m_b)/T from the parts' ``u`` and their maxima's
    gaps (error-free, :func:`two_diff`), u = log Σ ρ_i·e^{y_i} = log1p(Σ ρ_i·expm1(y_i)),
    x_i = y_i − u. Parts where p or q is empty take the plain log-masses. A part with π = 0 adds
    nothing (also where its own KL is +inf from an underflowed mass, as on the XLA path).
    """
    t = temperature
    ma, mb = jnp.maximum(x.ma, y.ma), jnp.maximum(x.mb, y.mb)
    la1, wa1 = _block_weight(x.ma, x.sa, ma, t)
    la2, wa2 = _block_weight(y.ma, y.sa, ma, t)
    lb1, wb1 = _block_weight(x.mb, x.sb, mb, t)
    lb2, wb2 = _block_weight(y.mb, y.sb, mb, t)
    sa, sb = wa1 + wa2, wb1 + wb2
    sa1 = jnp.where(sa > 0, sa, jnp.ones_like(sa))
    sb1 = jnp.where(sb > 0, sb, jnp.ones_like(sb))
    pi1, pi2, rho1, rho2 = wa1 / sa1, wa2 / sa1, wb1 / sb1, wb2 / sb1
    full = jnp.isfinite(la1) & jnp.isfinite(la2) & jnp.isfinite(lb1) & jnp.isfinite(lb2)

    def safe(m):
        return jnp.where(full, m, jnp.zeros_like(m))

    g_hi, g_lo = two_diff(safe(ma), safe(mb))

    def y_of(part: BlockKL):
        hi, lo = two_diff(safe(part.ma), safe(part.mb))
        return _scaled((hi - g_hi) + (lo - g_lo), t) + safe(part.u)

    y1, y2 = y_of(x), y_of(y)
    # expm1(y) must not overflow (ρ ≤ 1): beyond that the parts differ so much that the plain
    # log-masses below are accurate enough.
    full = full & (jnp.maximum(y1, y2) < math.log(jnp.finfo(y1.dtype).max) - 1)
    y1, y2 = safe(y1), safe(y2)
    u_acc = jnp.log1p(rho1 * jnp.expm1(y1) + rho2 * jnp.expm1(y2))
    # Accurate where all four masses are positive; a part empty in both p and q leaves the
    # other part's state as it is; otherwise (a support mismatch) from the log-masses.
    none1 = (x.sa <= 0) & (x.sb <= 0)
    none2 = (y.sa <= 0) & (y.sb <= 0)
    log_norm = jnp.log(sa1) - jnp.log(sb1)
    u = jnp.where(none1, y.u, jnp.where(none2, x.u, jnp.where(full, u_acc, log_norm)))
    # x = log(π/ρ); −inf where π = 0 (kl_terms then gives ρ, the mass q has there).
    x1 = jnp.where(full, y1 - u_acc, jnp.where(pi1 > 0, la1 - lb1 - log_norm, -jnp.inf))
    x2 = jnp.where(full, y2 - u_acc, jnp.where(pi2 > 0, la2 - lb2 - log_norm, -jnp.inf))
    x1, x2 = (jnp.where(none1 | none2, jnp.zeros_like(x1), xi) for xi in (x1, x2))
    two_point = kl_terms(pi1, rho1, x1) + kl_terms(pi2, rho2, x2)
    two_point = jnp.where(sb > 0, two_point, jnp.where(sa > 0, jnp.inf, 0.0))
    # p empty in both parts: 0 whatever q holds, as a row where p has no support on every path
    # (the terms above would give ρ₁ + ρ₂ = 1, the generalised divergence's Σq)
    two_point = jnp.where(sa == 0, jnp.zeros_like(two_point), two_point)

    def part(pi, kl):
        return jnp.where(pi > 0, pi * kl, jnp.where(jnp.isnan(kl), kl, jnp.zeros_like(kl)))

    kl = part(pi1, x.kl) + part(pi2, y.kl) + two_point
    return BlockKL(ma, sa, mb, sb, u, kl)


def finish_stats(m, s):
    """Raw merged (max, Σexp) → the (max, Σexp) convention of :func:`logits_stats`.

    Empty rows get max 0 and Σexp 0 (no support: :func:`logits_terms`).
    """
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)), s
