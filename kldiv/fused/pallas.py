"""Pallas kernel for KL from logits, row-wise fused forward and backward (``impl="pallas"``).

One program per row (grid = N). The forward kernel walks over the row in vocabulary blocks twice:
first the online logsumexp statistics of both logits (``_numerics.block_stats`` merged with
``merge_stats``; Milakov & Gimelshein 2018), then the KL terms (``logits_terms``, ``kl_terms``)
summed per block. It writes the KL and the four row statistics, which are all the backward kernel
needs besides the inputs: it walks over the row once more and writes both gradients
(``kl_logits_grads``) scaled by the incoming cotangent. Nothing of size N·V is ever stored besides
the inputs and the gradients themselves.

On GPU the kernel is lowered through Triton (``pl.pallas_call`` with Triton compiler params). On
any other backend it runs in Pallas *interpret mode* (``interpret=True``): the same kernel code
evaluated as ordinary JAX operations, which is slow (a loop over rows and blocks) but exercises the
kernel's logic, so CPU test runs cover it. Use small shapes there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kldiv._numerics import (
    block_stats,
    finish_stats,
    kl_logits_grads,
    kl_terms,
    logits_terms,
    merge_stats,
)

__all__ = ["block_size", "kl_logits_pallas", "on_gpu"]

# Largest vocabulary block per loop step (a power of two, as Triton requires): 4096 float32 in
# registers of 8 warps (16 per thread). Not yet tuned on GPU hardware.
MAX_BLOCK = 4096


def on_gpu() -> bool:
    """Whether the default backend is a GPU (where the kernel is compiled through Triton)."""
    return jax.default_backend() == "gpu"


def block_size(v: int, max_block: int = MAX_BLOCK) -> int:
    """Power-of-two block ≥ 16 covering ``v`` if it fits in ``max_block``, else ``max_block``."""
    return int(min(max_block, max(16, pl.next_power_of_2(v))))


def _load(ref, i, block, fill):
    """Block i of a row ref; entries past the row's end read as ``fill`` (−inf: no mass)."""
    idx = i * block + jnp.arange(block)
    mask = idx < ref.shape[0]
    return plgpu.load(ref.at[idx], mask=mask, other=fill), idx, mask


def _fwd_kernel(a_ref, b_ref, kl_ref, ma_ref, mb_ref, sa_ref, sb_ref, *, block):
    n_blocks = pl.cdiv(a_ref.shape[0], block)
    dtype = kl_ref.dtype

    def stats_step(i, carry):
        ma, sa, mb, sb = carry
        a, _, _ = _load(a_ref, i, block, -jnp.inf)
        b, _, _ = _load(b_ref, i, block, -jnp.inf)
        ma, sa = merge_stats(ma, sa, *block_stats(a))
        mb, sb = merge_stats(mb, sb, *block_stats(b))
        return ma, sa, mb, sb

    empty_m = jnp.full((1,), -jnp.inf, dtype)
    empty_s = jnp.zeros((1,), dtype)
    ma, sa, mb, sb = jax.lax.fori_loop(
        0, n_blocks, stats_step, (empty_m, empty_s, empty_m, empty_s)
    )
    ma, sa = finish_stats(ma, sa)
    mb, sb = finish_stats(mb, sb)

    def kl_step(i, acc):
        a, _, _ = _load(a_ref, i, block, -jnp.inf)
        b, _, _ = _load(b_ref, i, block, -jnp.inf)
        terms = kl_terms(*logits_terms(a, b, ma, mb, sa, sb))
        return acc + jnp.sum(terms, keepdims=True)

    kl_ref[...] = jax.lax.fori_loop(0, n_blocks, kl_step, jnp.zeros((1,), dtype))
    ma_ref[...] = ma
    mb_ref[...] = mb
    sa_ref[...] = sa
    sb_ref[...] = sb


def _bwd_kernel(
    a_ref, b_ref, kl_ref, ma_ref, mb_ref, sa_ref, sb_ref, g_ref, ga_ref, gb_ref, *, block
):
    n_blocks = pl.cdiv(a_ref.shape[0], block)
    stats = (ma_ref[...], mb_ref[...], sa_ref[...], sb_ref[...])
    kl, g = kl_ref[...], g_ref[...]

    def step(i, carry):
        a, idx, mask = _load(a_ref, i, block, -jnp.inf)
        b, _, _ = _load(b_ref, i, block, -jnp.inf)
        ga, gb = kl_logits_grads(*logits_terms(a, b, *stats), kl)
        plgpu.store(ga_ref.at[idx], ga * g, mask=mask)
        plgpu.store(gb_ref.at[idx], gb * g, mask=mask)
        return carry

    jax.lax.fori_loop(0, n_blocks, step, 0)


def _row_spec(v):
    return pl.BlockSpec((None, v), lambda i: (i, 0))


_SCALAR_SPEC = pl.BlockSpec((None, 1), lambda i: (i, 0))


def _call(kernel, n, v, n_in_rows, n_in_scalars, out_shapes, out_specs, block, interpret):
    """pallas_call over a grid of one program per row: row inputs, then per-row scalars."""
    params = None if interpret else plgpu.CompilerParams(num_warps=8 if block >= 2048 else 4)
    return pl.pallas_call(
        functools.partial(kernel, block=block),
        out_shape=out_shapes,
        grid=(n,),
        in_specs=[_row_spec(v)] * n_in_rows + [_SCALAR_SPEC] * n_in_scalars,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
        name=kernel.__name__.strip("_"),
    )


def _forward(a, b, block, interpret):
    n, v = a.shape
    row = jax.ShapeDtypeStruct((n, 1), a.dtype)
    return _call(_fwd_kernel, n, v, 2, 0, (row,) * 5, (_SCALAR_SPEC,) * 5, block, interpret)(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kl_rows(a, b, block, interpret):
    return _forward(a, b, block, interpret)[0][:, 0]


def _kl_rows_fwd(a, b, block, interpret):
    kl, *stats = _forward(a, b, block, interpret)
    return kl[:, 0], (a, b, kl, *stats)


def _kl_rows_bwd(block, interpret, res, g):
    a, b, kl, *stats = res
    n, v = a.shape
    g = g.astype(a.dtype)[:, None]
    full = jax.ShapeDtypeStruct((n, v), a.dtype)
    return _call(_bwd_kernel, n, v, 2, 6, (full, full), (_row_spec(v),) * 2, block, interpret)(
        a, b, kl, *stats, g
    )


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd)


def kl_logits_pallas(
    a: jax.Array,
    b: jax.Array,
    *,
    interpret: bool | None = None,
    block: int | None = None,
) -> jax.Array:
    """KL(softmax(a)‖softmax(b)) along the last axis with the Pallas kernels above.

    Args:
      a, b: prepared logits of one shape ``[..., V]`` and one floating dtype (as returned by
        ``kldiv.discrete.prepare_logits``).
      interpret: run in Pallas interpret mode; default: True unless the default backend is a GPU.
      block: vocabulary elements per block (a power of two); default :func:`block_size`.

    Returns:
      KL per row, shape ``a.shape[:-1]``; reverse-mode differentiable (custom VJP).
    """
    lead, v = a.shape[:-1], a.shape[-1]
    a2, b2 = a.reshape(-1, v), b.reshape(-1, v)
    if a2.shape[0] == 0 or v == 0:
        from kldiv.discrete import _kl_logits_core

        return _kl_logits_core(a, b, None)
    interpret = (not on_gpu()) if interpret is None else bool(interpret)
    block = block_size(v) if block is None else int(block)
    return _kl_rows(a2, b2, block, interpret).reshape(lead)
