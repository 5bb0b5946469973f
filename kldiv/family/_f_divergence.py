"""Csiszár f-divergences: the generic rule, the named generators and the three public functions."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv.family._core import (
    FGenerator,
    Pair,
    Rule,
    make_cores,
    safe_log,
    simple,
    static_real,
    xlogx,
    zero_nonfinite,
)
from kldiv.family._js import js_generator

__all__ = [
    "f_divergence",
    "f_divergence_from_log_probs",
    "f_divergence_from_logits",
    "F_GENERATORS",
]


def _reverse_kl_f(t):
    return -safe_log(t)


def _tv_f(t):
    return 0.5 * jnp.abs(t - 1)


def _hellinger_f(t):
    return 0.5 * jnp.square(jnp.sqrt(t) - 1)


def _pearson_f(t):
    return jnp.square(t - 1)


def _neyman_f(t):
    return jnp.square(t - 1) / t


F_GENERATORS: dict[str, FGenerator] = {
    "kl": FGenerator("kl", xlogx, math.inf),
    "reverse_kl": FGenerator("reverse_kl", _reverse_kl_f, 0.0),
    "js": js_generator(0.5),
    "total_variation": FGenerator("total_variation", _tv_f, 0.5),
    "squared_hellinger": FGenerator("squared_hellinger", _hellinger_f, 0.5),
    "pearson_chi2": FGenerator("pearson_chi2", _pearson_f, math.inf),
    "neyman_chi2": FGenerator("neyman_chi2", _neyman_f, 1.0),
}
"""Standard f-generators by name (the parametrised families are :func:`js_generator` and
:func:`alpha_generator`). For normalised inputs ``f_divergence(p, q, F_GENERATORS[k])`` is:
``kl``: KL(p‖q) (f = t log t); ``reverse_kl``: KL(q‖p) (f = −log t); ``js``: JSD, β = ½;
``total_variation``: ½ Σ|p − q|; ``squared_hellinger``: ½ Σ(√p − √q)²; ``pearson_chi2``:
Σ(p − q)²/q (f = (t − 1)²); ``neyman_chi2``: Σ(p − q)²/p (f = (t − 1)²/t)."""


def _f_rule(pair: Pair, f: Callable, slope: float) -> Rule:
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
    gp = zero_nonfinite(jnp.where(ok, dft, slope))
    gq = zero_nonfinite(jnp.where(ok, ft - t_safe * dft, 0))
    hp = jnp.where(pos_p, p * gp, 0)
    hq_lo = jnp.where(pos_q, q * (ft - t_safe * dft), 0)
    hq_hi = jnp.where(pos_p, p * (ft / t_safe - dft), 0)
    hq = zero_nonfinite(jnp.where(ok, jnp.where(up, hq_hi, hq_lo), 0))
    return Rule(jnp.sum(terms, axis=-1), gp, gq, hp, hq)


_F = make_cores(_f_rule)


def _f_div(space, x, y, f, f_inf_slope, axis, where, temperature, logit_scale=None, softcap=None):
    if isinstance(f, FGenerator):
        fn, slope = f.f, f.slope_at_inf
    elif callable(f):
        fn, slope = f, math.inf
    else:
        raise TypeError(f"kldiv: `f` must be an FGenerator or a callable; got {type(f).__name__}.")
    if f_inf_slope is not None:
        slope = f_inf_slope
    slope = static_real("f_inf_slope", slope, -math.inf, math.inf)
    return simple(_F, space, x, y, axis, where, temperature, (fn, slope), logit_scale, softcap)


def f_divergence(
    p: ArrayLike,
    q: ArrayLike,
    f: FGenerator | Callable[[ArrayLike], ArrayLike],
    *,
    f_inf_slope: float | None = None,
    axis: int = -1,
    where: ArrayLike | None = None,
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

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.f_divergence(p, q, kldiv.F_GENERATORS['kl']):.4f} {kldiv.kl(p, q):.4f}")
      0.1438 0.1438

      Any convex f with f(1) = 0, as a plain callable (f'(∞) = +inf assumed):

      >>> chi2 = kldiv.f_divergence(p, q, lambda t: (t - 1) ** 2)
      >>> print(f"{chi2:.4f} {kldiv.pearson_chi2(p, q):.4f}")
      0.3333 0.3333

    References:
      Csiszár (1967), "Information-type measures of difference of probability distributions",
      Studia Sci. Math. Hungar. 2; Ali & Silvey (1966), J. R. Stat. Soc. B 28; Liese & Vajda
      (2006), IEEE Trans. Inf. Theory 52(10), for the boundary conventions.
    """
    return _f_div("probs", p, q, f, f_inf_slope, axis, where, 1.0)


def f_divergence_from_log_probs(
    log_p: ArrayLike,
    log_q: ArrayLike,
    f: FGenerator | Callable[[ArrayLike], ArrayLike],
    *,
    f_inf_slope: float | None = None,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """f-divergence Σ q f(p/q) from log-probabilities (t = e^{log p − log q}); see f_divergence.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> tv = kldiv.F_GENERATORS["total_variation"]
      >>> print(f"{kldiv.f_divergence_from_log_probs(log_p, log_q, tv):.4f}")
      0.2500
    """
    return _f_div("log_probs", log_p, log_q, f, f_inf_slope, axis, where, 1.0)


def f_divergence_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    f: FGenerator | Callable[[ArrayLike], ArrayLike],
    *,
    f_inf_slope: float | None = None,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """f-divergence of softmax(logits_p/T) from softmax(logits_q/T). See :func:`f_divergence`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> hellinger = kldiv.F_GENERATORS["squared_hellinger"]
      >>> print(f"{kldiv.f_divergence_from_logits(logits_p, logits_q, hellinger):.4f}")
      0.0259
      >>> print(f"{kldiv.squared_hellinger_from_logits(logits_p, logits_q):.4f}")
      0.0259
    """
    return _f_div(
        "logits", logits_p, logits_q, f, f_inf_slope, axis, where, temperature, logit_scale, softcap
    )
