"""Input validation: the one place where kldiv checks dtypes, shapes and axes.

Every check here runs at trace time (on static shapes and dtypes), so a wrong call fails when the
function is traced, with a message that names the argument, what it got and what is allowed.
The optional *runtime* check of probability values goes through ``jax.experimental.checkify``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.experimental import checkify
from jax.typing import ArrayLike

__all__ = ["validate_log_probs", "validate_probs"]

Reduction = Literal["none", "sum", "mean", "batchmean", "dataset"]
"""The explicit reductions of :func:`kldiv.reduce` (one alias, used by every reducing function)."""
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean", "batchmean", "dataset")

Direction = Literal["forward", "reverse", "jsd"]
"""Distillation directions: KL(p‖q), KL(q‖p) or the generalised Jensen–Shannon divergence."""
DIRECTIONS: tuple[str, ...] = ("forward", "reverse", "jsd")


def check_choice(name: str, value, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``; ValueError naming ``name`` and the choices."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"kldiv: unknown {name} {value!r}; allowed: " + ", ".join(map(repr, allowed))
        )
    return value


def check_floating(name: str, x) -> None:
    """Raises TypeError unless ``x`` has a floating dtype (array-likes such as nested lists of
    Python floats count as floating, as in ``jnp.asarray``)."""
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError as e:
            raise TypeError(f"kldiv: `{name}` is not an array-like of numbers: {e}") from None
    try:
        dtype = jnp.result_type(x)
    except TypeError:
        raise TypeError(
            f"kldiv: `{name}` must be an array or array-like of floats; got {type(x).__name__}."
        ) from None
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


def broadcast_floating(
    names: Sequence[str], xs: Sequence, *, cast: bool = True
) -> tuple[list[jax.Array], tuple[int, ...]]:
    """The one preparation of several floating arguments: each checked (TypeError naming it),
    all broadcast to one shape (ValueError naming every shape) and, with ``cast``, cast to their
    common compute dtype (:func:`compute_dtype`). Returns the arrays and the shape."""
    for name, x in zip(names, xs, strict=True):
        check_floating(name, x)
    arrays = [as_array(x) for x in xs]
    shape = broadcast_shapes(names, [x.shape for x in arrays])
    if cast:
        dtype = compute_dtype(*arrays)
        arrays = [cast_to(x, dtype) for x in arrays]
    return [broadcast_to(x, shape) for x in arrays], shape


def as_array(x) -> jax.Array:
    """``x`` as an array, without staging a copy: jax arrays (tracers too) and numpy arrays as they
    are (a numpy array becomes a device array when it enters the compiled program), anything else
    (Python numbers, nested lists) through ``jnp.asarray``. ``jnp.asarray`` of a numpy array
    compiles a copy program per shape and dtype, which an eager call would pay on every new shape.
    """
    if isinstance(x, (jax.Array, np.ndarray)):
        return cast(jax.Array, x)  # a numpy array stands in for the device array it becomes
    return jnp.asarray(x)


def cast_to(x, dtype):
    """``x`` in ``dtype``; ``x`` itself (no operation) when it already has it."""
    return x if x.dtype == dtype else x.astype(dtype)


def broadcast_to(x, shape: tuple[int, ...]):
    """``x`` broadcast to ``shape``; ``x`` itself (no operation) when it already has it."""
    return x if tuple(x.shape) == tuple(shape) else jnp.broadcast_to(x, shape)


def move_to_last(x, axis: int):
    """``x`` with (normalised) ``axis`` moved last; ``x`` itself when it already is last."""
    return x if axis == x.ndim - 1 else jnp.moveaxis(x, axis, -1)


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


def check_mask(
    mask, shape: tuple[int, ...], name: str = "where", *, numeric: bool = False
) -> jax.Array | None:
    """The one mask check: ``mask`` broadcast to ``shape``, or None when it is None.

    ``numeric=False`` (event-axis ``where`` masks) requires a boolean mask; ``numeric=True``
    (per-example ``mask`` weights of a reduction) also accepts numbers, returned as they are.
    TypeError names ``name`` and its dtype; ValueError names it, its shape and ``shape``.
    """
    if mask is None:
        return None
    mask = as_array(mask)
    if mask.dtype != jnp.bool_ and not (numeric and jnp.issubdtype(mask.dtype, jnp.number)):
        allowed = "boolean or numeric" if numeric else "a boolean mask"
        raise TypeError(
            f"kldiv: `{name}` must be {allowed}; got dtype {mask.dtype}. "
            f"Use e.g. `{name}=m.astype(bool)`."
        )
    check_broadcasts_to(name, mask.shape, shape, "a mask")
    return broadcast_to(mask, tuple(shape))


def check_broadcasts_to(name: str, got: tuple[int, ...], shape: tuple[int, ...], what: str = ""):
    """ValueError naming ``name``, its shape ``got`` and ``shape`` unless ``got`` broadcasts to
    ``shape`` without changing it; ``what`` describes the argument's role in the message."""
    try:
        out_shape = tuple(np.broadcast_shapes(tuple(got), tuple(shape)))
    except ValueError:
        out_shape = None
    if out_shape != tuple(shape):
        role = f" ({what})" if what else ""
        raise ValueError(
            f"kldiv: `{name}`{role} of shape {tuple(got)} does not broadcast to the shape "
            f"{tuple(shape)}."
        )


def is_concrete(x) -> bool:
    """Whether ``x`` has a value now (not a tracer under jit/grad/vmap)."""
    return not isinstance(x, Tracer)


def check_temperature(temperature, batch_shape: tuple[int, ...] | None = None, dtype=None):
    """The one check of a temperature; returns it ready to divide ``[..., V]`` logits by.

    A Python number must be finite and > 0 (and, with ``dtype``, at least that dtype's smallest
    normal number, below which the division flushes to zero); it is returned as a float. An
    array must be real; one value (shape ``()``) or one per example, broadcastable to
    ``batch_shape`` (the logits' shape without the event axis), returned with a trailing axis
    so that it broadcasts over the vocabulary. Concrete arrays are held to the same bounds as
    numbers; traced ones are used as given (check them with ``checkify`` if they can be ≤ 0).
    TypeError for booleans, strings and other objects, ValueError for values or shapes outside
    this, each naming `temperature`.
    """
    if isinstance(temperature, bool) or isinstance(temperature, np.bool_):
        raise TypeError("kldiv: `temperature` must be a number > 0 or a real array; got a bool.")
    tiny = float(jnp.finfo(dtype).tiny) if dtype is not None else 0.0
    allowed = f"≥ {tiny:.3g} (the smallest normal {jnp.dtype(dtype).name})" if tiny else "> 0"
    if isinstance(temperature, numbers.Real):
        t = float(temperature)
        if not (np.isfinite(t) and t > 0 and t >= tiny):
            raise ValueError(f"kldiv: `temperature` must be finite and {allowed}; got {t}.")
        return t
    if not hasattr(temperature, "dtype") and not isinstance(temperature, (list, tuple)):
        raise TypeError(
            "kldiv: `temperature` must be a number > 0 or a real array; got "
            f"{type(temperature).__name__}."
        )
    t = jnp.asarray(temperature)
    if not (jnp.issubdtype(t.dtype, jnp.floating) or jnp.issubdtype(t.dtype, jnp.integer)):
        raise TypeError(f"kldiv: `temperature` must be real; got dtype {t.dtype}.")
    if is_concrete(t) and t.size:
        # on the host: a device comparison would flush a subnormal value to 0 first
        values = np.asarray(t, np.float64)
        bad = values[~(np.isfinite(values) & (values > 0) & (values >= tiny))]
        if bad.size:
            raise ValueError(
                f"kldiv: `temperature` must be finite and {allowed}; got {bad[:3].tolist()}."
            )
    if t.ndim == 0:
        return t
    if batch_shape is None:
        raise ValueError(f"kldiv: `temperature` must be a scalar here; got shape {t.shape}.")
    check_broadcasts_to(
        "temperature",
        t.shape,
        tuple(batch_shape),
        "one value per example: the inputs' shape without the event axis",
    )
    return t[..., None]


LogitTransform = tuple[float | None, float | None]
"""(logit_scale, softcap) of one side of a pair of logits: Python floats, None where off."""

PairOption = float | tuple[float | None, float | None] | None
"""The type of ``softcap=`` and ``logit_scale=``: None (off), one Python number for both inputs,
or a ``(teacher, student)`` pair of numbers or None (:func:`check_logit_transform`)."""


def check_logit_transform(name: str, value, dtype=None) -> tuple[float | None, float | None]:
    """The one check of ``softcap=`` / ``logit_scale=``; returns the (teacher, student) values.

    ``value``: None (off on both sides), a Python number (the same on both sides) or a
    ``(teacher, student)`` pair of Python numbers or None. Each number must be finite and > 0
    (and, with ``dtype``, between that dtype's smallest normal number and its largest finite
    one, so that it is representable in the compute dtype). TypeError for arrays, booleans,
    strings and other objects (the transform is static: it is applied per chunk or block by the
    fused paths), ValueError for values outside this, each naming ``name``.
    """
    if value is None:
        return None, None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(
                f"kldiv: `{name}` as a pair must be (teacher, student), two Python numbers or "
                f"None; got {len(value)} entries."
            )
        teacher, student = (_logit_transform_number(name, v, dtype) for v in value)
        return teacher, student
    number = _logit_transform_number(name, value, dtype)
    return number, number


def _logit_transform_number(name: str, value, dtype) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"kldiv: `{name}` must be None, a Python number > 0 or a (teacher, student) pair of "
            f"them (a static value); got {type(value).__name__}."
        )
    v = float(value)
    lo = float(jnp.finfo(dtype).tiny) if dtype is not None else 0.0
    hi = float(jnp.finfo(dtype).max) if dtype is not None else np.inf
    if not (np.isfinite(v) and v > 0 and lo <= v <= hi):
        allowed = f"in [{lo:.3g}, {hi:.3g}] (normal {jnp.dtype(dtype).name})" if dtype else "> 0"
        raise ValueError(f"kldiv: `{name}` must be finite and {allowed}; got {v}.")
    return v


def logit_transforms(
    logit_scale, softcap, dtype=None
) -> tuple[LogitTransform | None, LogitTransform | None]:
    """``logit_scale=`` and ``softcap=`` checked (:func:`check_logit_transform`) and regrouped
    per side: ((teacher scale, teacher cap), (student scale, student cap)), a side being None
    where it has neither (a scale of exactly 1 counts as none)."""
    scales = check_logit_transform("logit_scale", logit_scale, dtype)
    caps = check_logit_transform("softcap", softcap, dtype)
    out = []
    for s, c in zip(scales, caps, strict=True):
        s = None if s == 1.0 else s
        out.append(None if s is None and c is None else (s, c))
    return out[0], out[1]


def check_same_event_size(names: Sequence[str], sizes: Sequence[int]) -> None:
    """ValueError naming both sizes when two event axes differ."""
    if len(set(sizes)) > 1:
        described = " and ".join(f"`{n}` has {s}" for n, s in zip(names, sizes, strict=True))
        raise ValueError(f"kldiv: event sizes differ: {described}.")


def _check_total_is_one(what: str, total: jax.Array, axis: int, atol: float) -> None:
    """Records a checkify error unless every total is 1 within ``atol`` (naming the worst)."""
    checkify.check(
        jnp.all(jnp.abs(total - 1) <= atol),
        f"kldiv: {what} does not sum to 1 along axis {axis} within atol={atol} "
        "(worst total {total}).",
        total=total.ravel()[jnp.argmax(jnp.abs(total - 1).ravel())],
    )


def validate_probs(p: ArrayLike, *, axis: int = -1, atol: float = 1e-4, name: str = "p"):
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

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> from jax.experimental import checkify
      >>> def checked_kl(p, q):
      ...     return kldiv.kl(kldiv.validate_probs(p), q)
      >>> q = jnp.array([0.25, 0.75])
      >>> err, value = checkify.checkify(checked_kl)(jnp.array([0.5, 0.5]), q)
      >>> print(err.get(), f"{value:.4f}")
      None 0.1438
      >>> err, _ = checkify.checkify(checked_kl)(jnp.array([0.5, 0.6]), q)
      >>> print(err.get())
      kldiv: `p` does not sum to 1 along axis 0 within atol=0.0001 (worst total 1.1...)...
    """
    check_floating(name, p)
    p = jnp.asarray(p)
    axis = check_axis(axis, p.ndim)
    x = p.astype(compute_dtype(p))
    checkify.check(
        jnp.all(jnp.isfinite(x) & (x >= 0)),
        f"kldiv: `{name}` has negative or non-finite entries; probabilities must be in [0, 1].",
    )
    _check_total_is_one(f"`{name}`", jnp.sum(x, axis=axis), axis, atol)
    return p


def validate_log_probs(
    log_p: ArrayLike, *, axis: int = -1, atol: float = 1e-4, name: str = "log_p"
) -> jax.Array:
    """Like :func:`validate_probs` for log-probabilities: no NaN or +inf, logsumexp ≈ 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> from jax.experimental import checkify
      >>> def checked_kl(log_p, log_q):
      ...     return kldiv.kl_from_log_probs(kldiv.validate_log_probs(log_p), log_q)
      >>> log_q = jnp.log(jnp.array([0.25, 0.75]))
      >>> err, value = checkify.checkify(checked_kl)(jnp.log(jnp.array([0.5, 0.5])), log_q)
      >>> print(err.get(), f"{value:.4f}")
      None 0.1438
      >>> err, _ = checkify.checkify(checked_kl)(jnp.array([0.0, 0.0]), log_q)
      >>> print(err.get())
      kldiv: exp(`log_p`) does not sum to 1 along axis 0 within atol=0.0001 (worst total 2...)...
    """
    check_floating(name, log_p)
    log_p = jnp.asarray(log_p)
    axis = check_axis(axis, log_p.ndim)
    x = log_p.astype(compute_dtype(log_p))
    checkify.check(
        jnp.all(~jnp.isnan(x) & (x < jnp.inf)),
        f"kldiv: `{name}` has NaN or +inf entries; log-probabilities must be in [-inf, 0].",
    )
    _check_total_is_one(f"exp(`{name}`)", jnp.exp(jax.nn.logsumexp(x, axis=axis)), axis, atol)
    return log_p


def check_scalar_count(name: str, value, *, allow_zero: bool = False) -> None:
    """A count-like argument (``count``, ``batch_size``, ``dataset_size``): None, or one real
    number; concrete values must be > 0 (≥ 0 with ``allow_zero``). Traced values are used as
    given. TypeError/ValueError naming ``name`` otherwise."""
    if value is None:
        return
    v = _real_scalar(name, value)
    if is_concrete(v):
        ok = bool(v >= 0) if allow_zero else bool(v > 0)
        if not ok:
            bound = "≥ 0" if allow_zero else "> 0"
            raise ValueError(f"kldiv: `{name}` must be {bound}; got {value!r}.")


def check_positive(name: str, value) -> None:
    """Python numbers must be > 0; None and array values are taken as they are."""
    if value is None or isinstance(value, jax.Array):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not float(value) > 0:
        raise ValueError(f"kldiv: `{name}` must be a number > 0 or None; got {value!r}.")


def check_grad_filter(value) -> float | None:
    """``grad_filter`` of the fused linear head: None (exact), or a Python number ≥ 0 (a static
    threshold; it is part of the compiled configuration). Returned as a float. TypeError for
    booleans, arrays and other objects, ValueError for negative, NaN or infinite values."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            "kldiv: `grad_filter` must be None or a Python number ≥ 0 (a static threshold on "
            f"the per-token student-logit gradient); got {type(value).__name__}."
        )
    v = float(value)
    if not (np.isfinite(v) and v >= 0):
        raise ValueError(f"kldiv: `grad_filter` must be finite and ≥ 0; got {value!r}.")
    return v


def as_keep_mask(mask, shape: tuple[int, ...], name: str) -> jax.Array | None:
    """Boolean view of a keep-mask (numeric weights: nonzero = kept), broadcast to ``shape``."""
    mask = check_mask(mask, shape, name, numeric=True)
    return mask if mask is None or mask.dtype == jnp.bool_ else mask != 0


def _real_scalar(name: str, value, what: str = "") -> jax.Array:
    """``value`` as a real scalar array: a Python number or an array of shape ``()`` and an
    integer or floating dtype. TypeError/ValueError naming ``name`` otherwise (``what``: a
    remark added to the shape error)."""
    if isinstance(value, (bool, np.bool_, str)) or not (
        isinstance(value, numbers.Real) or hasattr(value, "dtype")
    ):
        raise TypeError(f"kldiv: `{name}` must be a number or a scalar array; got {value!r}.")
    v = jnp.asarray(value)
    if v.ndim != 0:
        raise ValueError(f"kldiv: `{name}` must be a scalar{what}; got shape {v.shape}.")
    if not (jnp.issubdtype(v.dtype, jnp.integer) or jnp.issubdtype(v.dtype, jnp.floating)):
        raise TypeError(f"kldiv: `{name}` must be real; got dtype {v.dtype}.")
    return v


def check_static_int(name: str, value, minimum: int) -> int:
    """A static integer option (a chunk size, a sample count): a Python int ≥ ``minimum``,
    returned as an int. ValueError naming ``name`` for anything else (floats, booleans, strings,
    arrays, smaller values)."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not integral or value < minimum:
        raise ValueError(f"kldiv: `{name}` must be a Python int ≥ {minimum}; got {value!r}.")
    return int(value)


def check_scalar_weight(name: str, value) -> None:
    """A loss weight (``soft_weight``, ``hard_weight``): a Python number or a real scalar array
    (traced values are used as given). TypeError/ValueError naming ``name`` otherwise."""
    _real_scalar(name, value, " (one weight for every token; per-token weights go in `mask`)")


def token_ids(name: str, ids) -> jax.Array:
    """Integer token ids (labels, top-k ids) as an array of a signed dtype that holds every
    value of theirs and every vocabulary bound: int32, or int64 for 64-bit and uint32 ids
    where 64-bit types are enabled.

    Comparisons such as ``ids < V`` and ``ids == ignore_index`` are made in the ids' dtype, in
    which a narrow or unsigned one would wrap the bound: V = 65536 is 0 as a uint16 and
    ignore_index = −100 is 156 as a uint8, so every id of a 65536-token vocabulary stored as
    uint16 would fall out of range. TypeError naming ``name`` for non-integer ids.
    """
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"kldiv: `{name}` must have an integer dtype; got {ids.dtype}.")
    wide = ids.dtype.itemsize > 4 or (ids.dtype.itemsize == 4 and ids.dtype.kind == "u")
    target = jax.dtypes.canonicalize_dtype(jnp.int64 if wide else jnp.int32)
    return ids if ids.dtype == target else ids.astype(target)
