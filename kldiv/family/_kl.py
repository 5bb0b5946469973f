"""Reverse KL and Jeffreys: thin layers over the KL cores (closed-form JVPs, every input space)."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv.family._core import (
    KL_CORES,
    prepare,
)

__all__ = [
    "jeffreys",
    "jeffreys_from_log_probs",
    "jeffreys_from_logits",
    "reverse_kl",
    "reverse_kl_from_log_probs",
    "reverse_kl_from_logits",
]


def _reverse_kl(space, x, y, axis, where, temperature, logit_scale=None, softcap=None):
    x, y = prepare(space, x, y, axis, where, temperature, logit_scale=logit_scale, softcap=softcap)
    return KL_CORES[space](y, x)


def _jeffreys(space, x, y, axis, where, temperature, logit_scale=None, softcap=None):
    x, y = prepare(space, x, y, axis, where, temperature, logit_scale=logit_scale, softcap=softcap)
    return KL_CORES[space](x, y) + KL_CORES[space](y, x)


def reverse_kl(
    p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Reverse KL, KL(q‖p) = Σ_v q_v log(q_v/p_v), from probabilities.

    ``reverse_kl(p, q) == kl(q, p)``: the arguments keep the library's order (p the target, q
    the model) and the divergence is taken the other way round, the mode-seeking direction of
    variational inference and "reverse-KL" distillation. Every semantic (edges, gradients,
    dtypes, ``where``) is that of :func:`kldiv.kl` with the roles swapped: q = 0 entries
    contribute 0; q > 0 where p = 0 gives +inf.

    Returns one value per example (``axis`` removed).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> p = jnp.array([[0.5, 0.5], [0.9, 0.1]])  # targets, a batch of two
      >>> q = jnp.array([[0.25, 0.75], [0.6, 0.4]])  # model
      >>> values = kldiv.reverse_kl(p, q)  # KL(q‖p) per example
      >>> print(np.asarray(values).round(4))
      [0.1308 0.3112]
      >>> print(np.asarray(kldiv.kl(q, p)).round(4))
      [0.1308 0.3112]
      >>> print(f"{kldiv.reduce(values, 'mean'):.4f}")
      0.2210

    References:
      Kullback & Leibler (1951); Minka (2005), "Divergence measures and message passing", for
      the mode-seeking behaviour.
    """
    return _reverse_kl("probs", p, q, axis, where, 1.0)


def reverse_kl_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """KL(q‖p) from log-probabilities: ``kl_from_log_probs(log_q, log_p)``; see reverse_kl.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.reverse_kl_from_log_probs(log_p, log_q):.4f}")
      0.1308
    """
    return _reverse_kl("log_probs", log_p, log_q, axis, where, 1.0)


def reverse_kl_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """KL(softmax(logits_q/T) ‖ softmax(logits_p/T)), ``kl_from_logits(logits_q, logits_p)``.

    See :func:`reverse_kl` and :func:`kldiv.kl_from_logits` (accuracy, edges, temperature).

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.reverse_kl_from_logits(logits_p, logits_q):.4f}")
      0.1081
      >>> print(f"{kldiv.reverse_kl_from_logits(logits_p, logits_q, temperature=2.0):.4f}")
      0.0250
    """
    return _reverse_kl("logits", logits_p, logits_q, axis, where, temperature, logit_scale, softcap)


def jeffreys(
    p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Jeffreys divergence J(p, q) = KL(p‖q) + KL(q‖p) = Σ_v (p_v − q_v) log(p_v/q_v).

    Symmetric; +inf wherever the supports differ. Computed as two :func:`kldiv.kl` calls (each
    a sum of non-negative terms), so it inherits their accuracy, edges and gradients.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.jeffreys(p, q):.4f}")
      0.2747
      >>> print(f"{kldiv.kl(p, q) + kldiv.kl(q, p):.4f}")
      0.2747

    References:
      Jeffreys (1946), "An invariant form for the prior probability in estimation problems",
      Proc. R. Soc. A 186.
    """
    return _jeffreys("probs", p, q, axis, where, 1.0)


def jeffreys_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Jeffreys divergence KL(p‖q) + KL(q‖p) from log-probabilities. See :func:`jeffreys`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.jeffreys_from_log_probs(log_p, log_q):.4f}")
      0.2747
    """
    return _jeffreys("log_probs", log_p, log_q, axis, where, 1.0)


def jeffreys_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Jeffreys divergence of softmax(logits_p/T) and softmax(logits_q/T). See :func:`jeffreys`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.jeffreys_from_logits(logits_p, logits_q):.4f}")
      0.2081
      >>> print(f"{kldiv.jeffreys_from_logits(logits_p, logits_q, temperature=2.0):.4f}")
      0.0495
    """
    return _jeffreys("logits", logits_p, logits_q, axis, where, temperature, logit_scale, softcap)
