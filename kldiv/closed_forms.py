"""Closed-form KL divergences of parametric families: Bernoulli (from logits) and Dirichlet.

Argument order is mathematical: ``kl_bernoulli_from_logits(logits_p, logits_q)`` is
KL(Bernoulli(σ(logits_p)) ‖ Bernoulli(σ(logits_q))), and ``kl_dirichlet(concentration_p,
concentration_q)`` is KL(Dir(concentration_p) ‖ Dir(concentration_q)). Parameters broadcast
against each other (numpy rules); nothing reduces over examples. bfloat16/float16 inputs are
computed and returned in float32; float64 stays float64. Both are ``jax.custom_jvp`` functions
whose tangents are closed forms, and both work under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma, gammaln, polygamma
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._numerics import kl_terms

__all__ = ["kl_bernoulli_from_logits", "kl_dirichlet"]


def _broadcast_params(names, xs, min_ndim: int):
    """Parameters checked, cast and broadcast together; an event axis where ``min_ndim`` = 1."""
    xs, shape = _checks.broadcast_floating(names, xs)
    if len(shape) < min_ndim:
        _checks.check_axis(-1, len(shape))  # raises: scalars have no event axis
    return xs


# ---------------------------------------------------------------------------------------------
# Bernoulli.


def _bernoulli_terms(a, b):
    """KL(Bern(σ(a)) ‖ Bern(σ(b))) as kl_terms over the two outcomes, plus p, q, a − b."""
    delta = jnp.where(a == b, jnp.zeros_like(a), a - b)  # equal infinities give 0, not NaN
    p, q = jax.nn.sigmoid(a), jax.nn.sigmoid(b)
    pc, qc = jax.nn.sigmoid(-a), jax.nn.sigmoid(-b)  # 1 − p, 1 − q without cancellation
    # log(p/q) = log1p((1 − p)·expm1(a − b)) and log((1 − p)/(1 − q)) = log1p(p·expm1(b − a)):
    # relative accuracy when a ≈ b; for |a − b| > 1 the softplus differences do not cancel.
    near = jnp.abs(delta) <= 1
    dn = jnp.where(near, delta, 0)
    x1 = jnp.where(near, jnp.log1p(pc * jnp.expm1(dn)), jax.nn.softplus(-b) - jax.nn.softplus(-a))
    x0 = jnp.where(near, jnp.log1p(p * jnp.expm1(-dn)), jax.nn.softplus(b) - jax.nn.softplus(a))
    return kl_terms(p, q, x1) + kl_terms(pc, qc, x0), p, pc, q, delta


@jax.custom_jvp
def _bernoulli_core(a, b):
    return _bernoulli_terms(a, b)[0]


@_bernoulli_core.defjvp
def _bernoulli_jvp(primals, tangents):
    a, b = primals
    da, db = tangents
    out, p, pc, q, delta = _bernoulli_terms(a, b)
    # KL = σ(a)(a − b) + softplus(b) − softplus(a): d/da = σ(a)σ(−a)(a − b), d/db = σ(b) − σ(a).
    var = p * pc
    # Infinite only where the value is (a finite, b = ±inf): 0 there, so no 0·∞ downstream.
    ga = jnp.where(var > 0, var * jnp.where(var > 0, delta, 0), 0)
    ga = jnp.where(jnp.isfinite(ga), ga, 0)
    return out, ga * da + (q - p) * db


def kl_bernoulli_from_logits(logits_p: ArrayLike, logits_q: ArrayLike) -> jax.Array:
    """KL(Bernoulli(σ(logits_p)) ‖ Bernoulli(σ(logits_q))), elementwise.

        KL = p log(p/q) + (1 − p) log((1 − p)/(1 − q)),   p = σ(a), q = σ(b),
           = σ(a)·(a − b) + softplus(b) − softplus(a).

    The second form cancels when a ≈ b. Instead each outcome contributes a non-negative
    ``kl_terms`` term, with log(p/q) = log1p(σ(−a)·expm1(a − b)) and
    log((1−p)/(1−q)) = log1p(σ(a)·expm1(b − a)) while |a − b| ≤ 1 (relative accuracy when
    p ≈ q) and softplus differences otherwise. The result is never negative and stays finite
    and accurate for |logits| up to 1e4 and beyond; ±inf logits mean p ∈ {0, 1}
    (KL = +inf where q is 0 or 1 and p is not).

    Args:
      logits_p: logits of the reference/target Bernoulli, any shape, floating.
      logits_q: logits of the model Bernoulli, broadcastable against ``logits_p``.

    Returns:
      KL per element, with the broadcast shape (float32 for 16-bit inputs, else the input
      dtype). Gradients: d/dlogits_p = σ(a)σ(−a)(a − b), d/dlogits_q = σ(b) − σ(a).

    Raises:
      TypeError: non-floating inputs. ValueError: shapes that do not broadcast.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> logits_p = jnp.array([0.0, 2.0, -1.0])  # reference / target
      >>> logits_q = jnp.array([1.0, 2.0, 1.0])  # model
      >>> print(np.asarray(kldiv.kl_bernoulli_from_logits(logits_p, logits_q)).round(4))
      [0.1201 0.     0.4621]

    References:
      Cover & Thomas (2006), "Elements of Information Theory", eq. (2.26) (relative entropy
      of two distributions on {0, 1}).
    """
    a, b = _broadcast_params(("logits_p", "logits_q"), (logits_p, logits_q), min_ndim=0)
    return _bernoulli_jit(a, b)


# ---------------------------------------------------------------------------------------------
# Dirichlet.

# Gauss–Legendre nodes on [0, 1]; used when the two concentration vectors are close.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(12)
_GL_U = tuple(float(u) for u in (_GL_X + 1) / 2)
_GL_W = tuple(float(w) for w in _GL_W / 2)
# ψ'(x) − 1/x ~ 1/(2x²) + Σ_k B_{2k}/x^{2k+1} (asymptotic series, used for x ≥ 20).
_BERNOULLI_2K = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730)
_ASYMPTOTIC_FROM = 20.0
_CLOSE = 0.5  # max_i |β_i − α_i| / α_i for the quadrature


def _trigamma_minus_inv(x):
    """r(x) = ψ'(x) − 1/x > 0 for x > 0, without cancellation for large x."""
    big = x >= _ASYMPTOTIC_FROM
    xb = jnp.where(big, x, _ASYMPTOTIC_FROM)
    inv = 1 / xb
    inv2 = inv * inv
    acc = jnp.full_like(x, _BERNOULLI_2K[-1])
    for c in reversed(_BERNOULLI_2K[:-1]):
        acc = acc * inv2 + c
    asym = inv2 * (0.5 + inv * acc)
    xs = jnp.where(big, 1, x)
    return jnp.where(big, asym, polygamma(1, xs) - 1 / xs)


def _with_total(x):
    """x with its sum over the last axis appended, [..., K + 1] (one special-function call)."""
    return jnp.concatenate([x, jnp.sum(x, axis=-1, keepdims=True)], axis=-1)


def _dirichlet_quadrature(a, b):
    """KL and ∂KL/∂b when b is close to a (max |b − a|/a ≤ 1/2), from the integral form.

    KL is the Bregman divergence of A(α) = Σ lnΓ(α_i) − lnΓ(α_0), so with h = b − a,
        KL = ∫_0^1 (1 − u) hᵀ ∇²A(a + u h) h du,
        hᵀ∇²A h = Σ_i ψ'(c_i) h_i² − ψ'(c_0) H²   (c = a + u h, H = Σ h, c_0 = Σ c)
                = Σ_i c_i (h_i/c_i − H/c_0)² + Σ_i r(c_i) h_i² − r(c_0) H²,
    r = ψ' − 1/x: the 1/x parts form a weighted variance, so nothing large cancels. The
    integrand is analytic on a neighbourhood of [0, 1] (poles at u ≤ −2), where 12-point
    Gauss–Legendre quadrature is exact to rounding. Likewise ψ(b) − ψ(a) = h ∫ ψ'(a + u h) du.
    """
    h = _with_total(b - a)  # [..., K + 1]; the last entry is H
    u = jnp.asarray(_GL_U, a.dtype)[:, None]  # [n, 1]
    w = jnp.asarray(_GL_W, a.dtype)
    c = _with_total(a)[..., None, :] + u * h[..., None, :]  # [..., n, K + 1]
    r = _trigamma_minus_inv(c)
    hi, hh = h[..., None, :-1], h[..., None, -1]
    ci, c0 = c[..., :-1], c[..., -1]
    var = jnp.sum(ci * jnp.square(hi / ci - (hh / c0)[..., None]), axis=-1)
    rest = jnp.sum(r[..., :-1] * hi * hi, axis=-1) - r[..., -1] * hh * hh
    kl = jnp.sum(w * (1 - u[:, 0]) * (var + rest), axis=-1)
    dpsi = jnp.sum(w[:, None] * h[..., None, :] * (r + 1 / c), axis=-2)  # ψ(b) − ψ(a), [..., K+1]
    return kl, dpsi[..., :-1] - dpsi[..., -1:]


def _dirichlet_terms(a, b):
    k = a.shape[-1]
    x = jnp.concatenate([_with_total(a), _with_total(b)], axis=-1)
    lg, dg = gammaln(x), digamma(x)
    lga, lga0, lgb, lgb0 = lg[..., :k], lg[..., k], lg[..., k + 1 : -1], lg[..., -1]
    dga, dga0, dgb, dgb0 = dg[..., :k], dg[..., k : k + 1], dg[..., k + 1 : -1], dg[..., -1:]
    closed = lga0 - lgb0 - jnp.sum(lga - lgb, axis=-1) + jnp.sum((a - b) * (dga - dga0), axis=-1)
    grad_b = dgb - dga - (dgb0 - dga0)
    close = jnp.max(jnp.abs(b - a) / a, axis=-1) <= _CLOSE  # NaN (invalid input) is False
    safe_b = jnp.where(close[..., None], b, a)  # the quadrature only ever sees close pairs
    kl_q, grad_q = _dirichlet_quadrature(a, safe_b)
    kl = jnp.maximum(jnp.where(close, kl_q, closed), 0)
    return kl, jnp.where(close[..., None], grad_q, grad_b)


@jax.custom_jvp
def _dirichlet_core(a, b):
    return _dirichlet_terms(a, b)[0]


@_dirichlet_core.defjvp
def _dirichlet_jvp(primals, tangents):
    a, b = primals
    da, db = tangents
    kl, grad_b = _dirichlet_terms(a, b)
    # ∂KL/∂a_k = (a_k − b_k)ψ'(a_k) − (a_0 − b_0)ψ'(a_0);
    # ∂KL/∂b_k = ψ(b_k) − ψ(a_k) − (ψ(b_0) − ψ(a_0)).
    diff = _with_total(a - b)
    t = diff * polygamma(1, _with_total(a))
    grad_a = t[..., :-1] - t[..., -1:]
    return kl, jnp.sum(grad_a * da + grad_b * db, axis=-1)


def kl_dirichlet(concentration_p: ArrayLike, concentration_q: ArrayLike) -> jax.Array:
    """KL(Dir(α) ‖ Dir(β)) in closed form, event axis last.

        KL = lnΓ(α_0) − Σ_i lnΓ(α_i) − lnΓ(β_0) + Σ_i lnΓ(β_i)
             + Σ_i (α_i − β_i)(ψ(α_i) − ψ(α_0)),      α_0 = Σ_i α_i, β_0 = Σ_i β_i.

    When the two concentration vectors are close (max_i |β_i − α_i|/α_i ≤ ½), where this
    expression cancels, the same quantity is computed from its integral form as a Bregman
    divergence of the log-partition function (Gauss–Legendre quadrature of a trigamma
    quadratic form, rearranged so that no large terms cancel); this keeps relative accuracy
    as β → α. The result is clamped at 0.

    Args:
      concentration_p: α > 0, shape ``[..., K]`` (the reference/target Dirichlet).
      concentration_q: β > 0, broadcastable against α (a size-1 event axis broadcasts, e.g.
        a symmetric prior).

    Returns:
      KL per distribution, shape = the broadcast batch shape (event axis removed); float32 for
      16-bit inputs, else the input dtype. Non-positive concentrations are invalid.
      Gradients: ∂/∂α_k = (α_k − β_k)ψ'(α_k) − (α_0 − β_0)ψ'(α_0),
      ∂/∂β_k = ψ(β_k) − ψ(α_k) − ψ(β_0) + ψ(α_0).

    Raises:
      TypeError: non-floating inputs. ValueError: shapes that do not broadcast, or scalars.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> alpha = jnp.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])  # a batch of two, K = 3
      >>> prior = jnp.array([1.0, 1.0, 1.0])  # one Dir(1, 1, 1) for the whole batch
      >>> kl = kldiv.kl_dirichlet(alpha, prior)
      >>> kl.shape
      (2,)
      >>> print(np.asarray(kl).round(4))
      [0.5512 0.2443]

    References:
      Penny (2001), "KL-divergences of Normal, Gamma, Dirichlet and Wishart densities",
      Wellcome Department of Cognitive Neurology technical report.
    """
    a, b = _broadcast_params(
        ("concentration_p", "concentration_q"), (concentration_p, concentration_q), 1
    )
    return _dirichlet_jit(a, b)


# One compiled kernel per shape for eager callers; inlined inside a user's jit.
_bernoulli_jit = jax.jit(_bernoulli_core)
_dirichlet_jit = jax.jit(_dirichlet_core)
