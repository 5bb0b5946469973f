"""Cross-entropy and Shannon entropy: rule, cores and the public functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv.family._core import (
    NEG_INF,
    Pair,
    Rule,
    make_cores,
    prepare,
    simple,
)

__all__ = [
    "cross_entropy",
    "cross_entropy_from_log_probs",
    "cross_entropy_from_logits",
    "entropy",
    "entropy_from_log_probs",
    "entropy_from_logits",
]


def _ce_rule(pair: Pair) -> Rule:
    p, lq = pair.p, pair.lq
    pos = p > 0
    terms = jnp.where(pos, -p * jnp.where(pos, lq, 0), 0)  # p > 0 = q gives +inf
    gp = jnp.where(lq > NEG_INF, -lq, jnp.where(pos, jnp.inf, 0))
    gq = jnp.where(pos, -jnp.exp(jnp.where(pos, pair.d, 0)), 0)  # −p/q
    return Rule(jnp.sum(terms, axis=-1), gp, gq, terms, -p)


_CE = make_cores(_ce_rule)


def cross_entropy(
    p: ArrayLike, q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Cross-entropy H(p, q) = −Σ_v p_v log q_v (nats), from probabilities.

    H(p, q) = H(p) + KL(p‖q). Entries with p = 0 contribute 0 (also where q = 0); p > 0 where
    q = 0 gives +inf. Gradients: ∂/∂p = −log q, ∂/∂q = −p/q (0 at p = 0). From logits, the
    gradient with respect to ``logits_q`` is the familiar (softmax(logits_q/T) − p)/T.

    Args:
      p: target probabilities (e.g. soft labels), shape ``[..., V, ...]``.
      q: model probabilities, broadcastable against ``p``.
      axis, where: see the module docstring.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.cross_entropy(p, q):.4f}")
      0.8370
      >>> print(f"{kldiv.entropy(p) + kldiv.kl(p, q):.4f}")  # H(p, q) = H(p) + KL(p‖q)
      0.8370

    References:
      Cover & Thomas (2006), "Elements of Information Theory", 2nd ed., Ch. 2 and Sec. 5.4.
    """
    return simple(_CE, "probs", p, q, axis, where, 1.0)


def cross_entropy_from_log_probs(
    log_p: ArrayLike, log_q: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Cross-entropy −Σ p log q from log-probabilities. See :func:`cross_entropy`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.cross_entropy_from_log_probs(log_p, log_q):.4f}")
      0.8370
    """
    return simple(_CE, "log_probs", log_p, log_q, axis, where, 1.0)


def cross_entropy_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Cross-entropy H(softmax(logits_p/T), softmax(logits_q/T)). See :func:`cross_entropy`.

    log q is formed from centred logits (never the log of an underflowed probability), so
    finite logits of any size give finite values.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.cross_entropy_from_logits(logits_p, logits_q):.4f}")
      0.9468
      >>> print(f"{kldiv.cross_entropy_from_logits(logits_p, logits_q, temperature=2.0):.4f}")
      1.0507
    """
    return simple(
        _CE,
        "logits",
        logits_p,
        logits_q,
        axis,
        where,
        temperature,
        logit_scale=logit_scale,
        softcap=softcap,
    )


def _entropy(space, x, axis, where, temperature, name, logit_scale=None, softcap=None):
    x, y = prepare(space, x, x, axis, where, temperature, (name, name), logit_scale, softcap)
    return getattr(_CE, space)(x, y, ())


def entropy(p: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None) -> jax.Array:
    """Shannon entropy H(p) = −Σ_v p_v log p_v (nats), from probabilities.

    Entries with p = 0 contribute 0. Gradient: −log p − 1, taken as 0 at p = 0 (where it is
    +inf). ``entropy(p) == cross_entropy(p, p)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> p = jnp.array([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]])
      >>> print(np.asarray(kldiv.entropy(p)).round(4))
      [0.6931 0.3251 0.    ]

    References:
      Shannon (1948); Cover & Thomas (2006), "Elements of Information Theory", eq. (2.1).
    """
    return _entropy("probs", p, axis, where, 1.0, "p")


def entropy_from_log_probs(
    log_p: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None
) -> jax.Array:
    """Shannon entropy −Σ p log p from log-probabilities (−inf contributes 0). See entropy.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.array([jnp.log(0.5), jnp.log(0.5), -jnp.inf])  # −inf contributes 0
      >>> print(f"{kldiv.entropy_from_log_probs(log_p):.4f}")
      0.6931
    """
    return _entropy("log_probs", log_p, axis, where, 1.0, "log_p")


def entropy_from_logits(
    logits: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Shannon entropy of softmax(logits/T). Gradient: −p·(log p + H)/T. See :func:`entropy`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits = jnp.array([2.0, 1.0, 0.1])
      >>> print(f"{kldiv.entropy_from_logits(logits):.4f}")
      0.8467
      >>> print(f"{kldiv.entropy_from_logits(logits, temperature=2.0):.4f}")  # flatter: higher
      1.0262
    """
    for name, value in (("softcap", softcap), ("logit_scale", logit_scale)):
        if isinstance(value, (tuple, list)):
            raise TypeError(f"kldiv: `{name}` of entropy_from_logits is one Python number or None.")
    return _entropy("logits", logits, axis, where, temperature, "logits", logit_scale, softcap)
