"""The shared machinery of the divergence family: one canonical pair, rules, cores, arguments.

A pair of distributions is put in one canonical form (:class:`Pair`: probabilities, their logs, the
accurate log-ratio and difference) whatever the input space; each divergence is a *rule* (its value
along the last axis and its partial derivatives), from which :func:`make_cores` builds one
closed-form ``custom_jvp`` core per input space. :func:`prepare` checks, aligns, masks and tempers
the arguments of every public function of the family.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kldiv import _checks, discrete
from kldiv._logits import fill_masked, kl_logits_core, prepare_logits, prepare_pair
from kldiv._numerics import log_ratio, logits_stats, logits_terms, psum

__all__: list[str] = []


NEG_INF = -jnp.inf


class Pair(NamedTuple):
    """Event axis last. p, q: probabilities; lp, lq: their logs (−inf at 0); d = log(p/q),
    accurate when p ≈ q, 0 where p = q = 0, ±inf at one-sided zeros; pmq = p − q, accurate."""

    p: jax.Array
    q: jax.Array
    lp: jax.Array
    lq: jax.Array
    d: jax.Array
    pmq: jax.Array


def safe_log(x):
    pos = x > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, x, 1)), NEG_INF)


def _clean_ratio(d, lp, lq):
    # −inf − (−inf) is NaN; an entry absent from both distributions has ratio 1.
    return jnp.where((lp == NEG_INF) & (lq == NEG_INF), jnp.zeros_like(d), d)


def _diff_from_ratio(p, q, d):
    """p − q from p, q and d = log(p/q): −p·expm1(−d) if p ≥ q else q·expm1(d); no cancellation."""
    pos = d >= 0
    return jnp.where(
        pos, -p * jnp.expm1(-jnp.where(pos, d, 0)), q * jnp.expm1(jnp.where(pos, 0, d))
    )


def pair_from_probs(p, q):
    lp, lq = safe_log(p), safe_log(q)
    return Pair(p, q, lp, lq, _clean_ratio(log_ratio(p, q), lp, lq), p - q)


def pair_from_log_probs(lp, lq):
    p, q = jnp.exp(lp), jnp.exp(lq)
    d = _clean_ratio(lp - lq, lp, lq)
    return Pair(p, q, lp, lq, d, _diff_from_ratio(p, q, d))


def pair_from_logits(a, b, axis_name=None):
    """The pair of softmax(a), softmax(b); with ``axis_name`` the last axis is one shard of a
    vocabulary split over that mapped axis (global row statistics, local entries)."""
    ma, mb, sa, sb = logits_stats(a, b, axis_name)
    p, q, dh = logits_terms(a, b, ma, mb, sa, sb)
    d = 2 * dh
    lp = (a - ma) - jnp.log(jnp.where(sa > 0, sa, 1))
    # A row where p has no support counts as empty in both (logits_terms): q = 0 there.
    lq = jnp.where(sa > 0, (b - mb) - jnp.log(jnp.where(sb > 0, sb, 1)), NEG_INF)
    d = _clean_ratio(d, lp, lq)
    return Pair(p, q, lp, lq, d, _diff_from_ratio(p, q, d))


class Rule(NamedTuple):
    value: jax.Array  # per row
    gp: jax.Array  # ∂D/∂p_i (probability space; boundary convention in the module docstring)
    gq: jax.Array  # ∂D/∂q_i
    hp: jax.Array  # p_i ∂D/∂p_i = ∂D/∂log p_i
    hq: jax.Array  # q_i ∂D/∂q_i
    centred: bool = False  # Σ hp = Σ hq = 0 already: logits need no projection


class Cores(NamedTuple):
    probs: Callable
    log_probs: Callable
    logits: Callable


def make_cores(rule) -> Cores:
    """custom_jvp cores for the three input spaces from one rule(pair, *params) -> Rule."""

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
        return jnp.sum(zero_nonfinite(r.gp) * dp + zero_nonfinite(r.gq) * dq, axis=-1)

    def log_probs_tangent(pair, r, dlp, dlq):
        return jnp.sum(zero_nonfinite(r.hp) * dlp + zero_nonfinite(r.hq) * dlq, axis=-1)

    def logits_tangent(pair, r, da, db):
        ga, gb = logits_grads(pair, r)
        return jnp.sum(ga * da + gb * db, axis=-1)

    return Cores(
        make(pair_from_probs, probs_tangent),
        make(pair_from_log_probs, log_probs_tangent),
        make(pair_from_logits, logits_tangent),
    )


def logits_grads(pair: Pair, r: Rule, axis_name=None) -> tuple[jax.Array, jax.Array]:
    """∂D/∂a and ∂D/∂b for logits a, b from a rule's log-space partials (0 where not finite).

    d log p_i = da_i − Σ_j p_j da_j (softmax), so ∂D/∂a_i = hp_i − p_i Σ_j hp_j (likewise for b);
    with ``axis_name`` the sums run over the shards of a vocabulary split over that axis.
    """
    ga, gb = r.hp, r.hq
    if not r.centred:
        ga = ga - pair.p * psum(jnp.sum(ga, axis=-1, keepdims=True), axis_name)
        gb = gb - pair.q * psum(jnp.sum(gb, axis=-1, keepdims=True), axis_name)
    return zero_nonfinite(ga), zero_nonfinite(gb)


def zero_nonfinite(x):
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


NAMES = {
    "probs": ("p", "q"),
    "log_probs": ("log_p", "log_q"),
    "logits": ("logits_p", "logits_q"),
}


def _kl_logits(a, b):
    return kl_logits_core(a, b, None, None)


KL_CORES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "probs": discrete.kl,
    "log_probs": discrete.kl_from_log_probs,
    "logits": _kl_logits,
}
"""KL of prepared inputs (:func:`prepare`) per input space, each through its closed-form core (so
forward-mode differentiation works for every function built on them)."""


def prepare(
    space: str, x, y, axis, where, temperature=1.0, names=None, logit_scale=None, softcap=None
):
    """Checked, aligned (event axis last), masked (and, for logits, scaled, soft-capped and
    tempered: :func:`kldiv._logits.prepare_logits`) inputs of one input space."""
    names = names or NAMES[space]
    if space == "logits":
        for name, v in zip(names, (x, y), strict=True):
            _checks.check_floating(name, v)
        return prepare_logits(x, y, axis, where, temperature, logit_scale, softcap)
    x, y, where = prepare_pair(names[0], x, names[1], y, axis, where)
    return fill_masked(x, y, where, 0.0 if space == "probs" else NEG_INF)


def static_real(name: str, value, lo: float, hi: float) -> float:
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


def simple(
    cores: Cores, space, x, y, axis, where, temperature, params=(), logit_scale=None, softcap=None
):
    x, y = prepare(space, x, y, axis, where, temperature, None, logit_scale, softcap)
    return getattr(cores, space)(x, y, params)


class FGenerator(NamedTuple):
    """A convex generator f with f(1) = 0 and its slope at infinity f'(∞) = lim_{t→∞} f(t)/t.

    ``f`` must be elementwise, defined on t ∈ [0, ∞) (t = 0 as its limit, possibly +inf) and
    differentiable by JAX; ``slope_at_inf`` may be ``math.inf``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> neyman = kldiv.FGenerator("neyman_chi2", lambda t: (t - 1) ** 2 / t, slope_at_inf=1.0)
      >>> print(f"{kldiv.f_divergence(p, q, neyman):.4f}")  # Σ (p − q)²/p
      0.2500
      >>> print(f"{kldiv.pearson_chi2(q, p):.4f}")
      0.2500
    """

    name: str
    f: Callable[[jax.Array], jax.Array]
    slope_at_inf: float


FGenerator.__module__ = "kldiv.family"  # documented (and pickled) under its public home


def xlogx(t):
    pos = t > 0
    return jnp.where(pos, t * jnp.log(jnp.where(pos, t, 1)), 0)
