"""Fused large-vocabulary divergences: O(N) extra memory for [N, V] logits.

- :func:`kl_from_prepared_logits` — the ``impl="chunked"``/``"pallas"`` paths of
  :func:`kldiv.kl_from_logits` (custom VJPs that save only the inputs and per-row statistics);
  ``impl="auto"`` resolves through :func:`choose_logits_impl`.
- :func:`fused_linear_kl` — KL/reverse KL/JSD between two linear heads (``hidden @ weight``)
  without materialising either ``[N, V]`` logits tensor, with an optional hard-label
  cross-entropy term in the same pass.

Every path computes the same elementwise numerics as :mod:`kldiv.discrete`
(``kldiv._numerics.logits_stats``/``logits_terms``/``kl_terms``) on inputs cast, tempered and
masked by the same ``kldiv.discrete.temper_and_mask`` (per row chunk or vocabulary block here, so
no ``[N, V]`` copy of the inputs in the compute dtype is made), so ``where``, temperature and edge
semantics are identical.
"""

from __future__ import annotations

import jax

from kldiv.discrete import kl_logits_aligned, static_temperature, temper_and_mask_pair
from kldiv.fused.chunked import kl_logits_chunked
from kldiv.fused.linear import DIRECTIONS, fused_linear_kl

__all__ = [
    "AUTO_CHUNKED_MIN_ELEMENTS",
    "DIRECTIONS",
    "choose_logits_impl",
    "fused_linear_kl",
    "kl_from_prepared_logits",
]

# "auto" uses the chunked path on CPU/TPU from this many logits per input (N·V) on; below it the
# plain XLA path, which also supports forward-mode differentiation. Measured on a 2-core x86 CPU
# (bench/suites/fused.py, case "crossover", forward+backward): chunked is ~10% faster at 2^16
# logits, 1.3-1.9× at 2^18-2^20 and 2-4× from 2^22 on, where the XLA path's [N, V]
# intermediates leave the cache.
AUTO_CHUNKED_MIN_ELEMENTS = 2**18


def choose_logits_impl(shape: tuple[int, ...], dtype=None, backend: str | None = None) -> str:
    """The implementation ``impl="auto"`` picks for prepared logits of ``shape``.

    ``"pallas"`` on GPU; ``"chunked"`` on CPU/TPU when N·V ≥ ``AUTO_CHUNKED_MIN_ELEMENTS``;
    else ``"xla"``. ``backend`` defaults to ``jax.default_backend()``.
    """
    del dtype
    backend = jax.default_backend() if backend is None else backend
    size = 1
    for d in shape:
        size *= int(d)
    if size == 0:
        return "xla"
    if backend in ("gpu", "cuda", "rocm"):
        return "pallas"
    return "chunked" if size >= AUTO_CHUNKED_MIN_ELEMENTS else "xla"


def kl_from_prepared_logits(
    a: jax.Array,
    b: jax.Array,
    impl: str = "auto",
    *,
    where: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """KL(softmax(a/T)‖softmax(b/T)) along the last axis of aligned logits.

    Args:
      a, b: logits of one shape ``[..., V]`` (event axis last, as returned by
        ``kldiv.discrete.align_pair`` or ``prepare_logits``), each in its storage dtype; they are
        cast to the compute dtype (``kldiv._checks.compute_dtype``) per chunk or block.
      impl: ``"auto"`` (see :func:`choose_logits_impl`), ``"xla"``, ``"chunked"`` (row chunks,
        custom VJP) or ``"pallas"`` (Triton kernel on GPU; interpret mode elsewhere — slow,
        meant for tests on small shapes).
      where: boolean mask of the inputs' shape, or None; masked entries count as −inf logits.
      temperature: a Python number is applied per chunk/block by the fused paths; an array
        (traced) temperature is applied to the whole inputs here (a full copy in the compute
        dtype), so that its gradient flows through ordinary autodiff.

    Returns:
      KL per row in the compute dtype; gradients w.r.t. ``a``/``b`` in their own dtypes.
    """
    if impl == "auto":
        impl = choose_logits_impl(a.shape, a.dtype)
    if impl == "xla":
        return kl_logits_aligned(a, b, where, temperature)
    t = static_temperature(temperature)
    if t is None:  # an array temperature: applied here, so that its gradient flows (full copy)
        a, b = temper_and_mask_pair(a, b, temperature)
        t = 1.0
    if impl == "chunked":
        return kl_logits_chunked(a, b, where=where, temperature=t)
    if impl == "pallas":
        from kldiv.fused.pallas import kl_logits_pallas  # Pallas imports only when used.

        return kl_logits_pallas(a, b, where=where, temperature=t)
    raise ValueError(f"kldiv: unknown impl {impl!r}; allowed: auto, xla, chunked, pallas")
