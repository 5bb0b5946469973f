"""The generalised Jensen–Shannon divergence JSD_β: rule, cores, the three public functions and
its f-generator.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv._checks import PairOption
from kldiv._numerics import kl_terms, psum
from kldiv.family._core import (
    FGenerator,
    Pair,
    Rule,
    logits_grads,
    make_cores,
    pair_from_logits,
    prepare,
    static_real,
    xlogx,
)

__all__ = ["js", "js_from_log_probs", "js_from_logits", "js_generator"]


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


def _js_rule(pair: Pair, beta: float) -> Rule:
    p, q, d = pair.p, pair.q, pair.d
    m = beta * p + (1 - beta) * q
    x1 = _log_ratio_to_mixture(d, 1 - beta)  # log(p/m)
    x2 = _log_ratio_to_mixture(-d, beta)  # log(q/m)
    terms = beta * kl_terms(p, m, x1) + (1 - beta) * kl_terms(q, m, x2)
    # ∂JSD/∂p = β log(p/m), ∂JSD/∂q = (1 − β) log(q/m) (the other terms cancel).
    gp = jnp.where(p > 0, beta * x1, 0)
    gq = jnp.where(q > 0, (1 - beta) * x2, 0)
    return Rule(jnp.sum(terms, axis=-1), gp, gq, p * gp, q * gq)


_JS = make_cores(_js_rule)


def _js(space, x, y, beta, axis, where, temperature, logit_scale=None, softcap=None):
    beta = static_real("beta", beta, 0.0, 1.0)
    x, y = prepare(space, x, y, axis, where, temperature, logit_scale=logit_scale, softcap=softcap)
    if beta in (0.0, 1.0):
        return jnp.zeros(x.shape[:-1], x.dtype)
    return getattr(_JS, space)(x, y, (beta,))


def js_rows_with_grads(a, b, beta: float, axis_name=None):
    """JSD_β(softmax(a)‖softmax(b)) per row of prepared logits (tempered and masked, event axis
    last) and both logit gradients, from the closed forms of :func:`js_from_logits`.

    With ``axis_name`` the last axis is one shard of a vocabulary split over that mapped axis:
    the row statistics and sums are global, the gradients local to the shard (the fused linear
    head). ``beta`` ∈ {0, 1} gives zeros, as :func:`js_from_logits` does.
    """
    if beta in (0.0, 1.0):
        zeros = jnp.zeros_like(a)
        return zeros[..., 0], zeros, jnp.zeros_like(b)
    pair = pair_from_logits(a, b, axis_name)
    r = _js_rule(pair, beta)
    ga, gb = logits_grads(pair, r, axis_name)
    return psum(r.value, axis_name), ga, gb


def js(
    p: ArrayLike,
    q: ArrayLike,
    beta: float = 0.5,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
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

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> print(f"{kldiv.js(p, q):.4f}")  # β = 0.5, the standard JSD
      0.0338
      >>> print(f"{kldiv.js(p, q, beta=0.1):.4f}")
      0.0128

      Finite even for disjoint supports, where it reaches log 2:

      >>> print(f"{kldiv.js(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])):.4f}")
      0.6931

    References:
      Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory
      37(1) (weighted JS divergence, weights (β, 1 − β)); Agarwal et al. (2024), "On-policy
      distillation of language models" (generalised JSD for distillation).
    """
    return _js("probs", p, q, beta, axis, where, 1.0)


def js_from_log_probs(
    log_p: ArrayLike,
    log_q: ArrayLike,
    beta: float = 0.5,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Generalised Jensen–Shannon divergence JSD_β(p‖q) from log-probabilities. See :func:`js`.

    m is never formed from exp(log p) + exp(log q): log(p/m) comes from log p − log q.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_p = jnp.log(jnp.array([0.5, 0.5]))  # target
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))  # model
      >>> print(f"{kldiv.js_from_log_probs(log_p, log_q):.4f}")
      0.0338
    """
    return _js("log_probs", log_p, log_q, beta, axis, where, 1.0)


def js_from_logits(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    beta: float = 0.5,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """JSD_β(softmax(logits_p/T) ‖ softmax(logits_q/T)). See :func:`js`.

    log(p/q) is formed from error-free centred logits (as in :func:`kldiv.kl_from_logits`) and
    log(p/m), log(q/m) from it in log space, so the result keeps float32 relative accuracy when
    p ≈ q, and finite logits of any size give finite values. Gradients:
    ∂/∂logits_p = β·p·(log(p/m) − Σ p log(p/m))/T, and likewise for q with 1 − β.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logits_p = jnp.array([2.0, 1.0, 0.1])  # teacher
      >>> logits_q = jnp.array([1.5, 1.5, 0.0])  # student
      >>> print(f"{kldiv.js_from_logits(logits_p, logits_q):.4f}")
      0.0257
      >>> print(f"{kldiv.js_from_logits(logits_p, logits_q, beta=0.1, temperature=2.0):.4f}")
      0.0022
    """
    return _js("logits", logits_p, logits_q, beta, axis, where, temperature, logit_scale, softcap)


@functools.lru_cache(maxsize=64)  # the same generator object: compiled kernels are reused
def js_generator(beta: float = 0.5) -> FGenerator:
    """The generator of JSD_β: f(t) = β t log t − (βt + 1 − β) log(βt + 1 − β).

    f'(∞) = −β log β. ``f_divergence(p, q, js_generator(beta)) == js(p, q, beta)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> p = jnp.array([0.5, 0.5])  # target
      >>> q = jnp.array([0.25, 0.75])  # model
      >>> generator = kldiv.js_generator(0.5)
      >>> generator.name
      'js(beta=0.5)'
      >>> print(f"{kldiv.f_divergence(p, q, generator):.4f} {kldiv.js(p, q):.4f}")
      0.0338 0.0338
    """
    beta = static_real("beta", beta, 0.0, 1.0)

    def f(t):
        return beta * xlogx(t) - xlogx(beta * t + (1 - beta))

    slope = 0.0 if beta in (0.0, 1.0) else -beta * math.log(beta)
    return FGenerator(f"js(beta={beta})", f, slope)
