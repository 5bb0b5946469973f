"""Sampled-token KL estimators for RL penalties (k1, k2, k3), their variants and the exact penalty.

Setting. A policy π_θ samples tokens a ~ π_θ(·|s); for each sampled token we know
``logp_policy`` = log π_θ(a|s) and ``logp_ref`` = log π_ref(a|s). The quantity of interest is the
KL penalty KL(π_θ ‖ π_ref) = E_{a~π_θ}[log π_θ(a) − log π_ref(a)]. Argument order is the
mathematical one: the first argument is the distribution the expectation is over (p in KL(p‖q),
here the sampling policy), the second the reference. With

    log r = log π_ref(a) − log π_θ(a)      (r = π_ref/π_θ, E_{π_θ}[r] = 1)

the three estimators of Schulman (2020) are, per sampled token:

====  =================  ==========================  =========================================
name  formula            bias for KL(π_θ‖π_ref)      gradient as a loss (tokens fixed)
====  =================  ==========================  =========================================
k1    −log r             unbiased                    ∇log π_θ(a); E = 0
k2    ½ (log r)²         biased: E = Σ π·½(log r)²   −log r·∇log π_θ(a); E = ∇KL(π_θ‖π_ref)
k3    (r − 1) − log r    unbiased                    (1 − r)·∇log π_θ(a); E = ∇KL(π_ref‖π_θ)
====  =================  ==========================  =========================================

Values. k1 is unbiased but takes negative values and has high variance: Var[k1] = Var[log r]
≈ 2·KL as π_θ → π_ref, so its relative standard deviation grows like 1/√KL. k2 ≥ 0 is biased,
but for nearby distributions the bias is third order in the log-ratio
(E[k2] − KL = O(E|log r|³)) and its variance is O(KL²). k3 ≥ 0 is unbiased with variance O(KL²)
near π_ref: it is k1 plus the zero-mean control variate r − 1, and (r − 1) − log r ≥ 0 because
log is concave. Far from π_ref k3's variance can be large: r = π_ref/π_θ is unbounded on tokens
that π_θ deems unlikely.

Gradients. Used as a loss with the sampled tokens held fixed (the sampling distribution is not
differentiated — what ``jax.grad`` of the loss on a batch of samples computes), each estimator
f(x) of x = log(π_θ(a)/π_ref(a)) = −log r gives ∇_θ f = f'(x)·∇_θ log π_θ(a), and over a ~ π_θ:

* k1: E[∇log π_θ] = Σ_a ∇π_θ(a) = 0. The gradient of the k1 loss is pure noise; KL(π_θ‖π_ref)
  is not minimised (that needs the score-function term E[k1·∇log π_θ], i.e. REINFORCE with k1
  as a negative reward).
* k2: E[log(π_θ/π_ref)·∇log π_θ] = ∇_θ KL(π_θ‖π_ref), since
  ∇KL = Σ ∇π_θ·log(π_θ/π_ref) + Σ π_θ·∇log π_θ and the second sum is 0. k2's gradient is the
  score-function gradient of k1 (∇_θ E[k1] = E[k1·∇log π_θ]), so it is unbiased for ∇KL(π_θ‖π_ref)
  although k2's *value* is biased.
* k3: E[(1 − π_ref/π_θ)·∇log π_θ] = −Σ π_ref·∇log π_θ = ∇_θ KL(π_ref‖π_θ): the gradient of the
  *reverse* KL, not of the penalty whose value k3 estimates (the usual "k3 as a loss" pitfall).
  The two gradients vanish at π_θ = π_ref and agree to first order near it.

The exact alternative, with zero variance, is the full-vocabulary KL per position,
:func:`kl_penalty_exact`; it needs both models' logits over the vocabulary, not only the
log-probabilities of the sampled tokens.

Numerics. Everything is a function of x = −log r = logp_policy − logp_ref: k1 = x, k2 = ½x² and
k3 = ω(x) = x + expm1(−x), with ω evaluated from its Taylor series for |x| < 1 (where
x + expm1(−x) cancels; ``kldiv._numerics.omega``), so k3 keeps float32 relative accuracy for tiny
log-ratios and is exactly non-negative. k3 overflows to +inf where r = e^{−x} does (log r above
≈88.7 in float32, ≈709.8 in float64): +inf is then the correctly rounded value. Derivatives are
closed forms that saturate at ±finfo(dtype).max instead of overflowing, so gradients are never
±inf or NaN for non-NaN inputs (and a where-masked overflowed token gives gradient 0, not NaN).

References:
  J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
  J. Schulman et al. (2017), "Proximal Policy Optimization Algorithms", arXiv:1707.06347.
  Y. Bengio, N. Léonard, A. Courville (2013), "Estimating or Propagating Gradients Through
  Stochastic Neurons for Conditional Computation", arXiv:1308.3432.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._numerics import omega, saturate
from kldiv.discrete import kl_from_logits
from kldiv.reductions import Reduction, reduce

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_importance_weighted",
    "kl_penalty",
    "kl_penalty_exact",
    "kl_straight_through",
]

Estimator = Literal["k1", "k2", "k3"]
ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


# ---------------------------------------------------------------------------------------------
# Elementwise cores of x = log(π/π_ref) = −log r, with closed-form, saturating derivatives.


@jax.custom_jvp
def _half_square(x: jax.Array) -> jax.Array:
    return 0.5 * (x * x)


@_half_square.defjvp
def _half_square_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _half_square(x), saturate(x, nan_to_zero=False) * dx


_CORES = {"k1": lambda x: x, "k2": _half_square, "k3": omega}


def _check_estimator(name: str, estimator) -> None:
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(
            f"kldiv: unknown `{name}` {estimator!r}; allowed: " + ", ".join(map(repr, ESTIMATORS))
        )


def _difference(a: jax.Array, b: jax.Array) -> jax.Array:
    """a − b for log-probabilities, 0 where both are −inf (an impossible token contributes 0)."""
    both = (a == -jnp.inf) & (b == -jnp.inf)
    zero = jnp.zeros_like(a)
    return jnp.where(both, zero, jnp.where(both, zero, a) - jnp.where(both, zero, b))


def _log_ratio(names, logps, mask, log_ratio_clip):
    """Checks, casts, broadcasts and masks the per-token log-probabilities.

    Returns (x, logps, mask, dtype) with x = logps[0] − logps[1] = log(π/π_ref) clipped to
    ±``log_ratio_clip``. Masked tokens are set to 0 *before* anything is computed (double where),
    so whatever they hold touches neither value nor gradient.
    """
    logps, shape = _checks.broadcast_floating(names, logps)
    mask = _checks.as_keep_mask(mask, shape, "mask")
    dtype = logps[0].dtype
    if mask is not None:
        logps = [jnp.where(mask, lp, jnp.zeros_like(lp)) for lp in logps]
    x = _difference(logps[0], logps[1])
    _checks.check_positive("log_ratio_clip", log_ratio_clip)
    if log_ratio_clip is not None:
        c = jnp.asarray(log_ratio_clip, dtype)
        x = jnp.clip(x, -c, c)
    return x, logps, mask, dtype


def _finish(value, mask, max_value, dtype):
    _checks.check_positive("max_value", max_value)
    if max_value is not None:
        value = jnp.minimum(value, jnp.asarray(max_value, dtype))
    if mask is not None:
        value = jnp.where(mask, value, jnp.zeros_like(value))
    return value


def _estimate(estimator, logp_policy, logp_ref, mask, log_ratio_clip, max_value):
    x, _, mask, dtype = _log_ratio(
        ("logp_policy", "logp_ref"), (logp_policy, logp_ref), mask, log_ratio_clip
    )
    return _finish(_CORES[estimator](x), mask, max_value, dtype)


_ARGS_DOC = """
    Args:
      logp_policy: log π_θ(a) of the sampled tokens under the sampling policy, any shape (e.g.
        ``[batch, tokens]``), any floating dtype; −inf allowed.
      logp_ref: log π_ref(a) of the same tokens under the reference, broadcastable against
        ``logp_policy``.
      mask: optional keep-mask (boolean, or numeric with nonzero = kept) broadcastable to the
        inputs. Masked tokens give 0, and whatever they hold (NaN, ±inf) touches neither value
        nor gradient.
      log_ratio_clip: optional c > 0: log r is clipped to [−c, c] before the estimator is
        evaluated (common in practice, e.g. c = 20, to keep e^{log r} finite). Tokens outside
        the range get zero gradient, as with any clip.
      max_value: optional m > 0: the per-token value is clipped to ≤ m (e.g. m = 10 for k3);
        tokens above it get zero gradient.

    Returns:
      One value per token, the broadcast shape of the inputs; float32 for 16-bit inputs, else
      the input dtype. Tokens whose two log-probabilities are both −inf give 0.

    Raises:
      TypeError: non-floating inputs; a non-numeric ``mask``.
      ValueError: shapes that do not broadcast; a clip or maximum that is not > 0.
"""

_REFERENCES_DOC = """
    References:
      J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html.
"""

_EXAMPLES = "\n    Examples:\n"


def _with_args_doc(f):
    """Completes the docstring in Google-style order: the function's own text, the shared
    Args/Returns/Raises, the function's own ``Examples:`` (written last in its docstring), and
    the shared References."""
    if f.__doc__ is not None:  # docstrings are stripped under python -OO
        text, marker, examples = f.__doc__.partition(_EXAMPLES)
        examples = marker + examples.rstrip() + "\n" if marker else ""
        f.__doc__ = text.rstrip() + "\n" + _ARGS_DOC + examples + _REFERENCES_DOC
    return f


@_with_args_doc
def kl_k1(
    logp_policy: ArrayLike,
    logp_ref: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    log_ratio_clip: float | ArrayLike | None = None,
    max_value: float | ArrayLike | None = None,
) -> jax.Array:
    """Per-token k1 = −log r = log π_θ(a) − log π_ref(a), an unbiased estimate of KL(π_θ‖π_ref).

    Unbiased for KL(π_θ‖π_ref) over a ~ π_θ, but high-variance and often negative. As a loss
    (tokens fixed) its gradient is ∇_θ log π_θ(a), whose expectation is 0: it does not minimise
    the KL (see the module docstring). A −inf reference log-probability gives +inf; a −inf policy
    log-probability (a token the policy cannot sample) gives −inf.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> logp_policy = jnp.array([-0.5, -1.0, -2.0, -0.1])  # log π_θ(a), sampled tokens
      >>> logp_ref = jnp.array([-0.7, -0.8, -2.5, -0.1])  # log π_ref(a), same tokens
      >>> print(np.asarray(kldiv.kl_k1(logp_policy, logp_ref)).round(4))
      [ 0.2 -0.2  0.5  0. ]
      >>> mask = jnp.array([True, True, True, False])  # e.g. padding
      >>> k1 = kldiv.kl_k1(logp_policy, logp_ref, mask=mask)
      >>> print(f"{kldiv.reduce(k1, 'mean', mask=mask):.4f}")
      0.1667
    """
    return _estimate("k1", logp_policy, logp_ref, mask, log_ratio_clip, max_value)


@_with_args_doc
def kl_k2(
    logp_policy: ArrayLike,
    logp_ref: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    log_ratio_clip: float | ArrayLike | None = None,
    max_value: float | ArrayLike | None = None,
) -> jax.Array:
    """Per-token k2 = ½(log r)², a biased, low-variance, non-negative estimate of KL(π_θ‖π_ref).

    E_{π_θ}[k2] = Σ_a π_θ(a)·½(log r(a))², which equals KL(π_θ‖π_ref) up to a third-order term in
    the log-ratio (both are ½E[(log r)²] + O(E|log r|³)); it is an f-divergence, not KL. As a
    loss (tokens fixed) its gradient is −log r·∇_θ log π_θ(a), an unbiased estimate of
    ∇_θ KL(π_θ‖π_ref) — the estimator to use when the penalty is optimised by differentiating it
    directly. It overflows to +inf only for |log r| > √(2·finfo.max) or an infinite log r; the
    derivative saturates at ±finfo.max.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> logp_policy = jnp.array([-0.5, -1.0, -2.0, -0.1])  # log π_θ(a), sampled tokens
      >>> logp_ref = jnp.array([-0.7, -0.8, -2.5, -0.1])  # log π_ref(a), same tokens
      >>> print(np.asarray(kldiv.kl_k2(logp_policy, logp_ref)).round(4))
      [0.02  0.02  0.125 0.   ]
    """
    return _estimate("k2", logp_policy, logp_ref, mask, log_ratio_clip, max_value)


@_with_args_doc
def kl_k3(
    logp_policy: ArrayLike,
    logp_ref: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    log_ratio_clip: float | ArrayLike | None = None,
    max_value: float | ArrayLike | None = None,
) -> jax.Array:
    """Per-token k3 = (r − 1) − log r = expm1(log r) − log r, unbiased for KL(π_θ‖π_ref), ≥ 0.

    k1 plus the zero-mean control variate r − 1 (r = π_ref/π_θ): unbiased, non-negative and,
    near π_ref, of much lower variance than k1. As a loss (tokens fixed) its gradient is
    (1 − r)·∇_θ log π_θ(a), whose expectation is ∇_θ KL(π_ref‖π_θ) — the reverse KL, not the
    one its value estimates. For the gradient of KL(π_θ‖π_ref) use k2's, e.g. through
    :func:`kl_straight_through` (value k3, gradient k2), or :func:`kl_k3_importance_weighted`
    with its differentiable weight.

    Computed as ω(−log r) with ω(x) = x + expm1(−x) (its Taylor series for |log r| < 1;
    ``kldiv._numerics.omega``), so it is exactly non-negative and float32-accurate for tiny
    log-ratios. Where r overflows (log r above ≈88.7 in float32, ≈709.8 in float64) the value is
    +inf — the correctly rounded value of e^{log r} − 1 − log r — and the gradient saturates at
    ∓finfo.max (finite, not NaN); pass ``log_ratio_clip`` and/or ``max_value`` for finite
    penalties.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> logp_policy = jnp.array([-0.5, -1.0, -2.0, -0.1])  # log π_θ(a), sampled tokens
      >>> logp_ref = jnp.array([-0.7, -0.8, -2.5, -0.1])  # log π_ref(a), same tokens
      >>> print(np.asarray(kldiv.kl_k3(logp_policy, logp_ref)).round(4))
      [0.0187 0.0214 0.1065 0.    ]
      >>> print(np.asarray(kldiv.kl_k3(logp_policy, logp_ref, max_value=0.05)).round(4))
      [0.0187 0.0214 0.05   0.    ]
    """
    return _estimate("k3", logp_policy, logp_ref, mask, log_ratio_clip, max_value)


def kl_straight_through(
    logp_policy: ArrayLike,
    logp_ref: ArrayLike,
    *,
    value: Estimator,
    grad: Estimator,
    mask: ArrayLike | None = None,
    log_ratio_clip: float | ArrayLike | None = None,
    max_value: float | ArrayLike | None = None,
) -> jax.Array:
    """Per-token estimator whose value is ``value``'s and whose gradient is ``grad``'s.

    Constructed as ``stop_gradient(a) + (b − stop_gradient(b))`` with a the value estimator and
    b the gradient estimator, both of the same (masked, clipped) log-ratio. The second term is
    exactly 0 for finite b, so the value is *exactly* a (``b + stop_gradient(a − b)`` would
    round), and only b is differentiated. Where b is not finite the second term is 0 and the
    token's gradient is 0. ``max_value`` clips the value only; the gradient stays b's.

    Gradients (tokens fixed, a ~ π_θ, r = π_ref/π_θ), whatever ``value`` is:

    ========  ==========================  =========================================
    ``grad``  per-token gradient          expectation over a ~ π_θ
    ========  ==========================  =========================================
    "k1"      ∇log π_θ(a)                 0
    "k2"      −log r·∇log π_θ(a)          ∇_θ KL(π_θ‖π_ref)   (unbiased)
    "k3"      (1 − r)·∇log π_θ(a)         ∇_θ KL(π_ref‖π_θ)   (reverse KL)
    ========  ==========================  =========================================

    The useful combination is ``value="k3", grad="k2"``: the reported penalty is the unbiased,
    non-negative k3 and the gradient is the unbiased estimate of ∇KL(π_θ‖π_ref) (k2's). The
    straight-through idea — compute one function forward, backpropagate another — is from
    Bengio et al. (2013).

    Args:
      logp_policy, logp_ref, mask, log_ratio_clip, max_value: as in :func:`kl_k3`.
      value: the estimator giving the value, one of ``ESTIMATORS`` (no default).
      grad: the estimator giving the gradient, one of ``ESTIMATORS`` (no default).

    Returns:
      One value per token (broadcast shape of the inputs; float32 for 16-bit inputs).

    Raises:
      TypeError, ValueError: as :func:`kl_k3`; an unknown estimator name.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> logp_policy = jnp.array([-0.5, -1.0, -2.0, -0.1])  # log π_θ(a), sampled tokens
      >>> logp_ref = jnp.array([-0.7, -0.8, -2.5, -0.1])  # log π_ref(a), same tokens
      >>> st = kldiv.kl_straight_through(logp_policy, logp_ref, value="k3", grad="k2")
      >>> print(np.asarray(st).round(4))  # k3's values
      [0.0187 0.0214 0.1065 0.    ]
      >>> def loss(lp, estimator):
      ...     return jnp.sum(estimator(lp, logp_ref))
      >>> def st_k3_k2(lp, ref):
      ...     return kldiv.kl_straight_through(lp, ref, value="k3", grad="k2")
      >>> print(np.asarray(jax.grad(loss)(logp_policy, st_k3_k2)).round(4))  # k2's gradient
      [ 0.2 -0.2  0.5  0. ]
      >>> print(np.asarray(jax.grad(loss)(logp_policy, kldiv.kl_k2)).round(4))
      [ 0.2 -0.2  0.5  0. ]

    References:
      Y. Bengio, N. Léonard, A. Courville (2013), arXiv:1308.3432; J. Schulman (2020),
      "Approximating KL Divergence".
    """
    _check_estimator("value", value)
    _check_estimator("grad", grad)
    x, _, mask, dtype = _log_ratio(
        ("logp_policy", "logp_ref"), (logp_policy, logp_ref), mask, log_ratio_clip
    )
    a = jax.lax.stop_gradient(_CORES[value](x))
    b = _CORES[grad](x)
    b_const = jax.lax.stop_gradient(b)
    delta = jnp.where(jnp.isfinite(b_const), b - b_const, jnp.zeros_like(b))
    return _finish(a + delta, mask, max_value, dtype)


def kl_k3_importance_weighted(
    logp_policy: ArrayLike,
    logp_ref: ArrayLike,
    logp_old: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    weight_clip: float | ArrayLike | None = None,
    max_weight: float | ArrayLike | None = None,
    log_ratio_clip: float | ArrayLike | None = None,
    max_value: float | ArrayLike | None = None,
) -> jax.Array:
    """Per-token w·k3 for tokens sampled from an older policy π_old; estimates KL(π_θ‖π_ref).

    With w = π_θ(a)/π_old(a) = exp(logp_policy − logp_old) and k3 as in :func:`kl_k3`,

        E_{a~π_old}[w·k3(a)] = E_{a~π_θ}[k3(a)] = KL(π_θ‖π_ref)        (unclipped w),

    the importance-sampling correction for a penalty computed on tokens generated by the policy
    before the current update (PPO's several epochs over one batch, Schulman et al. 2017).

    Gradient (tokens fixed; w depends on θ through ``logp_policy``; ``logp_old`` is constant):
    ∇(w·k3) = w·(k3 + 1 − r)·∇log π_θ = w·log(π_θ/π_ref)·∇log π_θ, because k3 + 1 − r = −log r.
    Its expectation over π_old is E_{π_θ}[log(π_θ/π_ref)·∇log π_θ] = ∇_θ KL(π_θ‖π_ref): with the
    weight differentiated, IS-corrected k3 has the *correct* gradient (at π_old = π_θ it equals
    k2's), unlike plain k3. Stopping the gradient of the weight instead gives
    E_{π_old}[w·(1 − r)∇log π_θ] = ∇_θ KL(π_ref‖π_θ), k3's reverse-KL gradient. Clipping w
    (``weight_clip``, ``max_weight``) zeroes the weight's gradient on clipped tokens and biases
    value and gradient; it bounds the variance.

    Args:
      logp_policy: log π_θ(a) under the current (differentiated) policy.
      logp_ref: log π_ref(a) under the reference.
      logp_old: log π_old(a) under the policy that sampled the tokens; all three broadcast.
      mask: optional keep-mask, as in :func:`kl_k3` (masked tokens give 0 and no gradient).
      weight_clip: optional ε > 0: w is clipped to [1 − ε, 1 + ε] (PPO's clip range).
      max_weight: optional m > 0: w is clipped to ≤ m (truncated importance sampling).
      log_ratio_clip, max_value: clip log r = logp_ref − logp_policy and the k3 value, as in
        :func:`kl_k3` (the weight multiplies the clipped k3).

    Returns:
      One value per token (broadcast shape of the three inputs; float32 for 16-bit inputs). The
      weight is exp of the clipped log-weight, so clipping keeps it finite; an unclipped w
      overflows only for logp_policy − logp_old above ≈88.7 (float32). Tokens with logp_policy
      and logp_old both −inf get w = 1.

    Raises:
      TypeError, ValueError: as :func:`kl_k3`, naming ``logp_old`` mask it is at fault.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> logp_policy = jnp.array([-0.5, -1.0, -2.0, -0.1])  # log π_θ(a), sampled tokens
      >>> logp_ref = jnp.array([-0.7, -0.8, -2.5, -0.1])  # log π_ref(a), same tokens
      >>> logp_old = jnp.array([-0.6, -1.0, -1.8, -0.2])  # the policy that sampled them
      >>> weighted = kldiv.kl_k3_importance_weighted(logp_policy, logp_ref, logp_old)
      >>> print(np.asarray(weighted).round(4))
      [0.0207 0.0214 0.0872 0.    ]
      >>> ppo = kldiv.kl_k3_importance_weighted(logp_policy, logp_ref, logp_old, weight_clip=0.1)
      >>> print(np.asarray(ppo).round(4))  # w clipped to [0.9, 1.1]
      [0.0206 0.0214 0.0959 0.    ]

    References:
      J. Schulman et al. (2017), "Proximal Policy Optimization Algorithms", arXiv:1707.06347;
      J. Schulman (2020), "Approximating KL Divergence".
    """
    _checks.check_positive("weight_clip", weight_clip)
    _checks.check_positive("max_weight", max_weight)
    x, (lp, _, lo), mask, dtype = _log_ratio(
        ("logp_policy", "logp_ref", "logp_old"),
        (logp_policy, logp_ref, logp_old),
        mask,
        log_ratio_clip,
    )
    k3 = _finish(omega(x), None, max_value, dtype)
    log_w = _difference(lp, lo)
    if weight_clip is not None:
        eps = jnp.asarray(weight_clip, dtype)
        log_w = jnp.clip(log_w, jnp.log(jnp.maximum(1 - eps, 0)), jnp.log1p(eps))
    if max_weight is not None:
        log_w = jnp.minimum(log_w, jnp.log(jnp.asarray(max_weight, dtype)))
    return _finish(jnp.exp(log_w) * k3, mask, None, dtype)


def kl_penalty(
    logp_policy: ArrayLike,
    logp_ref: ArrayLike,
    *,
    estimator: Estimator,
    reduction: Reduction,
    mask: ArrayLike | None = None,
    grad_estimator: Estimator | None = None,
    log_ratio_clip: float | ArrayLike | None = None,
    max_value: float | ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    count: ArrayLike | float | None = None,
    batch_size: ArrayLike | int | None = None,
) -> jax.Array:
    """A sampled-token KL(π_θ‖π_ref) penalty, masked and explicitly reduced.

    ``reduce(est(logp_policy, logp_ref), reduction, mask=mask, ...)`` where ``est`` is
    :func:`kl_k1`, :func:`kl_k2` or :func:`kl_k3` (``estimator``), or, with ``grad_estimator``,
    :func:`kl_straight_through` with ``value=estimator, grad=grad_estimator``. The mask both
    sanitises the per-token computation (masked tokens touch neither value nor gradient) and is
    passed to :func:`kldiv.reduce`. See the module docstring for the bias of each value and the
    gradient each yields; ``estimator="k3", grad_estimator="k2"`` gives an unbiased value and an
    unbiased gradient of KL(π_θ‖π_ref).

    Args:
      logp_policy, logp_ref: per-token log-probabilities of the sampled tokens under the
        sampling policy and the reference, e.g. ``[batch, tokens]``.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (no default).
      reduction: as :func:`kldiv.reduce` (no default); ``"mean"`` with a token mask is the
        token-mean penalty.
      mask: optional keep-mask (boolean, or numeric weights with nonzero = kept).
      grad_estimator: optional estimator whose gradient replaces ``estimator``'s.
      log_ratio_clip, max_value: as in :func:`kl_k3`.
      axis_name, count, batch_size: passed to :func:`kldiv.reduce`.

    Returns:
      The reduced penalty (a scalar), or per-token values for ``reduction="none"``.

    Raises:
      TypeError, ValueError: as :func:`kl_k3` and :func:`kldiv.reduce`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> logp_policy = jnp.array([[-0.5, -1.0, -2.0], [-0.1, -0.3, -0.9]])  # [batch, tokens]
      >>> logp_ref = jnp.array([[-0.7, -0.8, -2.5], [-0.1, -0.6, -0.2]])
      >>> mask = jnp.array([[True, True, True], [True, True, False]])  # padding
      >>> penalty = kldiv.kl_penalty(
      ...     logp_policy, logp_ref, estimator="k3", grad_estimator="k2",
      ...     reduction="mean", mask=mask,
      ... )
      >>> print(f"{penalty:.4f}")
      0.0375
      >>> k1 = kldiv.kl_penalty(logp_policy, logp_ref, estimator="k1", reduction="sum", mask=mask)
      >>> print(f"{k1:.4f}")
      0.8000

    References:
      J. Schulman (2020), "Approximating KL Divergence".
    """
    _check_estimator("estimator", estimator)
    if grad_estimator is None:
        values = _estimate(estimator, logp_policy, logp_ref, mask, log_ratio_clip, max_value)
    else:
        values = kl_straight_through(
            logp_policy,
            logp_ref,
            value=estimator,
            grad=grad_estimator,
            mask=mask,
            log_ratio_clip=log_ratio_clip,
            max_value=max_value,
        )
    return reduce(
        values, reduction, mask=mask, axis_name=axis_name, count=count, batch_size=batch_size
    )


def kl_penalty_exact(
    policy_logits: ArrayLike,
    ref_logits: ArrayLike,
    *,
    axis: int = -1,
    mask: ArrayLike | None = None,
    where: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    impl: str = "auto",
) -> jax.Array:
    """Exact per-position KL(π_θ‖π_ref) over the full vocabulary: the zero-variance penalty.

    KL(softmax(policy_logits) ‖ softmax(ref_logits)) along ``axis``, computed by
    :func:`kldiv.kl_from_logits` with p = the policy (the distribution the sampled estimators
    average over). Its value is what k1 and k3 estimate, and its gradient w.r.t. the policy
    logits is the exact ∇_θ KL(π_θ‖π_ref), without sampling noise — at the cost of both models'
    logits over the whole vocabulary at every position.

    Args:
      policy_logits: the policy's logits, e.g. ``[batch, tokens, vocab]``.
      ref_logits: the reference's logits, broadcastable against ``policy_logits``.
      axis: the vocabulary axis (summed over and removed).
      mask: optional boolean per-position keep-mask, broadcastable to the inputs' shape without
        ``axis`` (e.g. ``[batch, tokens]``). Masked positions give 0, and whatever their logits
        hold touches neither value nor gradient; reduce with the same mask, e.g.
        ``kldiv.reduce(kl_penalty_exact(a, b, mask=m), "mean", mask=m)``.
      where: optional boolean vocabulary mask (as in :func:`kldiv.kl_from_logits`).
      temperature, impl: as in :func:`kldiv.kl_from_logits`.

    Returns:
      KL per position: the broadcast shape without ``axis`` (float32 for 16-bit inputs).

    Raises:
      TypeError, ValueError: as :func:`kldiv.kl_from_logits`; a ``mask`` that is not boolean or
        does not broadcast to the per-position shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> policy_logits = jnp.array([[[2.0, 0.5, 0.0], [0.0, 1.0, 0.0]]])  # [batch, tokens, V]
      >>> ref_logits = jnp.array([[[1.5, 1.0, 0.0], [0.0, 0.0, 0.0]]])
      >>> mask = jnp.array([[True, False]])  # [batch, tokens]: the second token is padding
      >>> per_token = kldiv.kl_penalty_exact(policy_logits, ref_logits, mask=mask)
      >>> print(np.asarray(per_token).round(4))
      [[0.0837 0.    ]]
      >>> print(f"{kldiv.reduce(per_token, 'mean', mask=mask):.4f}")
      0.0837

    References:
      Kullback & Leibler (1951); J. Schulman (2020), "Approximating KL Divergence".
    """
    if mask is not None:
        _checks.check_floating("policy_logits", policy_logits)
        _checks.check_floating("ref_logits", ref_logits)
        shape = _checks.broadcast_shapes(
            ("policy_logits", "ref_logits"), (jnp.shape(policy_logits), jnp.shape(ref_logits))
        )
        ax = _checks.check_axis(axis, len(shape))
        keep = _checks.check_mask(mask, shape[:ax] + shape[ax + 1 :], "mask")
        assert keep is not None
        keep = jnp.broadcast_to(jnp.expand_dims(keep, ax), shape)
        vocab = _checks.check_mask(where, shape)
        where = keep if vocab is None else keep & vocab
    return kl_from_logits(
        policy_logits, ref_logits, axis=axis, where=where, temperature=temperature, impl=impl
    )
