"""Row-chunked KL from logits with a memory-light custom VJP (CPU/TPU path of ``impl="chunked"``).

The naive composition (log-softmax of both logits, KL, autodiff) keeps several ``[N, V]``
float32 arrays alive for the backward pass and reads the logits many times. Here:

* forward: one pass over the inputs, a loop over chunks of ``C`` rows that computes Σexp of
  both rows and the KL terms while the chunk is in cache. The rows are centred on the maxima of
  their first V/16 columns (``centre_columns``), not on the row maxima, which would need a pass
  of their own over the chunk: every result is invariant to the centre (the centred logits are
  error-free; ``_numerics.log_ratio`` keeps log(Σexp_a/Σexp_b) accurate however far apart the
  sums are) unless the entries above it make Σexp overflow or exceed 1/tiny (its reciprocal
  would be subnormal, flushed to zero on CPU). A chunk where that happens, or whose sample
  holds no live entry or a NaN (``_accepted``), is recomputed on its row maxima, so every edge
  is that of the XLA path. About a sampled centre the exponentials are compensated for the
  rounding of x − centre (``_numerics.exp_and_sum``). Saved for the backward pass: the inputs
  (as given), the KL and four numbers per row, O(N): each row's centre and Σexp, those of an
  accepted sample moved onto the row's log-normaliser (``_numerics.recentre``), so that the
  gradients keep the accuracy of the XLA path; where T ≠ 1 also the raw centres
  (``temper_and_mask`` subtracts them before the division).
* backward: both gradients from the saved statistics in elementwise passes,

      ∂KL/∂a = p·(x − KL),   ∂KL/∂b = q − p,   x = log(p/q)   (``_numerics.kl_logits_grads``),

  which need no reduction and therefore no chunking: XLA fuses them into loops that write the
  two gradients directly (no ``[N, V]`` temporaries besides the outputs).
* one gradient (a frozen teacher: the distillation case, or a frozen student), of an input
  stored in the compute dtype: the forward pass forms it per chunk, on the row maxima, from the
  terms it has in cache (``_gradient_rows``), and saves it instead of the inputs; the
  backward pass only multiplies it by the cotangent, in place, and not at all when the
  cotangent is the constant 1 (the rows summed, or the seed of ``value_and_grad``): XLA then
  folds the pass away and the gradient formed forward is the result. The inputs are read
  once, not twice, and nothing is computed twice (the "student" rows of
  ``python -m bench.designs``).
  With both inputs differentiated the same design was measured no faster than the recomputing
  backward above across cotangents (a few per cent faster for a sum of the rows, slower for a
  mean: the "both" rows there), and its forward pass would hold both gradients' buffers beside
  both inputs; so two gradients are recomputed.
  Memory: until the backward pass one ``[N, V]`` array is kept (the gradient) instead of two
  (the inputs); during the forward pass the gradient's buffer exists beside both inputs, where
  the recomputing backward wrote the gradient into the buffer of an input that was no longer
  needed. A program whose logits are intermediates (a materialised LM head) therefore peaks at
  three ``[N, V]`` arrays instead of two; ``kldiv.fused_linear_kl`` holds none.

The inputs stay in their storage dtype (e.g. bfloat16) and the mask stays boolean: every pass
applies ``kldiv._logits.temper_and_mask`` (cast to the compute dtype, −inf where masked, a static
logit scale and soft-cap, divide by a static T) to the rows it reads, inside the chunk or fused
into the elementwise loop, and the backward pass multiplies by the transform's derivative
(``transform_logits_grad``) and casts the gradients to the inputs' dtypes at its end (exactly 0
where masked).

Temporary memory is O(C·V + N), independent of N·V. The numerics are exactly those of
``kldiv.discrete`` (``temper_and_mask``, ``_numerics.safe_max``/``exp_and_sum`` — together
``logits_stats`` —, ``logits_terms`` and ``kl_terms``).

Chunks never need padding: the last chunk starts at N − C (it overlaps the previous one), and
rows computed twice are written twice with the same values.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import jax.numpy as jnp

from kldiv._checks import compute_dtype
from kldiv._logits import (
    NO_TRANSFORMS,
    Transforms,
    chain_cotangent,
    is_unit,
    kl_logits_aligned,
    masked_logits_cotangent,
    masked_row_max_pair,
    row_cotangent,
    temper_and_mask,
    tempered_max,
    untempered_half_difference,
    untempered_pair,
)
from kldiv._numerics import (
    centred_half_difference,
    exp_and_sum,
    kl_logits_grads,
    logit_kl_terms,
    logits_stats_and_exps,
    logits_terms,
    match_vma,
    psum,
    recentre,
    tempered_exp_and_sum,
    two_diff,
)
from kldiv.fused._rows import for_each_chunk, put_rows, rows

__all__: list[str] = []

# Bytes of one chunk of one input. Measured on a 2-core x86 CPU (1 MiB L2 per core, 32 MiB L3),
# [1024, 32768] float32: 2–8 MiB chunks (16–64 rows) were equally fast; 4 MiB halves the number of
# small kernels (and thread wake-ups) of 2 MiB. See bench/suites/fused.py.
CHUNK_BYTES = 4 * 2**20


def chunk_rows(n: int, v: int, dtype, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: about ``chunk_bytes`` of one ``[C, v]`` input, at least 1, at most ``n``."""
    target = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    c = max(1, target // max(1, v * jnp.dtype(dtype).itemsize))
    return int(max(1, min(n, c)))


def row_sum(x: jax.Array) -> jax.Array:
    """Σ over the last axis as a matrix-vector product with ones.

    Same value as ``jnp.sum(x, -1)`` (up to summation order), but on CPU XLA then fuses the
    elementwise producer of ``x`` into one loop instead of materialising extra operands for a
    reduction; measured ~10% faster for the chunked forward pass.
    """
    ones = jnp.ones((x.shape[-1],), x.dtype)
    return jnp.matmul(x, ones, precision=jax.lax.Precision.HIGHEST)


def kl_rows_with_grads(
    a: jax.Array, b: jax.Array, axis_name=None, centred=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KL(softmax(a)‖softmax(b)) per row of prepared ``[C, V]`` logits and both gradients.

    ∂KL/∂a = p·(x − KL) and ∂KL/∂b = q − p (``kl_logits_grads``): one evaluation of the shared
    statistics and terms gives the value and the gradients (XLA drops the unused one). With
    ``axis_name`` the ``V`` columns are one shard of a vocabulary split over that mapped axis (as
    ``kl_from_logits(..., axis_name=)``): row maxima, normalisers and the KL are combined across
    the shards (pmax/psum), the gradients stay local to the shard. ``centred``: for tempered
    logits, their halved centred difference before the division (``logits_terms(centred=)``).
    """
    stats, exps = logits_stats_and_exps(a, b, axis_name)
    p, q, x = logits_terms(a, b, *stats, exps, centred)  # each exponential formed once
    kl = psum(row_sum(logit_kl_terms(p, q, x)), axis_name)
    ga, gb = kl_logits_grads(p, q, x, kl[:, None])
    return kl, ga, gb


def _pass_through(x, dtype):
    """``x`` behind an optimization barrier if it is stored narrower than ``dtype`` (a no-op).

    XLA:CPU has no native bfloat16 slices: it converts the whole operand of each chunk's
    dynamic slice to float32 and, the operand being loop-invariant, hoists that conversion out
    of the loop — an ``[N, V]`` float32 copy. Handing the input on through the loop carry
    behind a barrier keeps it from looking invariant, so the conversion fuses into the slice and
    only the chunk is converted. (The barrier forwards the buffer; nothing is copied.)
    """
    return x if x.dtype == dtype else jax.lax.optimization_barrier(x)


# Columns whose maxima centre a chunk's rows first: the first 1/CENTRE_SAMPLE_FRACTION of them.
CENTRE_SAMPLE_FRACTION = 16


def centre_columns(v: int) -> int:
    """How many leading columns the sampled centres of a chunk are taken over (at least 1)."""
    return max(1, v // CENTRE_SAMPLE_FRACTION)


def _chunk_terms(ac, bc, w, dtype, t, transforms, cols):
    """The statistics and terms of one chunk of stored rows: ``(kl, sa, sb, ma, mb, raw, terms)``
    with ``raw`` the raw centres ``(ca, cb)`` and ``terms`` = (p, q, x/2) of
    ``_numerics.logits_terms``. See :func:`_chunk_kl` (the forward pass) and
    :func:`_gradient_rows` (the forward pass that also forms the gradients)."""
    ws = w if w is None or cols is None else w[:, :cols]
    a_s, b_s = (ac, bc) if cols is None else (ac[:, :cols], bc[:, :cols])
    ca, cb = masked_row_max_pair(a_s, b_s, dtype, ws)
    ta, tb = transforms
    xa = temper_and_mask(ac, dtype, t, w, ca, ta)
    xb = temper_and_mask(bc, dtype, t, w, cb, tb)
    ma, mb = tempered_max(ca, t, ta), tempered_max(cb, t, tb)
    # = logits_stats(xa, xb); the chunk's exponentials, in cache, serve both passes
    exact = cols is not None
    centred = None
    if not is_unit(t):
        # the rows before the division, read once: the centred difference, and about a sampled
        # centre the exponentials compensated for the roundings of x − centre and of ÷T
        ua, ub, cat, cbt = untempered_pair(ac, bc, ca, cb, dtype, w, (ta, tb))
        centred = centred_half_difference(ua, ub, cat, cbt, t)
    if centred is not None and exact:
        (ea, sa), (eb, sb) = tempered_exp_and_sum(ua, cat, t), tempered_exp_and_sum(ub, cbt, t)
    else:
        (ea, sa), (eb, sb) = (
            exp_and_sum(xa, ma, compensated=exact),
            exp_and_sum(xb, mb, compensated=exact),
        )
    terms = logits_terms(xa, xb, ma, mb, sa, sb, (ea, eb), centred)
    kl = row_sum(logit_kl_terms(*terms))
    return kl, sa, sb, ma, mb, (ca, cb), terms


def _chunk_kl(ac, bc, w, dtype, t, transforms, cols):
    """(KL, Σexp of a, Σexp of b, tempered centre of a, of b, raw centres of a and b) of one
    chunk of stored rows: the tempered centres as ``logits_terms`` takes them
    (``tempered_max``), the raw ones only where T ≠ 1 (``temper_and_mask`` needs them then).

    The rows are centred on the raw maxima of their first ``cols`` columns (all of them when
    ``cols`` is None: the row maxima) and put through ``temper_and_mask``; every result is
    invariant to the centres except for overflow, which :func:`_accepted` detects. About a
    sampled centre the exponentials are compensated (``exp_and_sum(compensated=True)``): the
    rounding of x − centre would otherwise enter each p with up to eps·(max − centre)/2.
    """
    kl, sa, sb, ma, mb, raw, _ = _chunk_terms(ac, bc, w, dtype, t, transforms, cols)
    return (kl, sa, sb, ma, mb) + (() if is_unit(t) else raw)


def _recentred(stats):
    """:func:`_chunk_kl`'s outputs with the statistics of each row moved onto its log-normaliser
    (``_numerics.recentre``), for the backward pass: about a sampled centre far below the row
    maximum, log p = (x − m) − log s would carry an absolute error of eps·log s (which the
    gradient p·(x − KL) sees at first order). Rows centred on their maxima need no move
    (1 ≤ s ≤ V) and keep the XLA path's statistics, bit for bit."""
    kl, sa, sb, ma, mb, *raw = stats
    (ma, sa), (mb, sb) = recentre(ma, sa), recentre(mb, sb)
    return (kl, sa, sb, ma, mb, *raw)


def _accepted(sa, sb):
    """Whether sampled centres served every row of a chunk: both normalisers ≥ 1 and at most
    1/tiny (2^126 in float32), so that 1/Σexp is a normal number.

    A centre that is an entry of its row contributes e^0 = 1 to its Σexp, so a sum below 1 (or
    NaN) means that the sample held no live entry (all masked or −inf) or a NaN. A sum above
    1/tiny means that some entry lay almost the dtype's exponent range above the centre (huge
    logits, a tiny T), or beyond it (+inf): XLA forms the probabilities e^{x − m}/Σexp
    (``_numerics.logits_terms``) as e^{x − m}·(1/Σexp), and a subnormal reciprocal is flushed
    to zero on CPU (every p 0, a silently wrong KL). Such chunks are recomputed on their row
    maxima (Σexp ≤ V), the exact semantics of every path.
    """
    big = 1 / jnp.finfo(sa.dtype).tiny  # a power of two, exact in the dtype

    def ok(s):
        return (s >= 1) & (s <= big)  # NaN compares False

    return jnp.all(ok(sa) & ok(sb))


# The fallback of a chunk whose sampled centres failed works through it in this many parts, so
# that its temporaries (a branch of its own, which XLA does not overlap with the loop body's)
# add a fraction of a chunk to the memory, not a second chunk.
_FALLBACK_PARTS = 8


def _rows_kl(a, b, where, first, n, c, dtype, t, transforms, cols):
    """:func:`_chunk_kl` of rows [first, first + n) of the stored inputs, in chunks of ``c``
    rows, as per-row outputs (KL ``[n]``, Σexp and centres ``[n, 1]``).

    ``cols``: the sampled centres' columns (see :func:`centre_columns`), or None for the row
    maxima. With a sample, a chunk that :func:`_accepted` rejects is recomputed on its row
    maxima, in ``_FALLBACK_PARTS`` parts (by this function, without a sample). The inputs ride
    in the carry (``_pass_through``).
    """
    part = max(1, -(-c // _FALLBACK_PARTS))

    def body(start, _, carry):
        (a_, b_), out = carry
        at = first + start
        w = None if where is None else rows(where, at, c)
        new = _chunk_kl(rows(a_, at, c), rows(b_, at, c), w, dtype, t, transforms, cols)
        if cols is not None:
            # the move onto the log-normaliser outside the branch: formed inside it, it cost
            # a fifth of the forward (`python -m bench.designs`: kldiv-chunked at 1.22x the
            # design without the test in a run at e7499c5; 1.05x at 01b2910,
            # bench/results/designs.json); its values are discarded where the chunk falls back
            accepted, recentred = _accepted(new[1], new[2]), _recentred(new)
            new = jax.lax.cond(
                accepted,
                lambda: recentred,
                # from the stored inputs, not from the slices: a slice handed into a branch
                # would be materialised (two chunk-sized copies on every iteration)
                lambda: _rows_kl(a_, b_, where, at, c, part, dtype, t, transforms, None),
            )
        out = tuple(put_rows(buf, x, start) for buf, x in zip(out, new, strict=True))
        return (_pass_through(a_, dtype), _pass_through(b_, dtype)), out

    return for_each_chunk(n, c, body, ((a, b), _row_outputs(n, dtype, t, a, b, where)))[1]


def _row_outputs(n, dtype, t, *like):
    """Zeroed per-row outputs of :func:`_chunk_kl` for ``n`` rows (KL ``[n]``, the rest
    ``[n, 1]``), varying over the mapped axes of ``like`` as the loop's values do (inside
    ``shard_map``: a loop carry keeps one type)."""
    zeros = cast(jax.Array, match_vma(jnp.zeros((n,), dtype), *like)[0])
    return (zeros,) + (zeros[:, None],) * (4 if is_unit(t) else 6)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kl_rows(a, b, where, c, t, tr):
    return _forward(a, b, where, c, t, tr)[0]


def _kl_rows_fwd(a, b, where, c, t, tr):
    """The forward pass with symbolic zeros: an input that is not differentiated (a frozen
    teacher, the distillation case) gets no gradient pass and no gradient write at all. Which
    inputs need one is carried in the residuals' structure: a ``(None,)`` marker or ``()``.

    When exactly one input is differentiated and it is stored in the compute dtype, its
    gradient is formed in this pass (:func:`_gradient_rows`), while each chunk is in cache, and
    the backward pass only scales it by the cotangent: the inputs are read once instead of
    twice. (For a narrower storage dtype the gradient would have to be kept in the compute
    dtype until then, twice the bytes of the result, or rounded twice.) Both gradients are not
    formed here: measured no faster than the recomputing backward across cotangents, and one
    more ``[N, V]`` array during the forward pass (the "both" rows of
    ``python -m bench.designs``)."""
    where = getattr(where, "value", where)  # None (no mask) has no leaves to wrap
    dtype = compute_dtype(a.value, b.value)
    perturbed = (a.perturbed, b.perturbed)
    if perturbed.count(True) == 1:
        wrt = perturbed.index(True)
        if (a.value, b.value)[wrt].dtype == dtype:
            kl, (grad,) = _gradient_rows(a.value, b.value, where, c, t, tr, (wrt,))
            return kl, {"grads": {wrt: grad}, "where": where}
    kl, res = _forward(a.value, b.value, where, c, t, tr)
    wanted = tuple((None,) if x else () for x in perturbed)
    return kl, (res, wanted)


def _gradient_rows(a, b, where, c, t, tr, wrts):
    """KL per row and ∂KL/∂(a, b)[i] for each ``i`` in ``wrts`` (before the cotangent and 1/T:
    times the transform's derivative, exactly 0 where masked, in the compute dtype), in one pass
    over the inputs.

    Each chunk is centred on its row maxima (``_chunk_terms`` without a sample: the XLA path's
    statistics, no fallback needed) and its gradients are formed from the same terms while the
    chunk is in cache, ``_numerics.kl_logits_grads``. Writing them costs the ``[N, V]`` outputs
    that the backward pass would write anyway (the scaling there reuses their buffers).
    """
    n, v = a.shape
    dtype = compute_dtype(a, b)

    def body(start, _, carry):
        (a_, b_), kl_buf, g_bufs = carry
        ac, bc = rows(a_, start, c), rows(b_, start, c)
        w = None if where is None else rows(where, start, c)
        kl, *_, terms = _chunk_terms(ac, bc, w, dtype, t, tr, None)
        gs = kl_logits_grads(*terms, kl[:, None])
        g_bufs = tuple(
            put_rows(buf, masked_logits_cotangent(gs[i], dtype, w, (ac, bc)[i], tr[i]), start)
            for buf, i in zip(g_bufs, wrts, strict=True)
        )
        return (
            (_pass_through(a_, dtype), _pass_through(b_, dtype)),
            put_rows(kl_buf, kl, start),
            g_bufs,
        )

    # one initial buffer per gradient, built by distinct operations: XLA would merge equal ones
    # and then copy the merged buffer (a full [N, V] pass) to give each loop carry its own
    inits = [jnp.zeros((n, v), dtype), jnp.full((n, v), -0.0, dtype)][: len(wrts)]
    kl0, *inits = cast(tuple, match_vma(jnp.zeros((n,), dtype), *inits, a, b))[: 1 + len(wrts)]
    _, kl, grads = for_each_chunk(n, c, body, ((a, b), kl0, tuple(inits)))
    return kl, grads


def _forward(a, b, where, c, t, tr):
    n, v = a.shape
    dtype = compute_dtype(a, b)
    # One pass over the inputs from memory: each chunk of rows is read once and kept in cache
    # while its Σexp and KL terms are computed. The rows are centred on the maxima of their
    # first columns (a 1/16 sample, read first), not on the row maxima: those would take a
    # pass of their own over the whole chunk, and any centre gives the same values (the
    # centred logits are error-free, all-row constants cancel) unless the entries above it
    # push Σexp beyond 1/tiny — then, or where the sample holds no live entry, the chunk is
    # recomputed on its row maxima (`python -m bench.designs` times both designs).
    cols = centre_columns(v)
    kl, sa, sb, ma, mb, *raw = _rows_kl(
        a, b, where, 0, n, c, dtype, t, tr, cols if cols < v else None
    )
    return kl, (a, b, where, kl, (ma, mb, sa, sb), tuple(raw) or (None, None))


def _kl_rows_bwd(c, t, tr, res, g):
    del c
    if isinstance(res, dict):  # the gradients of the differentiated inputs, formed forward
        grads, where = res["grads"], res["where"]

        gr = row_cotangent(g, next(iter(grads.values())).dtype)

        def scaled(gx):  # exactly 0 where masked, also where the cotangent is not finite
            y = chain_cotangent(gx, gr, t)
            # gx is exactly 0 where masked, so a row with a finite cotangent needs no mask:
            # when the cotangent is a constant (a sum or a mean of the rows) XLA folds the
            # test away, and for g = 1, T = 1 the whole pass (the gradient formed forward is
            # the result).
            return jnp.where(jnp.isfinite(gr), y, masked_logits_cotangent(y, gx.dtype, where))

        return tuple(scaled(grads[i]) if i in grads else None for i in (0, 1)) + (None,)
    (a, b, where, kl, stats, (ca, cb)), wanted = res
    need_a, need_b = (bool(w) for w in wanted)
    dtype = kl.dtype
    g = row_cotangent(g, dtype)

    def grad(wrt, a, b):
        ac, bc = (
            temper_and_mask(x, dtype, t, where, m, trx)
            for x, m, trx in ((a, ca, tr[0]), (b, cb, tr[1]))
        )
        centred = None
        if not is_unit(t):
            # about the tempered centres (0); the saved statistics were moved onto the rows'
            # log-normalisers (ma, mb: _recentred), so the difference moves with them
            shift_hi, shift_lo = two_diff(0.5 * stats[0], 0.5 * stats[1])
            centred = untempered_half_difference(a, b, ca, cb, dtype, where, tr, t)
            centred = (centred - shift_hi) - shift_lo
        gx = kl_logits_grads(*logits_terms(ac, bc, *stats, centred=centred), kl[:, None])[wrt]
        x = (a, b)[wrt]
        y = chain_cotangent(gx, g, t)
        return masked_logits_cotangent(y, x.dtype, where, x.astype(dtype), tr[wrt])

    # Two elementwise passes over the inputs, each writing its gradient directly. They share
    # e^{a − max a}: XLA computes it once into an [N, V] buffer that it then reuses for a
    # gradient (no temporary) — possible only when the gradients have the compute dtype. For
    # narrower inputs the barrier keeps the passes independent (the shared terms are
    # recomputed), so that no [N, V] temporary in the compute dtype is made. The same with a
    # logit transform: XLA would otherwise keep the transformed logits of both inputs (shared
    # by the two passes) as [N, V] buffers.
    ga = grad(0, a, b) if need_a else None
    transformed = tr[0] is not None or tr[1] is not None
    if need_a and need_b and (a.dtype != dtype or b.dtype != dtype or transformed):
        a, b = jax.lax.optimization_barrier((a, b))
    return ga, (grad(1, a, b) if need_b else None), None


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd, symbolic_zeros=True)


def kl_logits_chunked(
    a: jax.Array,
    b: jax.Array,
    *,
    where: jax.Array | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    transforms: Transforms = NO_TRANSFORMS,
) -> jax.Array:
    """KL(softmax(a/T)‖softmax(b/T)) along the last axis, in row chunks with an O(N) residual VJP.

    Args:
      a, b: logits of one shape ``[..., V]`` (event axis last), each in its storage dtype
        (bfloat16, float16, float32 or float64): the cast to the compute dtype
        (``kldiv._checks.compute_dtype``), the temperature and the mask are applied per chunk
        (``kldiv._logits.temper_and_mask``), so no ``[N, V]`` copy in the compute dtype is made.
      where: boolean mask of the same shape, or None; masked entries count as −inf logits and
        get exactly zero gradient, whatever they hold.
      temperature: T > 0, a Python number (a static value; apply traced temperatures to the
        inputs beforehand).
      chunk_size: rows per chunk; default: about ``CHUNK_BYTES`` of one input per chunk in the
        compute dtype.
      transforms: the (a, b) logit scale and soft-cap (``kldiv._logits.transform_logits``),
        applied per chunk before the temperature; the backward pass multiplies the logits'
        cotangents by the transform's derivative.

    Returns:
      KL per row, shape ``a.shape[:-1]``, in the compute dtype. Differentiable in reverse mode
      only (a custom VJP; use ``impl="xla"`` for forward-mode derivatives); the gradients come
      back in the dtypes of ``a`` and ``b``.
    """
    t = float(temperature)
    lead, v = a.shape[:-1], a.shape[-1]
    dtype = compute_dtype(a, b)
    if a.size == 0 or v == 0:
        return kl_logits_aligned(a, b, where, t, transforms)
    a2, b2 = a.reshape(-1, v), b.reshape(-1, v)
    w2 = None if where is None else where.reshape(-1, v)
    n = a2.shape[0]
    c = chunk_rows(n, v, dtype) if chunk_size is None else max(1, min(n, int(chunk_size)))
    a2, b2, w2 = match_vma(a2, b2, w2)  # replicated inputs inside shard_map (see match_vma)
    return jnp.reshape(cast(jax.Array, _kl_rows(a2, b2, w2, c, t, tuple(transforms))), lead)
