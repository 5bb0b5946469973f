"""Row-chunked KL from logits with a memory-light custom VJP (CPU/TPU path of ``impl="chunked"``).

The naive composition (log-softmax of both logits, KL, autodiff) keeps several ``[N, V]``
float32 arrays alive for the backward pass and reads the logits many times. Here:

* forward: the row maxima of both logits (one streaming pass each), then a loop over chunks of
  ``C`` rows that computes Σexp of both rows and the KL terms while the chunk is in cache. Saved
  for the backward pass: the inputs and four numbers per row (maxima, Σexp) and the KL, O(N).
* backward: both gradients from the saved statistics in one elementwise pass,

      ∂KL/∂a = p·(x − KL),   ∂KL/∂b = q − p,   x = log(p/q)   (``_numerics.kl_logits_grads``),

  which needs no reduction and therefore no chunking: XLA fuses it into loops that write the two
  gradients directly (no ``[N, V]`` temporaries besides the outputs).

Temporary memory is O(C·V + N), independent of N·V. The numerics are exactly those of
``kldiv.discrete`` (``_numerics.safe_max``/``sum_exp`` — together ``logits_stats`` —,
``logits_terms`` and ``kl_terms``), on the same prepared inputs.

Chunks never need padding: the last chunk starts at N − C (it overlaps the previous one), and
rows computed twice are written twice with the same values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kldiv._numerics import (
    kl_logits_grads,
    kl_terms,
    logits_stats,
    logits_terms,
    safe_max,
    sum_exp,
)

__all__ = ["chunk_rows", "for_each_chunk", "kl_logits_chunked", "kl_rows_with_grad", "row_sum"]

# Bytes of one chunk of one input. Measured on a 2-core x86 CPU (1 MiB L2 per core, 32 MiB L3),
# [1024, 32768] float32: 2–8 MiB chunks (16–64 rows) were equally fast; 4 MiB halves the number of
# small kernels (and thread wake-ups) of 2 MiB. See bench/suites/fused.py.
CHUNK_BYTES = 4 * 2**20


def chunk_rows(n: int, v: int, dtype, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: about ``chunk_bytes`` of one ``[C, v]`` input, at least 1, at most ``n``."""
    target = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    c = max(1, target // max(1, v * jnp.dtype(dtype).itemsize))
    return int(max(1, min(n, c)))


def for_each_chunk(n: int, c: int, body, init, first: int = 0):
    """Runs ``body(start, first_new, carry)`` over ⌈n/c⌉ chunks of ``c`` rows; returns the carry.

    Chunk i covers rows [start, start + c) with start = min(i·c, n − c), so every chunk is full
    and no padded copy of the inputs is made; ``first_new`` = i·c is the first row that no earlier
    chunk covered (rows below it in the last chunk were already processed: bodies that accumulate
    across chunks must weight those rows by 0). ``first`` skips the chunks before it (a caller
    that handled them itself).
    """
    n_chunks = -(-n // c)

    def step(i, carry):
        first_new = i * c
        start = jnp.minimum(first_new, n - c)
        return body(start, first_new, carry)

    if n_chunks - first <= 0:
        return init
    if n_chunks - first == 1:
        return step(first, init)
    return jax.lax.fori_loop(first, n_chunks, step, init)


def row_sum(x: jax.Array) -> jax.Array:
    """Σ over the last axis as a matrix-vector product with ones.

    Same value as ``jnp.sum(x, -1)`` (up to summation order), but on CPU XLA then fuses the
    elementwise producer of ``x`` into one loop instead of materialising extra operands for a
    reduction; measured ~10% faster for the chunked forward pass.
    """
    ones = jnp.ones((x.shape[-1],), x.dtype)
    return jnp.matmul(x, ones, precision=jax.lax.Precision.HIGHEST)


def _rows(x, start, c):
    return jax.lax.dynamic_slice_in_dim(x, start, c, axis=0)


def _put(buf, x, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=0)


def kl_rows_with_grad(a: jax.Array, b: jax.Array, wrt: str) -> tuple[jax.Array, jax.Array]:
    """KL(softmax(a)‖softmax(b)) per row of prepared ``[C, V]`` logits and its gradient.

    ``wrt="a"``: ∂KL/∂a = p·(x − KL); ``wrt="b"``: ∂KL/∂b = q − p (``kl_logits_grads``). One
    evaluation of the shared statistics and terms gives both the value and the gradient.
    """
    stats = logits_stats(a, b)
    p, q, x = logits_terms(a, b, *stats)
    kl = row_sum(kl_terms(p, q, x))
    ga, gb = kl_logits_grads(p, q, x, kl[:, None])
    return kl, (ga if wrt == "a" else gb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kl_rows(a, b, c):
    return _kl_rows_fwd(a, b, c)[0]


def _kl_rows_fwd(a, b, c):
    n = a.shape[0]
    # Row maxima of the whole arrays first (one streaming pass each): the chunk loop then reads
    # its rows straight from the inputs, without a copy of each chunk for the reduction.
    ma, mb = safe_max(a), safe_max(b)

    def body(start, _, carry):
        ac, bc = _rows(a, start, c), _rows(b, start, c)
        ma_c, mb_c = _rows(ma, start, c), _rows(mb, start, c)
        sa, sb = sum_exp(ac, ma_c), sum_exp(bc, mb_c)  # = logits_stats(ac, bc) with the maxima
        kl = row_sum(kl_terms(*logits_terms(ac, bc, ma_c, mb_c, sa, sb)))
        return tuple(_put(buf, v, start) for buf, v in zip(carry, (kl, sa, sb), strict=True))

    zeros = jnp.zeros((n,), a.dtype)
    kl, sa, sb = for_each_chunk(n, c, body, (zeros, zeros[:, None], zeros[:, None]))
    return kl, (a, b, kl, ma, mb, sa, sb)


def _kl_rows_bwd(c, res, g):
    del c
    a, b, kl, *stats = res
    p, q, x = logits_terms(a, b, *stats)
    ga, gb = kl_logits_grads(p, q, x, kl[:, None])
    g = g.astype(a.dtype)[:, None]
    return ga * g, gb * g


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd)


def kl_logits_chunked(a: jax.Array, b: jax.Array, *, chunk_size: int | None = None) -> jax.Array:
    """KL(softmax(a)‖softmax(b)) along the last axis, in row chunks with an O(N) residual VJP.

    Args:
      a, b: prepared logits of one shape ``[..., V]`` and one floating dtype (as returned by
        ``kldiv.discrete.prepare_logits``: event axis last, masked entries −inf, temperature
        applied).
      chunk_size: rows per chunk; default: about ``CHUNK_BYTES`` of one input per chunk.

    Returns:
      KL per row, shape ``a.shape[:-1]``. Differentiable in reverse mode only (a custom VJP; use
      ``impl="xla"`` for forward-mode derivatives).
    """
    lead, v = a.shape[:-1], a.shape[-1]
    a2, b2 = a.reshape(-1, v), b.reshape(-1, v)
    n = a2.shape[0]
    if n == 0 or v == 0:
        from kldiv.discrete import _kl_logits_core

        return _kl_logits_core(a, b, None)
    c = chunk_rows(n, v, a.dtype) if chunk_size is None else max(1, min(n, int(chunk_size)))
    return _kl_rows(a2, b2, c).reshape(lead)
