"""Fused linear-head distillation divergence: logits = hidden @ weight are never materialised.

For language-model distillation the logits of both models, ``[N, V]`` with V = 32k–256k, are by
far the largest tensors of a step. :func:`fused_linear_kl` walks over chunks of C tokens: per
chunk it computes both logit blocks ``[C, V]`` with one matmul each, the per-token divergence (and
optionally a hard-label cross-entropy) and its gradient w.r.t. the student logits, and — for the
scalar reductions — immediately folds that gradient into ``grad_hidden`` (stored per chunk) and
``grad_weight`` (summed over chunks). The backward pass then only scales them by the incoming
cotangent (Liger-Kernel's approach; Hsu et al. 2024). With ``reduction="none"`` the cotangent is a
vector known only in the backward pass, which therefore recomputes the logits chunk by chunk.

Peak temporary memory is O(C·V + H·V) instead of O(N·V).
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
from kldiv._checks import DIRECTIONS, REDUCTIONS, Direction, PairOption, Reduction
from kldiv._logits import (
    static_temperature,
    tempered_pair,
    transform_logits,
    transform_logits_grad,
)
from kldiv._numerics import axis_names, check_axis_name, match_vma, psum, varying_axes
from kldiv.family._js import js_rows_with_grads
from kldiv.fused._rows import for_each_chunk, put_rows, rows
from kldiv.fused.chunked import kl_rows_with_grads
from kldiv.reductions import reduce

__all__ = ["fused_linear_kl", "fused_linear_kl_penalty"]

# Tokens per chunk: about CHUNK_BYTES of one [C, V] block of logits (a chunk keeps about four such
# blocks alive), but at least MIN_CHUNK tokens. Every chunk adds its [H, V] weight-gradient product
# into the accumulator, a pass over H·V floats that costs ~50% of the product itself at 128 tokens
# (measured on a 2-core x86 CPU), so chunks must not shrink with V. At [2048 × 512] @ [512 × 32768]
# the default is 128 tokens: temporaries ~1/8 of the two materialised logit tensors. See
# bench/suites/fused.py.
CHUNK_BYTES = 16 * 2**20
MIN_CHUNK = 128
# Rows per tile of the weight-gradient update (see _accumulate_weight_grad): about
# WEIGHT_TILE_BYTES of [tile, V], at least MIN_WEIGHT_TILE rows (narrower products are slow).
WEIGHT_TILE_BYTES = 16 * 2**20
MIN_WEIGHT_TILE = 64
# Vocabulary columns per tile of the filtered backward (``grad_filter``): a [C × tile] block of
# the student-logit gradient is skipped when all its entries are below the threshold. Narrower
# tiles skip more of a peaked distribution's tail but run more, smaller products.
GRAD_FILTER_TILE = 1024


class _Tuning(NamedTuple):
    chunk_bytes: int  # bytes of one [C, V] logits block per chunk
    min_chunk: int  # tokens per chunk at least
    weight_tile_bytes: int | None  # None: one weight-gradient tile over all of H


# Per backend. CPU: sizes measured on a 2-core x86 CPU (above). GPU: large matrix products keep
# the tensor cores busy and every extra chunk re-reads the [H, V] float32 accumulator, so chunks
# of at least 1024 tokens and one weight-gradient product over all of H per chunk; set from
# the shapes' arithmetic, not yet measured on GPU hardware (`make gpu-check` times them).
_ACCELERATOR_TUNING = {
    "gpu": _Tuning(1024 * 2**20, 1024, None),
    "tpu": _Tuning(512 * 2**20, 1024, None),
}


def _tuning(backend: str | None = None) -> _Tuning:
    backend = jax.default_backend() if backend is None else backend
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    cpu = _Tuning(CHUNK_BYTES, MIN_CHUNK, WEIGHT_TILE_BYTES)
    return _ACCELERATOR_TUNING.get(backend, cpu)


class _Config(NamedTuple):
    """Static (hashable) configuration of one fused call."""

    direction: str
    beta: float
    chunk: int  # tokens per chunk
    hard: bool  # compute the hard-label cross-entropy term
    t2: bool
    unit_temperature: bool  # T is the Python number 1: skip the divisions
    traced_temperature: bool  # T is an array: its gradient is computed
    grad_filter: float | None = None  # skip backward tiles with every |∂ℓ_i/∂z_s| ≤ this
    # The vocabulary is split over this mapped axis (each call holds one shard of both heads).
    axis_name: str | tuple[str, ...] | None = None
    # Mapped axes over which grad_hidden is summed (those of axis_name that the hidden states do
    # not vary over: replicated hidden states get the sum of the per-shard products).
    hidden_psum: tuple[str, ...] = ()
    # (logit_scale, softcap) of each head (_checks.logit_transforms), None: neither
    teacher_transform: _checks.LogitTransform | None = None
    student_transform: _checks.LogitTransform | None = None


def _soft_rows(cfg: _Config, a_t, a_s, centred=None):
    """Per-token divergence D of tempered teacher/student logits, ∂D/∂a_s and ∂D/∂a_t.

    Closed-form gradients of the shared numerics: ``kl_rows_with_grads`` for forward and reverse
    KL, the rule of :func:`kldiv.family.js_from_logits` for the JSD. Under ``cfg.axis_name`` the
    columns are one vocabulary shard: row statistics and values are global, gradients local.
    """
    if cfg.direction == "forward":
        values, g_t, g_s = kl_rows_with_grads(a_t, a_s, cfg.axis_name, centred)
        return values, g_s, g_t
    if cfg.direction == "reverse":
        flipped = None if centred is None else -centred  # the difference is antisymmetric
        values, g_s, g_t = kl_rows_with_grads(a_s, a_t, cfg.axis_name, flipped)
        return values, g_s, g_t
    values, g_t, g_s = js_rows_with_grads(a_t, a_s, cfg.beta, cfg.axis_name)
    return values, g_s, g_t


def _hard_rows(z_s, labels, ct, axis_name=None):
    """Cross-entropy −log softmax(z_s)[y] and ct·∂/∂z_s, as KL(one-hot(y) ‖ softmax(z_s)).

    The one-hot target has entropy 0, so this KL is exactly the cross-entropy; its gradient is
    softmax(z_s) − one-hot(y). Same numerics as every other KL here. Under ``axis_name`` the
    columns of z_s are vocabulary shard k = axis_index of a split into equal shards: label y
    lives in shard y // V_shard, at column y − k·V_shard (the other shards' one-hots are empty).
    """
    ids = jax.lax.broadcasted_iota(labels.dtype, z_s.shape, 1)
    if axis_name is not None:
        ids = ids + (jax.lax.axis_index(axis_name) * z_s.shape[1]).astype(labels.dtype)
    onehot_logits = jnp.where(ids == labels[:, None], 0.0, -jnp.inf).astype(z_s.dtype)
    values, _, grad = kl_rows_with_grads(onehot_logits, z_s, axis_name)
    return values, grad * ct[:, None]


def _chunk_loss(cfg, hs, ws, ht, wt, labels, ct, soft_w, hard_w, temperature):
    """One chunk of tokens ([C, H] hidden states): the per-token loss ℓ, ∂(Σ ct·ℓ)/∂z_s and the
    ct-weighted per-token derivatives of ℓ with respect to soft_weight, hard_weight and T."""
    cdt = jnp.result_type(soft_w)
    z_s = jnp.matmul(hs, ws, preferred_element_type=cdt)
    z_t = jnp.matmul(ht, wt, preferred_element_type=cdt)
    t = temperature.astype(cdt)
    factor = t * t if cfg.t2 else jnp.ones_like(t)
    soft_scale = soft_w * factor
    # The heads' logit scale and soft-cap, per chunk and before the temperature (identity if off).
    z_t = transform_logits(z_t, cfg.teacher_transform)
    y_s = transform_logits(z_s, cfg.student_transform)
    if cfg.unit_temperature:
        a_t, a_s, centred = z_t, y_s, None
    else:  # the shared tempering: centred (on global row maxima), then divided
        a_t, a_s, centred = tempered_pair(z_t, y_s, t, axis_name=cfg.axis_name)
    soft, g_s, g_t = _soft_rows(cfg, a_t, a_s, centred)
    dz = g_s * (ct * soft_scale / t)[:, None]
    loss = soft_scale * soft
    # ∂ℓ/∂T = soft_w·(T²)'·D + soft_scale·∂D/∂T, ∂D/∂T = −(Σ_v g_t·a_t + Σ_v g_s·a_s)/T (the
    # softmax gradients sum to 0, so the centring of a_t, a_s does not matter).
    d_t = jnp.zeros_like(soft)
    if cfg.traced_temperature:
        live = lambda a: jnp.where(a > -jnp.inf, a, 0)  # noqa: E731
        dot = psum(jnp.sum(g_t * live(a_t) + g_s * live(a_s), axis=-1), cfg.axis_name)
        d_t = -soft_scale * dot / t + (soft_w * 2 * t * soft if cfg.t2 else 0)
    hard = jnp.zeros_like(soft)
    if cfg.hard:
        hard, d_hard = _hard_rows(y_s, labels, ct * hard_w, cfg.axis_name)
        loss = loss + hard_w * hard
        dz = dz + d_hard
    if cfg.student_transform is not None:  # chain rule through the student's transform
        dz = dz * transform_logits_grad(z_s, cfg.student_transform)
    return loss, dz, jnp.stack([ct * factor * soft, ct * hard, ct * d_t])


def _weight_grad(x, dz):
    """xᵀ·dz accumulated in float32 (or float64) whatever the dtype of x."""
    return jnp.matmul(x.T, dz.astype(x.dtype), preferred_element_type=dz.dtype)


def _accumulate_weight_grad(acc, x, dz):
    """acc + xᵀ·dz for x ``[C, H]``, dz ``[C, V]``, computed in tiles of H rows of the result.

    One ``[H, V]`` product would be a temporary as large as the weight gradient itself, on top
    of the accumulator; a tile's product is ``[tile, V]``. Tiles are contiguous rows of ``acc``,
    and only small column slices of ``x`` are copied (dz is used whole).
    """
    h = x.shape[1]
    tile_bytes = _tuning().weight_tile_bytes
    if tile_bytes is None:
        return acc + _weight_grad(x, dz)
    n_rows = tile_bytes // max(1, dz.shape[1] * dz.dtype.itemsize)
    tile = max(1, min(h, max(MIN_WEIGHT_TILE, n_rows)))
    if tile >= h:
        return acc + _weight_grad(x, dz)

    def body(start, first_new, acc):
        xt = jax.lax.dynamic_slice_in_dim(x, start, tile, axis=1)
        # The last tile overlaps the previous one: its already-added rows add 0.
        fresh = (start + jnp.arange(tile)) >= first_new
        xt = jnp.where(fresh[None, :], xt, jnp.zeros_like(xt))
        acc_t = jax.lax.dynamic_slice_in_dim(acc, start, tile, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(acc, acc_t + _weight_grad(xt, dz), start, 0)

    return for_each_chunk(h, tile, body, acc)


def _hidden_grad_t(dz, w):
    """(dz·wᵀ)ᵀ = w·dzᵀ, ``[H, C]``, in the compute dtype.

    Formed transposed: with few tokens per chunk, XLA's CPU matmul is ~25% faster with the
    hidden size as the rows of the product than with the tokens (measured, [128 × 32768] chunks).
    """
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(w, dz.astype(w.dtype), dims, preferred_element_type=dz.dtype)


def _live_tiles(dz, ct, threshold: float, tile: int):
    """Per vocabulary tile of ``dz`` ``[C, V]``: whether any entry has |dz_iv| > threshold·|ct_i|
    (ct_i: the weight that dz carries; dz/ct is the per-token gradient ∂ℓ_i/∂z_s). Tile j covers
    the columns [j·tile, min((j + 1)·tile, V)). Returns (the live tile indices first, then
    padding, ``[n_tiles]``; the number of live tiles)."""
    v = dz.shape[1]
    n_tiles = -(-v // tile)
    bound = threshold * jnp.abs(ct).astype(dz.dtype)
    live_cols = jnp.any(jnp.abs(dz) > bound[:, None], axis=0)
    live_cols = jnp.pad(live_cols, (0, n_tiles * tile - v))
    live = jnp.any(live_cols.reshape(n_tiles, tile), axis=1)
    order = jnp.nonzero(live, size=n_tiles, fill_value=0)[0]
    return order, jnp.sum(live, dtype=jnp.int32)


def _filtered_grads(cfg, x, ct, dz, w, gw):
    """(dz·wᵀ)ᵀ ``[H, C]`` and gw + xᵀ·dz, over the live vocabulary tiles of dz only.

    A tile whose every entry has |dz_iv| ≤ grad_filter·|ct_i| is skipped: its products
    dz_tile·w_tileᵀ and xᵀ·dz_tile are never computed. The live tiles are compacted first, and a
    loop with a data-dependent trip count runs over them alone, so skipped tiles cost nothing but
    the test. Tiles are ``GRAD_FILTER_TILE`` columns; the last one is shifted to end at V and its
    columns that belong to the tile before it are zeroed (that tile handled them, or dropped them
    as below the threshold).
    """
    h, (c, v) = w.shape[0], dz.shape
    tile = min(GRAD_FILTER_TILE, v)
    order, n_live = _live_tiles(dz, ct, cast(float, cfg.grad_filter), tile)
    dims = (((1,), (1,)), ((), ()))

    def body(k, carry):
        gh_t, gw = carry
        first = order[k] * tile
        start = jnp.minimum(first, v - tile)
        dz_k = jax.lax.dynamic_slice_in_dim(dz, start, tile, axis=1)
        fresh = (start + jnp.arange(tile)) >= first
        dz_k = jnp.where(fresh[None, :], dz_k, jnp.zeros_like(dz_k))
        w_k = jax.lax.dynamic_slice_in_dim(w, start, tile, axis=1)
        dzw = dz_k.astype(w.dtype)
        gh_t = gh_t + jax.lax.dot_general(w_k, dzw, dims, preferred_element_type=dz.dtype)
        gw_k = jax.lax.dynamic_slice_in_dim(gw, start, tile, axis=1) + _weight_grad(x, dz_k)
        return gh_t, jax.lax.dynamic_update_slice_in_dim(gw, gw_k, start, 1)

    gh0, gw, _ = match_vma(jnp.zeros((h, c), dz.dtype), gw, dz)  # loop carries: same type
    return jax.lax.fori_loop(0, n_live, body, (gh0, gw))


def _pass(
    cfg, hs, ws, ht, wt, labels, weights, soft_w, hard_w, temperature, grads: bool
) -> tuple[jax.Array, ...]:
    """One walk over the token chunks: per-token losses and, if ``grads``, Σ_i weights_i·∇ℓ_i."""
    n, c = hs.shape[0], cfg.chunk
    cdt = jnp.result_type(soft_w)

    def chunk(start):
        hs_c = rows(hs, start, c)
        args = (rows(ht, start, c), wt, rows(labels, start, c), rows(weights, start, c))
        return (hs_c, *_chunk_loss(cfg, hs_c, ws, *args, soft_w, hard_w, temperature))

    def body(start, first_new, carry):
        hs_c, loss, dz, aux = chunk(start)
        out = (put_rows(carry[0], loss, start),)
        if grads and cfg.grad_filter is not None:
            fresh = (start + jnp.arange(c)) >= first_new
            x = jnp.where(fresh[:, None], hs_c, 0)
            gh_c, gw = _filtered_grads(cfg, x, rows(weights, start, c), dz, ws, carry[2])
            gh_t = jax.lax.dynamic_update_slice_in_dim(carry[1], gh_c, start, 1)
            out += (gh_t, gw, carry[3] + jnp.sum(jnp.where(fresh, aux, 0), axis=-1))
        elif grads:
            gh_t = jax.lax.dynamic_update_slice_in_dim(carry[1], _hidden_grad_t(dz, ws), start, 1)
            # Rows of the (overlapping) last chunk that an earlier chunk already added to
            # grad_weight count once: zero them in the hidden states used for the sum.
            fresh = (start + jnp.arange(c)) >= first_new
            gw = _accumulate_weight_grad(carry[2], jnp.where(fresh[:, None], hs_c, 0), dz)
            out += (gh_t, gw, carry[3] + jnp.sum(jnp.where(fresh, aux, 0), axis=-1))
        return out

    # Loop carries start varying over the mapped axes like the chunks' values (inside shard_map).
    loss0 = cast(jax.Array, match_vma(jnp.zeros((n,), cdt), hs)[0])
    if not grads:
        return for_each_chunk(n, c, body, (loss0,))
    if cfg.grad_filter is not None:
        zeros = (jnp.zeros(hs.shape[::-1], cdt), jnp.zeros(ws.shape, cdt))
        init = cast(tuple[jax.Array, ...], match_vma(*zeros, hs, ws)[:2])
        # the derivatives w.r.t. soft_weight, hard_weight and T sum per-token values, which vary
        # like the hidden states and the weights, not over a vocabulary split of the heads
        aux0 = cast(jax.Array, match_vma(jnp.zeros(3, cdt), hs, weights)[0])
        out = for_each_chunk(n, c, body, (loss0, *init, aux0))
        return out[0], psum(out[1].T, cfg.hidden_psum or None), out[2], out[3]
    # The first chunk starts the sums: its weight-gradient product is the accumulator (no zero
    # fill and no accumulation pass for it).
    hs_0, loss, dz, aux = chunk(0)
    gh_t = jax.lax.dynamic_update_slice_in_dim(
        jnp.zeros(hs.shape[::-1], cdt), _hidden_grad_t(dz, ws), 0, 1
    )
    init = (put_rows(loss0, loss, 0), gh_t, _weight_grad(hs_0, dz), jnp.sum(aux, axis=-1))
    out = for_each_chunk(n, c, body, init, first=1)
    # (per-token losses, grad hidden, grad weight, [d/dsoft_weight, d/dhard_weight, d/dT]);
    # a vocabulary-split head: grad hidden sums the shards' products, grad weight stays local.
    return out[0], psum(out[1].T, cfg.hidden_psum or None), out[2], out[3]


# Scalar reductions (linear in the per-token values): gradients are folded in the forward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scalar(cfg, hs, ws, ht, wt, labels, weights, soft_w, hard_w, temperature):
    return _fused_scalar_fwd(cfg, hs, ws, ht, wt, labels, weights, soft_w, hard_w, temperature)[0]


def _fused_scalar_fwd(cfg, hs, ws, ht, wt, labels, weights, soft_w, hard_w, temperature):
    loss, gh, gw, aux = _pass(
        cfg, hs, ws, ht, wt, labels, weights, soft_w, hard_w, temperature, grads=True
    )
    total = jnp.sum(weights * loss)
    return (total, loss), (gh.astype(hs.dtype), gw.astype(ws.dtype), aux)


def _fused_scalar_bwd(cfg, res, cts):
    gh, gw, aux = res
    g = cts[0]  # the per-token values are only used under stop_gradient
    d_soft, d_hard, d_t = g * aux
    return ((g * gh).astype(gh.dtype), (g * gw).astype(gw.dtype), None, None, None, None) + (
        d_soft,
        d_hard,
        d_t,
    )


_fused_scalar.defvjp(_fused_scalar_fwd, _fused_scalar_bwd)


# reduction="none": the cotangent is per token, so the backward pass recomputes the logits.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_values(cfg, hs, ws, ht, wt, labels, soft_w, hard_w, temperature):
    ones = jnp.ones(hs.shape[:1], jnp.result_type(soft_w))
    return _pass(cfg, hs, ws, ht, wt, labels, ones, soft_w, hard_w, temperature, grads=False)[0]


def _fused_values_fwd(cfg, hs, ws, ht, wt, labels, soft_w, hard_w, temperature):
    out = _fused_values(cfg, hs, ws, ht, wt, labels, soft_w, hard_w, temperature)
    return out, (hs, ws, ht, wt, labels, soft_w, hard_w, temperature)


def _fused_values_bwd(cfg, res, g):
    hs, ws, ht, wt, labels, soft_w, hard_w, temperature = res
    _, gh, gw, aux = _pass(cfg, hs, ws, ht, wt, labels, g, soft_w, hard_w, temperature, grads=True)
    d_soft, d_hard, d_t = aux
    return (gh.astype(hs.dtype), gw.astype(ws.dtype), None, None, None) + (d_soft, d_hard, d_t)


_fused_values.defvjp(_fused_values_fwd, _fused_values_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.


def _chunk_tokens(n: int, v: int, cdt, chunk_size: int | None) -> int:
    """Tokens per chunk: ``chunk_size``, or the backend's default (:func:`_tuning`: about
    ``chunk_bytes`` of one ``[C, V]`` block, at least ``min_chunk``), within [1, max(n, 1)]."""
    if chunk_size is None:
        tuning = _tuning()
        chunk = max(tuning.min_chunk, tuning.chunk_bytes // max(1, v * jnp.dtype(cdt).itemsize))
    else:
        chunk = _checks.check_static_int("chunk_size", chunk_size, 1)
    return max(1, min(max(n, 1), chunk))


def _reduction_weights(reduce_fn, n: int, cdt, like, exclude=frozenset()) -> jax.Array:
    """d reduce_fn(values)/d values, ``[n]``: the per-token weights that a scalar (linear)
    reduction gives the values, which the fused forward pass folds into the gradients.

    Inside ``shard_map`` the point has the type of the per-token values (varying like the
    arrays ``like``: the hidden states and the token mask) and the cotangent that of the
    reduction: an invariant point would sum the weights over the mapped axes.
    """
    point = match_vma(jnp.zeros((n,), cdt), *like, exclude=exclude)[0]
    reduced, reduce_vjp = jax.vjp(reduce_fn, point)
    (weights,) = reduce_vjp(match_vma(jnp.ones((), cdt), reduced)[0])
    return weights


def _fused_reduce(
    values_fn, scalar_fn, *, lead, cdt, reduction, mask, like, exclude=frozenset(), **reduce_kw
) -> jax.Array:
    """The reduced loss of a fused head, shared by :func:`fused_linear_kl` and
    ``fused_linear_topk_kl``.

    ``values_fn()``: the per-token values (a custom VJP that takes their cotangent), used for
    ``reduction="none"``. ``scalar_fn(weights)``: ``(Σ weights·values, values)`` from a custom
    VJP whose forward pass folds the per-token ``weights`` (:func:`_reduction_weights`) into the
    gradients. The value is exactly ``reduce(values)``; the gradient is that of
    Σ weights·values, equal because every scalar reduction is linear in the values. ``like``
    and ``exclude``: as :func:`_reduction_weights`.
    """
    n = int(np.prod(lead, dtype=np.int64))

    def reduce_fn(values):
        return reduce(values.reshape(lead), reduction, mask=mask, **reduce_kw)

    if n == 0:
        return reduce_fn(jnp.zeros((0,), cdt))
    if reduction == "none":
        return reduce_fn(values_fn())
    weights = _reduction_weights(reduce_fn, n, cdt, like, exclude)
    total, values = scalar_fn(weights)
    return _with_gradient_of(reduce_fn(jax.lax.stop_gradient(values)), total)


@jax.custom_jvp
def _with_gradient_of(value, total):
    """``value``, differentiated as ``total`` (equal values up to rounding: the reduced loss
    and Σ weights·values, whose gradient the fused pass formed).

    Unlike ``value + (total − stop_gradient(total))`` this passes the gradient on when the total
    is ±inf or NaN (a row at +inf, a NaN in one token): inf − inf would make the sum NaN, and
    masking that would zero every gradient. The gradients are then those of autodiff through
    the materialised logits: finite where a token's are, NaN only where NaN reaches.
    """
    del total
    return value


@_with_gradient_of.defjvp
def _with_gradient_of_jvp(primals, tangents):
    value, _ = primals
    return value, tangents[1]


def _operands(h: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A head's hidden states and weight in one dtype, that of ``h @ w`` (their promotion).

    The gradient products take their operands in it: with bfloat16 hidden states and a float32
    weight the logits' cotangent stays float32 in xᵀ·dz, as in autodiff of the materialised
    ``h @ w``, instead of being rounded to the narrower operand's dtype. Equal dtypes (the usual
    case) are returned as they are; a mixed pair costs a copy of the narrower operand, the copy
    that ``h @ w`` makes. The casts are differentiable, so the gradients come back in the
    inputs' own dtypes.
    """
    dtype = jnp.promote_types(h.dtype, w.dtype)
    return h.astype(dtype), w.astype(dtype)


def _check_matrix(name_h, h, name_w, w):
    _checks.check_floating(name_h, h)
    _checks.check_floating(name_w, w)
    if jnp.ndim(w) != 2:
        raise ValueError(
            f"kldiv: `{name_w}` must be a [hidden, vocab] matrix (a Flax Dense kernel); "
            f"got shape {jnp.shape(w)}."
        )
    if jnp.ndim(h) < 1 or jnp.shape(h)[-1] != jnp.shape(w)[0]:
        raise ValueError(
            f"kldiv: `{name_h}` {jnp.shape(h)} does not match `{name_w}` {jnp.shape(w)}: the "
            f"last axis of `{name_h}` must equal the first axis of `{name_w}`."
        )


def _vocab(vs: int, vt: int, vocab_size) -> int:
    if vocab_size is None:
        try:
            _checks.check_same_event_size(("student_weight", "teacher_weight"), (vs, vt))
        except ValueError as e:
            raise ValueError(
                f"{e} (vocabulary sizes: student {vs}, teacher {vt}). Padded vocabularies are "
                f"common (e.g. 151936 vs 151665); pass `vocab_size=V` to compare the "
                f"distributions over the first V token ids of both."
            ) from None
        return vs
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, numbers.Integral)
        or not 1 <= int(vocab_size) <= min(vs, vt)
    ):
        raise ValueError(
            f"kldiv: `vocab_size` must be a Python int in [1, {min(vs, vt)}] (the smaller of the "
            f"student's {vs} and the teacher's {vt} vocabulary columns); got {vocab_size!r}."
        )
    return int(vocab_size)


def _check_vocab_axis(axis_name, vocab_size, arrays: dict) -> int:
    """The number of vocabulary shards (1 without ``axis_name``), after checking the axis and
    (where ``shard_map`` types tell) that both weights are split over it."""
    if axis_name is None:
        return 1
    check_axis_name(axis_name)
    if vocab_size is not None:
        raise ValueError(
            f"kldiv: `vocab_size` cannot be combined with `axis_name`={axis_name!r}: the heads "
            f"must be split into equal shards of one vocabulary (got vocab_size={vocab_size!r}); "
            "give both heads the same padded width and drop the padding columns' logits in the "
            "model, or gather the heads and pass axis_name=None."
        )
    typed = any(varying_axes(x) for x in arrays.values())  # shard_map with check_vma=True
    for name in ("student_weight", "teacher_weight"):
        w = arrays[name]
        vma = varying_axes(w)
        missing = [a for a in axis_names(axis_name) if a not in vma]
        if typed and missing:
            raise ValueError(
                f"kldiv: `axis_name`={axis_name!r} says the heads are split by vocabulary over "
                f"it, but `{name}` {jnp.shape(w)} is replicated over {missing} (it varies over "
                f"{sorted(vma) or 'no axis'}); shard its columns over the axis (in_specs "
                f"P(None, {missing[0]!r})), or pass axis_name=None for a replicated head."
            )
    return int(jax.lax.axis_size(axis_name))


def fused_linear_kl(
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    *,
    reduction: Reduction,
    mask: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    direction: Direction = "forward",
    beta: float = 0.5,
    scale_by_temperature_squared: bool = False,
    labels: ArrayLike | None = None,
    hard_weight: float | ArrayLike = 0.0,
    soft_weight: float | ArrayLike = 1.0,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    dataset_size: int | ArrayLike | None = None,
    count: float | ArrayLike | None = None,
    batch_size: int | ArrayLike | None = None,
    chunk_size: int | None = None,
    grad_filter: float | None = None,
    axis_name: str | tuple[str, ...] | None = None,
    softcap: PairOption = None,
    logit_scale: PairOption = None,
) -> jax.Array:
    """Distillation divergence between two linear heads without materialising their logits.

    With student logits z_s = student_hidden @ student_weight, teacher logits
    z_t = teacher_hidden @ teacher_weight, p = softmax(z_t/T) (teacher) and q = softmax(z_s/T)
    (student), the per-token value is

        ℓ = soft_weight · s · D(p, q)  +  hard_weight · CE(y, softmax(z_s)),

    with s = T² if ``scale_by_temperature_squared`` else 1, D one of

    * ``"forward"``: KL(p‖q) = ``kl_from_logits(z_t, z_s, temperature=T)`` (Hinton et al. 2015);
    * ``"reverse"``: KL(q‖p) = ``kl_from_logits(z_s, z_t, temperature=T)`` (Gu et al. 2024);
    * ``"jsd"``: JSD_β(p‖q) = β·KL(p‖m) + (1 − β)·KL(q‖m), m = βp + (1 − β)q
      (``kldiv.family.js_from_logits(z_t, z_s, beta)``; Agarwal et al. 2024),

    and CE(y, ·) = −log softmax(z_s)[y] the hard-label cross-entropy at temperature 1 (computed in
    the same pass over the vocabulary). The loss is ``kldiv.reduce(ℓ, reduction, mask=kept)`` —
    exactly the value of materialising both logits, calling those per-token functions and
    reducing, up to float rounding — where a token is kept if ``mask`` keeps it and, when
    ``labels`` are given, its label is not ``ignore_index``; ``"mean"`` divides by the number of
    kept tokens. Dropped tokens touch neither value nor gradient, whatever their hidden states
    hold.

    The per-token numerics are those of :func:`kldiv.kl_from_logits` (accurate when p ≈ q,
    finite for finite logits of any size, never negative).

    Args:
      teacher_hidden: ``[..., H_t]`` teacher hidden states, same leading shape as the student's
        (frozen: its gradient is zero, as under ``jax.lax.stop_gradient``).
      teacher_weight: ``[H_t, V_t]`` teacher output projection (frozen).
      student_hidden: ``[..., H_s]`` student hidden states (the inputs of its output layer).
      student_weight: ``[H_s, V_s]`` student output projection (a Flax ``Dense`` kernel; for a
        torch-style ``[V, H]`` matrix pass its transpose). A head whose hidden states and weight
        have different dtypes computes in their promotion, as ``h @ w`` does (bfloat16 hidden
        states with a float32 weight: float32 products, float32-accurate gradients).
      reduction: ``"none"``, ``"sum"``, ``"mean"``, ``"batchmean"`` or ``"dataset"`` (no
        default; see :func:`kldiv.reduce`).
      mask: optional token keep-mask (boolean, or numeric weights as in :func:`kldiv.reduce`),
        shape broadcastable to the leading shape ``[...]``.
      temperature: T > 0 dividing both logits for the soft term (not for the hard term).
      direction: ``"forward"``, ``"reverse"`` or ``"jsd"``.
      beta: the JSD mixture weight β ∈ [0, 1] (a Python number; 0.5: the standard JSD).
      scale_by_temperature_squared: multiply the soft term by T² (Hinton et al.'s factor, which
        keeps gradient magnitudes comparable across temperatures). Off by default: no T² unless
        asked for.
      labels: optional integer targets ``[...]`` in [0, V) (or ``ignore_index``) for the hard
        term, of any integer dtype (narrow and unsigned ones, e.g. uint16 ids of a 65536-token
        vocabulary, are compared with V and ``ignore_index`` in a dtype that holds both);
        entries equal to ``ignore_index`` drop the token from both terms.
      hard_weight, soft_weight: weights of the two terms (Python numbers or scalar arrays; for
        per-token weights use ``mask``).
      ignore_index: the label value of ignored tokens.
      vocab_size: compare over the first V token ids of both heads. Required when the two
        vocabularies differ (e.g. padded 151936 vs 151665 columns); otherwise a ValueError names
        both sizes. The student's columns beyond V get zero gradient.
      dataset_size, count, batch_size: passed to :func:`kldiv.reduce`.
      chunk_size: tokens per chunk (a Python int ≥ 1); default per backend: on CPU about
        ``CHUNK_BYTES`` of ``[C, V]`` logits, at least ``MIN_CHUNK`` tokens; on GPU and TPU at
        least 1024 tokens and one weight-gradient product over all of H per chunk. Temporary
        memory is about four ``[C, V]`` blocks plus one ``[H, V]`` weight-gradient accumulator,
        whatever the number of tokens.
      grad_filter: None (default: the exact gradient) or a Python number τ ≥ 0: gradient
        filtering of the backward products, after Cut Cross-Entropy (Wijmans et al. 2024). Per
        chunk of C tokens and tile of ``GRAD_FILTER_TILE`` vocabulary columns, a tile in which
        every entry of the per-token student-logit gradient g_iv = ∂ℓ_i/∂z_s,iv (for forward
        KL, soft_weight·s·(q − p)/T, plus the hard term) has |g_iv| ≤ τ is skipped: its products
        dz_tile·W_tileᵀ (into the hidden-state gradient) and h_chunkᵀ·dz_tile (into the weight
        gradient) are not computed, where dz_i = c_i·g_i and c_i is token i's cotangent (e.g.
        1/kept for ``"mean"``). Each dropped entry has |g_iv| ≤ τ, so the gradient error is
        bounded by ``|Δ grad_hidden[i, h]| ≤ τ·|c_i|·Σ_{v dropped for i} |W[h, v]| ≤
        τ·|c_i|·‖W[h, :]‖₁`` and ``|Δ grad_weight[h, v]| ≤ τ·Σ_{i: v dropped for i} |c_i|·|x[i,
        h]| ≤ τ·Σ_i |c_i|·|x[i, h]|`` (x: the student hidden states). The value, and every other
        gradient, is unchanged: only the backward products are filtered; the forward pass needs
        the logsumexp over every column of both heads, so it is never filtered. τ = 0 drops only
        tiles of exact zeros (the gradient within float rounding of the exact one). Recommended:
        τ = ``jnp.finfo(cdt).eps`` of the compute dtype cdt (float32 for 16-bit and float32
        weights: 1.19e-7): a dropped entry then changes each product term by less than the
        relative rounding of that dtype. It saves time when many [C × tile] blocks are below
        τ: peaked distributions with a long tail of tokens no context in a chunk predicts,
        clustered into whole tiles — sort the vocabulary (e.g. by the teacher's mean logit) and
        apply the same permutation ``perm`` to both weights' columns (``weight[:, perm]``) and
        the labels (``argsort(perm)[labels]``): the divergence is invariant under it. Where
        no block is below τ (flat, high-entropy or unsorted distributions) nothing is skipped:
        the filtered path then runs every product, in tiles, plus the per-tile test.
      axis_name: vocabulary-parallel heads. Inside ``jax.shard_map`` with both weights split by
        vocabulary over this mapped axis (a name or a tuple of names) into P equal shards — each
        call holds ``[H, V/P]`` columns k·V/P … (k+1)·V/P − 1 of both heads, k = the axis index,
        and the same (replicated) hidden states — the row maxima, normalisers and per-token values
        are combined across the shards (pmax/psum), so each device only ever computes
        ``[C, V/P]`` logit blocks. Values and gradients equal those of the unsharded heads: the
        student weight's gradient is its own shard's (no sum), the hidden states' gradient the
        sum over the axis of the per-shard products. Labels are global token ids (label y lives
        in shard y // (V/P)). The per-token values are the same on every shard and reduced there
        once: ``"mean"`` counts each token once (for tokens also split over a data axis, pass
        the global ``count`` or reduce with ``"sum"`` and psum over that axis). ``vocab_size`` is
        not supported here (the shards must hold whole, equal slices of one vocabulary).
      softcap, logit_scale: c > 0 and s > 0 (Python numbers, default None: off) of scaled and
        soft-capped (Gemma-style) heads, applied per chunk to the logits of both heads before
        the temperature, in this order: z ← c·tanh(s·z/c), then ÷T, as in
        :func:`kldiv.kl_from_logits`; a ``(teacher, student)`` pair of numbers or None gives
        each head its own. The hard-label term uses the transformed student logits (the
        model's own logits, without T). Gradients carry the factor s·(1 − tanh²(s·z/c)).

    Returns:
      The reduced loss (a scalar), or the per-token values ``[...]`` for ``"none"`` (dropped
      tokens 0); float32 for 16-bit inputs, else the inputs' float dtype. Differentiable in reverse
      mode w.r.t. the student's hidden states and weight; the teacher is frozen (its cotangents
      are zero, as under ``jax.lax.stop_gradient``).

    Raises:
      TypeError: non-floating hidden states or weights, non-integer labels, a traced ``beta``.
      ValueError: mismatched hidden/weight shapes or leading shapes, different vocabulary sizes
        without ``vocab_size``, unknown ``direction``/``reduction``, β outside [0, 1], a Python
        temperature ≤ 0, ``hard_weight`` without ``labels``; an ``axis_name`` that is not a
        mapped axis here, ``vocab_size`` with ``axis_name``, or (inside ``shard_map`` with
        ``check_vma=True``) a weight that is replicated rather than split over ``axis_name``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> # 2 sequences × 3 tokens; hidden sizes 4 (teacher) and 3 (student); vocabulary of 5.
      >>> teacher_hidden = jnp.cos(jnp.arange(24.0)).reshape(2, 3, 4)
      >>> teacher_weight = jnp.sin(jnp.arange(20.0)).reshape(4, 5)
      >>> student_hidden = jnp.cos(0.5 * jnp.arange(18.0)).reshape(2, 3, 3)
      >>> student_weight = jnp.sin(0.7 * jnp.arange(15.0)).reshape(3, 5)
      >>> mask = jnp.array([[True, True, True], [True, True, False]])  # padding
      >>> loss = kldiv.fused_linear_kl(
      ...     teacher_hidden, teacher_weight, student_hidden, student_weight,
      ...     reduction="mean", mask=mask,
      ... )
      >>> print(f"{loss:.4f}")
      0.5076

      The same value as materialising both logits:

      >>> teacher_logits = teacher_hidden @ teacher_weight
      >>> student_logits = student_hidden @ student_weight
      >>> values = kldiv.kl_from_logits(teacher_logits, student_logits)
      >>> print(f"{kldiv.reduce(values, 'mean', mask=mask):.4f}")
      0.5076

      Per-token values, with a hard-label cross-entropy term added:

      >>> labels = jnp.array([[0, 1, 2], [3, 4, -100]])  # -100: ignore_index
      >>> per_token = kldiv.fused_linear_kl(
      ...     teacher_hidden, teacher_weight, student_hidden, student_weight,
      ...     reduction="none", labels=labels, hard_weight=0.5,
      ... )
      >>> print(np.asarray(per_token).round(4))
      [[1.3183 1.3858 1.3168]
       [1.422  1.8468 0.    ]]

      Gradient filtering leaves the value as it is; here τ = 0.5 drops every gradient entry
      (every |q − p| ≤ 0.5 in this toy vocabulary), so the filtered gradient is zero:

      >>> import jax
      >>> def loss(hidden, grad_filter):
      ...     return kldiv.fused_linear_kl(
      ...         teacher_hidden, teacher_weight, hidden, student_weight,
      ...         reduction="mean", grad_filter=grad_filter,
      ...     )
      >>> print(f"{loss(student_hidden, 1.2e-7):.4f}")
      0.5138
      >>> print(float(jnp.abs(jax.grad(loss)(student_hidden, 0.5)).max()))
      0.0

    References:
      Hinton et al. (2015), "Distilling the knowledge in a neural network"; Agarwal et al. (2024),
      "On-policy distillation of language models" (GKD); Hsu et al. (2024), "Liger Kernel"
      (fused linear cross-entropy/JSD); Wijmans et al. (2024), "Cut your losses in
      large-vocabulary language models" (gradient filtering).
    """
    _check_matrix("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    _check_matrix("student_hidden", student_hidden, "student_weight", student_weight)
    lead = tuple(jnp.shape(student_hidden)[:-1])
    if tuple(jnp.shape(teacher_hidden)[:-1]) != lead:
        raise ValueError(
            f"kldiv: `student_hidden` {jnp.shape(student_hidden)} and `teacher_hidden` "
            f"{jnp.shape(teacher_hidden)} must have the same leading (token) shape."
        )
    _checks.check_choice("direction", direction, DIRECTIONS)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    if direction == "jsd":
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"kldiv: `beta` must be a Python number; got {type(beta).__name__}.")
        if not 0 <= beta <= 1:
            raise ValueError(f"kldiv: `beta` must be in [0, 1]; got {beta}.")
    grad_filter = _checks.check_grad_filter(grad_filter)
    _checks.check_scalar_weight("soft_weight", soft_weight)
    _checks.check_scalar_weight("hard_weight", hard_weight)
    if labels is None and not (isinstance(hard_weight, numbers.Real) and hard_weight == 0):
        raise ValueError("kldiv: `hard_weight` is set but no `labels` were given.")

    vs, vt = jnp.shape(student_weight)[1], jnp.shape(teacher_weight)[1]
    n_shards = _check_vocab_axis(
        axis_name,
        vocab_size,
        {
            "teacher_hidden": teacher_hidden,
            "teacher_weight": teacher_weight,
            "student_hidden": student_hidden,
            "student_weight": student_weight,
        },
    )
    v = _vocab(vs, vt, vocab_size)
    hs = jnp.asarray(student_hidden)
    ht = jnp.asarray(teacher_hidden)
    ws_full = jnp.asarray(student_weight)
    ws = ws_full if v == vs else ws_full[:, :v]
    wt = jax.lax.stop_gradient(jnp.asarray(teacher_weight))
    wt = wt if v == vt else wt[:, :v]
    ht = jax.lax.stop_gradient(ht)
    cdt = _checks.compute_dtype(hs, ws, ht, wt)
    temperature = _checks.check_temperature(temperature, dtype=cdt)
    hs, ws = _operands(hs, ws)
    teacher_tr, student_tr = _checks.logit_transforms(logit_scale, softcap, cdt)

    # Kept tokens: the reduction's mask, and labels other than ignore_index.
    reduce_mask = _checks.check_mask(mask, lead, "mask", numeric=True)
    if labels is not None:
        labels = _checks.token_ids("labels", labels)
        if labels.shape != lead:
            raise ValueError(
                f"kldiv: `labels` {labels.shape} must have the hidden states' leading shape {lead}."
            )
        in_range = (labels >= 0) & (labels < v * n_shards)
        if _checks.is_concrete(labels) and not bool(jnp.all(in_range | (labels == ignore_index))):
            bad = np.asarray(labels)[~np.asarray(in_range | (labels == ignore_index))]
            raise ValueError(
                f"kldiv: `labels` must be in [0, {v * n_shards}) or equal `ignore_index` "
                f"({ignore_index}); "
                f"got {bad[:5].tolist()}."
            )
        # Under jit, out-of-range labels drop their token (as ignore_index does).
        label_keep = (labels != ignore_index) & in_range
        if reduce_mask is None:
            reduce_mask = label_keep
        elif reduce_mask.dtype == jnp.bool_:
            reduce_mask = reduce_mask & label_keep
        else:
            reduce_mask = jnp.where(label_keep, reduce_mask, 0)

    n = int(np.prod(lead, dtype=np.int64))
    hs = hs.reshape(n, hs.shape[-1])
    ht = ht.reshape(n, ht.shape[-1])
    if reduce_mask is not None:
        keep = jnp.broadcast_to(reduce_mask, lead).reshape(n) != 0
        # Dropped tokens: zero hidden states, so whatever they held never reaches a value.
        hs = jnp.where(keep[:, None], hs, 0)
        ht = jnp.where(keep[:, None], ht, 0)
    else:
        keep = None
    if labels is not None:
        flat = labels.reshape(n)
        labels_c = flat if keep is None else jnp.where(keep, flat, 0)
    else:
        labels_c = jnp.zeros((n,), jnp.int32)

    chunk = _chunk_tokens(n, v, cdt, chunk_size)
    unit_t = bool(isinstance(temperature, numbers.Real) and temperature == 1)
    # The hard term is computed when there are labels and its weight is not the Python number 0
    # (labels alone, with hard_weight=0, only drop ignore_index tokens).
    hard = labels is not None and not (isinstance(hard_weight, numbers.Real) and hard_weight == 0)
    soft_w = jnp.asarray(soft_weight, cdt)
    hard_w = jnp.asarray(hard_weight, cdt)
    temp = jnp.asarray(temperature, cdt)
    # Inside shard_map every input varies over the union of the inputs' mapped axes, except the
    # vocabulary axis, over which only the weights vary (see match_vma).
    vocab_axes = frozenset(axis_names(axis_name))
    hs, ws, ht, wt, labels_c, soft_w, hard_w, temp = match_vma(
        hs, ws, ht, wt, labels_c, soft_w, hard_w, temp, exclude=vocab_axes
    )
    cfg = _Config(
        direction,
        float(beta),
        chunk,
        hard,
        bool(scale_by_temperature_squared),
        unit_t,
        static_temperature(temperature) is None,
        grad_filter=grad_filter,
        axis_name=axis_name,
        hidden_psum=tuple(a for a in axis_names(axis_name) if a not in varying_axes(hs)),
        teacher_transform=teacher_tr,
        student_transform=student_tr,
    )

    def scalar_fn(weights):
        weights = match_vma(weights, hs, ws, exclude=vocab_axes)[0]
        args = (hs, ws, ht, wt, labels_c, weights, soft_w, hard_w, temp)
        return cast(tuple[jax.Array, jax.Array], _fused_scalar(cfg, *args))

    return _fused_reduce(
        lambda: _fused_values(cfg, hs, ws, ht, wt, labels_c, soft_w, hard_w, temp),
        scalar_fn,
        lead=lead,
        cdt=cdt,
        reduction=reduction,
        mask=reduce_mask,
        like=(hs, reduce_mask),
        exclude=vocab_axes,
        dataset_size=dataset_size,
        count=count,
        batch_size=batch_size,
    )


def fused_linear_kl_penalty(
    ref_hidden: ArrayLike,
    ref_weight: ArrayLike,
    policy_hidden: ArrayLike,
    policy_weight: ArrayLike,
    *,
    reduction: Reduction,
    mask: ArrayLike | None = None,
    vocab_size: int | None = None,
    count: float | ArrayLike | None = None,
    batch_size: int | ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    """Exact per-token RL penalty KL(π_θ‖π_ref) over the full vocabulary, from hidden states.

    With policy logits z_θ = policy_hidden @ policy_weight and reference logits
    z_ref = ref_hidden @ ref_weight, the per-token value is

        KL(π_θ‖π_ref) = Σ_v π_θ(v)·log(π_θ(v)/π_ref(v)),   π = softmax(z),

    the quantity that the sampled-token estimators k1 and k3 (:mod:`kldiv.estimators`) estimate
    from log π(a) at one sampled token, here exact and without sampling noise: its gradient is
    the exact ∇_θ KL(π_θ‖π_ref). It is :func:`fused_linear_kl` with the reference as the frozen
    teacher and the policy as the student, ``direction="reverse"``: the logits are never
    materialised, so temporary memory is that of a few ``[C, V]`` chunks rather than ``[N, V]``.
    Same value as ``kldiv.kl_penalty_exact(z_θ, z_ref, mask=mask)`` — note the order: the
    estimators take (policy, reference) log-probabilities or logits, the fused heads take the
    reference (teacher) first, as every distillation loss does.

    Args:
      ref_hidden: ``[..., H_ref]`` reference-model hidden states (the inputs of its output
        layer); frozen (zero gradient, as under ``jax.lax.stop_gradient``).
      ref_weight: ``[H_ref, V]`` reference output projection (frozen).
      policy_hidden: ``[..., H]`` policy hidden states, same leading shape.
      policy_weight: ``[H, V]`` policy output projection (a Flax ``Dense`` kernel).
      reduction: ``"none"`` for the per-token penalty ``[...]`` (e.g. to subtract β·KL from each
        token's reward, or to weight it per token), or a scalar reduction as in
        :func:`kldiv.reduce` (``"mean"``: over the kept tokens). No default.
      mask: optional token keep-mask broadcastable to ``[...]`` (e.g. the response tokens):
        dropped tokens give 0 and touch no gradient, whatever their hidden states hold.
      vocab_size, count, batch_size, chunk_size, axis_name: as in :func:`fused_linear_kl`.

    Returns:
      The per-token KL ``[...]`` (``"none"``; masked tokens 0) or the reduced scalar; float32 for
      16-bit inputs. Differentiable w.r.t. the policy's hidden states and weight.

    Raises:
      TypeError, ValueError: as :func:`fused_linear_kl`.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import kldiv
      >>> # 1 sequence × 3 response tokens; hidden size 4; vocabulary of 6.
      >>> ref_hidden = jnp.cos(jnp.arange(12.0)).reshape(1, 3, 4)
      >>> ref_weight = jnp.sin(jnp.arange(24.0)).reshape(4, 6)
      >>> policy_hidden = ref_hidden + 0.3 * jnp.sin(jnp.arange(12.0)).reshape(1, 3, 4)
      >>> policy_weight = ref_weight
      >>> mask = jnp.array([[True, True, False]])  # the last token is padding
      >>> penalty = kldiv.fused_linear_kl_penalty(
      ...     ref_hidden, ref_weight, policy_hidden, policy_weight, reduction="none", mask=mask
      ... )
      >>> print(np.asarray(penalty).round(4))
      [[0.0601 0.0382 0.    ]]

      The exact KL from materialised logits (:func:`kldiv.kl_penalty_exact`, policy first):

      >>> exact = kldiv.kl_penalty_exact(
      ...     policy_hidden @ policy_weight, ref_hidden @ ref_weight, mask=mask
      ... )
      >>> print(np.asarray(exact).round(4))
      [[0.0601 0.0382 0.    ]]

      Its exact gradient w.r.t. the policy, for a penalty β·KL averaged over the kept tokens:

      >>> def loss(policy_hidden, policy_weight):
      ...     return 0.1 * kldiv.fused_linear_kl_penalty(
      ...         ref_hidden, ref_weight, policy_hidden, policy_weight, reduction="mean", mask=mask
      ...     )
      >>> grad_hidden, grad_weight = jax.grad(loss, argnums=(0, 1))(policy_hidden, policy_weight)
      >>> grad_hidden.shape, grad_weight.shape
      ((1, 3, 4), (4, 6))

    References:
      J. Schulman (2020), "Approximating KL Divergence"; Hsu et al. (2024), "Liger Kernel".
    """
    return fused_linear_kl(
        ref_hidden,
        ref_weight,
        policy_hidden,
        policy_weight,
        reduction=reduction,
        mask=mask,
        direction="reverse",
        vocab_size=vocab_size,
        count=count,
        batch_size=batch_size,
        chunk_size=chunk_size,
        axis_name=axis_name,
    )
