"""Amari α-divergence: rule, cores, the three public functions and its f-generator."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv.family._core import (
    KL_CORES,
    NEG_INF,
    FGenerator,
    Pair,
    Rule,
    make_cores,
    prepare,
    safe_log,
    static_real,
    xlogx,
    zero_nonfinite,
)

__all__ = [
    "alpha_divergence",
    "alpha_divergence_from_log_probs",
    "alpha_divergence_from_logits",
    "alpha_generator",
]


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


def log_geo(pair: Pair, s: float):
    """t = log(p^α q^{1−α}) = log p + (α − 1)·log(p/q), −inf off the support of p."""
    supp = pair.lp > NEG_INF
    return supp, jnp.where(supp, pair.lp + s * jnp.where(supp, pair.d, 0), NEG_INF)


def alpha_terms(pair: Pair, alpha: float, t):
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


def _alpha_rule(pair: Pair, alpha: float) -> Rule:
    s = alpha - 1.0
    p, q, d = pair.p, pair.q, pair.d
    _, t = log_geo(pair, s)
    value = jnp.sum(alpha_terms(pair, alpha, t), axis=-1)
    # ∂/∂p = expm1((α−1)d)/(α−1), ∂/∂q = −expm1(αd)/α; p·∂/∂p = (e^t − p)/(α−1), etc.
    gp = zero_nonfinite(jnp.where(p > 0, jnp.expm1(s * d) / s, -1 / s if s > 0 else 0.0))
    gq = zero_nonfinite(jnp.where(q > 0, -jnp.expm1(alpha * d) / alpha, 0.0))
    hp = _geo_minus(p, s, d, t) / s
    hq = -_geo_minus(q, alpha, d, t) / alpha
    return Rule(value, gp, gq, hp, hq)


_ALPHA = make_cores(_alpha_rule)


def _alpha_div(space, x, y, alpha, axis, where, temperature, logit_scale=None, softcap=None):
    alpha = static_real("alpha", alpha, 0.0, math.inf)
    if alpha == math.inf:
        raise ValueError("kldiv: the α-divergence needs a finite `alpha`; got inf.")
    x, y = prepare(space, x, y, axis, where, temperature, logit_scale=logit_scale, softcap=softcap)
    if alpha == 1.0:
        return KL_CORES[space](x, y)
    if alpha == 0.0:
        return KL_CORES[space](y, x)
    return getattr(_ALPHA, space)(x, y, (alpha,))


def alpha_divergence(
    p: ArrayLike,
    q: ArrayLike,
    alpha: float,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
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

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.alpha_divergence(p, q, alpha=0.5):.4f}")
      0.1363
      >>> print(f"{4 * kldiv.squared_hellinger(p, q):.4f}")  # A_½ = 4·H²
      0.1363
      >>> print(f"{kldiv.alpha_divergence(p, q, alpha=1.0):.4f} {kldiv.kl(p, q):.4f}")  # A_1 = KL
      0.1438 0.1438

    References:
      Amari (1985), "Differential-Geometrical Methods in Statistics"; Cichocki & Amari (2010),
      "Families of Alpha- Beta- and Gamma-Divergences", Entropy 12(6) (this parametrisation).
    """
    return _alpha_div("probs", p, q, alpha, axis, where, 1.0)


def alpha_divergence_from_log_probs(
    log_p: ArrayLike,
    log_q: ArrayLike,
    alpha: float,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Amari α-divergence A_α(p‖q) from log-probabilities. See :func:`alpha_divergence`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.alpha_divergence_from_log_probs(log_p, log_q, alpha=0.5):.4f}")
      0.1363
    """
    return _alpha_div("log_probs", log_p, log_q, alpha, axis, where, 1.0)


def alpha_divergence_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    alpha: float,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Amari α-divergence of two softmax distributions. See :func:`alpha_divergence`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.alpha_divergence_from_logits(logits_p, logits_q, alpha=0.5):.4f}")
      0.1034
      >>> soft = kldiv.alpha_divergence_from_logits(logits_p, logits_q, 0.5, temperature=2.0)
      >>> print(f"{soft:.4f}")
      0.0247
    """
    return _alpha_div(
        "logits", logits_p, logits_q, alpha, axis, where, temperature, logit_scale, softcap
    )


@functools.lru_cache(maxsize=64)  # the same generator object: compiled kernels are reused
def alpha_generator(alpha: float) -> FGenerator:
    """The generator of the α-divergence: f(t) = (t^α − αt − (1 − α))/(α(α − 1)).

    f'(∞) = 1/(1 − α) for α < 1 and +inf for α ≥ 1; α = 1 gives t log t − t + 1 (KL) and
    α = 0 gives t − 1 − log t (reverse KL).
    ``f_divergence(p, q, alpha_generator(a)) == alpha_divergence(p, q, a)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> generator = kldiv.alpha_generator(2.0)
      >>> a2 = kldiv.f_divergence(p, q, generator)
      >>> print(f"{a2:.4f} {kldiv.alpha_divergence(p, q, alpha=2.0):.4f}")
      0.1667 0.1667
    """
    alpha = static_real("alpha", alpha, 0.0, math.inf)
    if alpha == math.inf:
        raise ValueError("kldiv: the α-generator needs a finite `alpha`; got inf.")
    if alpha == 1.0:
        return FGenerator("alpha(1.0)", lambda t: xlogx(t) - t + 1, math.inf)
    if alpha == 0.0:
        return FGenerator("alpha(0.0)", lambda t: t - 1 - safe_log(t), 1.0)

    def f(t):
        return (jnp.power(t, alpha) - alpha * t - (1 - alpha)) / (alpha * (alpha - 1))

    return FGenerator(f"alpha({alpha})", f, math.inf if alpha > 1 else 1 / (1 - alpha))
