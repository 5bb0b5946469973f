"""Total variation distance: rule, cores and the three public functions."""

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

__all__ = ["total_variation", "total_variation_from_log_probs", "total_variation_from_logits"]


def _tv_rule(pair: Pair) -> Rule:
    g = 0.5 * jnp.sign(pair.pmq)
    value = 0.5 * jnp.sum(jnp.abs(pair.pmq), axis=-1)
    return Rule(value, g, -g, pair.p * g, -pair.q * g)


_TV = make_cores(_tv_rule)


def total_variation(
    p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Total variation distance TV(p, q) = ½ Σ_v |p_v − q_v| ∈ [0, 1], from probabilities.

    Symmetric; the f-divergence of f(t) = ½|t − 1|. Gradient: ∂/∂p = ½ sign(p − q) (0 where
    p = q). In the log spaces p − q is formed from the accurate log-ratio
    (−p·expm1(−log(p/q))), so small distances keep their relative accuracy.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.total_variation(p, q):.4f}")
      0.2500

    References:
      Tsybakov (2009), "Introduction to Nonparametric Estimation", Definition 2.4.
    """
    return simple(_TV, "probs", p, q, axis, where, 1.0)


def total_variation_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Total variation ½ Σ |p − q| from log-probabilities. See :func:`total_variation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.total_variation_from_log_probs(log_p, log_q):.4f}")
      0.2500
    """
    return simple(_TV, "log_probs", log_p, log_q, axis, where, 1.0)


def total_variation_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Total variation of softmax(logits_p/T) and softmax(logits_q/T). See total_variation.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.total_variation_from_logits(logits_p, logits_q):.4f}")
      0.2092
      >>> print(f"{kldiv.total_variation_from_logits(logits_p, logits_q, temperature=2.0):.4f}")
      0.1002
    """
    return simple(
        _TV,
        "logits",
        logits_p,
        logits_q,
        axis,
        where,
        temperature,
        logit_scale=logit_scale,
        softcap=softcap,
    )
