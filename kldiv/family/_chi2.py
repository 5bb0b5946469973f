"""Pearson χ² divergence: rule, cores and the three public functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv.family._core import (
    Pair,
    Rule,
    make_cores,
    simple,
)

__all__ = ["pearson_chi2", "pearson_chi2_from_log_probs", "pearson_chi2_from_logits"]


def _chi2_rule(pair: Pair) -> Rule:
    p, q, d = pair.p, pair.q, pair.d
    t_m1 = jnp.expm1(d)  # p/q − 1: +inf where q = 0 < p, −1 where p = 0 < q, 0 where p = q = 0
    value = jnp.sum(pair.pmq * t_m1, axis=-1)  # (p − q)²/q: equal signs, never negative
    pos = p > 0
    p_t = jnp.where(pos, p * jnp.exp(jnp.where(pos, d, 0)), 0)  # p²/q
    hp = jnp.where(pos, 2 * p * t_m1, 0)
    return Rule(value, 2 * t_m1, -jnp.expm1(2 * d), hp, q - p_t)


_CHI2 = make_cores(_chi2_rule)


def pearson_chi2(
    p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Pearson χ² divergence χ²(p‖q) = Σ_v (p_v − q_v)²/q_v, from probabilities.

    Not symmetric (Neyman's χ² is ``pearson_chi2(q, p)``). An entry with q = 0 < p gives +inf;
    p = q = 0 contributes 0. Computed as Σ (p − q)·expm1(log(p/q)), non-negative term by term.
    Gradients: ∂/∂p = 2(p/q − 1), ∂/∂q = 1 − p²/q². log(1 + χ²) is the Rényi divergence D₂.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.pearson_chi2(p, q):.4f}")
      0.3333
      >>> print(f"{jnp.log1p(kldiv.pearson_chi2(p, q)):.4f}")  # log(1 + χ²) = D₂
      0.2877
      >>> print(f"{kldiv.renyi(p, q, alpha=2.0):.4f}")
      0.2877

    References:
      Pearson (1900); Liese & Vajda (2006), "On divergences and informations in statistics and
      information theory", IEEE Trans. Inf. Theory 52(10).
    """
    return simple(_CHI2, "probs", p, q, axis, where, 1.0)


def pearson_chi2_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Pearson χ²(p‖q) from log-probabilities. See :func:`pearson_chi2`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.pearson_chi2_from_log_probs(log_p, log_q):.4f}")
      0.3333
    """
    return simple(_CHI2, "log_probs", log_p, log_q, axis, where, 1.0)


def pearson_chi2_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Pearson χ² of softmax(logits_p/T) against softmax(logits_q/T). See :func:`pearson_chi2`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.pearson_chi2_from_logits(logits_p, logits_q):.4f}")
      0.1929
      >>> print(f"{kldiv.pearson_chi2_from_logits(logits_p, logits_q, temperature=2.0):.4f}")
      0.0482
    """
    return simple(
        _CHI2,
        "logits",
        logits_p,
        logits_q,
        axis,
        where,
        temperature,
        logit_scale=logit_scale,
        softcap=softcap,
    )
