"""The shared logits machinery: aligning, tempering and masking, the XLA closed-form KL core.

Floor 2 of the package (below the implementations in :mod:`kldiv.fused` and the public functions in
:mod:`kldiv.discrete` and :mod:`kldiv.family`, above ``_checks`` and ``_numerics``). Every path that
takes logits — the XLA reference, the chunked custom VJP, the Pallas kernel, the fused linear head —
sees its inputs through :func:`temper_and_mask`, so that all of them agree on every edge (masks,
logit scale and soft-cap, temperature, −inf, NaN in masked entries); and every path
differentiates through the same closed forms (:func:`kl_logits_core`'s JVP here,
``_numerics.kl_logits_grads`` in the fused paths).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._numerics import (
    centred_half_difference,
    kl_logits_grads,
    logit_kl_terms,
    logits_stats,
    logits_terms,
    psum,
    safe_max,
    safe_max_pair,
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
    p, q = _checks.move_to_last(p, axis), _checks.move_to_last(q, axis)
    if where is not None:
        where = _checks.move_to_last(where, axis)
    return p, q, where


def prepare_pair(name_p: str, p, name_q: str, q, axis: int, where):
    """Checks and aligns a pair of event arrays: floating dtypes, broadcast shapes, ``axis``.

    Returns (p, q, where) cast to the compute dtype, broadcast to one shape, with the event axis
    moved last; ``where`` broadcast to that shape or None. Shared by every discrete divergence.
    """
    p, q, where = align_pair(name_p, p, name_q, q, axis, where)
    dtype = _checks.compute_dtype(p, q)
    return _checks.cast_to(p, dtype), _checks.cast_to(q, dtype), where


def fill_masked(p, q, where, fill: float):
    """``p`` and ``q`` with ``fill`` where ``where`` is False (both unchanged when it is None):
    0 for probabilities, −inf for log-probabilities, as if the event space excluded the
    entries, whatever they hold (NaN, ±inf)."""
    if where is None:
        return p, q
    return jnp.where(where, p, fill), jnp.where(where, q, fill)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def kl_logits_core(a, b, centred=None, axis_name=None):
    """KL(softmax(a)‖softmax(b)) per row of prepared logits, with its closed-form JVP.

    ``centred``: for tempered logits, their halved centred difference formed before the division
    (:func:`tempered_pair`; ``_numerics.centred_half_difference``), or None (T = 1). A constant
    of the computation: the derivatives flow through ``a`` and ``b``."""
    p, q, x = logits_terms(a, b, *logits_stats(a, b, axis_name), centred=centred)
    return psum(jnp.sum(logit_kl_terms(p, q, x), axis=-1), axis_name)


@kl_logits_core.defjvp
def _kl_logits_jvp(axis_name, primals, tangents):
    a, b, centred = primals
    da, db, _ = tangents
    p, q, x = logits_terms(a, b, *logits_stats(a, b, axis_name), centred=centred)
    out = psum(jnp.sum(logit_kl_terms(p, q, x), axis=-1), axis_name)
    # d/da = p·(log(p/q) − KL), d/db = q − p (softmax(b) − softmax(a)).
    ga, gb = kl_logits_grads(p, q, x, out[..., None])
    return out, psum(jnp.sum(ga * da + gb * db, axis=-1), axis_name)


# ---------------------------------------------------------------------------------------------
# Logit scale and soft-cap: logits ← c·tanh(s·x/c) (or s·x without a cap), before the temperature.


def _constant(v: float, dtype) -> jax.Array:
    """A positive Python float in ``dtype``, saturated to its largest finite value."""
    return jnp.asarray(min(v, float(jnp.finfo(dtype).max)), dtype)


def transform_logits(x, transform: _checks.LogitTransform | None):
    """Logits as a scaled and soft-capped head gives them: c·tanh(s·x/c), or s·x without a cap.

    ``transform``: (s, c) Python floats or None each (:func:`kldiv._checks.logit_transforms`),
    or None for neither (``x`` returned as it is). The one definition of the transform, used on
    whole arrays (XLA path), per row chunk (``kldiv.fused.chunked``) and per token chunk
    (``kldiv.fused_linear``). Edges: −inf (an impossible or masked token) stays −inf (c·tanh
    would give it the finite logit −c, i.e. mass); +inf gives c with a cap (the limit), +inf
    without; NaN stays NaN. c·tanh(s·x/c) is computed as c·tanh((s/c)·x): finite for every
    finite x (tanh saturates where (s/c)·x overflows); without a cap, s·x that overflows is
    saturated to the dtype's largest finite value. Differentiable (custom JVP,
    :func:`transform_logits_grad`).
    """
    if transform is None:
        return x
    return _transform(x, transform)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _transform(x, transform):
    scale, cap = transform
    s = 1.0 if scale is None else scale
    if cap is None:
        y = x * _constant(s, x.dtype)
        return jnp.where(jnp.isfinite(x), saturate(y, nan_to_zero=False), y)
    y = _constant(cap, x.dtype) * jnp.tanh(x * _constant(s / cap, x.dtype))
    return jnp.where(x == -jnp.inf, x, y)


@_transform.defjvp
def _transform_jvp(transform, primals, tangents):
    (x,), (dx,) = primals, tangents
    # Linear in dx (no saturation here: the tangent map must stay transposable).
    return _transform(x, transform), dx * transform_logits_grad(x, transform)


def transform_logits_grad(x, transform: _checks.LogitTransform | None):
    """The derivative of :func:`transform_logits` at ``x``: s·(1 − tanh²(s·x/c)) with a cap,
    formed as s·4e/(1 + e)² with e = exp(−2|s·x/c|) (finite everywhere: 0 where tanh saturates
    and at ±inf, NaN at NaN); the scalar s without a cap; 1 (a Python number) for None."""
    if transform is None:
        return 1.0
    scale, cap = transform
    s = _constant(1.0 if scale is None else scale, x.dtype)
    if cap is None:
        return s
    e = jnp.exp(-2 * jnp.abs(x * _constant((1.0 if scale is None else scale) / cap, x.dtype)))
    return s * (4 * e / jnp.square(1 + e))


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


def masked_row_max_pair(a, b, dtype, where=None, axis_name=None):
    """``(masked_row_max(a, …), masked_row_max(b, …))`` in one pass over both inputs
    (``_numerics.safe_max_pair``)."""
    a, b = a.astype(dtype), b.astype(dtype)
    if where is not None:
        a, b = jnp.where(where, a, -jnp.inf), jnp.where(where, b, -jnp.inf)
    return safe_max_pair(a, b, axis_name)


def tempered_max(center, temperature, transform: _checks.LogitTransform | None = None):
    """The row maximum of :func:`temper_and_mask`'s output given the raw ``center`` it used: the
    (transformed) center itself at T = 1 (no centring), else 0 (the centred maximum)."""
    if is_unit(temperature):
        return transform_logits(center, transform)
    return jnp.zeros_like(center)


def temper_and_mask(
    x,
    dtype,
    temperature: float | ArrayLike = 1.0,
    where=None,
    center=None,
    transform: _checks.LogitTransform | None = None,
):
    """Logits as every path sees them: cast to ``dtype``, −inf where masked, scaled and
    soft-capped (:func:`transform_logits`, when ``transform`` is given), divided by T.

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
    ``center`` is always the *raw* row maximum: the transform is monotone, so the transformed
    row maximum is the transform of it (computed here from the ``[..., 1]`` column).
    Entries that are −inf stay −inf through a double ``where``, so that the gradient with
    respect to a traced T is finite (their branch is differentiated at 0).
    """
    x = x.astype(dtype)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    if is_unit(temperature):
        return transform_logits(x, transform)
    if center is None:
        center = masked_row_max(x, dtype)
    x = transform_logits(x, transform)
    center = transform_logits(jax.lax.stop_gradient(center), transform)
    live = x != -jnp.inf  # NaN counts as live and propagates
    t = jnp.asarray(temperature, dtype)
    tempered = _divide(jnp.where(live, x, center), jax.lax.stop_gradient(center), t)
    return jnp.where(live, tempered, -jnp.inf) + _dead_entry_zeros(x, live, t)


@jax.custom_jvp
def _divide(x, c, t):
    """(x − c)/T, as 2·((x/2 − c/2)/T): halving is exact, and x/2 − c/2 cannot overflow."""
    return 2 * ((0.5 * x - 0.5 * c) / t)


@_divide.defjvp
def _divide_jvp(primals, tangents):
    # d((x − c)/t) = dx/t − (y/t)·dt, saturated: a tiny T gives huge, never infinite, local
    # derivatives (c is a constant: the caller stops its gradient). One factor 1/t on the
    # cotangent, as the fused paths apply it (_logits.chain_cotangent): the chain through the
    # halving and doubling would multiply a saturated cotangent (a row at KL = +inf) by 2/t
    # first, overflowing where (g·gx)/t does not, and 0·inf = NaN at the row maximum (y = 0)
    # in the gradient w.r.t. a traced T.
    x, c, t = primals
    dx, _, dt = tangents
    y = _divide(x, c, t)
    inv = saturate(1 / t, nan_to_zero=False)
    return y, dx * inv - saturate(y * inv, nan_to_zero=False) * dt


@jax.custom_jvp
def _dead_entry_zeros(x, live, t):
    """Zeros shaped like ``x``, whose tangent is dx/T at the −inf entries (``~live``).

    :func:`temper_and_mask` selects −inf for those entries, and the select's derivative w.r.t.
    ``x`` is 0 there; x/T's is 1/T, as at T = 1 (no select) and on the fused paths, whose closed
    forms give a −inf student logit where p has mass the gradient −p/T. Added to the output
    (exact: ±inf + 0 and x + 0 are unchanged), this restores that derivative; the one w.r.t. a
    traced T stays 0 there (finite)."""
    del live, t
    return jnp.zeros_like(x)


@_dead_entry_zeros.defjvp
def _dead_entry_zeros_jvp(primals, tangents):
    x, live, t = primals
    dx = tangents[0]
    inv = saturate(1 / t, nan_to_zero=False)
    return jnp.zeros_like(x), jnp.where(live, jnp.zeros_like(dx), dx * inv)


def row_cotangent(g, dtype):
    """The per-row cotangent ``g`` of a fused path's backward pass as a ``[..., 1]`` column in
    ``dtype``."""
    return g.astype(dtype)[..., None]


def chain_cotangent(gx, g, temperature: float = 1.0):
    """(g·gx)·(1/T): the chain rule from the row cotangent ``g`` (:func:`row_cotangent`) through
    the local derivative ``gx`` w.r.t. the tempered logits and :func:`temper_and_mask`'s
    division by a static temperature, in the order and with the saturated 1/T of autodiff
    through the XLA path (``_divide``'s JVP). Plain products: a cotangent that is infinite, or
    so large that a product overflows, gives ±inf (and 0·inf = NaN), as autodiff does; only
    the local derivatives are saturated (``_numerics.saturate``)."""
    y = gx * g
    return y if is_unit(temperature) else y * _constant(1 / temperature, y.dtype)


def masked_logits_cotangent(g, dtype, where=None, x=None, transform=None):
    """Cotangent of raw logits from the compute-dtype cotangent ``g`` of :func:`temper_and_mask`
    (the row cotangent and 1/T already in ``g``: :func:`chain_cotangent`): times the transform's
    derivative at the raw logits ``x`` (compute dtype) when ``transform`` is given, exactly 0 at
    masked entries whatever ``g`` holds there, cast to ``dtype``. Plain products and a plain
    cast, as autodiff through the XLA path forms them (a value beyond the range of ``dtype``
    becomes ±inf)."""
    if transform is not None:
        g = g * transform_logits_grad(x, transform)
    if where is not None:
        g = jnp.where(where, g, jnp.zeros_like(g))
    return g.astype(dtype)


Transforms = tuple[_checks.LogitTransform | None, _checks.LogitTransform | None]
NO_TRANSFORMS: Transforms = (None, None)


def temper_and_mask_pair(
    a,
    b,
    temperature: float | ArrayLike = 1.0,
    where=None,
    axis_name=None,
    transforms: Transforms = NO_TRANSFORMS,
    centres=None,
) -> tuple[jax.Array, jax.Array]:
    """Both whole logit arrays through :func:`temper_and_mask`, in their common compute dtype
    (centred on the global row maxima of a vocabulary split over ``axis_name``, or on
    ``centres`` = (ca, cb) when the caller has them); ``transforms``: the (a, b) logit
    transforms (:func:`transform_logits`)."""
    dtype = _checks.compute_dtype(a, b)
    ta, tb = transforms
    if is_unit(temperature):
        return (
            temper_and_mask(a, dtype, 1.0, where, transform=ta),
            temper_and_mask(b, dtype, 1.0, where, transform=tb),
        )
    ca, cb = masked_row_max_pair(a, b, dtype, where, axis_name) if centres is None else centres
    return (
        temper_and_mask(a, dtype, temperature, where, ca, ta),
        temper_and_mask(b, dtype, temperature, where, cb, tb),
    )


def tempered_pair(
    a,
    b,
    temperature: float | ArrayLike = 1.0,
    where=None,
    axis_name=None,
    transforms: Transforms = NO_TRANSFORMS,
):
    """:func:`temper_and_mask_pair` and the pair's halved centred difference formed before the
    division by T (``_numerics.centred_half_difference``, None at T = 1), for
    :func:`kl_logits_core` and ``logits_terms(centred=)``: at T ≠ 1 the tempered logits are
    each rounded after the division, and their difference with them."""
    if is_unit(temperature):
        return (*temper_and_mask_pair(a, b, 1.0, where, axis_name, transforms), None)
    dtype = _checks.compute_dtype(a, b)
    ca, cb = masked_row_max_pair(a, b, dtype, where, axis_name)
    at, bt = temper_and_mask_pair(a, b, temperature, where, axis_name, transforms, (ca, cb))
    centred = untempered_half_difference(a, b, ca, cb, dtype, where, transforms, temperature)
    return at, bt, centred


def untempered_half_difference(
    a,
    b,
    ca,
    cb,
    dtype,
    where=None,
    transforms: Transforms = NO_TRANSFORMS,
    temperature: float | ArrayLike = 1.0,
):
    """``_numerics.centred_half_difference`` of stored logit rows ``a``, ``b`` about their raw
    centres ``ca``, ``cb`` (as :func:`temper_and_mask` centres them): read as every path reads
    them (:func:`untempered_pair`), differenced error-free, then divided by T. Under
    ``stop_gradient``: a constant of the KL's closed-form derivatives."""
    t = temperature if static_temperature(temperature) is not None else jnp.asarray(temperature)
    centred = centred_half_difference(*untempered_pair(a, b, ca, cb, dtype, where, transforms), t)
    return jax.lax.stop_gradient(centred)


def untempered_pair(a, b, ca, cb, dtype, where=None, transforms: Transforms = NO_TRANSFORMS):
    """Stored logit rows ``a``, ``b`` and their raw centres ``ca``, ``cb`` before the division by
    T: the rows cast, masked and transformed (:func:`temper_and_mask` at T = 1), the centres
    transformed, ``(xa, xb, ca', cb')``."""
    ta, tb = transforms
    return (
        temper_and_mask(a, dtype, 1.0, where, transform=ta),
        temper_and_mask(b, dtype, 1.0, where, transform=tb),
        transform_logits(ca, ta),
        transform_logits(cb, tb),
    )


def kl_logits_aligned(
    a, b, where=None, temperature: float | ArrayLike = 1.0, transforms: Transforms = NO_TRANSFORMS
):
    """The XLA path on aligned logits (event axis last, storage dtypes, as from
    :func:`align_pair`): whole arrays through :func:`temper_and_mask`, then the core."""
    return kl_logits_core(*tempered_pair(a, b, temperature, where, None, transforms), None)


def prepare_logits(
    logits_p, logits_q, axis: int, where, temperature, logit_scale=None, softcap=None
):
    """Checks, aligns, scales and soft-caps, tempers and masks a pair of logit arrays (event axis
    last).

    Masked entries become −inf in both, exactly as if the vocabulary excluded them. Returns whole
    arrays in the compute dtype (the XLA path); the fused paths apply the same
    :func:`temper_and_mask` per chunk or block instead. ``logit_scale``/``softcap``: as
    :func:`kldiv._checks.logit_transforms` takes them, (teacher, student) = (p, q).
    """
    a, b, where = align_pair("logits_p", logits_p, "logits_q", logits_q, axis, where)
    dtype = _checks.compute_dtype(a, b)
    temperature = _checks.check_temperature(temperature, a.shape[:-1], dtype)
    transforms = _checks.logit_transforms(logit_scale, softcap, dtype)
    return temper_and_mask_pair(a, b, temperature, where, None, transforms)
