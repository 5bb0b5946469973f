"""Training losses: optax drop-ins and losses with an explicit ``reduction=``.

Drop-ins (optax's exact signatures and argument order, model first):

* :func:`kl_divergence` ``(log_predictions, targets, axis=-1, where=None)``
* :func:`kl_divergence_with_log_targets` ``(log_predictions, log_targets, axis=-1, where=None)``

They return what optax returns wherever optax's value is finite, and the true value where optax
returns NaN on valid input (an entry where target and prediction are both zero). Swap
``optax.losses.`` for ``kldiv.losses.`` and nothing else changes.

Training losses (each takes ``reduction=`` with no default, see :func:`kldiv.reduce`):

* :func:`distillation_loss` — teacher/student logits, temperature (optional Hinton T² scaling),
  ignored-token mask, forward / reverse / generalised-JSD direction.
* :func:`vae_kl` (from :mod:`kldiv.vae`, re-exported here) — the Gaussian VAE KL term (dataset
  scaling, β and annealing schedules, free bits).
* :func:`kl_penalty` (from :mod:`kldiv.estimators`, re-exported here) — the RL KL penalty from
  per-token log-probabilities of sampled tokens (k1/k2/k3 estimators, straight-through
  gradients, clamping), and :func:`kl_penalty_exact`, the zero-variance full-vocabulary penalty.

Static arguments: reduction names, directions, estimators, ``axis`` and Python-number
temperatures/β are configuration; under ``jax.jit`` close over them (or mark them static) and a
train step with fixed shapes compiles once.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._checks import DIRECTIONS, PairOption
from kldiv._numerics import kl_terms
from kldiv.discrete import kl_from_logits
from kldiv.estimators import kl_penalty, kl_penalty_exact
from kldiv.family import js_from_logits
from kldiv.reductions import Reduction, reduce
from kldiv.vae import vae_kl

__all__ = [
    "distillation_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "kl_penalty",
    "kl_penalty_exact",
    "vae_kl",
]


def _event_last(x: jax.Array, axis: int | Sequence[int] | None) -> jax.Array:
    """Moves ``axis`` (an int, a tuple of ints, or None for all) to one trailing event axis."""
    if axis is None:
        axis = tuple(range(x.ndim))
    if isinstance(axis, int):
        axis = (axis,)
    axis = tuple(_checks.check_axis(a, x.ndim) for a in axis)
    if len(set(axis)) != len(axis):
        raise ValueError(f"kldiv: `axis` repeats an axis: {axis}.")
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    return x.reshape(*x.shape[: x.ndim - len(axis)], -1)


def _optax_style(log_p, p, log_q, where, axis):
    """Σ p (log p − log q) (optax's value), as non-negative terms plus the Σ(p − q) residual."""
    shape = _checks.broadcast_shapes(("log_targets", "log_predictions"), (log_p.shape, log_q.shape))
    dtype = _checks.compute_dtype(log_p, log_q)
    log_p = jnp.broadcast_to(log_p.astype(dtype), shape)
    p = jnp.broadcast_to(p.astype(dtype), shape)
    log_q = jnp.broadcast_to(log_q.astype(dtype), shape)
    keep = _checks.check_mask(where, shape)
    if keep is not None:
        p = jnp.where(keep, p, 0)
        log_p = jnp.where(keep, log_p, -jnp.inf)
        log_q = jnp.where(keep, log_q, -jnp.inf)
    both = (log_p == -jnp.inf) & (log_q == -jnp.inf)
    x = jnp.where(both, 0, log_p - log_q)
    q = jnp.exp(log_q)
    terms = kl_terms(p, q, x) + (p - q)
    return jnp.sum(_event_last(terms, axis), axis=-1)


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Drop-in for ``optax.losses.kl_divergence``: Σ targets·(log targets − log_predictions).

    Note the optax argument order: the model's log-probabilities first, the target
    probabilities second. This is KL(targets ‖ predictions).

    Args:
      log_predictions: the model's log-probabilities, ``[..., dim]``.
      targets: target probabilities, broadcastable against ``log_predictions``.
      axis: axis or axes summed over (None: all).
      where: optional boolean mask of entries to include.

    Returns:
      optax's value wherever it is finite; at entries where target and prediction are both 0
      (optax: NaN) the entry contributes its true value 0. Gradients are finite wherever the value
      is (d/dlog_predictions = −targets, as optax).

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_predictions = jnp.log(jnp.array([0.25, 0.75]))  # the model, first (optax order)
      >>> targets = jnp.array([0.5, 0.5])
      >>> print(f"{kldiv.losses.kl_divergence(log_predictions, targets):.4f}")
      0.1438

      Where a target and its prediction are both 0 (optax: NaN) the entry contributes 0:

      >>> log_predictions = jnp.log(jnp.array([0.5, 0.5, 0.0]))
      >>> targets = jnp.array([1.0, 0.0, 0.0])
      >>> print(f"{kldiv.losses.kl_divergence(log_predictions, targets):.4f}")
      0.6931
    """
    _checks.check_floating("log_predictions", log_predictions)
    _checks.check_floating("targets", targets)
    targets = jnp.asarray(targets)
    safe = jnp.where(targets > 0, targets, 1)
    log_t = jnp.where(targets > 0, jnp.log(safe), -jnp.inf)
    return _optax_style(log_t, targets, jnp.asarray(log_predictions), where, axis)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Drop-in for ``optax.losses.kl_divergence_with_log_targets``.

    Σ exp(log_targets)·(log_targets − log_predictions) along ``axis``: KL(targets ‖ predictions),
    model first as in optax. Same values as optax wherever optax is finite; entries with both
    log-probabilities −inf contribute 0 instead of NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> log_predictions = jnp.log(jnp.array([0.25, 0.75]))  # the model, first (optax order)
      >>> log_targets = jnp.log(jnp.array([0.5, 0.5]))
      >>> loss = kldiv.losses.kl_divergence_with_log_targets(log_predictions, log_targets)
      >>> print(f"{loss:.4f}")
      0.1438
    """
    _checks.check_floating("log_predictions", log_predictions)
    _checks.check_floating("log_targets", log_targets)
    log_targets = jnp.asarray(log_targets)
    return _optax_style(
        log_targets, jnp.exp(log_targets), jnp.asarray(log_predictions), where, axis
    )


def distillation_loss(
    teacher_logits: ArrayLike,
    student_logits: ArrayLike,
    *,
    reduction: Reduction,
    mask: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    scale_by_temperature_squared: bool = False,
    direction: str = "forward",
    beta: float = 0.5,
    where: ArrayLike | None = None,
    stop_teacher_gradient: bool = True,
    impl: str = "auto",
    softcap: PairOption = None,
    logit_scale: PairOption = None,
    dataset_size: int | ArrayLike | None = None,
    count: ArrayLike | float | None = None,
    batch_size: ArrayLike | int | None = None,
) -> jax.Array:
    """Knowledge-distillation loss between teacher and student logits.

    Per token, with p = softmax(teacher/T), q = softmax(student/T):

    * ``"forward"``: KL(p ‖ q) (mode-covering; Hinton et al. 2015);
    * ``"reverse"``: KL(q ‖ p) (mode-seeking; Gu et al. 2024, MiniLLM);
    * ``"jsd"``: the generalised Jensen–Shannon divergence
      β·KL(p ‖ m) + (1 − β)·KL(q ‖ m), m = βp + (1 − β)q (Agarwal et al. 2024, GKD);

    then ``kldiv.reduce(values, reduction, mask=mask, dataset_size=..., count=...,
    batch_size=...)``, times T² when
    ``scale_by_temperature_squared`` (Hinton et al.'s factor, which keeps gradient magnitudes
    comparable across temperatures).

    Args:
      teacher_logits: ``[..., V]`` teacher logits (gradient stopped unless
        ``stop_teacher_gradient=False``).
      student_logits: ``[..., V]`` student logits.
      reduction: ``"none"``, ``"sum"``, ``"mean"``, ``"batchmean"`` or ``"dataset"``.
      mask: token keep-mask ``[...]`` (ignored tokens: padding, prompt); ``"mean"`` divides by
        the kept-token count.
      temperature: T > 0.
      scale_by_temperature_squared: multiply by T².
      direction: ``"forward"``, ``"reverse"`` or ``"jsd"``.
      beta: mixture weight for ``"jsd"`` (0.5: the standard JSD).
      where: optional vocabulary mask ``[..., V]`` (excluded entries as if −inf).
      stop_teacher_gradient: apply ``jax.lax.stop_gradient`` to the teacher logits.
      impl: implementation of the logits KL (``kldiv.kl_from_logits``).
      softcap: logit soft-cap c·tanh(x/c) before the temperature (Gemma 2's final-logit
        soft-capping): None, one Python number for both, or a ``(teacher, student)`` pair
        (``kldiv.kl_from_logits``); it follows the teacher and the student in every direction.
      logit_scale: a factor applied to the logits before the soft-cap, in the same forms.
      dataset_size, count, batch_size: passed to ``kldiv.reduce`` (``"dataset"`` scaling; a
        global kept-token count for ``"mean"`` across devices, processes or micro-batches; the
        global batch size for ``"batchmean"``/``"dataset"``).

    Returns:
      The reduced loss (or per-token values for ``"none"``), float32 for 16-bit inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> teacher = jnp.array([[[2.0, 1.0, 0.1], [0.5, 0.5, 0.5]]])  # [batch, tokens, V]
      >>> student = jnp.array([[[1.5, 1.5, 0.0], [1.0, 0.0, 0.0]]])
      >>> mask = jnp.array([[True, False]])  # the second token is padding
      >>> loss = kldiv.losses.distillation_loss(teacher, student, reduction="mean", mask=mask)
      >>> print(f"{loss:.4f}")
      0.1000
      >>> per_token = kldiv.losses.distillation_loss(
      ...     teacher, student, reduction="none", temperature=2.0,
      ...     scale_by_temperature_squared=True, direction="jsd",
      ... )
      >>> print(np.asarray(per_token).round(4))
      [[0.0247 0.0295]]
    """
    _checks.check_choice("direction", direction, DIRECTIONS)
    if stop_teacher_gradient:
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
    caps = _checks.check_logit_transform("softcap", softcap)
    scales = _checks.check_logit_transform("logit_scale", logit_scale)
    if direction == "forward":
        values = kl_from_logits(
            teacher_logits,
            student_logits,
            where=where,
            temperature=temperature,
            impl=impl,
            softcap=caps,
            logit_scale=scales,
        )
    elif direction == "reverse":  # the student is the first argument: swap the pairs
        values = kl_from_logits(
            student_logits,
            teacher_logits,
            where=where,
            temperature=temperature,
            impl=impl,
            softcap=(caps[1], caps[0]),
            logit_scale=(scales[1], scales[0]),
        )
    else:
        values = js_from_logits(
            teacher_logits,
            student_logits,
            beta=beta,
            where=where,
            temperature=temperature,
            softcap=caps,
            logit_scale=scales,
        )
    loss = reduce(
        values,
        reduction,
        mask=mask,
        dataset_size=dataset_size,
        count=count,
        batch_size=batch_size,
    )
    if scale_by_temperature_squared:
        loss = loss * jnp.asarray(temperature, loss.dtype) ** 2
    return loss
