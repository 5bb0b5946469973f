"""Input validation: the one place where kldiv checks dtypes, shapes and axes.

Every check here runs at trace time (on static shapes and dtypes), so a wrong call fails when the
function is traced, with a message that names the argument, what it got and what is allowed.
The optional *runtime* check of probability values goes through ``jax.experimental.checkify``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

__all__ = [
    "as_float",
    "as_keep_mask",
    "broadcast_shapes",
    "check_axis",
    "check_floating",
    "check_positive",
    "check_temperature",
    "check_where",
    "compute_dtype",
    "validate_log_probs",
    "validate_probs",
]


def check_floating(name: str, x) -> None:
    """Raises TypeError unless ``x`` has a floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"kldiv: `{name}` must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got dtype {dtype}. Cast it first, e.g. `{name}.astype(jnp.float32)`."
        )


def compute_dtype(*xs) -> jnp.dtype:
    """The dtype kldiv computes and returns in: float32 for 16-bit inputs, else the widest float.

    bfloat16 and float16 inputs are accumulated in float32 (their sums over a vocabulary would
    lose every digit otherwise); float64 stays float64 when x64 is enabled.
    """
    dtype = jnp.result_type(*xs)
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def as_float(name: str, x, dtype=None) -> jax.Array:
    """Checks that ``x`` is floating and casts it to ``dtype`` (default: its compute dtype)."""
    check_floating(name, x)
    x = jnp.asarray(x)
    return x.astype(dtype if dtype is not None else compute_dtype(x))


def broadcast_shapes(names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The broadcast shape of ``shapes``; ValueError naming every argument and shape if none."""
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        described = ", ".join(f"`{n}` {tuple(s)}" for n, s in zip(names, shapes, strict=True))
        raise ValueError(
            f"kldiv: shapes do not broadcast: {described}. Trailing dimensions must be equal or 1 "
            "(numpy broadcasting rules)."
        ) from None


def check_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Normalises ``axis`` for an array of rank ``ndim``; ValueError if out of range."""
    if not isinstance(axis, numbers.Integral):
        raise TypeError(f"kldiv: `{name}` must be a Python int; got {type(axis).__name__}.")
    if ndim == 0:
        raise ValueError(
            f"kldiv: inputs are scalars but a divergence needs an event axis (`{name}`={axis})."
        )
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"kldiv: `{name}`={axis} is out of range for inputs of rank {ndim} "
            f"(allowed: {-ndim} to {ndim - 1})."
        )
    return int(axis) % ndim


def check_where(where, shape: tuple[int, ...], name: str = "where") -> jax.Array | None:
    """Validates a boolean mask broadcastable to ``shape``; returns it broadcast, or None."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"kldiv: `{name}` must be a boolean mask; got dtype {where.dtype}. "
            f"Use e.g. `{name}=mask.astype(bool)`."
        )
    try:
        out_shape = tuple(np.broadcast_shapes(where.shape, shape))
    except ValueError:
        out_shape = None
    if out_shape != tuple(shape):
        raise ValueError(
            f"kldiv: `{name}` of shape {where.shape} does not broadcast to the inputs' shape "
            f"{tuple(shape)}."
        )
    return jnp.broadcast_to(where, shape)


def check_temperature(temperature) -> None:
    """Python numbers must be > 0; traced values are taken as they are (annealing schedules)."""
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"kldiv: `temperature` must be > 0; got {temperature}.")


def check_same_event_size(names: Sequence[str], sizes: Sequence[int]) -> None:
    """ValueError naming both sizes when two event axes differ."""
    if len(set(sizes)) > 1:
        described = " and ".join(f"`{n}` has {s}" for n, s in zip(names, sizes, strict=True))
        raise ValueError(f"kldiv: event sizes differ: {described}.")


def validate_probs(p: jax.Array, *, axis: int = -1, atol: float = 1e-4, name: str = "p"):
    """Runtime check (opt-in) that ``p`` holds probability vectors along ``axis``.

    Records a ``checkify`` error unless every entry is finite and non-negative and every vector
    sums to 1 within ``atol``. Returns ``p`` unchanged, so it can wrap an argument inline. The check
    only takes effect under ``jax.experimental.checkify.checkify``::

        from jax.experimental import checkify
        checked = checkify.checkify(lambda p, q: kldiv.kl(kldiv.validate_probs(p), q))
        err, value = jax.jit(checked)(p, q)
        err.throw()   # raises with the message below if p is not a distribution

    Outside ``checkify`` a ``checkify.check`` inside ``jit`` raises a trace-time error, so use
    it only in checked functions.
    """
    check_floating(name, p)
    p = jnp.asarray(p)
    axis = check_axis(axis, p.ndim)
    x = p.astype(compute_dtype(p))
    checkify.check(
        jnp.all(jnp.isfinite(x) & (x >= 0)),
        f"kldiv: `{name}` has negative or non-finite entries; probabilities must be in [0, 1].",
    )
    total = jnp.sum(x, axis=axis)
    checkify.check(
        jnp.all(jnp.abs(total - 1) <= atol),
        f"kldiv: `{name}` does not sum to 1 along axis {axis} within atol={atol} "
        "(worst total {total}).",
        total=total.ravel()[jnp.argmax(jnp.abs(total - 1).ravel())],
    )
    return p


def validate_log_probs(
    log_p: jax.Array, *, axis: int = -1, atol: float = 1e-4, name: str = "log_p"
) -> jax.Array:
    """Like :func:`validate_probs` for log-probabilities: no NaN or +inf, logsumexp ≈ 0."""
    check_floating(name, log_p)
    log_p = jnp.asarray(log_p)
    axis = check_axis(axis, log_p.ndim)
    x = log_p.astype(compute_dtype(log_p))
    checkify.check(
        jnp.all(~jnp.isnan(x) & (x < jnp.inf)),
        f"kldiv: `{name}` has NaN or +inf entries; log-probabilities must be in [-inf, 0].",
    )
    total = jnp.exp(jax.nn.logsumexp(x, axis=axis))
    checkify.check(
        jnp.all(jnp.abs(total - 1) <= atol),
        f"kldiv: exp(`{name}`) does not sum to 1 along axis {axis} within atol={atol} "
        "(worst total {total}).",
        total=total.ravel()[jnp.argmax(jnp.abs(total - 1).ravel())],
    )
    return log_p


def check_positive(name: str, value) -> None:
    """Python numbers must be > 0; None and array values are taken as they are."""
    if value is None or isinstance(value, jax.Array):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"kldiv: `{name}` must be a number > 0 or None; got {value!r}.")


def as_keep_mask(mask, shape: tuple[int, ...], name: str) -> jax.Array | None:
    """Boolean view of a keep-mask (numeric weights: nonzero = kept), broadcast to ``shape``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        if not jnp.issubdtype(mask.dtype, jnp.number):
            raise TypeError(f"kldiv: `{name}` must be boolean or numeric; got dtype {mask.dtype}.")
        mask = mask != 0
    return check_where(mask, shape, name)
