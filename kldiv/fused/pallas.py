"""Pallas kernel for KL from logits, row-wise fused forward and backward (``impl="pallas"``).

One program per row (grid = N). The forward kernel reads each row once, in vocabulary blocks:
per block the block's own maxima, Σexp and KL (``logits_terms``, ``logit_kl_terms``, centred on
the block's maxima), merged into a running state as the online logsumexp merges its statistics
(Milakov & Gimelshein 2018), with the KL merged by its chain rule over a partition,
KL = π₁·KL₁ + π₂·KL₂ + KL([π₁, π₂]‖[ρ₁, ρ₂]) (``_numerics.merge_block_kl``): every term is
non-negative, so the one-pass value keeps the relative accuracy of the two-pass one near p ≈ q.
It writes the KL and the four row statistics, which are all the backward kernel needs besides
the inputs: it walks over the row once more and writes both gradients
(``kl_logits_grads``) scaled by the incoming cotangent. Nothing of size N·V is ever stored besides
the inputs and the gradients themselves. The inputs are read in their storage dtype (e.g.
bfloat16) together with the optional boolean mask, and every loaded block goes through
``kldiv._logits.temper_and_mask`` (cast to the compute dtype, divide by the static temperature,
−inf where masked); gradients are computed in the compute dtype and stored in the inputs' dtypes.

On GPU the kernel is lowered through Triton (``pl.pallas_call`` with Triton compiler params). On
any other backend it runs in Pallas *interpret mode* (``interpret=True``): the same kernel code
evaluated as ordinary JAX operations, which is slow (a loop over rows and blocks) but exercises the
kernel's logic, so CPU test runs cover it. Use small shapes there.
"""

from __future__ import annotations

import functools
from typing import cast

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kldiv._checks import compute_dtype
from kldiv._logits import (
    NO_TRANSFORMS,
    Transforms,
    chain_cotangent,
    is_unit,
    kl_logits_aligned,
    masked_logits_cotangent,
    row_cotangent,
    temper_and_mask,
    tempered_max,
    transform_logits,
    untempered_half_difference,
)
from kldiv._numerics import (
    BlockKL,
    block_kl,
    finish_stats,
    kl_logits_grads,
    logits_terms,
    match_vma,
    merge_block_kl,
    varying_axes,
)

__all__: list[str] = []

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


def _load_pair(a_ref, b_ref, w_ref, i, block, dtype):
    """Block i of both logit rows, raw: cast to the compute dtype, −inf where masked or past the
    row's end (``temper_and_mask`` at T = 1 without a transform); the mask block (or None),
    indices, in-row mask."""
    a, idx, mask = _load(a_ref, i, block, -jnp.inf)
    b, _, _ = _load(b_ref, i, block, -jnp.inf)
    w = None if w_ref is None else _load(w_ref, i, block, 0)[0] != 0
    a, b = (temper_and_mask(x, dtype, 1.0, w) for x in (a, b))
    return a, b, w, idx, mask


def _tempered(raw, centers, temperature, transforms):
    """Raw blocks as ``temper_and_mask`` defines them (scaled and soft-capped, centred on the
    raw ``centers``, divided by T), and their tempered maxima."""
    dtype = raw[0].dtype
    out = tuple(
        temper_and_mask(x, dtype, temperature, None, c, tr)
        for x, c, tr in zip(raw, centers, transforms, strict=True)
    )
    maxima = tuple(
        tempered_max(c, temperature, tr) for c, tr in zip(centers, transforms, strict=True)
    )
    return out, maxima


def _split_refs(refs, has_where, n_in):
    """(a_ref, b_ref, w_ref or None, remaining refs) from a kernel's flat ref list."""
    a_ref, b_ref = refs[:2]
    w_ref = refs[2] if has_where else None
    return a_ref, b_ref, w_ref, refs[n_in:]


def _block_state(a, b, temperature, transforms):
    """The one-pass state of one block of raw (cast and masked) logit rows — its own maxima,
    Σexp and KL, computed as :func:`kl_logits_aligned` computes a whole row (``temper_and_mask``
    centred on the block's maxima, ``logits_terms``, ``logit_kl_terms``), with the maxima in the
    transformed logits' units — and the block's raw maxima."""
    raw_max = tuple(jnp.max(x, keepdims=True) for x in (a, b))
    centers = tuple(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)) for m in raw_max)
    (at, bt), (ta, tb) = _tempered((a, b), centers, temperature, transforms)
    ma, mb = (transform_logits(c, tr) for c, tr in zip(centers, transforms, strict=True))
    centred = _centred(a, b, centers, temperature, transforms)
    return block_kl(at, bt, ma, mb, ta, tb, centred), raw_max


def _centred(a, b, centers, temperature, transforms):
    """The halved centred difference of raw rows before the division by T (None at T = 1):
    ``logits_terms(centred=)``, as every path forms it."""
    if is_unit(temperature):
        return None
    ca, cb = centers
    return untempered_half_difference(a, b, ca, cb, a.dtype, None, transforms, temperature)


def _fwd_kernel(*refs, block, temperature, has_where, transforms):
    """One pass over the row: each block's own statistics and KL, merged into the running state
    by the chain rule of the KL divergence (``_numerics.merge_block_kl``)."""
    a_ref, b_ref, w_ref, (kl_ref, ma_ref, mb_ref, sa_ref, sb_ref) = _split_refs(
        refs, has_where, 2 + has_where
    )
    n_blocks = pl.cdiv(a_ref.shape[0], block)
    dtype = kl_ref.dtype
    t = temperature

    def step(i, carry):
        state, raw_a, raw_b, nans_a, nans_b = carry
        a, b = _load_pair(a_ref, b_ref, w_ref, i, block, dtype)[:2]
        block_state, (ba, bb) = _block_state(a, b, t, transforms)
        state = merge_block_kl(state, block_state, t)
        nans_a = nans_a + jnp.sum(jnp.isnan(a).astype(dtype), keepdims=True)
        nans_b = nans_b + jnp.sum(jnp.isnan(b).astype(dtype), keepdims=True)
        return state, jnp.maximum(raw_a, ba), jnp.maximum(raw_b, bb), nans_a, nans_b

    empty_m = jnp.full((1,), -jnp.inf, dtype)
    zero = jnp.zeros((1,), dtype)
    init = (BlockKL(empty_m, zero, empty_m, zero, zero, zero), empty_m, empty_m, zero, zero)
    state, raw_a, raw_b, nans_a, nans_b = jax.lax.fori_loop(0, n_blocks, step, init)
    # The raw row maxima (the backward's centres) and Σexp about their transformed, tempered
    # values (the state's maxima are the transformed ones: the same Σexp).
    ma, sa = finish_stats(raw_a, state.sa)
    mb, sb = finish_stats(raw_b, state.sb)
    # NaN in an unmasked entry propagates as on the XLA path (a GPU max would drop it): NaN
    # in p's logits always, in q's where p has support (a row where p has none is 0 whatever
    # q holds, as every other path gives it).
    nan_row = (nans_a > 0) | ((nans_b > 0) & (state.sa > 0))
    kl_ref[...] = jnp.where(nan_row, jnp.nan, state.kl)
    ma_ref[...] = ma
    mb_ref[...] = mb
    sa_ref[...] = sa
    sb_ref[...] = sb


def _bwd_kernel(*refs, block, temperature, has_where, wanted, transforms):
    """Writes the gradients in ``wanted`` (``"a"``, ``"b"`` or both): a frozen input (the
    teacher in distillation) costs no gradient write."""
    a_ref, b_ref, w_ref, rest = _split_refs(refs, has_where, 2 + has_where)
    kl_ref, ma_ref, mb_ref, sa_ref, sb_ref, g_ref, *out_refs = rest
    grad_refs = dict(zip(wanted, out_refs, strict=True))
    n_blocks = pl.cdiv(a_ref.shape[0], block)
    centers = (ma_ref[...], mb_ref[...])  # the raw row maxima
    kl, g = kl_ref[...], g_ref[...]  # g: the row cotangent
    dtype = kl.dtype
    sa, sb = sa_ref[...], sb_ref[...]

    def step(i, carry):
        a, b, w, idx, mask = _load_pair(a_ref, b_ref, w_ref, i, block, dtype)
        (at, bt), (ta, tb) = _tempered((a, b), centers, temperature, transforms)
        centred = _centred(a, b, centers, temperature, transforms)
        p, q, xh = logits_terms(at, bt, ta, tb, sa, sb, centred=centred)
        grads = dict(zip("ab", kl_logits_grads(p, q, xh, kl), strict=True))
        raw = {"a": a, "b": b}
        tr = dict(zip("ab", transforms, strict=True))
        for name, ref in grad_refs.items():
            y = chain_cotangent(grads[name], g, temperature)
            cot = masked_logits_cotangent(y, ref.dtype, w, raw[name], tr[name])
            plgpu.store(ref.at[idx], cot, mask=mask)
        return carry

    jax.lax.fori_loop(0, n_blocks, step, 0)


def _row_spec(v):
    return pl.BlockSpec((None, v), lambda i: (i, 0))


_SCALAR_SPEC = pl.BlockSpec((None, 1), lambda i: (i, 0))


def _call(kernel, n, v, n_in_rows, n_in_scalars, out_shapes, out_specs, block, interpret, **kw):
    """pallas_call over a grid of one program per row: row inputs, then per-row scalars."""
    params = None if interpret else plgpu.CompilerParams(num_warps=8 if block >= 2048 else 4)
    return pl.pallas_call(
        functools.partial(kernel, block=block, **kw),
        out_shape=out_shapes,
        grid=(n,),
        in_specs=[_row_spec(v)] * n_in_rows + [_SCALAR_SPEC] * n_in_scalars,
        out_specs=out_specs,
        interpret=interpret,
        compiler_params=params,
        name=kernel.__name__.strip("_"),
    )


# Pallas' Triton lowering indexes an operand with 32-bit element offsets unless the operand is
# larger than 2^32 bytes; the offsets are signed in the pointer arithmetic, so a one-byte operand
# (the boolean mask, a float8 input) of 2^31 ≤ N·V ≤ 2^32 elements would wrap and read out of
# bounds (e.g. [16384, 151936]). Operands of two or more bytes switch to 64-bit offsets before
# their element offsets can reach 2^31.
_INT32_OFFSETS = 2**31


def wide_offsets_dtype(dtype, n_elements: int):
    """The dtype an operand of ``n_elements`` is passed to the kernel in: one-byte dtypes are
    widened to two bytes (bool → int16, float8 → bfloat16) once their offsets could wrap."""
    dtype = jnp.dtype(dtype)
    if n_elements < _INT32_OFFSETS or dtype.itemsize > 1:
        return dtype
    return jnp.dtype(jnp.int16) if dtype == jnp.bool_ else jnp.dtype(jnp.bfloat16)


def _wide_offsets(x):
    dtype = wide_offsets_dtype(x.dtype, x.size)
    return x if dtype == x.dtype else x.astype(dtype)


def _out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """An output of ``shape`` and ``dtype`` varying over the same ``shard_map`` axes as ``like``
    (the inputs agree after ``match_vma``): Pallas needs it inside ``shard_map`` with
    ``check_vma=True``."""
    aval = jax.typeof(like)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual)
    vma = getattr(aval, "vma", None)  # JAX 0.7–0.9
    if vma is not None:
        return jax.ShapeDtypeStruct(shape, dtype, vma=vma)  # pyright: ignore[reportCallIssue]
    return jax.ShapeDtypeStruct(shape, dtype)


def _row_inputs(a, b, where):
    return (a, b) if where is None else (a, b, where)


def _forward(a, b, where, block, interpret, temperature, transforms):
    n, v = a.shape
    rows = _row_inputs(a, b, where)
    row = _out_struct((n, 1), compute_dtype(a, b), a)
    kw = dict(temperature=temperature, has_where=where is not None, transforms=transforms)
    call = _call(
        _fwd_kernel, n, v, len(rows), 0, (row,) * 5, (_SCALAR_SPEC,) * 5, block, interpret, **kw
    )
    return call(*rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _kl_rows(a, b, where, block, interpret, temperature, transforms):
    return _forward(a, b, where, block, interpret, temperature, transforms)[0][:, 0]


def _kl_rows_fwd(a, b, where, block, interpret, temperature, transforms):
    """Forward with symbolic zeros: which inputs are differentiated decides which gradients the
    backward kernel writes; it travels in the residuals' structure (a marker string)."""
    wanted = "".join(name for name, x in zip("ab", (a, b), strict=True) if x.perturbed)
    a, b, where = a.value, b.value, getattr(where, "value", where)
    kl, *stats = _forward(a, b, where, block, interpret, temperature, transforms)
    return kl[:, 0], ((a, b, where, kl, *stats), {name: () for name in wanted})


def _kl_rows_bwd(block, interpret, temperature, transforms, res, g):
    (a, b, where, kl, *stats), marker = res
    wanted = "".join(sorted(marker))
    n, v = a.shape
    if not wanted:
        return None, None, None
    g = row_cotangent(g, kl.dtype)
    rows = _row_inputs(a, b, where)
    dtypes = {"a": a.dtype, "b": b.dtype}
    outs = tuple(_out_struct((n, v), dtypes[name], a) for name in wanted)
    kw = dict(
        temperature=temperature, has_where=where is not None, wanted=wanted, transforms=transforms
    )
    specs = (_row_spec(v),) * len(wanted)
    call = _call(_bwd_kernel, n, v, len(rows), 6, outs, specs, block, interpret, **kw)
    grads = dict(zip(wanted, call(*rows, kl, *stats, g), strict=True))
    return grads.get("a"), grads.get("b"), None


_kl_rows.defvjp(_kl_rows_fwd, _kl_rows_bwd, symbolic_zeros=True)


def kl_logits_pallas(
    a: jax.Array,
    b: jax.Array,
    *,
    where: jax.Array | None = None,
    temperature: float = 1.0,
    interpret: bool | None = None,
    block: int | None = None,
    transforms: Transforms = NO_TRANSFORMS,
) -> jax.Array:
    """KL(softmax(a/T)‖softmax(b/T)) along the last axis with the Pallas kernels above.

    Args:
      a, b: logits of one shape ``[..., V]`` (event axis last), each in its storage dtype; each
        loaded block is cast to the compute dtype, tempered and masked in the kernel
        (``kldiv._logits.temper_and_mask``).
      where: boolean mask of the same shape, or None; masked entries count as −inf logits and
        get exactly zero gradient, whatever they hold.
      temperature: T > 0, a Python number (static; apply traced temperatures beforehand).
      interpret: run in Pallas interpret mode; default: True unless the default backend is a GPU.
      block: vocabulary elements per block (a power of two); default :func:`block_size`.
      transforms: the (a, b) logit scale and soft-cap (``kldiv._logits.transform_logits``),
        applied to each loaded block before the temperature; the backward kernel multiplies the
        cotangents by the transform's derivative.

    Returns:
      KL per row, shape ``a.shape[:-1]``, in the compute dtype; reverse-mode differentiable
      (custom VJP), with gradients in the dtypes of ``a`` and ``b``.
    """
    t = float(temperature)
    lead, v = a.shape[:-1], a.shape[-1]
    if a.size == 0 or v == 0:
        return kl_logits_aligned(a, b, where, t, transforms)
    a2, b2 = a.reshape(-1, v), b.reshape(-1, v)
    w2 = None if where is None else where.reshape(-1, v)
    a2, b2, w2 = (None if x is None else _wide_offsets(x) for x in (a2, b2, w2))
    interpret = (not on_gpu()) if interpret is None else bool(interpret)
    block = block_size(v) if block is None else int(block)
    a2, b2, w2 = match_vma(a2, b2, w2)  # replicated inputs inside shard_map (see match_vma)
    static = (block, interpret, t, tuple(transforms))

    def rows(a, b, where):
        return _kl_rows(a, b, where, *static)

    axes = tuple(sorted(varying_axes(a2), key=str))
    if interpret and axes:
        rows = functools.partial(_gathered_rows, rows, axes)
    return jnp.reshape(cast(jax.Array, rows(a2, b2, w2)), lead)


def _gathered_rows(rows, axes, a, b, where):
    """``rows`` in interpret mode inside ``jax.shard_map`` on inputs varying over ``axes``.

    Pallas' interpreter evaluates the kernel's block loop and indexed loads with the types the
    kernel was traced with, which carry no varying axes, and ``check_vma=True`` then rejects them
    (JAX 0.10). Every shard's rows are gathered into one array that is the same on every device
    (each shard placed at its index and ``psum``'d, a type with no varying axes), all rows go
    through the kernel, and this device's rows are taken back (``axis_index``). The kernel is
    row-wise, so the result equals the per-shard computation, and the transposes of the slice
    and the ``psum`` return each shard its own gradient rows. Each device computes every shard's
    rows: interpret mode is a test path, not a fast one. The compiled GPU kernel does not take
    this detour.
    """
    idx, p = jax.lax.axis_index(axes), jax.lax.axis_size(axes)

    def gather(x):
        if x is None:
            return None
        boolean = x.dtype == jnp.bool_
        y = x.astype(jnp.int8) if boolean else x
        whole = jax.lax.psum(jnp.zeros((p, *y.shape), y.dtype).at[idx].set(y), axes)
        whole = whole.reshape(p * y.shape[0], *y.shape[1:])
        return whole != 0 if boolean else whole

    out = rows(gather(a), gather(b), gather(where)).reshape(p, a.shape[0])
    return out[idx]
