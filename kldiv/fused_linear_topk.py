"""Top-k teacher KL from a student's linear head: the student logits are never materialised.

Offline distillation stores, per position, the teacher's top-k token ids and their
log-probabilities (:func:`kldiv.kl_topk_teacher` compares them with full student logits). Here the
student is given by its hidden states ``[N, H]`` and output projection ``[H, V]``;
:func:`fused_linear_topk_kl` walks over chunks of C tokens exactly like
:func:`kldiv.fused_linear_kl`: per chunk one matmul gives the ``[C, V]`` student logits, the
per-token top-k KL (the per-row math of :mod:`kldiv.topk`, shared) and its gradient w.r.t. those
logits and the teacher log-probs, and — for the scalar reductions — that gradient is folded into
``grad_hidden`` and ``grad_weight`` at once. ``reduction="none"`` recomputes in the backward pass.

Memory beyond the inputs: O(N·k + C·V + H·V) instead of the O(N·V) of the logits.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kldiv import _checks
from kldiv._checks import REDUCTIONS, Reduction
from kldiv._logits import static_temperature, temper_and_mask
from kldiv._numerics import match_vma
from kldiv.fused._rows import for_each_chunk, put_rows, rows
from kldiv.fused_linear import (
    _accumulate_weight_grad,
    _check_matrix,
    _chunk_tokens,
    _fused_reduce,
    _hidden_grad_t,
    _operands,
    _weight_grad,
)
from kldiv.topk import _check_tail, _check_teacher, _topk_kl_rows

__all__ = ["fused_linear_topk_kl"]


class _Config(NamedTuple):
    """Static (hashable) configuration of one fused call."""

    tail: str
    chunk: int  # tokens per chunk
    temperature: float | None  # a static temperature; None: traced (its gradient is computed)


def _chunk_rows(cfg: _Config, hs_c, ws, ids_c, lp_c, keep_c, t, ct) -> tuple[jax.Array, ...]:
    """One chunk of C tokens: per-token values and, given the cotangent ``ct`` ``[C]``, the
    ct-weighted gradients w.r.t. the chunk's logits ``[C, V]``, log-probs ``[C, k]`` and the
    (traced) temperature per token ``[C, 1]``."""
    cdt = lp_c.dtype
    z = jnp.matmul(hs_c, ws, preferred_element_type=cdt)

    def per_token(z, lp, t_rows):
        temp = cfg.temperature if cfg.temperature is not None else t_rows
        return _topk_kl_rows(ids_c, lp, temper_and_mask(z, cdt, temp), keep_c, cfg.tail)

    t_rows = jnp.broadcast_to(t, (z.shape[0], 1))
    if ct is None:
        return (per_token(z, lp_c, t_rows),)
    values, vjp = jax.vjp(per_token, z, lp_c, t_rows)
    dz, dlp, dt = vjp(ct.astype(cdt))
    return values, dz, dlp, dt[:, 0]


def _pass(cfg: _Config, hs, ws, ids, lp, keep, t, weights, grads: bool) -> tuple[jax.Array, ...]:
    """One walk over the token chunks: per-token values and, if ``grads``, Σ_i weights_i·∇ℓ_i
    w.r.t. hidden states, weight, log-probs and temperature."""
    n, c = hs.shape[0], cfg.chunk
    cdt = lp.dtype

    def chunk(start):
        hs_c = rows(hs, start, c)
        keep_c = None if keep is None else rows(keep, start, c)
        ct = rows(weights, start, c) if grads else None
        args = (rows(ids, start, c), rows(lp, start, c), keep_c, t, ct)
        return (hs_c, *_chunk_rows(cfg, hs_c, ws, *args))

    def body(start, first_new, carry):
        hs_c, values, *grad_c = chunk(start)
        out = (put_rows(carry[0], values, start),)
        if grads:
            dz, dlp, dt = grad_c
            gh_t = jax.lax.dynamic_update_slice_in_dim(carry[1], _hidden_grad_t(dz, ws), start, 1)
            # Rows of the (overlapping) last chunk that an earlier chunk already covered count
            # once in the sums (grad_weight, temperature); the per-row outputs are rewritten.
            fresh = (start + jnp.arange(c)) >= first_new
            gw = _accumulate_weight_grad(carry[2], jnp.where(fresh[:, None], hs_c, 0), dz)
            glp = put_rows(carry[3], dlp, start)
            out += (gh_t, gw, glp, carry[4] + jnp.sum(jnp.where(fresh, dt, 0)))
        return out

    # Varying like the inputs inside shard_map, so that the loop carry keeps one type.
    values0 = cast(jax.Array, match_vma(jnp.zeros((n,), cdt), lp)[0])
    if not grads:
        return for_each_chunk(n, c, body, (values0,))
    # The first chunk starts the sums (its weight-gradient product is the accumulator).
    hs_0, values, dz, dlp, dt = chunk(0)
    gh_t = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros(hs.shape[::-1], cdt), _hidden_grad_t(dz, ws), 0, 1
    )
    init = (
        put_rows(values0, values, 0),
        gh_t,
        _weight_grad(hs_0, dz),
        put_rows(jnp.zeros(lp.shape, cdt), dlp, 0),
        jnp.sum(dt),
    )
    out = for_each_chunk(n, c, body, init, first=1)
    # (per-token values, grad hidden, grad weight, grad log-probs, grad temperature)
    return out[0], out[1].T, out[2], out[3], out[4]


# Scalar reductions (linear in the per-token values): gradients are folded in the forward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scalar(cfg, hs, ws, ids, lp, keep, t, weights):
    return _fused_scalar_fwd(cfg, hs, ws, ids, lp, keep, t, weights)[0]


def _fused_scalar_fwd(cfg, hs, ws, ids, lp, keep, t, weights):
    values, gh, gw, glp, gt = _pass(cfg, hs, ws, ids, lp, keep, t, weights, grads=True)
    total = jnp.sum(weights * values)
    res = (gh.astype(hs.dtype), gw.astype(ws.dtype), glp.astype(lp.dtype), gt.astype(t.dtype))
    return (total, values), res


def _fused_scalar_bwd(cfg, res, cts):
    gh, gw, glp, gt = res
    g = cts[0]  # the per-token values are only used under stop_gradient
    scale = lambda x: (g * x).astype(x.dtype)  # noqa: E731
    return (scale(gh), scale(gw), None, scale(glp), None, scale(gt), None)


_fused_scalar.defvjp(_fused_scalar_fwd, _fused_scalar_bwd)


# reduction="none": the cotangent is per token, so the backward pass recomputes the logits.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_values(cfg, hs, ws, ids, lp, keep, t):
    return _pass(cfg, hs, ws, ids, lp, keep, t, None, grads=False)[0]


def _fused_values_fwd(cfg, hs, ws, ids, lp, keep, t):
    return _fused_values(cfg, hs, ws, ids, lp, keep, t), (hs, ws, ids, lp, keep, t)


def _fused_values_bwd(cfg, res, g):
    hs, ws, ids, lp, keep, t = res
    _, gh, gw, glp, gt = _pass(cfg, hs, ws, ids, lp, keep, t, g, grads=True)
    return (gh.astype(hs.dtype), gw.astype(ws.dtype), None, glp.astype(lp.dtype), None) + (
        gt.astype(t.dtype),
    )


_fused_values.defvjp(_fused_values_fwd, _fused_values_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.


def _vocab(vs: int, vocab_size) -> int:
    if vocab_size is None:
        return vs
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, numbers.Integral)
        or not 1 <= int(vocab_size) <= vs
    ):
        raise ValueError(
            f"kldiv: `vocab_size` must be a Python int in [1, {vs}] (the student weight's "
            f"vocabulary columns); got {vocab_size!r}."
        )
    return int(vocab_size)


def fused_linear_topk_kl(
    teacher_ids: ArrayLike,
    teacher_log_probs: ArrayLike,
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    *,
    tail: str,
    reduction: Reduction,
    mask: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    where: ArrayLike | None = None,
    vocab_size: int | None = None,
    dataset_size: int | ArrayLike | None = None,
    count: float | ArrayLike | None = None,
    batch_size: int | ArrayLike | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """KL(top-k teacher ‖ student) from the student's hidden states and output projection.

    With student logits z = student_hidden @ student_weight, q = softmax(z/T), the teacher's
    stored ids i_1..i_k and log-probabilities lp_j = log p(i_j) (under its full distribution,
    Σ_j e^{lp_j} ≤ 1), the per-token value is

    * ``tail="renormalize"``: KL(p̃ ‖ q̃), p̃_j = e^{lp_j}/Σ e^{lp}, q̃_j = q_{i_j}/Σ_j q_{i_j}
      (both restricted to the k ids and renormalised);
    * ``tail="bucket"``: the KL of the k + 1 bins (the k ids and one tail bin),
      Σ_j p_j log(p_j/q_{i_j}) + P_tail log(P_tail/Q_tail), P_tail = 1 − Σ_j p_j (via
      log1mexp), Q_tail = 1 − Σ_j q_{i_j};

    exactly ``kldiv.kl_topk_teacher(teacher_ids, teacher_log_probs, student_hidden @
    student_weight, tail=tail, reduction=reduction, mask=mask, temperature=T, where=where)`` up to
    float rounding, values and gradients, without the ``[N, V]`` logits: tokens are processed in
    chunks of C (one ``[C, V]`` matmul each), and for the scalar reductions the gradients w.r.t.
    the hidden states, the weight and the log-probs are accumulated in the forward pass with the
    reduction's per-token weights (its VJP); ``"none"`` recomputes the chunks in the backward pass.
    The per-row numerics are those of :func:`kldiv.kl_topk_teacher` (shared code): finite for
    finite logits of any size, never negative, finite gradients wherever the value is finite.

    Args:
      teacher_ids: ``[..., k]`` integer (any integer dtype), the teacher's top-k token ids
        (distinct, in [0, V)). The reference (teacher) comes first, as everywhere in kldiv.
      teacher_log_probs: float ``[..., k]``, their log-probabilities under the full teacher
        distribution (−inf allowed), at the temperature you distil at. Differentiable.
      student_hidden: ``[..., H]`` student hidden states (the inputs of its output layer).
      student_weight: ``[H, V]`` student output projection (a Flax ``Dense`` kernel; for a
        torch-style ``[V, H]`` matrix pass its transpose).
      tail: ``"renormalize"`` or ``"bucket"`` (no default; see :mod:`kldiv.topk`).
      reduction: ``"none"``, ``"sum"``, ``"mean"``, ``"batchmean"`` or ``"dataset"`` (no
        default; see :func:`kldiv.reduce`).
      mask: optional token keep-mask (boolean, or numeric weights as in :func:`kldiv.reduce`),
        broadcastable to the leading shape ``[...]``. Dropped tokens touch neither value nor
        gradient, whatever their hidden states, ids and log-probs hold.
      temperature: T > 0 dividing the student logits, a Python number or a scalar array (traced:
        its gradient is computed). The stored log-probs are used as given.
      where: optional boolean ``[..., k]``: False marks padding slots (fewer than k ids at a
        position); they are left out of both distributions.
      vocab_size: compare over the first V columns of ``student_weight`` (a padded vocabulary);
        the columns beyond get zero gradient. Default: all columns.
      dataset_size, count, batch_size: passed to :func:`kldiv.reduce`.
      chunk_size: tokens per chunk; default as :func:`kldiv.fused_linear_kl` (per backend).

    Returns:
      The reduced loss (a scalar), or the per-token values ``[...]`` for ``"none"`` (dropped
      tokens 0); float32 for 16-bit inputs, else the inputs' float dtype. Differentiable in
      reverse mode w.r.t. ``student_hidden``, ``student_weight``, ``teacher_log_probs`` and a
      traced ``temperature``. A kept slot with an id outside [0, V) makes its token's value NaN
      (check ids with :func:`kldiv.validate_topk_ids`). With k = V (all ids) and
      ``tail="renormalize"`` this is ``kl_from_logits(teacher_logits, student_logits)``.

    Raises:
      TypeError: non-integer ids, non-floating log-probs, hidden states or weight.
      ValueError: ids and log-probs of different shapes, leading shapes that differ from the
        hidden states', hidden/weight shapes that do not match, unknown ``tail`` or
        ``reduction``, a Python temperature ≤ 0 or a non-scalar temperature, a bad
        ``vocab_size``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> # 2 sequences × 3 tokens, hidden size 3, vocabulary of 6; the teacher stored its top 2.
      >>> student_hidden = jnp.cos(0.5 * jnp.arange(18.0)).reshape(2, 3, 3)
      >>> student_weight = jnp.sin(0.7 * jnp.arange(18.0)).reshape(3, 6)
      >>> teacher_ids = jnp.array([[[0, 3], [2, 1], [5, 4]], [[1, 0], [3, 2], [4, 5]]])
      >>> teacher_log_probs = jnp.log(jnp.full((2, 3, 2), 0.4))
      >>> loss = kldiv.fused_linear_topk_kl(
      ...     teacher_ids, teacher_log_probs, student_hidden, student_weight,
      ...     tail="bucket", reduction="mean",
      ... )
      >>> print(f"{loss:.4f}")
      0.4551

      The same value as materialising the student logits:

      >>> student_logits = student_hidden @ student_weight
      >>> dense = kldiv.kl_topk_teacher(
      ...     teacher_ids, teacher_log_probs, student_logits, tail="bucket", reduction="mean"
      ... )
      >>> print(f"{dense:.4f}")
      0.4551

      Per-token values, renormalised over the k ids:

      >>> per_token = kldiv.fused_linear_topk_kl(
      ...     teacher_ids, teacher_log_probs, student_hidden, student_weight,
      ...     tail="renormalize", reduction="none",
      ... )
      >>> print(np.asarray(per_token).round(4))
      [[0.061  0.0226 0.0022]
       [0.0369 0.0021 0.0313]]

    References:
      Raman et al. (2023), "For distillation, tokens are not all you need" (top-k logit
      distillation); Hsu et al. (2024), "Liger Kernel" (fused linear losses).
    """
    _check_tail(tail)
    ids, lp = _check_teacher(teacher_ids, teacher_log_probs)
    _check_matrix("student_hidden", student_hidden, "student_weight", student_weight)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    lead = tuple(jnp.shape(student_hidden)[:-1])
    if ids.ndim < 1 or ids.shape[:-1] != lead:
        raise ValueError(
            f"kldiv: leading shapes differ: `teacher_ids` {ids.shape} vs `student_hidden` "
            f"{jnp.shape(student_hidden)}; expected [..., k] and [..., H] with the same [...]."
        )
    vs = jnp.shape(student_weight)[1]
    v = _vocab(vs, vocab_size)
    hs = jnp.asarray(student_hidden)
    ws_full = jnp.asarray(student_weight)
    ws = ws_full if v == vs else ws_full[:, :v]
    cdt = _checks.compute_dtype(hs, ws, lp)
    temperature = _checks.check_temperature(temperature, dtype=cdt)
    hs, ws = _operands(hs, ws)
    k = ids.shape[-1]

    slot_keep = _checks.check_mask(where, ids.shape)
    reduce_mask = _checks.check_mask(mask, lead, "mask", numeric=True)
    n = int(np.prod(lead, dtype=np.int64))
    hs = hs.reshape(n, hs.shape[-1])
    ids = ids.reshape(n, k)
    lp = lp.astype(cdt).reshape(n, k)
    keep = None if slot_keep is None else slot_keep.reshape(n, k)
    if reduce_mask is not None:
        token_keep = jnp.broadcast_to(reduce_mask, lead).reshape(n) != 0
        # Dropped tokens: zero hidden states and every slot left out (value 0, finite gradient).
        hs = jnp.where(token_keep[:, None], hs, 0)
        keep = token_keep[:, None] if keep is None else keep & token_keep[:, None]
        keep = jnp.broadcast_to(keep, (n, k))

    chunk = _chunk_tokens(n, v, cdt, chunk_size)
    cfg = _Config(tail, chunk, static_temperature(temperature))
    temp = jnp.asarray(temperature, cdt)

    def scalar_fn(weights):
        args = match_vma(hs, ws, ids, lp, keep, temp, weights)
        return cast(tuple[jax.Array, jax.Array], _fused_scalar(cfg, *args))

    return _fused_reduce(
        lambda: _fused_values(cfg, *match_vma(hs, ws, ids, lp, keep, temp)),
        scalar_fn,
        lead=lead,
        cdt=cdt,
        reduction=reduction,
        mask=reduce_mask,
        like=(hs, reduce_mask),
        dataset_size=dataset_size,
        count=count,
        batch_size=batch_size,
    )
