"""Discrete divergences around KL: reverse KL, Jeffreys, Jensen–Shannon, Rényi, α, f-divergences.

Every divergence comes in three input spaces, named like :func:`kldiv.kl`:

==========================================  ======================  ========================
function                                    inputs                  masked entries become
==========================================  ======================  ========================
``name(p, q)``                              probabilities           0
``name_from_log_probs(log_p, log_q)``       log-probabilities       −inf
``name_from_logits(logits_p, logits_q)``    softmax(logits / T)     −inf (in both softmaxes)
==========================================  ======================  ========================

Conventions shared by every function here (and by :mod:`kldiv.discrete`):

* Argument order is mathematical: ``D(p, q)`` is D(p‖q), p the reference/target (teacher), q
  the model (student). The event axis ``axis`` is summed over and removed; nothing reduces over
  examples (aggregate with :func:`kldiv.reduce`).
* ``where`` (boolean, broadcastable to the inputs) leaves entries out exactly as if the
  vocabulary excluded them: p = q = 0 (probabilities) or −inf (log-probabilities, logits, where
  they are also left out of both softmax normalisers). Whatever a masked entry holds (NaN, ±inf)
  touches neither the value nor the gradient. A row with no entries left gives 0.
* ``temperature`` (logits only) divides both logit arrays before the softmax, as in
  :func:`kldiv.kl_from_logits`; no T² factor is applied.
* Edges: an entry with p = q = 0 contributes 0; valid input never gives NaN; +inf comes out
  exactly where the divergence is infinite (e.g. KL-type terms with p > 0 = q).
* Gradients come from closed forms (``jax.custom_jvp``) and are finite wherever the value is
  (where the value is +inf they are 0, so masking such an example out later gives no NaN).
  With respect to log-probabilities and logits they are exact (the chain-rule factor p or q
  vanishes at the boundary). With respect to probabilities, a partial derivative that is
  infinite at a boundary entry (p = 0 or q = 0) while the value is finite is taken as 0, as in
  :func:`kldiv.kl`. The Rényi divergences use the centred gradient (components summing to zero
  along the simplex), which differs from the textbook partials by multiples of p or q, or by a
  constant: directions that any normalisation, e.g. a softmax, projects out.
* The formulas assume normalised inputs. Sums of non-negative terms (``kl_terms`` for KL-type
  terms) and log-ratios formed from error-free differences keep float32 accurate when p ≈ q,
  where textbook compositions cancel catastrophically.
* dtypes: bfloat16/float16 inputs are computed and returned in float32; float32 stays float32;
  float64 stays float64.

Parameters that select a formula (``beta``, ``alpha``, the f-generator) are static Python
numbers or callables, resolved at trace time.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kldiv import _checks, discrete
from kldiv._numerics import kl_terms, log_ratio_probs, logits_stats, logits_terms

__all__ = [
    "F_GENERATORS",
    "FGenerator",
    "alpha_divergence",
    "alpha_divergence_from_log_probs",
    "alpha_divergence_from_logits",
    "alpha_generator",
    "cross_entropy",
    "cross_entropy_from_log_probs",
    "cross_entropy_from_logits",
    "entropy",
    "entropy_from_log_probs",
    "entropy_from_logits",
    "f_divergence",
    "f_divergence_from_log_probs",
    "f_divergence_from_logits",
    "jeffreys",
    "jeffreys_from_log_probs",
    "jeffreys_from_logits",
    "js",
    "js_from_log_probs",
    "js_from_logits",
    "js_generator",
    "pearson_chi2",
    "pearson_chi2_from_log_probs",
    "pearson_chi2_from_logits",
    "renyi",
    "renyi_from_log_probs",
    "renyi_from_logits",
    "reverse_kl",
    "reverse_kl_from_log_probs",
    "reverse_kl_from_logits",
    "squared_hellinger",
    "squared_hellinger_from_log_probs",
    "squared_hellinger_from_logits",
    "total_variation",
    "total_variation_from_log_probs",
    "total_variation_from_logits",
]

_NEG_INF = -jnp.inf

# ---------------------------------------------------------------------------------------------
# A pair of distributions in one canonical form, whatever the input space.


class _Pair(NamedTuple):
    """Event axis last. p, q: probabilities; lp, lq: their logs (−inf at 0); d = log(p/q),
    accurate when p ≈ q, 0 where p = q = 0, ±inf at one-sided zeros; pmq = p − q, accurate."""

    p: jax.Array
    q: jax.Array
    lp: jax.Array
    lq: jax.Array
    d: jax.Array
    pmq: jax.Array


def _log(x):
    pos = x > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, x, 1)), _NEG_INF)


def _clean_ratio(d, lp, lq):
    # −inf − (−inf) is NaN; an entry absent from both distributions has ratio 1.
    return jnp.where((lp == _NEG_INF) & (lq == _NEG_INF), jnp.zeros_like(d), d)


def _diff_from_ratio(p, q, d):
    """p − q from p, q and d = log(p/q): −p·expm1(−d) if p ≥ q else q·expm1(d); no cancellation."""
    pos = d >= 0
    return jnp.where(
        pos, -p * jnp.expm1(-jnp.where(pos, d, 0)), q * jnp.expm1(jnp.where(pos, 0, d))
    )


def _pair_from_probs(p, q):
    lp, lq = _log(p), _log(q)
    return _Pair(p, q, lp, lq, _clean_ratio(log_ratio_probs(p, q), lp, lq), p - q)


def _pair_from_log_probs(lp, lq):
    p, q = jnp.exp(lp), jnp.exp(lq)
    d = _clean_ratio(lp - lq, lp, lq)
    return _Pair(p, q, lp, lq, d, _diff_from_ratio(p, q, d))


def _pair_from_logits(a, b):
    ma, mb, sa, sb = logits_stats(a, b)
    p, q, d = logits_terms(a, b, ma, mb, sa, sb)
    lp = (a - ma) - jnp.log(sa)
    lq = (b - mb) - jnp.log(sb)
    d = _clean_ratio(d, lp, lq)
    return _Pair(p, q, lp, lq, d, _diff_from_ratio(p, q, d))


# ---------------------------------------------------------------------------------------------
# Rules: the value along the last axis and its partial derivatives, from which one generic
# custom_jvp per input space is built.


class _Rule(NamedTuple):
    value: jax.Array  # per row
    gp: jax.Array  # ∂D/∂p_i (probability space; boundary convention in the module docstring)
    gq: jax.Array  # ∂D/∂q_i
    hp: jax.Array  # p_i ∂D/∂p_i = ∂D/∂log p_i
    hq: jax.Array  # q_i ∂D/∂q_i
    centred: bool = False  # Σ hp = Σ hq = 0 already: logits need no projection


class _Cores(NamedTuple):
    probs: Callable
    log_probs: Callable
    logits: Callable


def _make_cores(rule) -> _Cores:
    """custom_jvp cores for the three input spaces from one rule(pair, *params) -> _Rule."""

    def make(to_pair, tangent):
        @functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
        def core(x, y, params):
            return rule(to_pair(x, y), *params).value

        @core.defjvp
        def _jvp(params, primals, tangents):
            pair = to_pair(*primals)
            r = rule(pair, *params)
            return r.value, tangent(pair, r, *tangents)

        # One compiled kernel per shape: eager calls do not dispatch op by op; inside a user's
        # jit this is inlined.
        return jax.jit(core, static_argnums=(2,))

    # Coefficients are finite wherever the value is; where it is +inf they are set to 0, so that
    # an infinite example dropped downstream (e.g. by a mask) cannot turn 0·∞ into NaN gradients.
    def probs_tangent(pair, r, dp, dq):
        return jnp.sum(_zero_nonfinite(r.gp) * dp + _zero_nonfinite(r.gq) * dq, axis=-1)

    def log_probs_tangent(pair, r, dlp, dlq):
        return jnp.sum(_zero_nonfinite(r.hp) * dlp + _zero_nonfinite(r.hq) * dlq, axis=-1)

    def logits_tangent(pair, r, da, db):
        # d log p_i = da_i − Σ_j p_j da_j (softmax), so ∂D/∂a_i = hp_i − p_i Σ_j hp_j.
        ga, gb = r.hp, r.hq
        if not r.centred:
            ga = ga - pair.p * jnp.sum(ga, axis=-1, keepdims=True)
            gb = gb - pair.q * jnp.sum(gb, axis=-1, keepdims=True)
        return jnp.sum(_zero_nonfinite(ga) * da + _zero_nonfinite(gb) * db, axis=-1)

    return _Cores(
        make(_pair_from_probs, probs_tangent),
        make(_pair_from_log_probs, log_probs_tangent),
        make(_pair_from_logits, logits_tangent),
    )


def _zero_nonfinite(x):
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


# Jensen–Shannon ------------------------------------------------------------------------------


def _log_ratio_to_mixture(d, g: float):
    """log(p/m) with m = (1 − g)·p + g·q, from d = log(p/q), for 0 < g < 1.

    log(m/p) = log(1 − g + g·e^{−d}) is a logaddexp of log(1 − g) and log g − d; it is evaluated
    as log1p(g·expm1(−d)), exact to a few ulps when p ≈ q, and, once e^{−d} could overflow, as
    log g − d + log1p((1 − g)/g·e^{d}).
    """
    near = d > -30.0  # e^{30} is far from overflow in float32; NaN goes to the far branch.
    v_near = -jnp.log1p(g * jnp.expm1(-jnp.where(near, d, 0)))
    d_far = jnp.where(near, -31.0, d)
    v_far = d_far - math.log(g) - jnp.log1p((1 - g) / g * jnp.exp(d_far))
    return jnp.where(near, v_near, v_far)


def _js_rule(pair: _Pair, beta: float) -> _Rule:
    p, q, d = pair.p, pair.q, pair.d
    m = beta * p + (1 - beta) * q
    x1 = _log_ratio_to_mixture(d, 1 - beta)  # log(p/m)
    x2 = _log_ratio_to_mixture(-d, beta)  # log(q/m)
    terms = beta * kl_terms(p, m, x1) + (1 - beta) * kl_terms(q, m, x2)
    # ∂JSD/∂p = β log(p/m), ∂JSD/∂q = (1 − β) log(q/m) (the other terms cancel).
    gp = jnp.where(p > 0, beta * x1, 0)
    gq = jnp.where(q > 0, (1 - beta) * x2, 0)
    return _Rule(jnp.sum(terms, axis=-1), gp, gq, p * gp, q * gq)


# Total variation, squared Hellinger, Pearson χ² ---------------------------------------------


def _tv_rule(pair: _Pair) -> _Rule:
    g = 0.5 * jnp.sign(pair.pmq)
    value = 0.5 * jnp.sum(jnp.abs(pair.pmq), axis=-1)
    return _Rule(value, g, -g, pair.p * g, -pair.q * g)


def _hellinger_rule(pair: _Pair) -> _Rule:
    sp, sq = jnp.sqrt(pair.p), jnp.sqrt(pair.q)
    s = sp + sq
    r = jnp.where(s > 0, pair.pmq / jnp.where(s > 0, s, 1), 0)  # √p − √q without cancellation
    gp = jnp.where(sp > 0, 0.5 * r / jnp.where(sp > 0, sp, 1), 0)
    gq = jnp.where(sq > 0, -0.5 * r / jnp.where(sq > 0, sq, 1), 0)
    return _Rule(0.5 * jnp.sum(r * r, axis=-1), gp, gq, 0.5 * sp * r, -0.5 * sq * r)


def _chi2_rule(pair: _Pair) -> _Rule:
    p, q, d = pair.p, pair.q, pair.d
    t_m1 = jnp.expm1(d)  # p/q − 1: +inf where q = 0 < p, −1 where p = 0 < q, 0 where p = q = 0
    value = jnp.sum(pair.pmq * t_m1, axis=-1)  # (p − q)²/q: equal signs, never negative
    pos = p > 0
    p_t = jnp.where(pos, p * jnp.exp(jnp.where(pos, d, 0)), 0)  # p²/q
    hp = jnp.where(pos, 2 * p * t_m1, 0)
    return _Rule(value, 2 * t_m1, -jnp.expm1(2 * d), hp, q - p_t)


# Cross-entropy -------------------------------------------------------------------------------


def _ce_rule(pair: _Pair) -> _Rule:
    p, lq = pair.p, pair.lq
    pos = p > 0
    terms = jnp.where(pos, -p * jnp.where(pos, lq, 0), 0)  # p > 0 = q gives +inf
    gp = jnp.where(lq > _NEG_INF, -lq, jnp.where(pos, jnp.inf, 0))
    gq = jnp.where(pos, -jnp.exp(jnp.where(pos, pair.d, 0)), 0)  # −p/q
    return _Rule(jnp.sum(terms, axis=-1), gp, gq, terms, -p)


# α-divergence and Rényi ----------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _alpha_series(s: float, n_terms: int) -> tuple[float, ...]:
    """Coefficients c_k, k = 2…n_terms+1, of g_s(d) = [expm1(s·d) + s·expm1(−d)]/(s(s+1)).

    c_k = Σ_{j=0}^{k−2} s^j (−1)^{k−2−j} / k!; at s = 0 these are those of ω in ``kl_terms``.
    """
    return tuple(
        sum(s**j * (-1.0) ** (k - 2 - j) for j in range(k - 1)) / math.factorial(k)
        for k in range(2, n_terms + 2)
    )


def _geo_minus(base, c: float, d, t):
    """base·expm1(c·d) where base·e^{c·d} = e^t: direct while |c·d| < 1, else e^t − base."""
    mid = jnp.abs(c * d) < 1
    return jnp.where(mid, base * jnp.expm1(c * jnp.where(mid, d, 0)), jnp.exp(t) - base)


def _log_geo(pair: _Pair, s: float):
    """t = log(p^α q^{1−α}) = log p + (α − 1)·log(p/q), −inf off the support of p."""
    supp = pair.lp > _NEG_INF
    return supp, jnp.where(supp, pair.lp + s * jnp.where(supp, pair.d, 0), _NEG_INF)


def _alpha_terms(pair: _Pair, alpha: float, t):
    """Non-negative terms [p^α q^{1−α} − αp − (1−α)q] / (α(α−1)) of the α-divergence.

    Near p = q (|d|·max(1, |α−1|) < 1/4) p·g(d) is summed from its Taylor series; elsewhere the
    form ((p^α q^{1−α} − p)/(α−1) − (p − q))/α loses at most a few bits.
    """
    s = alpha - 1.0
    p, d = pair.p, pair.d
    n_terms = 8 if jnp.finfo(p.dtype).bits <= 32 else 13
    small = jnp.abs(d) < 0.25 / max(1.0, abs(s))
    ds = jnp.where(small, d, 0)
    coefs = _alpha_series(s, n_terms)
    acc = jnp.full_like(ds, coefs[-1])
    for c in reversed(coefs[:-1]):
        acc = acc * ds + c
    series = p * (ds * ds) * acc
    direct = (_geo_minus(p, s, d, t) / s - pair.pmq) / alpha
    return jnp.maximum(jnp.where(small, series, direct), 0)


def _alpha_rule(pair: _Pair, alpha: float) -> _Rule:
    s = alpha - 1.0
    p, q, d = pair.p, pair.q, pair.d
    _, t = _log_geo(pair, s)
    value = jnp.sum(_alpha_terms(pair, alpha, t), axis=-1)
    # ∂/∂p = expm1((α−1)d)/(α−1), ∂/∂q = −expm1(αd)/α; p·∂/∂p = (e^t − p)/(α−1), etc.
    gp = _zero_nonfinite(jnp.where(p > 0, jnp.expm1(s * d) / s, -1 / s if s > 0 else 0.0))
    gq = _zero_nonfinite(jnp.where(q > 0, -jnp.expm1(alpha * d) / alpha, 0.0))
    hp = _geo_minus(p, s, d, t) / s
    hq = -_geo_minus(q, alpha, d, t) / alpha
    return _Rule(value, gp, gq, hp, hq)


def _renyi_rule(pair: _Pair, alpha: float) -> _Rule:
    s = alpha - 1.0
    p, q, d = pair.p, pair.q, pair.d
    supp, t = _log_geo(pair, s)
    # L = log Σ p^α q^{1−α}: log1p(α(α−1)A) from the α-divergence A ≥ 0 when |L| ≤ ½ (p ≈ q,
    # where a logsumexp would lose every digit), else a logsumexp (accurate when |L| is not
    # small, and free of overflow for large α).
    l_lse = jax.nn.logsumexp(t, axis=-1)
    l_a = jnp.log1p(alpha * s * jnp.sum(_alpha_terms(pair, alpha, t), axis=-1))
    log_s = jnp.where(jnp.abs(l_a) <= 0.5, l_a, l_lse)
    empty = ~jnp.any(supp, axis=-1)
    value = jnp.where(empty, 0, log_s / s)
    # Centred gradients with w = p^α q^{1−α}/e^L: ∂D/∂log p = (α/s)(w − p), ∂D/∂log q = q − w.
    lk = jnp.where(jnp.isfinite(log_s), log_s, 0)[..., None]
    w = jnp.exp(t - lk)
    z = jnp.where(supp, s * d - lk, 0)  # log(w/p)
    mid = jnp.abs(z) < 1
    hp = alpha / s * jnp.where(mid, p * jnp.expm1(jnp.where(mid, z, 0)), w - p)
    gp = _zero_nonfinite(jnp.where(p > 0, alpha / s * jnp.expm1(z), 0))
    gq = _zero_nonfinite(jnp.where(q > 0, -jnp.expm1(alpha * d - lk), 0))
    keep = ~empty[..., None]
    return _Rule(
        value,
        jnp.where(keep, gp, 0),
        jnp.where(keep, gq, 0),
        jnp.where(keep, hp, 0),
        jnp.where(keep, q - w, 0),
        centred=True,
    )


def _renyi_inf_rule(pair: _Pair) -> _Rule:
    p, q = pair.p, pair.q
    supp = pair.lp > _NEG_INF
    d = jnp.where(supp, pair.d, _NEG_INF)
    top = jnp.max(d, axis=-1)
    empty = ~jnp.any(supp, axis=-1)
    keep = ~empty[..., None]
    at = supp & (d == top[..., None]) & keep
    # The subgradient at the maximising entries (ties share it).
    e = (at / jnp.maximum(jnp.sum(at, axis=-1, keepdims=True), 1)).astype(p.dtype)
    gp = _zero_nonfinite(jnp.where(p > 0, e / jnp.where(p > 0, p, 1) - 1, 0))
    gq = _zero_nonfinite(jnp.where(q > 0, 1 - e / jnp.where(q > 0, q, 1), 0))
    hp, hq = jnp.where(keep, e - p, 0), jnp.where(keep, q - e, 0)
    return _Rule(jnp.where(empty, 0, top), gp, gq, hp, hq, centred=True)


def _renyi_zero_rule(pair: _Pair) -> _Rule:
    q = pair.q
    supp = pair.lp > _NEG_INF
    q_in = jnp.sum(jnp.where(supp, q, 0), axis=-1)
    q_out = jnp.sum(jnp.where(supp, 0, q), axis=-1)
    empty = ~jnp.any(supp, axis=-1)
    pos = q_in > 0
    # −log Q(supp p) = log(1 + Q(outside)/Q(supp)) for normalised q; accurate if Q(outside) ≪ 1.
    ratio = q_out / jnp.where(pos, q_in, 1)
    value = jnp.where(empty, 0, jnp.where(pos, jnp.log1p(ratio), jnp.inf))
    total = q_in + q_out
    inv_total = jnp.where(total > 0, 1 / jnp.where(total > 0, total, 1), 0)[..., None]
    inv_in = jnp.where(pos, 1 / jnp.where(pos, q_in, 1), 0)[..., None]
    gq = jnp.where(empty[..., None], 0, inv_total - jnp.where(supp, inv_in, 0))
    zeros = jnp.zeros_like(q)
    return _Rule(value, zeros, gq, zeros, q * gq, centred=True)


# f-divergences -------------------------------------------------------------------------------


def _f_rule(pair: _Pair, f: Callable, slope: float) -> _Rule:
    p, q = pair.p, pair.q
    t = jnp.exp(pair.d)  # p/q: 0 where p = 0 < q, +inf where q = 0 < p (or beyond the range)
    ok = jnp.isfinite(t)
    up = ok & (t > 1)
    t_safe = jnp.where(ok, t, 1)
    ft, dft = jax.jvp(f, (t_safe,), (jnp.ones_like(t_safe),))
    # q·f(p/q) for t ≤ 1; p·f(t)/t for t > 1 (no 0·∞ when q underflows); p·f'(∞) at q = 0.
    pos_p, pos_q = p > 0, q > 0
    lo = jnp.where(pos_q, q * ft, 0)
    hi = jnp.where(pos_p, p * (ft / t_safe), 0)
    far = jnp.where(pos_p, p * slope, 0)
    terms = jnp.where(ok, jnp.where(up, hi, lo), far)
    gp = _zero_nonfinite(jnp.where(ok, dft, slope))
    gq = _zero_nonfinite(jnp.where(ok, ft - t_safe * dft, 0))
    hp = jnp.where(pos_p, p * gp, 0)
    hq_lo = jnp.where(pos_q, q * (ft - t_safe * dft), 0)
    hq_hi = jnp.where(pos_p, p * (ft / t_safe - dft), 0)
    hq = _zero_nonfinite(jnp.where(ok, jnp.where(up, hq_hi, hq_lo), 0))
    return _Rule(jnp.sum(terms, axis=-1), gp, gq, hp, hq)


_JS = _make_cores(_js_rule)
_TV = _make_cores(_tv_rule)
_HELLINGER = _make_cores(_hellinger_rule)
_CHI2 = _make_cores(_chi2_rule)
_CE = _make_cores(_ce_rule)
_ALPHA = _make_cores(_alpha_rule)
_RENYI = _make_cores(_renyi_rule)
_RENYI_INF = _make_cores(_renyi_inf_rule)
_RENYI_ZERO = _make_cores(_renyi_zero_rule)
_F = _make_cores(_f_rule)

# ---------------------------------------------------------------------------------------------
# Argument handling shared by the public functions.

_NAMES = {
    "probs": ("p", "q"),
    "log_probs": ("log_p", "log_q"),
    "logits": ("logits_p", "logits_q"),
}
_KL = {
    "probs": discrete.kl,
    "log_probs": discrete.kl_from_log_probs,
    "logits": discrete.kl_from_logits,
}


def _prepare(space: str, x, y, axis, where, temperature=1.0, names=None):
    """Checked, aligned (event axis last), masked (and tempered) inputs of one input space."""
    names = names or _NAMES[space]
    if space == "logits":
        for name, v in zip(names, (x, y), strict=True):
            _checks.check_floating(name, v)
        return discrete.prepare_logits(x, y, axis, where, temperature)
    x, y, where = discrete.prepare_pair(names[0], x, names[1], y, axis, where)
    if where is not None:
        fill = 0 if space == "probs" else _NEG_INF
        x, y = jnp.where(where, x, fill), jnp.where(where, y, fill)
    return x, y


def _static_real(name: str, value, lo: float, hi: float) -> float:
    """A Python number in [lo, hi] (it selects the formula at trace time)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"kldiv: `{name}` must be a Python number (it selects the formula at trace time); "
            f"got {type(value).__name__}."
        )
    value = float(value)
    if not lo <= value <= hi:
        raise ValueError(f"kldiv: `{name}` must be in [{lo}, {hi}]; got {value}.")
    return value


def _simple(cores: _Cores, space, x, y, axis, where, temperature, params=()):
    x, y = _prepare(space, x, y, axis, where, temperature)
    return getattr(cores, space)(x, y, params)


# ---------------------------------------------------------------------------------------------
# Reverse KL and Jeffreys (thin layers over kldiv.discrete).


def _reverse_kl(space, x, y, axis, where, temperature):
    x, y = _prepare(space, x, y, axis, where, temperature)
    return _KL[space](y, x)


def _jeffreys(space, x, y, axis, where, temperature):
    x, y = _prepare(space, x, y, axis, where, temperature)
    return _KL[space](x, y) + _KL[space](y, x)


def reverse_kl(
    p: jax.Array, q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Reverse KL, KL(q‖p) = Σ_v q_v log(q_v/p_v), from probabilities.

    ``reverse_kl(p, q) == kl(q, p)``: the arguments keep the library's order (p the target, q
    the model) and the divergence is taken the other way round, the mode-seeking direction of
    variational inference and "reverse-KL" distillation. Every semantic (edges, gradients,
    dtypes, ``where``) is that of :func:`kldiv.kl` with the roles swapped: q = 0 entries
    contribute 0; q > 0 where p = 0 gives +inf.

    Returns one value per example (``axis`` removed).

    References:
      Kullback & Leibler (1951); Minka (2005), "Divergence measures and message passing", for
      the mode-seeking behaviour.
    """
    return _reverse_kl("probs", p, q, axis, where, 1.0)


def reverse_kl_from_log_probs(
    log_p: jax.Array, log_q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """KL(q‖p) from log-probabilities: ``kl_from_log_probs(log_q, log_p)``; see reverse_kl."""
    return _reverse_kl("log_probs", log_p, log_q, axis, where, 1.0)


def reverse_kl_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """KL(softmax(logits_q/T) ‖ softmax(logits_p/T)), ``kl_from_logits(logits_q, logits_p)``.

    See :func:`reverse_kl` and :func:`kldiv.kl_from_logits` (accuracy, edges, temperature).
    """
    return _reverse_kl("logits", logits_p, logits_q, axis, where, temperature)


def jeffreys(
    p: jax.Array, q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Jeffreys divergence J(p, q) = KL(p‖q) + KL(q‖p) = Σ_v (p_v − q_v) log(p_v/q_v).

    Symmetric; +inf wherever the supports differ. Computed as two :func:`kldiv.kl` calls (each
    a sum of non-negative terms), so it inherits their accuracy, edges and gradients.

    References:
      Jeffreys (1946), "An invariant form for the prior probability in estimation problems",
      Proc. R. Soc. A 186.
    """
    return _jeffreys("probs", p, q, axis, where, 1.0)


def jeffreys_from_log_probs(
    log_p: jax.Array, log_q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Jeffreys divergence KL(p‖q) + KL(q‖p) from log-probabilities. See :func:`jeffreys`."""
    return _jeffreys("log_probs", log_p, log_q, axis, where, 1.0)


def jeffreys_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Jeffreys divergence of softmax(logits_p/T) and softmax(logits_q/T). See :func:`jeffreys`."""
    return _jeffreys("logits", logits_p, logits_q, axis, where, temperature)


# ---------------------------------------------------------------------------------------------
# Generalised Jensen–Shannon.


def _js(space, x, y, beta, axis, where, temperature):
    beta = _static_real("beta", beta, 0.0, 1.0)
    x, y = _prepare(space, x, y, axis, where, temperature)
    if beta in (0.0, 1.0):
        return jnp.zeros(x.shape[:-1], x.dtype)
    return getattr(_JS, space)(x, y, (beta,))


def js(
    p: jax.Array,
    q: jax.Array,
    beta: float = 0.5,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Generalised Jensen–Shannon divergence with mixture weight β, from probabilities.

        JSD_β(p‖q) = β·KL(p‖m) + (1 − β)·KL(q‖m),   m = β·p + (1 − β)·q.

    β = 0.5 is the standard JSD (symmetric, ≤ log 2; ``scipy.spatial.distance.jensenshannon``
    returns its square root). In general 0 ≤ JSD_β ≤ h(β) = −β log β − (1−β) log(1−β) and
    JSD_β(p‖q) = JSD_{1−β}(q‖p). As β → 0 or 1 the value goes to 0 continuously (like
    β·KL(p‖q) and (1 − β)·KL(q‖p)); it is exactly 0 at β ∈ {0, 1}, also where KL is infinite.
    JSD_β is finite for any supports (an entry with q = 0 < p contributes β·p·log(1/β)).

    Liger-Kernel's ``LigerJSD(beta)`` (and the generalised JSD of Agarwal et al. 2024, GKD)
    uses this formula with P = teacher = our ``p`` and Q = student = our ``q``, so
    ``js(p_teacher, q_student, beta)`` equals Liger's per-token loss for 0 < β < 1. At the end
    points Liger switches to forward KL(P‖Q) (β = 0) and reverse KL(Q‖P) (β = 1), which are
    the limits of JSD_β/β and JSD_β/(1 − β), not of JSD_β; use :func:`kldiv.kl` and
    :func:`reverse_kl` for those. Liger takes (student, teacher) log-probabilities and averages
    over non-ignored tokens; here the order is mathematical and nothing is averaged.

    Computed as β Σ kl_terms(p, m, log(p/m)) + (1 − β) Σ kl_terms(q, m, log(q/m)), every term
    non-negative, with log(p/m) = −log1p((1 − β)·expm1(−log(p/q))) formed from the accurate
    log-ratio: a logaddexp of log β and log(1 − β) − log(p/q), arranged not to cancel when
    p ≈ q. Gradients: ∂/∂p = β log(p/m), ∂/∂q = (1 − β) log(q/m).

    Args:
      p: target probabilities, shape ``[..., V, ...]``.
      q: model probabilities, broadcastable against ``p``.
      beta: mixture weight β ∈ [0, 1], a Python number.
      axis, where: see the module docstring.

    Returns:
      JSD_β per example (float32 for 16-bit inputs, else the input dtype).

    Raises:
      TypeError: non-floating inputs, a non-boolean ``where`` or a traced ``beta``.
      ValueError: shapes that do not broadcast, ``axis`` out of range, β outside [0, 1].

    References:
      Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory
      37(1) (weighted JS divergence, weights (β, 1 − β)); Agarwal et al. (2024), "On-policy
      distillation of language models" (generalised JSD for distillation).
    """
    return _js("probs", p, q, beta, axis, where, 1.0)


def js_from_log_probs(
    log_p: jax.Array,
    log_q: jax.Array,
    beta: float = 0.5,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Generalised Jensen–Shannon divergence JSD_β(p‖q) from log-probabilities. See :func:`js`.

    m is never formed from exp(log p) + exp(log q): log(p/m) comes from log p − log q.
    """
    return _js("log_probs", log_p, log_q, beta, axis, where, 1.0)


def js_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    beta: float = 0.5,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """JSD_β(softmax(logits_p/T) ‖ softmax(logits_q/T)). See :func:`js`.

    log(p/q) is formed from error-free centred logits (as in :func:`kldiv.kl_from_logits`) and
    log(p/m), log(q/m) from it in log space, so the result keeps float32 relative accuracy when
    p ≈ q, and finite logits of any size give finite values. Gradients:
    ∂/∂logits_p = β·p·(log(p/m) − Σ p log(p/m))/T, and likewise for q with 1 − β.
    """
    return _js("logits", logits_p, logits_q, beta, axis, where, temperature)


# ---------------------------------------------------------------------------------------------
# Total variation, squared Hellinger, Pearson χ².


def total_variation(
    p: jax.Array, q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Total variation distance TV(p, q) = ½ Σ_v |p_v − q_v| ∈ [0, 1], from probabilities.

    Symmetric; the f-divergence of f(t) = ½|t − 1|. Gradient: ∂/∂p = ½ sign(p − q) (0 where
    p = q). In the log spaces p − q is formed from the accurate log-ratio
    (−p·expm1(−log(p/q))), so small distances keep their relative accuracy.

    References:
      Tsybakov (2009), "Introduction to Nonparametric Estimation", Definition 2.4.
    """
    return _simple(_TV, "probs", p, q, axis, where, 1.0)


def total_variation_from_log_probs(
    log_p: jax.Array, log_q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Total variation ½ Σ |p − q| from log-probabilities. See :func:`total_variation`."""
    return _simple(_TV, "log_probs", log_p, log_q, axis, where, 1.0)


def total_variation_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Total variation of softmax(logits_p/T) and softmax(logits_q/T). See total_variation."""
    return _simple(_TV, "logits", logits_p, logits_q, axis, where, temperature)


def squared_hellinger(
    p: jax.Array, q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Squared Hellinger distance H²(p, q) = ½ Σ_v (√p_v − √q_v)² = 1 − Σ_v √(p_v q_v) ∈ [0, 1].

    The ½ convention (H² ≤ 1), the f-divergence of f(t) = ½(√t − 1)². Symmetric. Computed as
    ½ Σ ((p − q)/(√p + √q))², non-negative terms that keep float32 accuracy when p ≈ q (where
    1 − Σ √(pq) cancels). Gradient: ∂/∂p = ½(1 − √(q/p)), taken as 0 at p = 0.

    References:
      Hellinger (1909); Le Cam & Yang (2000), "Asymptotics in Statistics", for the ½ convention.
    """
    return _simple(_HELLINGER, "probs", p, q, axis, where, 1.0)


def squared_hellinger_from_log_probs(
    log_p: jax.Array, log_q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Squared Hellinger distance from log-probabilities. See :func:`squared_hellinger`."""
    return _simple(_HELLINGER, "log_probs", log_p, log_q, axis, where, 1.0)


def squared_hellinger_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Squared Hellinger distance of two softmax distributions. See :func:`squared_hellinger`."""
    return _simple(_HELLINGER, "logits", logits_p, logits_q, axis, where, temperature)


def pearson_chi2(
    p: jax.Array, q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Pearson χ² divergence χ²(p‖q) = Σ_v (p_v − q_v)²/q_v, from probabilities.

    Not symmetric (Neyman's χ² is ``pearson_chi2(q, p)``). An entry with q = 0 < p gives +inf;
    p = q = 0 contributes 0. Computed as Σ (p − q)·expm1(log(p/q)), non-negative term by term.
    Gradients: ∂/∂p = 2(p/q − 1), ∂/∂q = 1 − p²/q². log(1 + χ²) is the Rényi divergence D₂.

    References:
      Pearson (1900); Liese & Vajda (2006), "On divergences and informations in statistics and
      information theory", IEEE Trans. Inf. Theory 52(10).
    """
    return _simple(_CHI2, "probs", p, q, axis, where, 1.0)


def pearson_chi2_from_log_probs(
    log_p: jax.Array, log_q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Pearson χ²(p‖q) from log-probabilities. See :func:`pearson_chi2`."""
    return _simple(_CHI2, "log_probs", log_p, log_q, axis, where, 1.0)


def pearson_chi2_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Pearson χ² of softmax(logits_p/T) against softmax(logits_q/T). See :func:`pearson_chi2`."""
    return _simple(_CHI2, "logits", logits_p, logits_q, axis, where, temperature)


# ---------------------------------------------------------------------------------------------
# Rényi and α-divergences.


def _renyi(space, x, y, alpha, axis, where, temperature):
    alpha = _static_real("alpha", alpha, 0.0, math.inf)
    x, y = _prepare(space, x, y, axis, where, temperature)
    if alpha == 1.0:
        return _KL[space](x, y)
    if alpha == math.inf:
        return getattr(_RENYI_INF, space)(x, y, ())
    if alpha == 0.0:
        return getattr(_RENYI_ZERO, space)(x, y, ())
    return getattr(_RENYI, space)(x, y, (alpha,))


def renyi(
    p: jax.Array,
    q: jax.Array,
    alpha: float,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Rényi divergence of order α, from probabilities.

        D_α(p‖q) = 1/(α − 1) · log Σ_v p_v^α q_v^{1−α},    α ∈ (0, 1) ∪ (1, ∞),

    extended by continuity: D_1 = KL(p‖q) (computed by :func:`kldiv.kl`), D_0 = −log Q(supp p),
    D_∞ = log max_{v: p_v>0} p_v/q_v. D_α is non-decreasing in α; D_½ = −2 log(1 − H²)
    (Bhattacharyya), D_2 = log(1 + χ²(p‖q)).

    Computation: L = log Σ p^α q^{1−α} is log1p(α(α−1)·A_α), with A_α ≥ 0 the α-divergence (a
    sum of non-negative terms with a Taylor form near p = q, see :func:`alpha_divergence`),
    whenever |L| ≤ ½; otherwise a logsumexp of α log p + (1−α) log q. The first keeps float32
    relative accuracy when p ≈ q and as α → 1, where the value is continuous with KL
    (D_{1+s} = KL + s·Var_p[log(p/q)]/2 + O(s²)); the second is accurate for large divergences
    and does not overflow for large α. D_0 is computed as log(1 + Q(outside supp p)/Q(supp p)).

    Edges: α > 1 gives +inf where some q_v = 0 < p_v; α < 1 gives +inf only for disjoint
    supports. A row where p has no mass gives 0. Gradients are centred (module docstring):
    ∂D/∂log p = (α/(α−1))(w − p), ∂D/∂log q = q − w, with w = p^α q^{1−α}/Σ p^α q^{1−α}; at
    α = ∞ the subgradient at the maximising entries (ties share it); at α = 0 only q has one.

    Args:
      p: target probabilities, shape ``[..., V, ...]``.
      q: model probabilities, broadcastable against ``p``.
      alpha: the order, a Python number in [0, inf] (``math.inf`` allowed).
      axis, where: see the module docstring.

    Returns:
      D_α per example (float32 for 16-bit inputs, else the input dtype).

    Raises:
      TypeError: non-floating inputs, a non-boolean ``where`` or a traced ``alpha``.
      ValueError: shapes that do not broadcast, ``axis`` out of range, α < 0.

    References:
      Rényi (1961), "On measures of entropy and information", Proc. 4th Berkeley Symp.;
      van Erven & Harremoës (2014), "Rényi divergence and Kullback–Leibler divergence",
      IEEE Trans. Inf. Theory 60(7) (orders 0, 1, ∞ and monotonicity in α).
    """
    return _renyi("probs", p, q, alpha, axis, where, 1.0)


def renyi_from_log_probs(
    log_p: jax.Array,
    log_q: jax.Array,
    alpha: float,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Rényi divergence D_α(p‖q) from log-probabilities. See :func:`renyi`."""
    return _renyi("log_probs", log_p, log_q, alpha, axis, where, 1.0)


def renyi_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    alpha: float,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Rényi divergence D_α(softmax(logits_p/T) ‖ softmax(logits_q/T)). See :func:`renyi`.

    Gradients: ∂/∂logits_p = (α/(α−1))(w − p)/T, ∂/∂logits_q = (q − w)/T.
    """
    return _renyi("logits", logits_p, logits_q, alpha, axis, where, temperature)


def _alpha_div(space, x, y, alpha, axis, where, temperature):
    alpha = _static_real("alpha", alpha, 0.0, math.inf)
    if alpha == math.inf:
        raise ValueError("kldiv: the α-divergence needs a finite `alpha`; got inf.")
    x, y = _prepare(space, x, y, axis, where, temperature)
    if alpha == 1.0:
        return _KL[space](x, y)
    if alpha == 0.0:
        return _KL[space](y, x)
    return getattr(_ALPHA, space)(x, y, (alpha,))


def alpha_divergence(
    p: jax.Array,
    q: jax.Array,
    alpha: float,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Amari α-divergence, from probabilities.

        A_α(p‖q) = Σ_v [p_v^α q_v^{1−α} − α p_v − (1 − α) q_v] / (α(α − 1)),

    the f-divergence of f(t) = (t^α − αt − (1 − α))/(α(α − 1)), with non-negative terms:
    A_1 = KL(p‖q), A_0 = KL(q‖p) (both from :mod:`kldiv.discrete`), A_½ = 4·H², A_2 = χ²/2.
    For normalised inputs log1p(α(α−1)·A_α)/(α−1) is the Rényi divergence D_α.

    Each term is summed from a Taylor series near p = q and otherwise from
    ((p^α q^{1−α} − p)/(α−1) − (p − q))/α, which loses at most a few bits (more as α → 0,
    where the terms are differences of O(1/α) quantities; α = 0 itself is exact). Edges:
    q = 0 < p gives p/(1 − α) for α < 1 and +inf for α > 1; p = 0 < q gives q/α. Gradients:
    ∂/∂p = expm1((α−1)·log(p/q))/(α−1), ∂/∂q = −expm1(α·log(p/q))/α.

    Args:
      p: target probabilities, shape ``[..., V, ...]``.
      q: model probabilities, broadcastable against ``p``.
      alpha: a finite Python number ≥ 0.
      axis, where: see the module docstring.

    References:
      Amari (1985), "Differential-Geometrical Methods in Statistics"; Cichocki & Amari (2010),
      "Families of Alpha- Beta- and Gamma-Divergences", Entropy 12(6) (this parametrisation).
    """
    return _alpha_div("probs", p, q, alpha, axis, where, 1.0)


def alpha_divergence_from_log_probs(
    log_p: jax.Array,
    log_q: jax.Array,
    alpha: float,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Amari α-divergence A_α(p‖q) from log-probabilities. See :func:`alpha_divergence`."""
    return _alpha_div("log_probs", log_p, log_q, alpha, axis, where, 1.0)


def alpha_divergence_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    alpha: float,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Amari α-divergence of two softmax distributions. See :func:`alpha_divergence`."""
    return _alpha_div("logits", logits_p, logits_q, alpha, axis, where, temperature)


# ---------------------------------------------------------------------------------------------
# Cross-entropy and entropy.


def cross_entropy(
    p: jax.Array, q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Cross-entropy H(p, q) = −Σ_v p_v log q_v (nats), from probabilities.

    H(p, q) = H(p) + KL(p‖q). Entries with p = 0 contribute 0 (also where q = 0); p > 0 where
    q = 0 gives +inf. Gradients: ∂/∂p = −log q, ∂/∂q = −p/q (0 at p = 0). From logits, the
    gradient with respect to ``logits_q`` is the familiar (softmax(logits_q/T) − p)/T.

    Args:
      p: target probabilities (e.g. soft labels), shape ``[..., V, ...]``.
      q: model probabilities, broadcastable against ``p``.
      axis, where: see the module docstring.

    References:
      Cover & Thomas (2006), "Elements of Information Theory", 2nd ed., Ch. 2 and Sec. 5.4.
    """
    return _simple(_CE, "probs", p, q, axis, where, 1.0)


def cross_entropy_from_log_probs(
    log_p: jax.Array, log_q: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Cross-entropy −Σ p log q from log-probabilities. See :func:`cross_entropy`."""
    return _simple(_CE, "log_probs", log_p, log_q, axis, where, 1.0)


def cross_entropy_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Cross-entropy H(softmax(logits_p/T), softmax(logits_q/T)). See :func:`cross_entropy`.

    log q is formed from centred logits (never the log of an underflowed probability), so
    finite logits of any size give finite values.
    """
    return _simple(_CE, "logits", logits_p, logits_q, axis, where, temperature)


def _entropy(space, x, axis, where, temperature, name):
    x, y = _prepare(space, x, x, axis, where, temperature, names=(name, name))
    return getattr(_CE, space)(x, y, ())


def entropy(p: jax.Array, *, axis: int = -1, where: jax.Array | None = None) -> jax.Array:
    """Shannon entropy H(p) = −Σ_v p_v log p_v (nats), from probabilities.

    Entries with p = 0 contribute 0. Gradient: −log p − 1, taken as 0 at p = 0 (where it is
    +inf). ``entropy(p) == cross_entropy(p, p)``.

    References:
      Shannon (1948); Cover & Thomas (2006), "Elements of Information Theory", eq. (2.1).
    """
    return _entropy("probs", p, axis, where, 1.0, "p")


def entropy_from_log_probs(
    log_p: jax.Array, *, axis: int = -1, where: jax.Array | None = None
) -> jax.Array:
    """Shannon entropy −Σ p log p from log-probabilities (−inf contributes 0). See entropy."""
    return _entropy("log_probs", log_p, axis, where, 1.0, "log_p")


def entropy_from_logits(
    logits: jax.Array,
    *,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """Shannon entropy of softmax(logits/T). Gradient: −p·(log p + H)/T. See :func:`entropy`."""
    return _entropy("logits", logits, axis, where, temperature, "logits")


# ---------------------------------------------------------------------------------------------
# f-divergences.


class FGenerator(NamedTuple):
    """A convex generator f with f(1) = 0 and its slope at infinity f'(∞) = lim_{t→∞} f(t)/t.

    ``f`` must be elementwise, defined on t ∈ [0, ∞) (t = 0 as its limit, possibly +inf) and
    differentiable by JAX; ``slope_at_inf`` may be ``math.inf``.
    """

    name: str
    f: Callable[[jax.Array], jax.Array]
    slope_at_inf: float


def _xlogx(t):
    pos = t > 0
    return jnp.where(pos, t * jnp.log(jnp.where(pos, t, 1)), 0)


def _reverse_kl_f(t):
    return -_log(t)


def _tv_f(t):
    return 0.5 * jnp.abs(t - 1)


def _hellinger_f(t):
    return 0.5 * jnp.square(jnp.sqrt(t) - 1)


def _pearson_f(t):
    return jnp.square(t - 1)


def _neyman_f(t):
    return jnp.square(t - 1) / t


@functools.lru_cache(maxsize=64)  # the same generator object: compiled kernels are reused
def js_generator(beta: float = 0.5) -> FGenerator:
    """The generator of JSD_β: f(t) = β t log t − (βt + 1 − β) log(βt + 1 − β).

    f'(∞) = −β log β. ``f_divergence(p, q, js_generator(beta)) == js(p, q, beta)``.
    """
    beta = _static_real("beta", beta, 0.0, 1.0)

    def f(t):
        return beta * _xlogx(t) - _xlogx(beta * t + (1 - beta))

    slope = 0.0 if beta in (0.0, 1.0) else -beta * math.log(beta)
    return FGenerator(f"js(beta={beta})", f, slope)


@functools.lru_cache(maxsize=64)  # the same generator object: compiled kernels are reused
def alpha_generator(alpha: float) -> FGenerator:
    """The generator of the α-divergence: f(t) = (t^α − αt − (1 − α))/(α(α − 1)).

    f'(∞) = 1/(1 − α) for α < 1 and +inf for α ≥ 1; α = 1 gives t log t − t + 1 (KL) and
    α = 0 gives t − 1 − log t (reverse KL).
    ``f_divergence(p, q, alpha_generator(a)) == alpha_divergence(p, q, a)``.
    """
    alpha = _static_real("alpha", alpha, 0.0, math.inf)
    if alpha == math.inf:
        raise ValueError("kldiv: the α-generator needs a finite `alpha`; got inf.")
    if alpha == 1.0:
        return FGenerator("alpha(1.0)", lambda t: _xlogx(t) - t + 1, math.inf)
    if alpha == 0.0:
        return FGenerator("alpha(0.0)", lambda t: t - 1 - _log(t), 1.0)

    def f(t):
        return (jnp.power(t, alpha) - alpha * t - (1 - alpha)) / (alpha * (alpha - 1))

    return FGenerator(f"alpha({alpha})", f, math.inf if alpha > 1 else 1 / (1 - alpha))


F_GENERATORS: dict[str, FGenerator] = {
    "kl": FGenerator("kl", _xlogx, math.inf),
    "reverse_kl": FGenerator("reverse_kl", _reverse_kl_f, 0.0),
    "js": js_generator(0.5),
    "total_variation": FGenerator("total_variation", _tv_f, 0.5),
    "squared_hellinger": FGenerator("squared_hellinger", _hellinger_f, 0.5),
    "pearson_chi2": FGenerator("pearson_chi2", _pearson_f, math.inf),
    "neyman_chi2": FGenerator("neyman_chi2", _neyman_f, 1.0),
}
"""Standard f-generators by name (parametrised families: :func:`js_generator`,
:func:`alpha_generator`). For normalised inputs ``f_divergence(p, q, F_GENERATORS[k])`` is:
``kl``: KL(p‖q) (f = t log t); ``reverse_kl``: KL(q‖p) (f = −log t); ``js``: JSD, β = ½;
``total_variation``: ½ Σ|p − q|; ``squared_hellinger``: ½ Σ(√p − √q)²; ``pearson_chi2``:
Σ(p − q)²/q (f = (t − 1)²); ``neyman_chi2``: Σ(p − q)²/p (f = (t − 1)²/t)."""


def _f_div(space, x, y, f, f_inf_slope, axis, where, temperature):
    if isinstance(f, FGenerator):
        fn, slope = f.f, f.slope_at_inf
    elif callable(f):
        fn, slope = f, math.inf
    else:
        raise TypeError(f"kldiv: `f` must be an FGenerator or a callable; got {type(f).__name__}.")
    if f_inf_slope is not None:
        slope = f_inf_slope
    slope = _static_real("f_inf_slope", slope, -math.inf, math.inf)
    return _simple(_F, space, x, y, axis, where, temperature, (fn, slope))


def f_divergence(
    p: jax.Array,
    q: jax.Array,
    f: FGenerator | Callable[[jax.Array], jax.Array],
    *,
    f_inf_slope: float | None = None,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """Csiszár f-divergence D_f(p‖q) = Σ_v q_v f(p_v/q_v), from probabilities.

    ``f`` is a convex generator with f(1) = 0: an :class:`FGenerator` (see ``F_GENERATORS``,
    :func:`js_generator`, :func:`alpha_generator`) or an elementwise callable defined on
    [0, ∞) (f(0) as its limit, possibly +inf). Boundary conventions (Liese & Vajda 2006):
    0·f(0/0) = 0, and an entry with q = 0 < p contributes p·f'(∞), f'(∞) = lim_{t→∞} f(t)/t,
    taken from ``f_inf_slope`` if given, else from the generator's ``slope_at_inf``, else (plain
    callables) +inf, which is right for every superlinear f (KL, χ²).

    This is the generic reference: f is evaluated on t = p/q, as q·f(t) for t ≤ 1 and as
    p·f(t)/t for t > 1 (so an underflowed q is never multiplied by a huge f(t)); ratios beyond
    the dtype's range (t > 3e38 in float32) count as q = 0. The dedicated functions
    (:func:`js`, :func:`pearson_chi2`, ...) are more accurate near p = q. Gradients:
    ∂/∂p = f'(t), ∂/∂q = f(t) − t f'(t) (f' by ``jax.jvp``); non-finite values, such as
    f'(0) = −∞ for t log t, are taken as 0.

    Args:
      p: target probabilities, shape ``[..., V, ...]``.
      q: model probabilities, broadcastable against ``p``.
      f: the generator.
      f_inf_slope: lim_{t→∞} f(t)/t (``math.inf`` allowed); overrides the generator's.
      axis, where: see the module docstring.

    References:
      Csiszár (1967), "Information-type measures of difference of probability distributions",
      Studia Sci. Math. Hungar. 2; Ali & Silvey (1966), J. R. Stat. Soc. B 28; Liese & Vajda
      (2006), IEEE Trans. Inf. Theory 52(10), for the boundary conventions.
    """
    return _f_div("probs", p, q, f, f_inf_slope, axis, where, 1.0)


def f_divergence_from_log_probs(
    log_p: jax.Array,
    log_q: jax.Array,
    f: FGenerator | Callable[[jax.Array], jax.Array],
    *,
    f_inf_slope: float | None = None,
    axis: int = -1,
    where: jax.Array | None = None,
) -> jax.Array:
    """f-divergence Σ q f(p/q) from log-probabilities (t = e^{log p − log q}); see f_divergence."""
    return _f_div("log_probs", log_p, log_q, f, f_inf_slope, axis, where, 1.0)


def f_divergence_from_logits(
    logits_p: jax.Array,
    logits_q: jax.Array,
    f: FGenerator | Callable[[jax.Array], jax.Array],
    *,
    f_inf_slope: float | None = None,
    axis: int = -1,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """f-divergence of softmax(logits_p/T) from softmax(logits_q/T). See :func:`f_divergence`."""
    return _f_div("logits", logits_p, logits_q, f, f_inf_slope, axis, where, temperature)
