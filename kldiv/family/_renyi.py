"""Rényi divergence D_α (orders 0, (0, 1), 1, (1, ∞), ∞): rules, cores and the three public
functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv.family._alpha import alpha_terms, log_geo
from kldiv.family._core import (
    KL_CORES,
    NEG_INF,
    Pair,
    Rule,
    make_cores,
    prepare,
    static_real,
    zero_nonfinite,
)

__all__ = ["renyi", "renyi_from_log_probs", "renyi_from_logits"]


def _renyi_rule(pair: Pair, alpha: float) -> Rule:
    s = alpha - 1.0
    p, q, d = pair.p, pair.q, pair.d
    supp, t = log_geo(pair, s)
    # L = log Σ p^α q^{1−α}: log1p(α(α−1)A) from the α-divergence A ≥ 0 when |L| ≤ ½ (p ≈ q,
    # where a logsumexp would lose every digit), else a logsumexp (accurate when |L| is not
    # small, and free of overflow for large α).
    l_lse = jax.nn.logsumexp(t, axis=-1)
    l_a = jnp.log1p(alpha * s * jnp.sum(alpha_terms(pair, alpha, t), axis=-1))
    log_s = jnp.where(jnp.abs(l_a) <= 0.5, l_a, l_lse)
    empty = ~jnp.any(supp, axis=-1)
    value = jnp.where(empty, 0, log_s / s)
    # Centred gradients with w = p^α q^{1−α}/e^L: ∂D/∂log p = (α/s)(w − p), ∂D/∂log q = q − w.
    lk = jnp.where(jnp.isfinite(log_s), log_s, 0)[..., None]
    w = jnp.exp(t - lk)
    z = jnp.where(supp, s * d - lk, 0)  # log(w/p)
    mid = jnp.abs(z) < 1
    hp = alpha / s * jnp.where(mid, p * jnp.expm1(jnp.where(mid, z, 0)), w - p)
    gp = zero_nonfinite(jnp.where(p > 0, alpha / s * jnp.expm1(z), 0))
    gq = zero_nonfinite(jnp.where(q > 0, -jnp.expm1(alpha * d - lk), 0))
    keep = ~empty[..., None]
    return Rule(
        value,
        jnp.where(keep, gp, 0),
        jnp.where(keep, gq, 0),
        jnp.where(keep, hp, 0),
        jnp.where(keep, q - w, 0),
        centred=True,
    )


def _renyi_inf_rule(pair: Pair) -> Rule:
    p, q = pair.p, pair.q
    supp = pair.lp > NEG_INF
    d = jnp.where(supp, pair.d, NEG_INF)
    top = jnp.max(d, axis=-1)
    empty = ~jnp.any(supp, axis=-1)
    keep = ~empty[..., None]
    at = supp & (d == top[..., None]) & keep
    # The subgradient at the maximising entries (ties share it).
    e = (at / jnp.maximum(jnp.sum(at, axis=-1, keepdims=True), 1)).astype(p.dtype)
    gp = zero_nonfinite(jnp.where(p > 0, e / jnp.where(p > 0, p, 1) - 1, 0))
    gq = zero_nonfinite(jnp.where(q > 0, 1 - e / jnp.where(q > 0, q, 1), 0))
    hp, hq = jnp.where(keep, e - p, 0), jnp.where(keep, q - e, 0)
    # max log(p/q) ≥ 0 for normalised p, q (both sum to 1); clamp the rounding of the centred
    # log-ratios (e.g. −1.6e-17 for p ≈ q in float64), NaN propagates through the maximum.
    value = jnp.where(empty, 0, jnp.maximum(top, 0))
    return Rule(value, gp, gq, hp, hq, centred=True)


def _renyi_zero_rule(pair: Pair) -> Rule:
    q = pair.q
    supp = pair.lp > NEG_INF
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
    return Rule(value, zeros, gq, zeros, q * gq, centred=True)


_RENYI = make_cores(_renyi_rule)


_RENYI_INF = make_cores(_renyi_inf_rule)


_RENYI_ZERO = make_cores(_renyi_zero_rule)


def _renyi(space, x, y, alpha, axis, where, temperature, logit_scale=None, softcap=None):
    alpha = static_real("alpha", alpha, 0.0, math.inf)
    x, y = prepare(space, x, y, axis, where, temperature, logit_scale=logit_scale, softcap=softcap)
    if alpha == 1.0:
        return KL_CORES[space](x, y)
    if alpha == math.inf:
        return getattr(_RENYI_INF, space)(x, y, ())
    if alpha == 0.0:
        return getattr(_RENYI_ZERO, space)(x, y, ())
    return getattr(_RENYI, space)(x, y, (alpha,))


def renyi(
    p: ArrayLike,
    q: ArrayLike,
    alpha: float,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
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

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> import math
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> for alpha in (0.5, 1.0, 2.0, math.inf):  # non-decreasing in α; D_1 = KL
      ...     print(f"{alpha}: {kldiv.renyi(p, q, alpha=alpha):.4f}")
      0.5: 0.0693
      1.0: 0.1438
      2.0: 0.2877
      inf: 0.6931

    References:
      Rényi (1961), "On measures of entropy and information", Proc. 4th Berkeley Symp.;
      van Erven & Harremoës (2014), "Rényi divergence and Kullback–Leibler divergence",
      IEEE Trans. Inf. Theory 60(7) (orders 0, 1, ∞ and monotonicity in α).
    """
    return _renyi("probs", p, q, alpha, axis, where, 1.0)


def renyi_from_log_probs(
    log_p: ArrayLike,
    log_q: ArrayLike,
    alpha: float,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Rényi divergence D_α(p‖q) from log-probabilities. See :func:`renyi`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.renyi_from_log_probs(log_p, log_q, alpha=2.0):.4f}")
      0.2877
    """
    return _renyi("log_probs", log_p, log_q, alpha, axis, where, 1.0)


def renyi_from_logits(
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
    """Rényi divergence D_α(softmax(logits_p/T) ‖ softmax(logits_q/T)). See :func:`renyi`.

    Gradients: ∂/∂logits_p = (α/(α−1))(w − p)/T, ∂/∂logits_q = (q − w)/T.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.renyi_from_logits(logits_p, logits_q, alpha=2.0):.4f}")
      0.1764
      >>> print(f"{kldiv.renyi_from_logits(logits_p, logits_q, alpha=2.0, temperature=2.0):.4f}")
      0.0471
    """
    return _renyi(
        "logits", logits_p, logits_q, alpha, axis, where, temperature, logit_scale, softcap
    )
