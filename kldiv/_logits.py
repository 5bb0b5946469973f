"""The shared logits machinery: aligning, tempering and masking, the XLA closed-form KL core.

Floor 2 of the package (below the implementations in :mod:`kldiv.fused` and the public functions in
:mod:`kldiv.discrete` and :mod:`kldiv.family`, above ``_checks`` and ``_numerics``). Every path that
takes logits — the XLA reference, the chunked custom VJP, the Pallas kernel, the fused linear head —
sees its inputs through :func:`temper_and_mask`, so that all of them agree on every edge (masks,
temperature, −inf, NaN in masked entries); and every path differentiates through the same closed
forms (:func:`kl_logits_core`'s JVP here, ``_numerics.kl_logits_grads`` in the fused paths).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._numerics import (
    kl_logits_grads,
    logit_kl_terms,
    logits_stats,
    logits_terms,
    psum,
    safe_max,
    saturate,
)

__all__: list[str] = []


def align_pair(name_p: str, p, name_q: str, q, axis: int, where):
    """Checks and aligns a pair of event arrays without casting them.

    Returns (p, q, where): floating arrays in their own (storage) dtypes, broadcast to one shape,
    with the event axis moved last; ``where`` broadcast to that shape (boolean) or None. The
    compute dtype is ``_checks.compute_dtype(p, q)``.
    """
    (p, q), shape = _checks.broadcast_floating((name_p, name_q), (p, q), cast=False)
    axis = _checks.check_axis(axis, len(shape))
    where = _checks.check_mask(where, shape)
    p, q = jnp.moveaxis(p, axis, -1), jnp.moveaxis(q, axis, -1)
    if where is not None:
        where = jnp.moveaxis(where, axis, -1)
    return p, q, where


def prepare_pair(name_p: str, p, name_q: str, q, axis: int, where):
    """Checks and aligns a pair of event arrays: floating dtypes, broadcast shapes, ``axis``.

    Returns (p, q, where) cast to the compute dtype, broadcast to one shape, with the event axis
    moved last; ``where`` broadcast to that shape or None. Shared by every discrete divergence.
    """
    p, q, where = align_pair(name_p, p, name_q, q, axis, where)
    dtype = _checks.compute_dtype(p, q)
    return p.astype(dtype), q.astype(dtype), where


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def kl_logits_core(a, b, axis_name=None):
    p, q, x = logits_terms(a, b, *logits_stats(a, b, axis_name))
    return psum(jnp.sum(logit_kl_terms(p, q, x), axis=-1), axis_name)


@kl_logits_core.defjvp
def _kl_logits_jvp(axis_name, primals, tangents):
    a, b = primals
    da, db = tangents
    p, q, x = logits_terms(a, b, *logits_stats(a, b, axis_name))
    out = psum(jnp.sum(logit_kl_terms(p, q, x), axis=-1), axis_name)
    # d/da = p·(log(p/q) − KL), d/db = q − p (softmax(b) − softmax(a)).
    ga, gb = kl_logits_grads(p, q, x, out[..., None])
    return out, psum(jnp.sum(ga * da + gb * db, axis=-1), axis_name)


def static_temperature(temperature) -> float | None:
    """A temperature known at trace time (a Python or NumPy real number) as a float, else None.

    Static temperatures are applied by the fused paths per chunk or block; array (traced)
    temperatures are applied to the whole arrays beforehand, so that their gradient flows.
    """
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool):
        return float(temperature)
    return None


def is_unit(temperature) -> bool:
    """Whether ``temperature`` is the Python number 1 (no division at all)."""
    return (
        isinstance(temperature, numbers.Real)
        and not isinstance(temperature, bool)
        and (float(temperature) == 1.0)
    )


def masked_row_max(x, dtype, where=None, axis_name=None):
    """The raw row maximum (``[..., 1]``) of ``x`` cast to ``dtype`` and masked, 0 for rows with
    no finite maximum (empty rows; NaN propagates through the entries themselves); across the
    shards of a vocabulary split over ``axis_name`` when given."""
    x = x.astype(dtype)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    return safe_max(jax.lax.stop_gradient(x), axis_name=axis_name)


def tempered_max(center, temperature):
    """The row maximum of :func:`temper_and_mask`'s output given the ``center`` it used: the
    center itself at T = 1 (no centring), else 0 (the centred maximum)."""
    return center if is_unit(temperature) else jnp.zeros_like(center)


def temper_and_mask(x, dtype, temperature: float | ArrayLike = 1.0, where=None, center=None):
    """Logits as every path sees them: cast to ``dtype``, −inf where masked, divided by T.

    The one definition of the input semantics of :func:`kl_from_logits`, applied to whole arrays
    (XLA path), to row chunks (``kldiv.fused.chunked``) and to loaded vocabulary blocks
    (``kldiv.fused.pallas``), so that all paths agree on every edge. ``temperature``: a Python
    number or an array broadcastable against ``x`` (a scalar or one per row, ``[..., 1]``);
    ``where``: boolean, broadcastable to ``x``, or None. Masked entries become −inf whatever ``x``
    holds there (NaN, ±inf).

    At T = 1 (the Python number) the logits are returned as they are: the centring happens later,
    error-free (``_numerics.logits_terms``). Otherwise they are centred *before* the division,
    (x − c)/T with c the raw row maximum (``center``, from :func:`masked_row_max` when None), so
    that every intermediate stays finite: the row maximum becomes exactly 0 however XLA rounds
    the division, and logits near ±3e38 cannot overflow (an entry whose tempered gap to the
    maximum is beyond the dtype's range becomes −inf: its probability is 0 to that precision).
    Entries that are −inf stay −inf through a double ``where``, so that the gradient with
    respect to a traced T is finite (their branch is differentiated at 0).
    """
    x = x.astype(dtype)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    if is_unit(temperature):
        return x
    if center is None:
        center = masked_row_max(x, dtype)
    live = x != -jnp.inf  # NaN counts as live and propagates
    # (x − c)/T as 2·((x/2 − c/2)/T): halving is exact, and x/2 − c/2 cannot overflow.
    half = 0.5 * jnp.where(live, x, center) - 0.5 * jax.lax.stop_gradient(center)
    return jnp.where(live, 2 * _divide(half, jnp.asarray(temperature, dtype)), -jnp.inf)


@jax.custom_jvp
def _divide(x, t):
    return x / t


@_divide.defjvp
def _divide_jvp(primals, tangents):
    # d(x/t) = dx/t − (x/t)/t·dt, saturated: a tiny T gives huge, never infinite, derivatives.
    x, t = primals
    dx, dt = tangents
    y = x / t
    inv = saturate(1 / t, nan_to_zero=False)
    return y, dx * inv - saturate(y * inv, nan_to_zero=False) * dt


def tempered_row_cotangent(g, dtype, temperature: float = 1.0):
    """The per-row cotangent ``g`` as a ``[..., 1]`` column in ``dtype``, times 1/T: the chain
    rule through :func:`temper_and_mask`'s division by a static temperature, folded into one
    factor per row by the fused paths."""
    g = g.astype(dtype)[..., None]
    return g if temperature == 1 else saturate(g / jnp.asarray(temperature, dtype))


def masked_logits_cotangent(g, dtype, where=None):
    """Cotangent of raw logits from the compute-dtype cotangent ``g`` of :func:`temper_and_mask`
    (with the 1/T factor already in ``g``): exactly 0 at masked entries, cast to ``dtype``."""
    if where is not None:
        g = jnp.where(where, g, jnp.zeros_like(g))
    return saturate(g.astype(dtype), nan_to_zero=False)


def temper_and_mask_pair(
    a, b, temperature: float | ArrayLike = 1.0, where=None, axis_name=None
) -> tuple[jax.Array, jax.Array]:
    """Both whole logit arrays through :func:`temper_and_mask`, in their common compute dtype
    (centred on the global row maxima of a vocabulary split over ``axis_name``)."""
    dtype = _checks.compute_dtype(a, b)
    if is_unit(temperature):
        return temper_and_mask(a, dtype, 1.0, where), temper_and_mask(b, dtype, 1.0, where)
    ca, cb = (masked_row_max(x, dtype, where, axis_name) for x in (a, b))
    return (
        temper_and_mask(a, dtype, temperature, where, ca),
        temper_and_mask(b, dtype, temperature, where, cb),
    )


def kl_logits_aligned(a, b, where=None, temperature: float | ArrayLike = 1.0):
    """The XLA path on aligned logits (event axis last, storage dtypes, as from
    :func:`align_pair`): whole arrays through :func:`temper_and_mask`, then the core."""
    return kl_logits_core(*temper_and_mask_pair(a, b, temperature, where), None)


def prepare_logits(logits_p, logits_q, axis: int, where, temperature):
    """Checks, aligns, tempers and masks a pair of logit arrays (event axis last).

    Masked entries become −inf in both, exactly as if the vocabulary excluded them. Returns whole
    arrays in the compute dtype (the XLA path); the fused paths apply the same
    :func:`temper_and_mask` per chunk or block instead.
    """
    a, b, where = align_pair("logits_p", logits_p, "logits_q", logits_q, axis, where)
    temperature = _checks.check_temperature(temperature, a.shape[:-1], _checks.compute_dtype(a, b))
    return temper_and_mask_pair(a, b, temperature, where)
