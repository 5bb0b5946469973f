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
from kldiv._numerics import kl_logits_grads, kl_terms, logits_stats, logits_terms, psum

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
    return psum(jnp.sum(kl_terms(p, q, x), axis=-1), axis_name)


@kl_logits_core.defjvp
def _kl_logits_jvp(axis_name, primals, tangents):
    a, b = primals
    da, db = tangents
    p, q, x = logits_terms(a, b, *logits_stats(a, b, axis_name))
    out = psum(jnp.sum(kl_terms(p, q, x), axis=-1), axis_name)
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


def temper_and_mask(x, dtype, temperature: float | ArrayLike = 1.0, where=None):
    """Logits as every path sees them: ``x`` cast to ``dtype``, divided by T, −inf where masked.

    The one definition of the input semantics of :func:`kl_from_logits`, applied to whole arrays
    (XLA path), to row chunks (``kldiv.fused.chunked``) and to loaded vocabulary blocks
    (``kldiv.fused.pallas``), so that all paths agree on every edge. ``temperature``: a Python
    number (1 skips the division) or an array; ``where``: boolean, broadcastable to ``x``, or
    None. Masked entries become −inf whatever ``x`` holds there (NaN, ±inf).
    """
    x = x.astype(dtype)
    if not (isinstance(temperature, numbers.Real) and temperature == 1):
        x = x / jnp.asarray(temperature, dtype)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    return x


def tempered_row_cotangent(g, dtype, temperature: float = 1.0):
    """The per-row cotangent ``g`` as a ``[..., 1]`` column in ``dtype``, times 1/T: the chain
    rule through :func:`temper_and_mask`'s division by a static temperature, folded into one
    factor per row by the fused paths."""
    g = g.astype(dtype)[..., None]
    return g if temperature == 1 else g / jnp.asarray(temperature, dtype)


def masked_logits_cotangent(g, dtype, where=None):
    """Cotangent of raw logits from the compute-dtype cotangent ``g`` of :func:`temper_and_mask`
    (with the 1/T factor already in ``g``): exactly 0 at masked entries, cast to ``dtype``."""
    if where is not None:
        g = jnp.where(where, g, jnp.zeros_like(g))
    return g.astype(dtype)


def temper_and_mask_pair(a, b, temperature: float | ArrayLike = 1.0, where=None):
    """Both whole logit arrays through :func:`temper_and_mask`, in their common compute dtype."""
    dtype = _checks.compute_dtype(a, b)
    return tuple(temper_and_mask(x, dtype, temperature, where) for x in (a, b))


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
    _checks.check_temperature(temperature)
    a, b, where = align_pair("logits_p", logits_p, "logits_q", logits_q, axis, where)
    return temper_and_mask_pair(a, b, temperature, where)
