"""Squared Hellinger distance: rule, cores and the three public functions."""

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

__all__ = ["squared_hellinger", "squared_hellinger_from_log_probs", "squared_hellinger_from_logits"]


def _hellinger_rule(pair: Pair) -> Rule:
    sp, sq = jnp.sqrt(pair.p), jnp.sqrt(pair.q)
    s = sp + sq
    r = jnp.where(s > 0, pair.pmq / jnp.where(s > 0, s, 1), 0)  # √p − √q without cancellation
    gp = jnp.where(sp > 0, 0.5 * r / jnp.where(sp > 0, sp, 1), 0)
    gq = jnp.where(sq > 0, -0.5 * r / jnp.where(sq > 0, sq, 1), 0)
    return Rule(0.5 * jnp.sum(r * r, axis=-1), gp, gq, 0.5 * sp * r, -0.5 * sq * r)


_HELLINGER = make_cores(_hellinger_rule)


def squared_hellinger(
    p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Squared Hellinger distance H²(p, q) = ½ Σ_v (√p_v − √q_v)² = 1 − Σ_v √(p_v q_v) ∈ [0, 1].

    The ½ convention (H² ≤ 1), the f-divergence of f(t) = ½(√t − 1)². Symmetric. Computed as
    ½ Σ ((p − q)/(√p + √q))², non-negative terms that keep float32 accuracy when p ≈ q (where
    1 − Σ √(pq) cancels). Gradient: ∂/∂p = ½(1 − √(q/p)), taken as 0 at p = 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.squared_hellinger(p, q):.4f}")
      0.0341
      >>> print(f"{kldiv.squared_hellinger(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])):.4f}")
      1.0000

    References:
      Hellinger (1909); Le Cam & Yang (2000), "Asymptotics in Statistics", for the ½ convention.
    """
    return simple(_HELLINGER, "probs", p, q, axis, where, 1.0)


def squared_hellinger_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Squared Hellinger distance from log-probabilities. See :func:`squared_hellinger`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.squared_hellinger_from_log_probs(log_p, log_q):.4f}")
      0.0341
    """
    return simple(_HELLINGER, "log_probs", log_p, log_q, axis, where, 1.0)


def squared_hellinger_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Squared Hellinger distance of two softmax distributions. See :func:`squared_hellinger`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.squared_hellinger_from_logits(logits_p, logits_q):.4f}")
      0.0259
      >>> print(f"{kldiv.squared_hellinger_from_logits(logits_p, logits_q, temperature=2.0):.4f}")
      0.0062
    """
    return simple(
        _HELLINGER,
        "logits",
        logits_p,
        logits_q,
        axis,
        where,
        temperature,
        logit_scale=logit_scale,
        softcap=softcap,
    )
