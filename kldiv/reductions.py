"""Explicit reductions over examples: the only place where kldiv aggregates per-example values.

Every divergence in kldiv returns one value per example (the event axis is summed away inside the
divergence). How those values become a loss is a modelling choice, so :func:`reduce` makes it an
explicit argument with no default:

===============  ==========================================================================
``"none"``       the values, with masked positions set to 0
``"sum"``        Σ_i m_i v_i
``"mean"``       Σ_i m_i v_i / Σ_i m_i  (mean over kept positions; token mean for [B, T] values)
``"batchmean"``  Σ_i m_i v_i / B        (B = size of the leading axis; torch's ``batchmean``)
``"dataset"``    Σ_i m_i v_i · N / B    (N = ``dataset_size``; minibatch estimate of a dataset sum)
===============  ==========================================================================

``"mean"`` over examples drawn from the data distribution is an unbiased estimate of
E_x[KL(p(·|x) ‖ q(·|x))]. ``"dataset"`` is the minibatch estimator of a sum over a whole data set,
as in the ELBO of a VAE (Kingma & Welling 2014, eq. 8 and 10): N/M × the minibatch sum.

Global normalisers: inside ``shard_map``/``pmap`` pass ``axis_name`` and sums and counts are
combined across devices *before* dividing. For gradient accumulation over micro-batches pass the
normaliser of the whole step explicitly (``count=`` for ``"mean"``, ``batch_size=`` for
``"batchmean"`` and ``"dataset"``), so that Σ over micro-batches of each micro-batch's loss equals
the loss of the whole step; see :func:`count_kept`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._checks import REDUCTIONS, Reduction
from kldiv._numerics import psum

__all__ = ["REDUCTIONS", "Reduction", "count_kept", "reduce"]


def count_kept(mask, *, shape: tuple[int, ...] | None = None, axis_name=None) -> jax.Array:
    """The number of kept positions (Σ mask), summed over ``axis_name`` when given.

    Use it to get the normaliser of a whole step before looping over micro-batches::

        count = kldiv.count_kept(full_mask)                   # tokens kept in the whole step
        loss_k = kldiv.reduce(v_k, "mean", mask=m_k, count=count)   # per micro-batch
        # Σ_k loss_k == reduce(v, "mean", mask=full_mask); the same holds for the gradients.

    With ``mask=None`` pass ``shape`` and the count is its number of elements. Boolean masks count
    kept positions; numeric masks are weights and count their sum.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> mask = jnp.array([[True, True, False], [True, False, False]])
      >>> print(kldiv.count_kept(mask))
      3.0

      Two micro-batches (the rows) reduced with the whole step's count add up to the step's mean:

      >>> values = jnp.array([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
      >>> count = kldiv.count_kept(mask)
      >>> parts = [kldiv.reduce(values[i], "mean", mask=mask[i], count=count) for i in range(2)]
      >>> print(f"{sum(parts):.4f} {kldiv.reduce(values, 'mean', mask=mask):.4f}")
      2.0000 2.0000
    """
    if mask is None:
        if shape is None:
            raise ValueError("kldiv: count_kept needs `mask` or `shape`.")
        return psum(jnp.asarray(float(np.prod(shape)), jnp.float32), axis_name)
    mask = jnp.asarray(mask)
    acc = jnp.float64 if mask.dtype == jnp.float64 else jnp.float32
    return psum(jnp.sum(mask.astype(acc)), axis_name)


def reduce(
    values: ArrayLike,
    reduction: Reduction,
    *,
    mask: ArrayLike | None = None,
    dataset_size: int | ArrayLike | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    count: ArrayLike | float | None = None,
    batch_size: ArrayLike | int | None = None,
) -> jax.Array:
    """Aggregates per-example values into a loss, explicitly.

    Args:
      values: per-example values, e.g. ``[batch]`` or ``[batch, tokens]`` (the output of any
        kldiv divergence). The leading axis is the batch axis for ``"batchmean"``/``"dataset"``.
      reduction: one of ``"none"``, ``"sum"``, ``"mean"``, ``"batchmean"``, ``"dataset"`` (no
        default; see the module docstring for the formulas).
      mask: optional boolean keep-mask (or numeric weights) broadcastable to ``values``. Masked
        positions contribute 0 whatever they hold (NaN and inf included), to values and gradients.
      dataset_size: N for ``"dataset"`` (required there, rejected elsewhere).
      axis_name: a mapped axis name (``shard_map``/``pmap``): sums, counts and batch sizes are
        combined across it with ``psum`` before dividing, so means use global counts.
      count: explicit normaliser for ``"mean"`` (e.g. the kept-token count of a whole
        accumulation step from :func:`count_kept`); used as given, not summed over ``axis_name``.
      batch_size: explicit batch size B for ``"batchmean"`` and ``"dataset"``; used as given.

    Returns:
      ``values`` with masked entries zeroed for ``"none"``, else a scalar. Sums and counts are
      accumulated in float32 at least: float32 comes out for 16-bit values (a float16 count of
      70000 tokens would overflow), else the dtype of ``values``. A ``"mean"`` over zero kept
      positions, and a ``"batchmean"``/``"dataset"`` of an empty batch, give 0, not NaN.

    Raises:
      ValueError: unknown reduction; mask that does not broadcast; missing or misplaced
        ``dataset_size``/``count``/``batch_size``; ``"batchmean"``/``"dataset"`` on a scalar;
        a ``count`` < 0, ``batch_size`` or ``dataset_size`` ≤ 0 or any of them not a scalar;
        numeric ``mask`` weights that are negative or NaN. Values known only under ``jit``
        (traced counts and weights) cannot be checked and are used as given.
      TypeError: a string or boolean ``count``/``batch_size``/``dataset_size``; a mask that is
        neither boolean nor numeric.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> values = jnp.array([0.5, 1.0, 3.0])  # e.g. kldiv.kl(p, q) of a batch of three
      >>> mask = jnp.array([True, True, False])
      >>> print(f"{kldiv.reduce(values, 'sum'):.2f}")
      4.50
      >>> print(f"{kldiv.reduce(values, 'mean', mask=mask):.2f}")  # over the kept entries
      0.75
      >>> print(f"{kldiv.reduce(values, 'batchmean', mask=mask):.2f}")  # divides by B = 3
      0.50
      >>> print(f"{kldiv.reduce(values, 'dataset', dataset_size=300):.1f}")  # N/B × sum
      450.0
      >>> print(np.asarray(kldiv.reduce(values, "none", mask=mask)))
      [0.5 1.  0. ]
    """
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    values = jnp.asarray(values)
    _checks.check_floating("values", values)
    if dataset_size is not None and reduction != "dataset":
        raise ValueError(
            f"kldiv: `dataset_size` only applies to reduction='dataset'; got {reduction!r}."
        )
    if reduction == "dataset" and dataset_size is None:
        raise ValueError(
            "kldiv: reduction='dataset' needs `dataset_size` (N in the N/M × minibatch-sum "
            "estimator of a whole-dataset objective)."
        )
    if count is not None and reduction != "mean":
        raise ValueError(f"kldiv: `count` only applies to reduction='mean'; got {reduction!r}.")
    if batch_size is not None and reduction not in ("batchmean", "dataset"):
        raise ValueError(
            "kldiv: `batch_size` only applies to reduction='batchmean' or 'dataset'; "
            f"got {reduction!r}."
        )
    if reduction in ("batchmean", "dataset") and values.ndim == 0 and batch_size is None:
        raise ValueError(
            f"kldiv: reduction={reduction!r} divides by the leading (batch) axis, but `values` is "
            "a scalar; pass per-example values or `batch_size`."
        )

    _checks.check_scalar_count("count", count, allow_zero=True)
    _checks.check_scalar_count("batch_size", batch_size)
    _checks.check_scalar_count("dataset_size", dataset_size)

    m = _checks.check_mask(mask, values.shape, "mask", numeric=True)
    if m is not None and m.dtype != jnp.bool_ and _checks.is_concrete(m):
        if not bool(np.all(np.asarray(m) >= 0)):  # NaN compares False
            raise ValueError(
                "kldiv: numeric `mask` weights must be ≥ 0 and not NaN (0 drops a position)."
            )
    # Sums and counts accumulate in float32 at least (16-bit values: float32 comes out).
    acc = _checks.compute_dtype(values)
    kept = values.astype(acc)
    if m is not None:
        kept = jnp.where(m.astype(bool), kept, 0)
        if m.dtype != jnp.bool_:
            kept = kept * m.astype(acc)
    if reduction == "none":
        return kept

    total = psum(jnp.sum(kept), axis_name)
    if reduction == "sum":
        return total
    if reduction == "mean":
        if count is None:
            count = count_kept(m, shape=values.shape, axis_name=axis_name)
        return _safe_divide(total, jnp.asarray(count, acc))
    if batch_size is None:
        batch_size = psum(jnp.asarray(values.shape[0], acc), axis_name)
    batch_size = jnp.asarray(batch_size, acc)
    if reduction == "batchmean":
        return _safe_divide(total, batch_size)
    return _safe_divide(total * jnp.asarray(dataset_size, acc), batch_size)


def _safe_divide(total: jax.Array, n: jax.Array) -> jax.Array:
    """total / n, and 0 where n is 0 (an empty batch or no kept position: nothing to average)."""
    return jnp.where(n > 0, total / jnp.where(n > 0, n, 1), jnp.zeros_like(total))
