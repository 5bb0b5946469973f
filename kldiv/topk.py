"""KL against a top-k (sparse) teacher: offline distillation from stored top-k log-probabilities.

Teachers served or stored offline give, per position, only their k most likely token ids and
those tokens' log-probabilities (under the full teacher distribution, so Σ_k e^{lp} ≤ 1). The
student has full logits. Two exact readings of "KL against a top-k teacher":

``tail="renormalize"``
    p̃ = teacher renormalised over its k ids, q̃ = student restricted to the same ids and
    renormalised: KL(p̃ ‖ q̃) = ``kl_from_logits(teacher_log_probs, student_logits[ids])`` over
    the k axis. Ignores where the student puts mass outside the k ids.

``tail="bucket"``
    The coarsened distributions over k + 1 bins: the k ids plus one tail bin holding the rest,
    P_tail = 1 − Σ_k p_i (computed as log1mexp(logsumexp(lp))) and Q_tail = the student's mass
    outside the k ids. This is the exact KL of the coarsened pair, so it also pushes the student's
    mass outside the k ids towards the teacher's tail mass.

Memory beyond the student logits is O(N·k) plus per-row scalars: the student's logsumexp over the
vocabulary is a reduction, and the tail mass is Σ_all − Σ_k of the same centred exponentials.
That difference resolves the student's tail to about 1e-7 of its row in float32; where the
teacher's tail is positive and the student's is below that resolution it is taken at the
resolution (never 0), so the value stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._logits import temper_and_mask
from kldiv._numerics import safe_max, sum_exp
from kldiv.discrete import kl_from_log_probs, kl_from_logits
from kldiv.reductions import Reduction, reduce

__all__ = ["kl_topk_teacher", "validate_topk_ids"]

TAILS = ("renormalize", "bucket")


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − e^x) for x ≤ 0, accurate on both sides of −log 2 (Mächler 2012); −inf for
    x ≥ 0 (an empty tail), with a zero, not NaN, derivative there (double ``where``)."""
    inside = x < 0
    x = jnp.where(inside, x, -1.0)
    far = x < -0.6931471805599453
    value = jnp.where(
        far,
        jnp.log1p(-jnp.exp(jnp.where(far, x, -1.0))),
        jnp.log(-jnp.expm1(jnp.where(far, -1.0, x))),
    )
    return jnp.where(inside, value, -jnp.inf)


def _logsumexp(x: jax.Array) -> jax.Array:
    """logsumexp over the last axis (kept), −inf for rows of −inf, with finite gradients."""
    m = safe_max(jax.lax.stop_gradient(x))
    s = sum_exp(x, m)
    return jnp.where(s > 0, jnp.log(jnp.where(s > 0, s, 1)) + m, -jnp.inf)


def validate_topk_ids(teacher_ids: ArrayLike, vocab_size: int) -> jax.Array:
    """Runtime check (opt-in, under ``checkify``) that ids are in range and distinct per row.

    Records a checkify error if any id is outside [0, vocab_size) or repeats within its row;
    returns ``teacher_ids`` unchanged. Use inside jit as::

        f = checkify.checkify(lambda ids, lp, s: kldiv.kl_topk_teacher(
            kldiv.validate_topk_ids(ids, s.shape[-1]), lp, s, tail="bucket", reduction="none"))
        err, value = jax.jit(f)(ids, lp, s); err.throw()

    Examples:
      >>> import jax.numpy as jnp
      >>> import kldiv
      >>> from jax.experimental import checkify
      >>> check = checkify.checkify(lambda ids: kldiv.validate_topk_ids(ids, 4))
      >>> err, _ = check(jnp.array([[0, 2], [3, 1]]))
      >>> print(err.get())
      None
      >>> err, _ = check(jnp.array([[0, 2], [3, 3]]))
      >>> print(err.get())
      kldiv: `teacher_ids` repeats an id within a row; top-k ids must be distinct...
    """
    teacher_ids = jnp.asarray(teacher_ids)
    ids = _checks.token_ids("teacher_ids", teacher_ids)
    checkify.check(
        jnp.all((ids >= 0) & (ids < vocab_size)),
        f"kldiv: `teacher_ids` has ids outside [0, {vocab_size}).",
    )
    srt = jnp.sort(ids, axis=-1)
    checkify.check(
        jnp.all(srt[..., 1:] != srt[..., :-1]),
        "kldiv: `teacher_ids` repeats an id within a row; top-k ids must be distinct.",
    )
    return teacher_ids


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"kldiv: unknown tail {tail!r}; allowed: 'renormalize', 'bucket'.")


def _check_teacher(teacher_ids: ArrayLike, teacher_log_probs: ArrayLike):
    """The stored teacher as arrays: integer ids and floating log-probs of one shape [..., k]."""
    teacher_ids = _checks.token_ids("teacher_ids", teacher_ids)
    _checks.check_floating("teacher_log_probs", teacher_log_probs)
    lp = jnp.asarray(teacher_log_probs)
    if teacher_ids.shape != lp.shape:
        raise ValueError(
            f"kldiv: `teacher_ids` {teacher_ids.shape} and `teacher_log_probs` {lp.shape} must "
            "have the same shape [..., k]."
        )
    return teacher_ids, lp


def _topk_kl_rows(
    teacher_ids: jax.Array, lp: jax.Array, s: jax.Array, keep: jax.Array | None, tail: str
) -> jax.Array:
    """Per-row top-k KL of prepared inputs: the one copy of the math (see the module docstring).

    ``lp`` ``[..., k]`` in the compute dtype, ``s`` ``[..., V]`` the student logits already cast,
    tempered and masked (``_logits.temper_and_mask``), ``keep`` the boolean slot mask ``[..., k]``
    or None. Returns ``[...]``, NaN where a kept slot holds an id outside [0, V). Differentiable
    (finite gradients) w.r.t. ``lp`` and ``s``; used whole by :func:`kl_topk_teacher` and per row
    chunk by ``kldiv.fused_linear_topk``.
    """
    dtype = s.dtype
    if keep is not None:
        lp = jnp.where(keep, lp, -jnp.inf)

    # Out-of-range ids in kept slots make their position NaN (never an alias of another id):
    # a negative id would otherwise index from the end and an id ≥ V read out of bounds.
    v = s.shape[-1]
    in_range = (teacher_ids >= 0) & (teacher_ids < v)
    bad = ~in_range if keep is None else keep & ~in_range
    s_k = jnp.take_along_axis(s, jnp.clip(teacher_ids, 0, max(v - 1, 0)), axis=-1)
    if keep is not None:
        s_k = jnp.where(keep, s_k, -jnp.inf)

    if tail == "renormalize":
        values = kl_from_logits(lp, s_k, impl="xla")
    else:
        # Student: log q_i = s_i − L over the k ids; tail from the same centred exponentials.
        m = safe_max(jax.lax.stop_gradient(s))
        total = sum_exp(s, m)
        top = jnp.sum(jnp.exp(s_k - m), axis=-1, keepdims=True)
        log_q = s_k - m - jnp.log(total)
        # Teacher tail: log(1 − Σ_k p) via log1mexp of the (≤ 0) logsumexp.
        log_p_tail = _log1mexp(_logsumexp(lp))
        resolution = jnp.finfo(dtype).eps * total
        tail_mass = total - top
        tail_mass = jnp.where(
            log_p_tail > -jnp.inf, jnp.maximum(tail_mass, resolution), jnp.maximum(tail_mass, 0)
        )
        safe = jnp.where(tail_mass > 0, tail_mass, 1)
        log_q_tail = jnp.where(tail_mass > 0, jnp.log(safe) - jnp.log(total), -jnp.inf)
        values = kl_from_log_probs(
            jnp.concatenate([lp, log_p_tail], axis=-1),
            jnp.concatenate([log_q, log_q_tail], axis=-1),
        )
    return jnp.where(jnp.any(bad, axis=-1), jnp.nan, values)


def kl_topk_teacher(
    teacher_ids: ArrayLike,
    teacher_log_probs: ArrayLike,
    student_logits: ArrayLike,
    *,
    tail: str,
    reduction: Reduction,
    temperature: float | ArrayLike = 1.0,
    where: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    softcap: float | tuple[None, float | None] | None = None,
    logit_scale: float | tuple[None, float | None] | None = None,
) -> jax.Array:
    """KL(teacher ‖ student) with a top-k teacher, per position (or reduced).

    Args:
      teacher_ids: ``[..., k]`` integer (any integer dtype), the teacher's top-k token ids
        (distinct, in [0, V)).
      teacher_log_probs: float ``[..., k]``, the teacher's log-probabilities of those ids under
        its full distribution (Σ_k exp ≤ 1; −inf allowed). Compute them at the temperature you
        distil at (for ``"renormalize"``, dividing stored T = 1 log-probs by T is exact).
      student_logits: float ``[..., V]``, the student's full logits.
      tail: ``"renormalize"`` or ``"bucket"`` (no default; see the module docstring).
      temperature: T > 0 dividing the student logits.
      where: optional boolean ``[..., k]``: False marks padding slots (fewer than k ids at a
        position); they are left out of both distributions.
      reduction: how positions are aggregated, required (``"none"`` returns the per-position
        values); see :func:`kldiv.reduce`.
      mask: optional token keep-mask ``[...]`` for the reduction (masked positions give 0).
      softcap, logit_scale: c > 0 and s > 0 (Python numbers, default None: off) of a scaled and
        soft-capped student head, applied to ``student_logits`` before the temperature, in this
        order: logits ← c·tanh(s·x/c), then ÷T, as in :func:`kldiv.kl_from_logits` (−inf stays
        −inf). They apply to the student only: the teacher side is log-probabilities, already
        normalised (compute them from the capped teacher logits). A ``(teacher, student)`` pair
        is accepted with ``None`` as the teacher entry.

    Returns:
      ``[...]`` per-position KL for ``"none"`` (float32 for 16-bit inputs), else the reduced
      scalar. Gradients flow to ``student_logits`` (dense [..., V]) and ``teacher_log_probs``.
      With k = V (all ids) and either tail this equals
      ``kl_from_logits(teacher_logits, student_logits)``.

    Raises:
      TypeError: non-integer ids, non-floating log-probs/logits.
      ValueError: ids and log-probs of different shapes; leading shapes that differ from the
        student's; unknown ``tail``; a Python temperature ≤ 0; a ``softcap``/``logit_scale``
        that is not a finite positive number, or a pair with a teacher entry.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> # Two positions, vocabulary of 5; the teacher kept its top-2 tokens at each.
      >>> teacher_ids = jnp.array([[0, 3], [2, 1]])
      >>> teacher_log_probs = jnp.log(jnp.array([[0.6, 0.3], [0.5, 0.4]]))
      >>> student_logits = jnp.array([[2.0, 0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.5, 0.0, 0.0]])
      >>> per_position = kldiv.kl_topk_teacher(
      ...     teacher_ids, teacher_log_probs, student_logits, tail="bucket", reduction="none"
      ... )
      >>> print(np.asarray(per_position).round(4))
      [0.0654 0.1192]
      >>> loss = kldiv.kl_topk_teacher(
      ...     teacher_ids, teacher_log_probs, student_logits, tail="renormalize", reduction="mean"
      ... )
      >>> print(f"{loss:.4f}")
      0.0097

    References:
      Hinton et al. (2015); sparse/top-k logit distillation as in Raman et al. (2023),
      "For distillation, tokens are not all you need"; log1mexp: Mächler (2012).
    """
    _check_tail(tail)
    teacher_ids, lp = _check_teacher(teacher_ids, teacher_log_probs)
    _checks.check_floating("student_logits", student_logits)
    s = jnp.asarray(student_logits)
    if teacher_ids.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"kldiv: leading shapes differ: `teacher_ids` {teacher_ids.shape} vs "
            f"`student_logits` {s.shape}; expected [..., k] and [..., V] with the same [...]."
        )
    dtype = _checks.compute_dtype(lp, s)
    temperature = _checks.check_temperature(temperature, s.shape[:-1], dtype)
    for name, value in (("softcap", softcap), ("logit_scale", logit_scale)):
        if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] is not None:
            raise ValueError(
                f"kldiv: `{name}` of kl_topk_teacher applies to the student logits only (the "
                f"teacher side is log-probabilities); got the teacher entry {value[0]!r}."
            )
    student_tr = _checks.logit_transforms(logit_scale, softcap, dtype)[1]
    keep = _checks.check_mask(where, lp.shape)
    values = _topk_kl_rows(
        teacher_ids,
        lp.astype(dtype),
        temper_and_mask(s, dtype, temperature, transform=student_tr),
        keep,
        tail,
    )
    return reduce(values, reduction, mask=mask)
