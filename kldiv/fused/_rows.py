"""Row-chunk helpers shared by the chunked path and the fused linear head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__: list[str] = []


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


def rows(x: jax.Array, start, c: int) -> jax.Array:
    """Rows [start, start + c) of ``x`` (a dynamic slice along axis 0)."""
    return jax.lax.dynamic_slice_in_dim(x, start, c, axis=0)


def put_rows(buf: jax.Array, x: jax.Array, start) -> jax.Array:
    """``buf`` with rows [start, start + len(x)) replaced by ``x``."""
    return jax.lax.dynamic_update_slice_in_dim(buf, x, start, axis=0)
